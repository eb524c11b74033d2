"""Review of fa5c231..HEAD (the lock-lapsed abandon, the 'tried' marker, the create lease's send window): faults
these changes bring in. Each test fails on the code it was written against; its docstring says what the user sees
and what they should see. Parts: the real function adapter and outcome log in Azurite, the fake delivery and the
Service Bus stand-ins of tests/function."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from tests.delivery.conftest import Rig, maps, rig_factory
from tests.function.conftest import FakeFactory, MockMessageActions, RecordingScheduler, rows_of
from tests.function.helpers import create_body, new_id
from tests.reliability.broker import SimMessage
from tests.reliability.conftest import BundleFault, Row
from writeback import functions
from writeback.pipeline import Envelope

__all__ = ["maps", "rig_factory"]  # the delivery rig's fixtures


async def test_a_message_abandoned_because_its_lock_is_nearly_over_has_an_outcome_row(
        outcome_env: str, fake_factory: FakeFactory, scheduler: RecordingScheduler,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A busy worker hands over a patient's Create with 1.2 s of its lock left (FHIR_TIMEOUT_SECONDS = 1). Since
    1634771 `FunctionApp._process` abandons it unworked (right), but it records nothing in the outcome log: the only
    trace is an Application Insights record, which names `deadline-reached` though no deadline was reached. The
    abandon makes Service Bus redeliver at once, burning a delivery (no retry delay), so an instance that stays
    behind abandons it again on every delivery until Service Bus dead-letters it `MaxDeliveryCountExceeded`, and
    `python -m writeback logs --record <id>` shows nothing at all for the row. docs/operations.md section 1: "Every
    outcome is also a row in the outcome log" (the one exception being a fault in the OUTCOMES_* settings). What the
    administrator should see: one row per such try (`retry`, with a reason that says the lock was nearly over)."""
    monkeypatch.setenv("FHIR_URL", "http://127.0.0.1:9/fhir")
    monkeypatch.setenv("FHIR_TIMEOUT_SECONDS", "1")
    app = functions.FunctionApp(delivery_factory=fake_factory, scheduler_factory=scheduler.factory)
    record = new_id()
    now = datetime.now(UTC)
    message = SimMessage(create_body(record), "late-1", {}, now - timedelta(minutes=5),
                         locked_until_utc=now + timedelta(seconds=1.2))
    actions = MockMessageActions()
    try:
        await app.handle_batch([message], actions)
    finally:
        await app.aclose()
    assert [c.kind for c in actions.calls] == ["abandon"] and fake_factory.delivery.plans == []
    rows = await rows_of(record)
    assert [(r.outcome, r.settlement) for r in rows] != [], (
        "a message abandoned unworked (its lock nearly over) left no row in the outcome log")


# ---- the create lease's send window applied to a wave's updates -------------------------------------------------


async def test_updates_sent_in_a_wave_with_a_create_are_not_refused_for_the_create_leases_window(
        rig_factory: Callable[..., Rig]) -> None:
    """One invocation's batch: three saves of patients already in FHIR and one new patient's Create, written in one
    wave (`BatchDelivery._write`). Since 64079cf the wave's whole `send` carries the create lease's `SendWindow`,
    and `FhirClient.request` refuses every request of it past `not_after` (FHIR_RETRY_MAX_SECONDS from the lease),
    including the bundles that hold only If-Match updates, which no lease protects and which are safe to send at any
    time. Under load (bundles waiting for a slot of WRITEBACK_MAX_CONCURRENCY, a slow server or 429s) the updates
    end `fhir-unavailable` ("was not sent: held up past the time its create lease allows") and are retried after a
    delay, though nothing was wrong with them; a large batch with a single Create in it has most of its updates
    refused on every try. Here: one bundle at a time, each taking 0.8 s, and FHIR_RETRY_MAX_SECONDS = 1. What the
    user should see: the three updates written (only the create's own requests bound by its lease)."""
    rig = rig_factory(FHIR_RETRY_MAX_SECONDS="1", FHIR_TIMEOUT_SECONDS="5", WRITEBACK_BUNDLE_SIZE="1",
                      WRITEBACK_MAX_CONCURRENCY="1")
    old = [Row() for _ in range(3)]
    for row in old:
        made = await rig.send(row.create())
        assert made.state == "written", made.detail
    new = Row()
    rig.transport.add(BundleFault(holding="update", delay=0.8, times=-1))
    bodies = [row.update(lastname=f"Later-{n}") for n, row in enumerate(old)] + [new.create()]
    results = await rig.pipeline.process_many([Envelope(json.dumps(body).encode()) for body in bodies])
    updates = [(r.state, r.reason.value if r.reason else None, r.detail) for r in results[:3]]
    assert all(state == "written" for state, _, _ in updates), (
        f"updates of patients already in FHIR, in a wave with one Create, ended {updates}")
