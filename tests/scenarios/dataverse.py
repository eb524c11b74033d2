"""Dataverse's side of a hospital sequence: rows that people (or the FHIR→Dataverse sync) save, and the messages the
service endpoint posts for each save, shaped as a plug-in step registered on Create and Update with a pre-image
and a post-image of all columns sends them.

It stands in for Dataverse, which cannot run here. What it keeps to: `versionnumber` grows across the
organisation with every save; a Create's Target holds every column the new row has; an Update's Target holds
the changed columns (and `modifiedon`, `versionnumber`), the pre-image the row before, the post-image the row
after; each body nests the ParentContext of the same operation at stage 30, as the public samples do; images
and Targets leave out empty columns; a save by the sync's application user (an ingest through the upsert API) is
posted like any other; a bulk operation (UpdateMultiple) posts one message per row under one
RequestId.
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from devtools.messages import Choice, Lookup, context, inside

CLINICIAN = "3f0c6a2e-8d1b-4e5f-a6b7-c8d9e0f1a2b3"
SYNC_USER = "9e7d5c3b-1a2f-4e6d-8c0b-7a5f3e1d9c2b"  # the FHIR→Dataverse sync's application user
PATIENT, PRACTITIONER = Choice(935000000), Choice(935000001)
MRN = "http://hospital.example.org/mrn"
SSN = "http://hl7.org/fhir/sid/us-ssn"
T0 = datetime(2026, 11, 30, 8, 0, tzinfo=UTC)
_KEYS = {"contact": "contactid", "msemr_medicalidentifier": "msemr_medicalidentifierid",
         "msemr_encounter": "msemr_encounterid", "msemr_observation": "msemr_observationid"}


def new_id() -> str:
    return str(uuid.uuid4())

CODE_HEART_RATE = "1d4f7a29-8c3e-4b6a-9f2d-5e0c8b1a7f87"  # a row of msemr_codeableconcept


@dataclass
class Sent:
    """One message as Dataverse posted it, and the row's state right after that save."""

    body: dict[str, Any]
    table: str
    row_id: str
    version: int
    state: dict[str, Any]
    raw: bytes | None = None  # the body's exact text, where it matters (a decimal as Dataverse wrote it)

    def bytes(self) -> bytes:
        return self.raw if self.raw is not None else json.dumps(self.body).encode()


@dataclass
class Dataverse:
    rows: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    sent: list[Sent] = field(default_factory=list)
    _versions: Iterator[int] = field(default_factory=lambda: itertools.count(5000))
    _clock: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def _stamp(self) -> tuple[int, datetime]:
        return next(self._versions), T0 + timedelta(seconds=next(self._clock))

    def create(self, table: str, row_id: str, columns: Mapping[str, Any], *, user: str = CLINICIAN,
               request_id: str | None = None) -> Sent:
        version, when = self._stamp()
        row = {_KEYS[table]: row_id, **{k: v for k, v in columns.items() if v is not None},
               "versionnumber": version, "modifiedon": when}
        self.rows[(table, row_id)] = row
        body = context("Create", table, row_id, row, post=row, user_id=user, request_id=request_id, created=when,
                       parent=inside("Create", table, row_id, user_id=user, request_id=request_id, created=when))
        return self._sent(body, table, row_id, version, row)

    def update(self, table: str, row_id: str, changes: Mapping[str, Any], *, user: str = CLINICIAN,
               request_id: str | None = None) -> Sent:
        before = self.rows[(table, row_id)]
        version, when = self._stamp()
        after = {**before, **changes, "versionnumber": version, "modifiedon": when}
        after = {k: v for k, v in after.items() if v is not None}
        self.rows[(table, row_id)] = after
        target = {**changes, "versionnumber": version, "modifiedon": when}
        body = context("Update", table, row_id, target, pre=before, post=after, user_id=user,
                       request_id=request_id, created=when,
                       parent=inside("Update", table, row_id, user_id=user, request_id=request_id, created=when))
        return self._sent(body, table, row_id, version, after)

    def _sent(self, body: dict[str, Any], table: str, row_id: str, version: int, row: dict[str, Any]) -> Sent:
        sent = Sent(body, table, row_id, version, dict(row))
        self.sent.append(sent)
        return sent

    def row(self, table: str, row_id: str) -> dict[str, Any]:
        return self.rows[(table, row_id)]

    # ---- the healthcare tables ------------------------------------------------------------------------

    def patient(self, *, consent: bool = True, user: str = CLINICIAN, fhir_id: str | None = None,
                **columns: Any) -> tuple[str, Sent]:
        row_id = new_id()
        row: dict[str, Any] = {"msemr_contacttype": PATIENT, "msemr_azurefhirsyncenabled": consent,
                               "firstname": "Wren", "lastname": "Castellanos", "birthdate": date(1981, 4, 12),
                               "gendercode": Choice(2), "telephone1": "+1 555 0100",
                               "msemr_azurefhirid": fhir_id, **columns}
        return row_id, self.create("contact", row_id, row, user=user)

    def identifier(self, patient: str, system: str | None, value: str, *, user: str = CLINICIAN,
                   **columns: Any) -> tuple[str, Sent]:
        row_id = new_id()
        row = {"msemr_assignee": Lookup("contact", patient), "msemr_identifiersystem": system, "msemr_value": value,
               **columns}
        return row_id, self.create("msemr_medicalidentifier", row_id, row, user=user)

    def observation(self, patient: str, encounter: str | None = None, *, user: str = CLINICIAN,
                    **columns: Any) -> tuple[str, Sent]:
        """A heart-rate observation of the patient (in the encounter), its code a row of the code table."""
        row_id = new_id()
        row: dict[str, Any] = {"msemr_status": Choice(935000002),
                               "msemr_code": Lookup("msemr_codeableconcept", CODE_HEART_RATE),
                               "msemr_subjecttypepatient": Lookup("contact", patient),
                               "msemr_effectivetypedatetime": T0, "msemr_valuetypequantityvalue": 72.5,
                               "msemr_valuequantityunit": "beats/minute", **columns}
        if encounter is not None:
            row["msemr_conexttypeencounter"] = Lookup("msemr_encounter", encounter)
        return row_id, self.create("msemr_observation", row_id, row, user=user)

    def encounter(self, patient: str, *, user: str = CLINICIAN, **columns: Any) -> tuple[str, Sent]:
        row_id = new_id()
        row: dict[str, Any] = {"msemr_encounterstatus": Choice(935000003), "msemr_encounterclass": Choice(935000001),
                               "msemr_subjectpatient": Lookup("contact", patient),
                               "msemr_encounterstartdate": T0, **columns}
        return row_id, self.create("msemr_encounter", row_id, row, user=user)
