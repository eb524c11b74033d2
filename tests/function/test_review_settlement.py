"""Adversarial review of the settlement / retry-scheduling / deadline / outcome-recording path, with reproducers.

Each test fails on the code it was written against, for a reason a user would notice; its docstring says what the
user sees and what they should see. The outcome log is real (Azurite); the Service Bus queue is the project's
simulator (tests/reliability/broker.py: duplicate detection on MessageId, scheduled copies, a clock the test
drives), as no broker can run here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from azure.core.exceptions import ServiceResponseError

from devtools.services import Azurite
from tests.admin.test_admin_trial import DeadLetterBroker, run_cli
from tests.function.conftest import FakeFactory, MockMessageActions, RecordingScheduler, UserFunction, rows_of
from tests.function.helpers import create_body, new_id, reject_body, update_body
from tests.function.sb import received_message
from tests.function.test_settlement import redelivered
from tests.reliability.broker import SimMessage
from writeback import functions
from writeback.errors import WritebackError
from writeback.outcomes import OutcomeStore
from writeback.pipeline import Envelope, Result
from writeback.reasons import Reason
from writeback.settings import Settings


@pytest.fixture
async def broker_app(outcome_env: str, fake_factory: FakeFactory,
                     monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[DeadLetterBroker, functions.FunctionApp]]:
    """The function app (fake FHIR delivery, real outcome log) fed by the queue simulator, which also schedules its
    retry copies and keeps a dead-letter queue (so `resubmit` can run over it)."""
    monkeypatch.setenv("FHIR_URL", "http://127.0.0.1:9/fhir")
    broker = DeadLetterBroker(batch=10)
    app = functions.FunctionApp(delivery_factory=fake_factory, scheduler_factory=broker.scheduler_factory,
                                clock=broker.clock)
    broker.app = app
    monkeypatch.setattr(functions, "_APP", app)
    yield broker, app
    await app.aclose()


async def test_a_resubmitted_message_whose_first_try_fails_transiently_is_not_lost(
        broker_app: tuple[DeadLetterBroker, functions.FunctionApp], fake_factory: FakeFactory,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A patient's Create meets a 503 (retry copy `<id>~r1` scheduled), then on that retry a 422: dead-lettered
    `fhir-rejected`. The administrator fixes the server's profile and, five minutes later, runs `python -m writeback
    resubmit --reason fhir-rejected` as docs/operations.md says. The resubmitted copy drops `writeback-attempt` but
    keeps `writeback-original-message-id`, so when it meets one more 503 (the server restarting after the fix) its
    retry copy is named `<id>~r1` again: Service Bus's duplicate detection (10 minutes, the Bicep's default) drops it,
    and the resubmitted message is completed. What the user sees: the outcome log says `retry` / `reschedule`
    (retry_attempt 1), the dead-letter queue is empty, and the patient never reaches FHIR; nothing ever comes back.
    What they should see: the retry arrives and the patient is written."""
    broker, _ = broker_app
    record = new_id()
    fake_factory.delivery.fail = [Reason.FHIR_UNAVAILABLE, Reason.FHIR_REJECTED]
    seq = broker.send(create_body(record, version=3), record, message_id="dv-create-1")
    await broker.run()
    assert [(e.settlement, e.reason) for e in broker.ends[seq]] == [("deadletter", "fhir-rejected")]

    broker.now += timedelta(minutes=5)  # the alert fired; the profile is fixed
    code, _ = run_cli(monkeypatch, broker, "resubmit", "--reason", "fhir-rejected")
    assert code == 0 and not broker.dlq
    fake_factory.delivery.fail = [Reason.FHIR_UNAVAILABLE]  # one more 503 while the server restarts
    await broker.run()

    assert broker.duplicates_dropped == 0, "the resubmitted message's retry copy was dropped as a duplicate"
    assert [(e.settlement, e.state) for e in broker.ends[seq]] == [
        ("deadletter", "dead-lettered"), ("complete", "written")], "the resubmitted message was lost"



async def history(record_id: str) -> list[tuple[str, str | None]]:
    """The outcome rows of one Dataverse row, newest first: (outcome, reason)."""
    return [(r.outcome, r.reason) for r in await rows_of(record_id)]


async def test_a_message_first_delivered_after_a_long_backlog_is_retried_before_it_is_given_up(
        broker_app: tuple[DeadLetterBroker, functions.FunctionApp], fake_factory: FakeFactory) -> None:
    """The function app was stopped over a weekend (a failed deployment; the queue keeps messages 14 days, the
    Bicep's default). When it runs again it drains the backlog, and the FHIR service throttles the flood: a
    patient's Create, enqueued 25 hours ago and delivered now for the first time, meets one 429/503. It is
    dead-lettered at once as `retries-exhausted`, "Retried 0 time(s) over 25.0 h (WRITEBACK_RETRY_WINDOW_HOURS)
    without success", though it was never retried: README says the window counts "from its first delivery", and
    `retries-exhausted` means "a transient failure ... lasted through the whole retry window". The same happens to
    every message of the backlog that ends `deadline-reached` (never tried at all), `target-pending` (its patient's
    Create in a later batch) or `consent-unknown`. What the user sees: the dead-letter queue fills with
    `retries-exhausted` after the backlog. What they should see: a delayed copy, and the patient written on it."""
    broker, _ = broker_app
    record = new_id()
    fake_factory.delivery.fail = [Reason.FHIR_UNAVAILABLE]
    seq = broker.send(create_body(record, version=2), record, message_id="weekend-1")
    broker.now += timedelta(hours=25)  # the app was down; the message waited in the queue
    await broker.run()
    ends = [(e.settlement, e.state, e.reason) for e in broker.ends[seq]]
    assert ends == [("complete", "written", None)], f"ended {ends}: {broker.ends[seq][0].description}"


async def test_a_message_dead_lettered_while_table_storage_is_down_still_gets_its_outcome_row(
        fake_app: functions.FunctionApp, user_function: UserFunction, scheduler: RecordingScheduler,
        azurite_tables: Azurite) -> None:
    """Table Storage is unreachable for a minute (a storage failover). A contact without its Contact Type arrives:
    a permanent `invalid-contact-type`, decided without the ledger. Its outcome row cannot be written, and the
    message is dead-lettered anyway. A written or skipped message in the same outage becomes
    `outcome-store-unavailable` and is retried until its row is kept (docs/operations.md, section 2, "Outage"); a
    dead-lettered one is not. What the user sees: once Table Storage is back, `python -m writeback logs --status
    failed` (and `--record <id>`) shows nothing for a message sitting in the dead-letter queue, though section 1
    says every outcome is a row (the one exception being the OUTCOMES_* settings themselves). What they should
    see: the message retried as `outcome-store-unavailable` and dead-lettered once its row is written (or the row
    written on a later try)."""
    record = new_id()
    actions = MockMessageActions()
    azurite_tables.stop()
    try:
        await user_function(messages=[received_message(reject_body(record), message_id="no-type")],
                            message_actions=actions)
    finally:
        azurite_tables.start()
    settled = [actions.only]
    for copy in scheduler.copies:  # what was put back for a later try comes back once Table Storage is
        again = MockMessageActions()
        await user_function(messages=[redelivered(copy)], message_actions=again)
        settled.append(again.only)
    dead = [(s.kind, s.reason) for s in settled if s.kind == "deadletter"]
    assert dead == [("deadletter", "invalid-contact-type")]
    assert ("dead-lettered", "invalid-contact-type") in await history(record), (
        "the message is in the dead-letter queue, and the outcome log has no row for it")


async def test_a_message_abandoned_because_no_copy_could_be_scheduled_is_not_logged_as_rescheduled(
        fake_app: functions.FunctionApp, user_function: UserFunction, fake_factory: FakeFactory,
        scheduler: RecordingScheduler, actions: MockMessageActions, caplog: pytest.LogCaptureFixture) -> None:
    """The identity lost Azure Service Bus Data Sender: a message that met a 503 cannot have its copy scheduled and
    is abandoned (Service Bus redelivers it at once and, after MaxDeliveryCount, dead-letters it). docs/operations.md
    (section 1) says the outcome row's `Settlement` is then `abandon`, and that only a message "put back on the queue
    for a later try" has `retry_attempt` / `retry_at`. What the user sees: `logs --json` says `"settlement":
    "reschedule"` (a delayed copy was scheduled), and the Application Insights record carries `retry_at`, so the
    documented "Rows waiting for a retry" query lists it as waiting for a try that will never come. What they
    should see: `abandon` and no retry time in the record. (The outcome row is written before the copy is tried,
    so it says `reschedule`, what was decided: docs/operations.md, section 1.)"""
    record = new_id()
    fake_factory.delivery.fail = [Reason.FHIR_UNAVAILABLE]
    scheduler.fail = True
    caplog.set_level(logging.INFO, "writeback")
    await user_function(messages=[received_message(create_body(record), message_id="no-sender")],
                        message_actions=actions)
    assert actions.only.kind == "abandon"
    [row] = await rows_of(record)
    [rec] = [r for r in caplog.records if r.name == "writeback.function" and r.__dict__.get("outcome") == "retry"
             and r.__dict__.get("message_id") == "no-sender"]
    assert (row.settlement, rec.__dict__["settlement"], rec.__dict__.get("retry_at")) == ("reschedule", "abandon",
                                                                                           None)


def _late_retry(record: str, first_tried: datetime) -> Any:
    """A contact's update on its 95th retry copy, first tried at `first_tried`."""
    return received_message(update_body(record, 9), message_id="m~r95", application_properties={
        "writeback-attempt": 95, "writeback-first-tried": first_tried.isoformat(),
        "writeback-original-message-id": "m"})


async def _invoke(app: functions.FunctionApp, user_function: UserFunction, message: Any) -> MockMessageActions:
    """One invocation of the function with `message`; the app closed after it."""
    actions = MockMessageActions()
    try:
        await user_function(messages=[message], message_actions=actions)
    finally:
        await app.aclose()
    return actions


class _SlowLedger:
    """The real outcome store, whose `record` takes a moment of the app's clock (a Table Storage round trip)."""

    def __init__(self, store: OutcomeStore, tick: Callable[[], None]) -> None:
        self._store, self._tick = store, tick

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def record(self, envelope: Envelope, result: Result) -> None:
        await self._store.record(envelope, result)
        self._tick()


async def test_a_message_given_up_while_its_outcome_was_being_recorded_has_a_row_that_says_so(
        outcome_env: str, fake_factory: FakeFactory, scheduler: RecordingScheduler, user_function: UserFunction,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A message in its last retry before WRITEBACK_RETRY_WINDOW_HOURS ends meets a 503. The pipeline decides with
    the clock before recording (still inside the window: `retry`, recorded so), the adapter decides again with the
    clock after recording (past the window: dead-letter `retries-exhausted`). What the user sees: the message is in
    the dead-letter queue as `retries-exhausted`, while its last outcome row (and `logs --status failed`) says
    `retry` / `reschedule`: the "log and settlement agree" claim of docs/operations.md (Timing) does not hold, and the
    `retries-exhausted` row that section 1 promises is missing. What they should see: the outcome row and the
    settlement agree (one decision, one clock reading)."""
    monkeypatch.setenv("FHIR_URL", "http://127.0.0.1:9/fhir")
    now = [datetime.now(UTC)]

    def tick() -> None:
        now[0] += timedelta(seconds=2)

    def ledger_factory(settings: Settings) -> tuple[Any, Callable[[], Awaitable[None]]]:
        store = OutcomeStore.from_settings(settings)
        return _SlowLedger(store, tick), store.aclose

    app = functions.FunctionApp(delivery_factory=fake_factory, ledger_factory=ledger_factory,
                                scheduler_factory=scheduler.factory, clock=lambda: now[0])
    monkeypatch.setattr(functions, "_APP", app)
    record = new_id()
    fake_factory.delivery.fail = [Reason.FHIR_UNAVAILABLE]
    actions = await _invoke(app, user_function, _late_retry(record, now[0] - timedelta(hours=24, seconds=-1)))
    settled = actions.only
    newest = (await history(record))[0]
    given_up = (settled.kind, settled.reason, newest) == ("deadletter", "retries-exhausted",
                                                          ("dead-lettered", "retries-exhausted"))
    retried = (settled.kind, newest) == ("complete", ("retry", "fhir-unavailable"))
    assert given_up or retried, f"settled {settled.kind} {settled.reason}; the newest outcome row says {newest}"


async def test_a_write_whose_history_row_failed_is_not_logged_only_as_a_duplicate_of_itself(
        outcome_env: str, fake_factory: FakeFactory, scheduler: RecordingScheduler, user_function: UserFunction,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A patient's Update is written to FHIR; recording it writes three things at once (the outcome row by day, the
    same row in the row's history, the processed-message marker). Table Storage answers the history row with a 503
    (ServerBusy on that partition) and accepts the other two: the message becomes `outcome-store-unavailable` and
    its copy is scheduled, as docs/operations.md (section 2, Outage) says ("its retry finds its version written
    (`no-change`)"). But the processed-message marker is already there, so the copy ends `skipped` / `duplicate`,
    "This message was already processed". What the user sees: `python -m writeback logs --record <id>`, the
    documented way to follow one row, never shows the write (no `written` row, no resource or Provenance
    reference), only a duplicate of a processing that left no trace there; the day's log meanwhile has a `written`
    row whose Settlement says `complete` for a message that was rescheduled. What they should see: the row's
    history names the version written (a `written` or `no-change` row), as the docs promise."""
    monkeypatch.setenv("FHIR_URL", "http://127.0.0.1:9/fhir")
    stores: list[OutcomeStore] = []

    def ledger_factory(settings: Settings) -> tuple[Any, Callable[[], Awaitable[None]]]:
        store = OutcomeStore.from_settings(settings)
        stores.append(store)
        return store, store.aclose

    app = functions.FunctionApp(delivery_factory=fake_factory, ledger_factory=ledger_factory,
                                scheduler_factory=scheduler.factory)
    monkeypatch.setattr(functions, "_APP", app)
    try:
        await app.runtime()
        [store] = stores
        await store.ensure_tables()
        history_table = store._tables["history"]  # the row's history: one 503, then as usual
        real = history_table.submit_transaction
        failures = [ServiceResponseError("injected: 503 ServerBusy")]

        async def busy_once(*args: Any, **kw: Any) -> Any:
            if failures:
                raise failures.pop()
            return await real(*args, **kw)

        monkeypatch.setattr(history_table, "submit_transaction", busy_once)
        record = new_id()
        first = MockMessageActions()
        await user_function(messages=[received_message(update_body(record, 4), message_id="u4")],
                            message_actions=first)
        [copy] = scheduler.copies
        second = MockMessageActions()
        await user_function(messages=[redelivered(copy)], message_actions=second)
    finally:
        await app.aclose()
    rows = await rows_of(record)
    assert first.only.kind == "complete" and second.only.kind == "complete"
    assert any(r.outcome == "written" or r.reason == "no-change" for r in rows) and any(r.resource for r in rows), (
        f"the row's history: {[(r.outcome, r.reason, r.detail) for r in rows]}")


class _StuckSender:
    """A Service Bus sender whose send never returns (a namespace that accepts the connection and then stops
    answering: throttled, or a network path that drops packets); the SDK's own retries can outlast the 30 s margin."""

    def __init__(self) -> None:
        self.calls = 0

    async def schedule(self, copies: Any) -> None:
        self.calls += 1
        await asyncio.Event().wait()

    async def aclose(self) -> None:
        return None

    def factory(self, settings: Settings) -> _StuckSender:
        return self


async def test_scheduling_retry_copies_never_outlasts_the_message_lock(
        outcome_env: str, fake_factory: FakeFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch whose lock ends 4 s from now; its message meets a 503, so its delayed copy is to be scheduled, and the
    Service Bus send does not answer. The invocation waits for it without any bound: past the lock, the message is
    still neither completed nor abandoned (docs/operations.md, Timing: "The 30 s after the deadline are for ... the
    settlement calls and scheduled copies"; the outcome log's own writes are bounded the same way, `_record_faults`).
    What the user sees: invocations that run on until the host's functionTimeout (10 min) while Service Bus
    redelivers their messages to other instances, settlements that fail (`complete-failed`) when the send finally
    returns, every such message processed twice. What they should see: scheduling bounded inside the lock, the
    message abandoned when it cannot be scheduled in time (as when the send fails)."""
    monkeypatch.setenv("FHIR_URL", "http://127.0.0.1:9/fhir")
    monkeypatch.setenv("FHIR_TIMEOUT_SECONDS", "1")  # (a lock with less left than one request's timeout: not worked on)
    sender = _StuckSender()
    app = functions.FunctionApp(delivery_factory=fake_factory, scheduler_factory=sender.factory)
    fake_factory.delivery.fail = [Reason.FHIR_UNAVAILABLE]
    now = datetime.now(UTC)
    message = SimMessage(create_body(new_id()), "stuck-1", {}, now, locked_until_utc=now + timedelta(seconds=4))
    actions = MockMessageActions()
    invocation = asyncio.create_task(app.handle_batch([message], actions))
    try:
        await asyncio.wait({invocation}, timeout=6.0)  # the lock ended 2 s ago
        assert sender.calls == 1
        assert invocation.done() and [c.kind for c in actions.calls] == ["abandon"], (
            f"2 s after the message's lock ended the invocation is {'done' if invocation.done() else 'still waiting'}"
            f" and the message's settlements are {[c.kind for c in actions.calls]}")
    finally:
        invocation.cancel()
        await asyncio.gather(invocation, return_exceptions=True)
        await app.aclose()


class _DownLedger(_SlowLedger):
    """The real outcome store, whose writes fail (Table Storage down); its reads work."""

    async def record(self, envelope: Envelope, result: Result) -> None:
        raise WritebackError(Reason.OUTCOME_STORE_UNAVAILABLE, "write the outcome log: unreachable (injected)")


async def test_a_message_whose_outcome_cannot_be_recorded_past_its_window_is_given_up(
        outcome_env: str, fake_factory: FakeFactory, scheduler: RecordingScheduler, user_function: UserFunction,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Table Storage down for more than WRITEBACK_RETRY_WINDOW_HOURS: a message in its 25th hour is written, its row
    cannot be kept, so it is `outcome-store-unavailable`. Its window was checked before that outcome existed: it is
    checked again (there is no row to disagree with), and the message is dead-lettered `retries-exhausted` instead
    of being retried for as long as the outage lasts."""
    monkeypatch.setenv("FHIR_URL", "http://127.0.0.1:9/fhir")

    def ledger_factory(settings: Settings) -> tuple[Any, Callable[[], Awaitable[None]]]:
        store = OutcomeStore.from_settings(settings)
        return _DownLedger(store, lambda: None), store.aclose

    app = functions.FunctionApp(delivery_factory=fake_factory, ledger_factory=ledger_factory,
                                scheduler_factory=scheduler.factory)
    monkeypatch.setattr(functions, "_APP", app)
    actions = await _invoke(app, user_function, _late_retry(new_id(), datetime.now(UTC) - timedelta(hours=25)))
    assert (actions.only.kind, actions.only.reason) == ("deadletter", "retries-exhausted")
    assert "outcome-store-unavailable" in (actions.only.description or "")
    assert scheduler.copies == []
