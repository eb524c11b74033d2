"""Dataverse message bodies for the function and outcome-log tests (fictional people, fresh row ids)."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime

from devtools.messages import Choice, context
from writeback.decide import WritePlan
from writeback.errors import WritebackError
from writeback.pipeline import Delivered, Issue
from writeback.reasons import Reason

PATIENT, RELATED = Choice(935000000), Choice(935000002)
CLINICIAN = "3f0c6a2e-8d1b-4e5f-a6b7-c8d9e0f1a2b3"
FIRST, LAST = "Ottilie", "Vandersloot"  # values that must never appear in a log row


def new_id() -> str:
    return str(uuid.uuid4())


def patient(record_id: str, version: int | None = None, modified: datetime | None = None,
            **changes: object) -> dict[str, object]:
    row: dict[str, object] = {"contactid": record_id, "msemr_contacttype": PATIENT,
                              "msemr_azurefhirsyncenabled": True, "firstname": FIRST, "lastname": LAST,
                              "gendercode": Choice(2)}
    if version is not None:
        row["versionnumber"] = version
    if modified is not None:
        row["modifiedon"] = modified
    row.update(changes)
    return row


def create_body(record_id: str, version: int | None = 1, request_id: str | None = None,
                modified: datetime | None = None) -> bytes:
    row = patient(record_id, version, modified)
    return json.dumps(context("Create", "contact", record_id, row, post=row, request_id=request_id)).encode()


def update_body(record_id: str, version: int | None, request_id: str | None = None,
                modified: datetime | None = None, **changes: object) -> bytes:
    """An Update with pre and post images, changing `changes` (default: the telephone)."""
    changes = changes or {"telephone1": f"+1 206 555 {version or 0:04d}"}
    pre = patient(record_id, (version or 1) - 1 if version else None)
    post = patient(record_id, version, modified, **changes)
    target = {**changes, **({"versionnumber": version} if version is not None else {})}
    return json.dumps(context("Update", "contact", record_id, target, pre=pre, post=post,
                              request_id=request_id)).encode()


def target_only_body(record_id: str, version: int | None, request_id: str | None = None,
                     modified: datetime | None = None, **changes: object) -> bytes:
    """An Update from a step registered without images: the Target holds the changed columns only (here with
    the contact type and consent, which such a step must send for a contact to be written at all)."""
    changes = changes or {"telephone1": f"+1 206 555 {version or 0:04d}"}
    target: dict[str, object] = {"msemr_contacttype": PATIENT, "msemr_azurefhirsyncenabled": True, **changes}
    if version is not None:
        target["versionnumber"] = version
    if modified is not None:
        target["modifiedon"] = modified
    return json.dumps(context("Update", "contact", record_id, target, request_id=request_id)).encode()


def reject_body(record_id: str) -> bytes:
    """A contact whose images leave its Contact Type out: `invalid-contact-type` (permanent)."""
    row = patient(record_id, 1)
    del row["msemr_contacttype"]
    return json.dumps(context("Create", "contact", record_id, row, post=row)).encode()


def related_body(record_id: str) -> bytes:
    """A related person (next of kin): skipped `no-entity-map`, a type the contact map does not write."""
    row = patient(record_id, 1, msemr_contacttype=RELATED)
    return json.dumps(context("Create", "contact", record_id, row, post=row)).encode()


def consent_body(record_id: str) -> bytes:
    """A patient without consent: skipped `consent-withheld`."""
    row = patient(record_id, 1, msemr_azurefhirsyncenabled=False)
    return json.dumps(context("Create", "contact", record_id, row, post=row)).encode()


@dataclass
class FakeDelivery:
    """A stand-in for the FHIR delivery (settlement and ledger tests only; the e2e tests use the real one).

    `fail` is a queue of reasons to raise on the next calls; `issues` are returned with every success.
    """

    fail: list[Reason] = field(default_factory=list)
    issues: tuple[Issue, ...] = ()
    plans: list[WritePlan] = field(default_factory=list)

    async def deliver(self, plan: WritePlan) -> Delivered:
        self.plans.append(plan)
        if self.fail:
            reason = self.fail.pop(0)
            raise WritebackError(reason, f"fake delivery failed with {reason.value}")
        n = len(self.plans)
        return Delivered(f"Patient/fake{n}/_history/1", f"Provenance/fakeprov{n}/_history/1", self.issues)
