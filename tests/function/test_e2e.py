"""End to end: Service Bus message → the real function → the FHIR dev server → rows in Azurite.

Nothing is faked but the settlement API (MockMessageActions; Service Bus settlement needs the Functions host).
"""

from __future__ import annotations

import gc
from typing import Any

import httpx

from tests.function.conftest import ROW_SYSTEM, MockMessageActions, UserFunction, patients_of, rows_of
from tests.function.helpers import FIRST, LAST, consent_body, create_body, new_id, reject_body, update_body
from tests.function.sb import received_message
from writeback import functions
from writeback.collector import GC_YOUNG_THRESHOLD
from writeback.outcomes import OutcomeRow, OutcomeStore, outcome_settings


async def deliver(fn: UserFunction, body: bytes, **kw: Any) -> MockMessageActions:
    actions = MockMessageActions()
    await fn(messages=[received_message(body, **kw)], message_actions=actions)
    return actions


async def test_written(live_app: functions.FunctionApp, user_function: UserFunction, fhir: httpx.Client) -> None:
    record = new_id()
    actions = await deliver(user_function, create_body(record, version=1), message_id="e2e-written")
    assert actions.only.kind == "complete"
    [row] = await rows_of(record)
    assert (row.outcome, row.reason, row.settlement, row.message_id) == ("written", None, "complete", "e2e-written")
    assert row.resource and row.resource.startswith("Patient/") and "/_history/" in row.resource
    assert row.provenance and row.provenance.startswith("Provenance/")
    resource = fhir.get(f"/{row.resource}").json()
    assert resource["name"][0]["family"] == LAST
    assert {"system": ROW_SYSTEM, "value": record} in [
        {"system": i.get("system"), "value": i.get("value")} for i in resource["identifier"]]
    provenance = fhir.get(f"/{row.provenance.split('/_history/')[0]}").json()
    assert provenance["resourceType"] == "Provenance"
    assert any(t["reference"].startswith(row.resource.split("/_history/")[0]) for t in provenance["target"])
    assert FIRST not in repr(row) and LAST not in repr(row)
    # The long-lived objects built by the first invocation are out of the cyclic collector's reach, and young
    # collections no longer run every few messages.
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold()[0] == GC_YOUNG_THRESHOLD
    assert gc.isenabled()  # paused while the invocation ran (`collector.paused`), and back once it ended


async def test_skipped(live_app: functions.FunctionApp, user_function: UserFunction, fhir: httpx.Client) -> None:
    record = new_id()
    actions = await deliver(user_function, consent_body(record))
    assert actions.only.kind == "complete"
    assert [(r.outcome, r.reason) for r in await rows_of(record)] == [("skipped", "consent-withheld")]
    assert patients_of(fhir, record) == []


async def test_duplicate(live_app: functions.FunctionApp, user_function: UserFunction, fhir: httpx.Client) -> None:
    record, request = new_id(), new_id()
    body = create_body(record, version=1, request_id=request)
    first = await deliver(user_function, body, message_id="dup-1")
    second = await deliver(user_function, body, message_id="dup-2")
    assert first.only.kind == "complete" and second.only.kind == "complete"
    assert [(r.outcome, r.reason) for r in await rows_of(record)] == [("skipped", "duplicate"), ("written", None)]
    assert len(patients_of(fhir, record)) == 1


async def test_stale(live_app: functions.FunctionApp, user_function: UserFunction, fhir: httpx.Client) -> None:
    record = new_id()
    created = await deliver(user_function, create_body(record, version=1))
    newer = await deliver(user_function, update_body(record, 3, telephone1="+1 206 555 0303"))
    older = await deliver(user_function, update_body(record, 2, telephone1="+1 206 555 0202"))
    assert [a.only.kind for a in (created, newer, older)] == ["complete"] * 3
    assert [(r.outcome, r.reason) for r in await rows_of(record)] == [
        ("skipped", "stale"), ("written", None), ("written", None)]
    [patient] = patients_of(fhir, record)
    phones = [t["value"] for t in patient.get("telecom", []) if t.get("system") == "phone"]
    assert "+1 206 555 0303" in phones and "+1 206 555 0202" not in phones


async def test_dead_lettered(live_app: functions.FunctionApp, user_function: UserFunction,
                             fhir: httpx.Client) -> None:
    record = new_id()
    actions = await deliver(user_function, reject_body(record), message_id="e2e-dead")
    assert (actions.only.kind, actions.only.reason) == ("deadletter", "invalid-contact-type")
    [row] = await rows_of(record)
    assert (row.outcome, row.status, row.reason, row.settlement) == (
        "dead-lettered", "failed", "invalid-contact-type", "deadletter")
    assert patients_of(fhir, record) == []
    assert row.row_key in {r.row_key for r in await _failed()}


async def _failed() -> list[OutcomeRow]:
    async with OutcomeStore.from_settings(outcome_settings()) as store:
        return await store.query(status="failed")


async def test_fhir_rejection_dead_letters(live_app: functions.FunctionApp, user_function: UserFunction) -> None:
    """An update of a resource the server does not have (its FHIR id column names a missing one)."""
    record = new_id()
    body = update_body(record, 2, telephone1="+1 206 555 0404", msemr_azurefhirid="no-such-patient-" + record[:8])
    actions = await deliver(user_function, body)
    assert actions.only.kind == "deadletter"
    assert actions.only.reason in ("target-missing", "fhir-rejected")
