"""Patient data never leaks: recognisable canary values in every patient field go through success, skip, reject
and every failure path of the write path (FHIR batch bundles: faults on whole bundles and on single entries,
whose OperationOutcomes echo the canaries as servers do); logs (all loggers, DEBUG), every outcome-table entity,
dead-letter descriptions (Result.detail/reason), exception texts and CLI output are searched for them."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import traceback
import uuid
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import httpx
from azure.data.tables import TableServiceClient

from devtools.faults import EntryFault, Fault
from devtools.messages import Choice, context
from devtools.services import Azurite
from tests.delivery.conftest import Fhir, Rig, create_message, new_patient, update_message
from tests.reliability.conftest import BundleFault
from tests.reliability.figures import FIGURES
from writeback.errors import WritebackError
from writeback.outcomes import OutcomeStore
from writeback.pipeline import Envelope, Pipeline, Result
from writeback.reasons import Reason
from writeback.settings import Settings

REPO = Path(__file__).resolve().parents[2]
CANARY = {
    "firstname": "Qzcanaryfirst", "middlename": "Qzcanarymiddle", "lastname": "Qzcanarylast",
    "telephone1": "+1 555 7301 999", "mobilephone": "+1 555 7302 888", "emailaddress1": "qzcanary.mail@example.org",
    "address1_line1": "77 Qzcanarystreet", "address1_city": "Qzcanarycity", "address1_postalcode": "QZ7731",
    "address1_stateorprovince": "Qzcanarystate", "address1_country": "Qzcanaryland",
    "msemr_azurefhirid": None,
}
BIRTHDATE = date(1911, 3, 17)
NEEDLES = [v for v in CANARY.values() if v] + ["1911-03-17", "Qzcanary", "7301 999", "7302 888", "QZ7731"]


def canary_row(**extra: Any) -> tuple[str, dict[str, Any]]:
    return new_patient(**{**{k: v for k, v in CANARY.items() if v is not None}, "birthdate": BIRTHDATE, **extra})


def echo(status: int) -> dict[str, Any]:
    """An error OperationOutcome that echoes the patient's values, as servers do in diagnostics."""
    return {"resourceType": "OperationOutcome", "issue": [{
        "severity": "error", "code": "invalid", "diagnostics": f"bad value {' '.join(NEEDLES)} (HTTP {status})",
        "details": {"text": CANARY["lastname"]}, "expression": ["Patient.name"]}]}


def leaks(text: str) -> list[str]:
    return [n for n in NEEDLES if n.lower() in text.lower()]


async def test_no_canary_in_logs_outcomes_dead_letters_exceptions_or_cli(
        rig_factory: Callable[..., Rig], fhir: Fhir, azurite_tables: Azurite, caplog: Any, tmp_path: Path):
    caplog.set_level(logging.DEBUG)  # every logger, every level
    logging.getLogger().setLevel(logging.DEBUG)
    prefix = "can" + uuid.uuid4().hex[:12]
    store_settings = Settings(outcomes_connection_string=azurite_tables.connection_string,
                              outcomes_table_prefix=prefix)
    texts: dict[str, str] = {}
    results: dict[str, Result] = {}

    async with OutcomeStore.from_settings(store_settings, retry_total=1, retry_backoff=0.05) as store:

        async def run(name: str, body: bytes | str | dict[str, Any], *faults: Fault | EntryFault,
                      expect: set[Reason | None], delivery_count: int = 1, **overrides: str) -> Result:
            rig = rig_factory(**overrides)
            for fault in faults:
                if isinstance(fault, EntryFault):
                    rig.transport.add_entry(fault)
                else:
                    rig.transport.add(fault)
            pipeline = Pipeline(rig.pipeline.maps, rig.settings, rig.pipeline.delivery, store)
            raw = json.dumps(body).encode() if isinstance(body, dict) else body
            envelope = Envelope(raw, message_id=uuid.uuid4().hex, delivery_count=delivery_count)
            result = await pipeline.process(envelope)
            assert result.reason in expect, (name, result.reason, result.detail)
            results[name] = result
            texts[f"{name}: result"] = f"{result.state} {result.reason} {result.detail} {result.issues!r}"
            # The exception the delivery raised, as a traceback would show it.
            plan = result.decision.plan
            if plan is not None and result.state != "written":
                try:
                    await rig.pipeline.delivery.deliver(plan)  # type: ignore[union-attr]
                except WritebackError as exc:
                    texts[f"{name}: exception"] = "".join(traceback.format_exception(exc)) + repr(exc)
            FIGURES["canary_paths"] += 1
            return result

        row_id, row = canary_row()
        created = create_message(row_id, row)
        await run("written", created, expect={None})
        await run("duplicate", created, expect={Reason.DUPLICATE})  # the same message posted twice
        await run("redelivered-create", create_message(row_id, row, request_id=str(uuid.uuid4())),
                  expect={Reason.NO_CHANGE})  # another request of the same row version: already there
        v11 = {**row, "telephone1": "+1 555 7301 999 0", "versionnumber": 11}
        await run("updated", update_message(row_id, row, {"telephone1": "+1 555 7301 999 0", "versionnumber": 11}),
                  expect={None})
        await run("no-change", update_message(row_id, v11, {"versionnumber": 12}), expect={Reason.NO_CHANGE})
        await run("stale", update_message(row_id, {**row, "versionnumber": 9},
                                          {"lastname": "Qzcanarylast-Old", "versionnumber": 10}),
                  expect={Reason.STALE})  # a state older than the one on the server, arriving late
        _, no_consent = canary_row(msemr_azurefhirsyncenabled=False)
        await run("consent-withheld", create_message(no_consent["contactid"], no_consent),
                  expect={Reason.CONSENT_WITHHELD})
        _, bad_type = canary_row(msemr_contacttype="Qzcanarytype")  # a canary where the type's choice belongs
        await run("invalid-contact-type", create_message(bad_type["contactid"], bad_type),
                  expect={Reason.INVALID_CONTACT_TYPE})
        _, other_type = canary_row(msemr_contacttype=Choice(4242))
        await run("no-entity-map (a type the map does not write)", create_message(other_type["contactid"],
                                                                                 other_type),
                  expect={Reason.NO_ENTITY_MAP})
        _, bad_value = canary_row(birthdate="1911-02-3Qzcanary")  # a canary in a value FHIR refuses
        await run("invalid-resource", create_message(bad_value["contactid"], bad_value),
                  expect={Reason.INVALID_RESOURCE, Reason.MALFORMED_MESSAGE})
        _, bad_email = canary_row(emailaddress1=["Qzcanary.list@example.org"], gendercode=Choice(9))
        await run("invalid-resource-2", create_message(bad_email["contactid"], bad_email),
                  expect={Reason.INVALID_RESOURCE, Reason.MALFORMED_MESSAGE, None})
        text = json.dumps(create_message(*canary_row()))
        await run("malformed", text[: len(text) // 2].encode(), expect={Reason.MALFORMED_MESSAGE})
        await run("malformed-2", text.replace('"Attributes"', '"Attributes" "', 1).encode(),
                  expect={Reason.MALFORMED_MESSAGE})
        # The server refuses one entry (its OperationOutcome echoes the values), or the whole bundle.
        await run("fhir-rejected", create_message(*canary_row()),
                  EntryFault(method="PUT", url_contains="Patient/", status=422, outcome=echo(422), times=-1),
                  expect={Reason.FHIR_REJECTED})
        await run("fhir-rejected-bundle", create_message(*canary_row()),
                  BundleFault(holding="create", status=400, body=echo(400), times=-1), expect={Reason.FHIR_REJECTED})
        await run("fhir-unavailable", create_message(*canary_row()),
                  Fault(method="POST", path_endswith="/R4", status=503, body=echo(503), times=-1),
                  expect={Reason.FHIR_UNAVAILABLE})
        await run("fhir-unavailable-entry", create_message(*canary_row()),
                  EntryFault(method="GET", url_contains="Patient", status=503, outcome=echo(503), times=-1),
                  expect={Reason.FHIR_UNAVAILABLE})
        await run("connection-reset", create_message(*canary_row()),
                  Fault(method="POST", path_endswith="/R4", error=httpx.ReadError, times=-1),
                  expect={Reason.FHIR_UNAVAILABLE})
        await run("conflict", update_message(row_id, v11, {"lastname": "Qzcanarylast-Two", "versionnumber": 20}),
                  EntryFault(method="PUT", url_contains="Patient/", status=412, outcome=echo(412), times=-1),
                  expect={Reason.CONFLICT})
        await run("provenance-failed", create_message(*canary_row()),
                  EntryFault(method="PUT", url_contains="Provenance/", status=500, outcome=echo(500), times=-1),
                  expect={Reason.PROVENANCE_FAILED})
        await run("provenance-rejected", create_message(*canary_row()),
                  EntryFault(method="PUT", url_contains="Provenance/", status=400, outcome=echo(400), times=-1),
                  expect={Reason.PROVENANCE_FAILED})
        owing = create_message(*canary_row())
        await run("provenance-bundle-failed", owing,
                  BundleFault(holding="provenance", status=500, body=echo(500), times=-1),
                  expect={Reason.PROVENANCE_FAILED})
        # Its retry finds its version in place and owes that version's Provenance, which still fails.
        await run("provenance-owed", owing,
                  EntryFault(method="PUT", url_contains="Provenance/", status=400, outcome=echo(400), times=-1),
                  expect={Reason.PROVENANCE_FAILED}, delivery_count=2)
        await run("unauthorized", create_message(*canary_row()),
                  Fault(method="POST", path_endswith="/R4", status=403, body=echo(403), times=-1),
                  expect={Reason.UNAUTHORIZED})
        await run("bad-secret", create_message(*canary_row()), expect={Reason.UNAUTHORIZED},
                  FHIR_CLIENT_SECRET="Qzcanary-secret")
        missing_id, missing = canary_row()
        # Without images (Target only) nothing but the changed columns is known: it waits for the row's Create.
        await run("target-pending", context("Update", "contact", missing_id, {
            "lastname": "Qzcanarylast-Gone", "msemr_contacttype": Choice(935000000),
            "msemr_azurefhirsyncenabled": True, "versionnumber": 11}), expect={Reason.TARGET_PENDING})
        await run("target-missing-by-id", update_message(missing_id, {**missing, "msemr_azurefhirid": "gone-1"},
                                                         {"lastname": "Qzcanarylast-Gone", "versionnumber": 11}),
                  EntryFault(method="GET", url_contains="Patient/gone-1", status=404, outcome=echo(404), times=-1),
                  expect={Reason.TARGET_MISSING})

    # Every entity of every table with the prefix.
    with TableServiceClient.from_connection_string(azurite_tables.connection_string) as service:
        tables = [t.name for t in service.list_tables() if t.name.startswith(prefix)]
        assert len(tables) == 4
        for name in tables:
            entities = list(service.get_table_client(name).list_entities())
            assert entities or name.endswith(("messages", "rowstate"))
            texts[f"table {name}"] = json.dumps([dict(e) for e in entities], default=str)

    texts["logs"] = "\n".join(f"{r.name} {r.levelname} {r.getMessage()} {r.__dict__!r}" for r in caplog.records)

    # The CLI's dry run on canary files.
    for name, body in {
        "write": create_message(*canary_row()),
        "skip": create_message(*canary_row(msemr_azurefhirsyncenabled=False)),
        "reject": create_message(*canary_row(msemr_contacttype=Choice(4242))),
        "invalid": create_message(*canary_row(birthdate="1911-02-3Qzcanary")),
    }.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(body))
        texts |= cli_output(name, path)
    malformed = tmp_path / "malformed.json"
    malformed.write_text(json.dumps(create_message(*canary_row()))[:900])
    texts |= cli_output("malformed", malformed)

    FIGURES["canary_places"] += len(texts)
    found = {where: leaks(text) for where, text in texts.items() if leaks(text)}
    FIGURES["leaked"] += sum(len(v) for v in found.values())
    assert not found, found
    assert results["written"].state == "written" and results["fhir-unavailable"].settlement == "reschedule"


def cli_output(name: str, path: Path) -> dict[str, str]:
    done = subprocess.run([sys.executable, "-m", "writeback", "plan", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode in (0, 1, 3, 4), (done.returncode, done.stderr[-500:])
    if name == "write":
        # The dry run prints the mapped resource on stdout: that is the product's output. Its detail must not.
        decision = json.loads(done.stdout)
        assert decision["decision"] == "write"
        assert leaks(json.dumps(decision["resource"])), "the canary row did not reach the mapped resource"
        return {f"cli {name} stderr": done.stderr, f"cli {name} detail": str(decision["detail"])}
    return {f"cli {name} stdout": done.stdout, f"cli {name} stderr": done.stderr}
