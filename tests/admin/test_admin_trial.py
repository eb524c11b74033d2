"""An administrator's trial of docs/operations.md against the real services (FHIR dev server, Azurite), with the
project's Service Bus simulator (tests/reliability/broker.py) as the queue and its dead-letter queue.

Each test asserts what the administrator should see, and fails today because of the problem its docstring names.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import shutil
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from azure.servicebus.exceptions import ServiceBusAuthorizationError

from devtools.messages import Choice, Lookup, context
from devtools.services import Azurite, FhirDevServer
from tests.reliability.broker import Broker, End, SimMessage
from writeback import cli
from writeback.functions import FunctionApp
from writeback.outcomes import OutcomeStore
from writeback.settings import DEFAULT_MAPS_DIR, SETTINGS, Settings

# ---- set-up: settings for the real services, a queue with a dead-letter queue, `resubmit` over it ----------------


@pytest.fixture
def admin_env(monkeypatch: pytest.MonkeyPatch, fhir_server: FhirDevServer, azurite_tables: Azurite) -> dict[str, str]:
    """The function app's settings against the dev servers, also exported for the CLI (as the docs ask)."""
    for spec in SETTINGS:
        monkeypatch.delenv(spec.name, raising=False)
    env = {"FHIR_URL": fhir_server.base_url, "FHIR_TOKEN_URL": fhir_server.token_url,
           "FHIR_CLIENT_ID": fhir_server.client_id, "FHIR_CLIENT_SECRET": fhir_server.client_secret,
           "OUTCOMES_CONNECTION_STRING": azurite_tables.connection_string,
           "OUTCOMES_TABLE_PREFIX": "adm" + uuid.uuid4().hex[:10], "FHIR_MAX_RETRIES": "1",
           "FHIR_RETRY_MAX_SECONDS": "2"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def records() -> Iterator[list[logging.LogRecord]]:
    """The `writeback.function` log records (the outcome records Application Insights receives)."""
    caught: list[logging.LogRecord] = []

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            caught.append(record)

    handler = Handler(level=logging.DEBUG)
    logger = logging.getLogger("writeback.function")
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield caught
    logger.removeHandler(handler)
    logger.setLevel(old)


@pytest.fixture
def maps_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "maps"
    shutil.copytree(DEFAULT_MAPS_DIR, folder)
    return folder


class DeadLetterBroker(Broker):
    """The simulator, keeping what it dead-letters as a dead-letter queue."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.dlq: list[tuple[int, SimMessage, End]] = []
        self._number = 0

    def _end(self, message: SimMessage, end: End) -> None:
        super()._end(message, end)
        if end.settlement == "deadletter":
            self._number += 1
            self.dlq.append((self._number, message, end))


class _DeadLettered:
    """What `ServiceBusReceiver.receive_messages` hands over from a dead-letter queue (the attributes `resubmit`
    reads)."""

    def __init__(self, number: int, message: SimMessage, end: End) -> None:
        self.sequence_number = number
        self.dead_letter_reason = end.reason
        self.dead_letter_error_description = end.description
        self.application_properties = {str(k).encode(): str(v).encode()
                                       for k, v in message.application_properties.items()}
        self.body = iter([message.body])
        self.message_id = message.message_id
        self.content_type = message.content_type
        self.correlation_id = message.correlation_id
        self.subject = None


class FakeServiceBus:
    """The part of `ServiceBusClient` that `resubmit` uses (a peek-lock receiver on the dead-letter queue and a
    sender on the queue), over the simulator: no broker can run here."""

    def __init__(self, broker: DeadLetterBroker, *, send: bool = True) -> None:
        self.broker = broker
        self.send = send  # the sign-in's Send right on the queue (Azure Service Bus Data Sender)

    def __enter__(self) -> FakeServiceBus:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def get_queue_receiver(self, queue: str, **kw: Any) -> Any:
        broker = self.broker
        locked: set[int] = set()

        class Receiver:
            def __enter__(self) -> Receiver:
                return self

            def __exit__(self, *exc: object) -> None:
                locked.clear()

            def receive_messages(self, max_message_count: int = 1, max_wait_time: float | None = None) -> list[Any]:
                out = [_DeadLettered(n, m, e) for n, m, e in broker.dlq if n not in locked][:max_message_count]
                locked.update(m.sequence_number for m in out)
                return out

            def complete_message(self, message: _DeadLettered) -> None:
                broker.dlq[:] = [x for x in broker.dlq if x[0] != message.sequence_number]

            def abandon_message(self, message: _DeadLettered) -> None:
                locked.discard(message.sequence_number)

        return Receiver()

    def get_queue_sender(self, queue: str) -> Any:
        broker = self.broker
        allowed = self.send

        class Sender:
            def __enter__(self) -> Sender:
                if not allowed:  # what Service Bus answers a sender link without the Send claim, on opening it
                    raise ServiceBusAuthorizationError(message="Unauthorized access. 'Send' claim(s) are required")
                return self

            def __exit__(self, *exc: object) -> None:
                return None

            def send_messages(self, message: Any) -> None:
                props = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                         for k, v in (message.application_properties or {}).items()}
                broker._enqueue(SimMessage(b"".join(message.body), message.message_id, props, broker.now,
                                           message.content_type, message.correlation_id), broker.now)

        return Sender()


def run_cli(monkeypatch: pytest.MonkeyPatch, broker: DeadLetterBroker | None, *args: str,
            send: bool = True) -> tuple[int, str]:
    if broker is not None:
        monkeypatch.setattr(cli, "servicebus_client", lambda: FakeServiceBus(broker, send=send))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(list(args))
    return code, out.getvalue()


def app_on(broker: Broker, env: dict[str, str]) -> FunctionApp:
    app = FunctionApp(env, scheduler_factory=broker.scheduler_factory, clock=broker.clock)
    broker.app = app
    return app


def patient(**changes: object) -> tuple[str, dict[str, object]]:
    row = str(uuid.uuid4())
    columns: dict[str, object] = {
        "contactid": row, "msemr_contacttype": Choice(935000000), "msemr_azurefhirsyncenabled": True,
        "firstname": "Rosalind", "lastname": "Quintero", "birthdate": date(1987, 7, 25), "gendercode": Choice(2),
        "telephone1": "+1 206 555 0142", "versionnumber": 1001, "modifiedon": datetime(2026, 11, 2, 9, 30, tzinfo=UTC)}
    columns.update(changes)
    return row, {k: v for k, v in columns.items() if v is not None}


def create(table: str, row: str, columns: dict[str, object]) -> bytes:
    return json.dumps(context("Create", table, row, columns, post=columns)).encode()


# ---- findings ---------------------------------------------------------------------------------------------------


async def test_a_wrong_client_secret_is_not_logged_as_abandoned_when_its_retry_copy_was_scheduled(
        admin_env: dict[str, str], records: list[logging.LogRecord]) -> None:
    """Wrong FHIR_CLIENT_SECRET (the usual fault after a secret rotation): each message ends `config-error` /
    `unauthorized` and a delayed copy is scheduled (retry_attempt, retry_at). Its outcome record says instead
    "The message is abandoned: Service Bus redelivers it at once, until MaxDeliveryCount (no retry copy can be
    scheduled)": the administrator is told messages will be dead-lettered within seconds and that the retry
    scheduler (Service Bus Data Sender) is broken, neither of which is true."""
    env = {**admin_env, "FHIR_CLIENT_SECRET": "rotated-away"}
    broker = DeadLetterBroker(batch=10)
    app = app_on(broker, env)
    row, columns = patient()
    broker.send(create("contact", row, columns), row=row)
    await broker.run(max_invocations=1)
    await app.aclose()
    assert broker.copies_scheduled == 1  # the message was put back for a later try, as docs/operations.md says
    [record] = [r for r in records if getattr(r, "outcome", None) == "config-error"]
    assert record.__dict__["reason"] == "unauthorized"
    assert record.__dict__["retry_attempt"] == 1 and record.__dict__["retry_at"]
    text = record.getMessage()
    assert "abandoned" not in text and "no retry copy can be scheduled" not in text, text


async def test_a_child_rows_consent_unknown_detail_does_not_deny_that_the_patients_message_was_seen(
        admin_env: dict[str, str]) -> None:
    """WRITEBACK_CONSENT_COLUMN names another column: the patient's Create is processed (skipped
    `consent-withheld`, detail naming the setting). Its identifier row then retries `consent-unknown` for 24 h
    and dead-letters `retries-exhausted` with "is not known yet: no message of that row has been seen": false (the
    row's message was seen, its outcome is in the log), and the README's action for it ("save the patient's contact
    row in Dataverse, then resubmit") cannot help. The detail should say the patient's messages do not hold the
    consent column, and name WRITEBACK_CONSENT_COLUMN."""
    env = {**admin_env, "WRITEBACK_CONSENT_COLUMN": "msemr_fhirsync"}
    broker = DeadLetterBroker(batch=10)
    app = app_on(broker, env)
    row, columns = patient()
    first = broker.send(create("contact", row, columns), row=row)
    await broker.run(max_invocations=1)
    assert broker.end(first).reason == "consent-withheld"  # the patient's message was seen and recorded
    child = str(uuid.uuid4())
    child_columns = {"msemr_medicalidentifierid": child, "msemr_assignee": Lookup("contact", row),
                     "msemr_identifiersystem": "http://hospital.example.org/mrn", "msemr_value": "MRN-0042731",
                     "versionnumber": 3001}
    second = broker.send(create("msemr_medicalidentifier", child, child_columns), row=child)
    await broker.run(max_invocations=2)  # one more invocation: its first try
    await app.aclose()
    [result] = broker.results[second]
    assert result.reason is not None and result.reason.value == "consent-unknown"
    assert "no message of that row has been seen" not in result.detail, result.detail
    assert "WRITEBACK_CONSENT_COLUMN" in result.detail, result.detail


async def test_resubmit_says_when_max_stopped_it_with_messages_of_that_reason_still_dead_lettered(
        admin_env: dict[str, str], maps_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full dead-letter queue after a map fault: 12 `invalid-resource` (a choice value the map did not
    translate) among 3 unreadable bodies. After fixing the map, `resubmit --reason invalid-resource --max 10`
    prints "Moved 10 ... 3 other dead-lettered message(s) left in place." and exits 0: it does not say that it
    stopped at --max with 2 messages of that very reason still dead-lettered, so the administrator believes the
    reason is cleared."""
    contact = maps_copy / "contact.yaml"
    good = contact.read_text()
    contact.write_text(good.replace("values: {1: male, 2: female,", "values: {1: male,"))
    env = {**admin_env, "WRITEBACK_MAPS_DIR": str(maps_copy)}
    broker = DeadLetterBroker(batch=20)
    app = app_on(broker, env)
    for i in range(3):
        broker.send(b"<Entity>" + str(i).encode() + b"</Entity>")
    for _ in range(12):
        row, columns = patient()
        broker.send(create("contact", row, columns), row=row)
    await broker.run()
    await app.aclose()
    assert sorted(e.reason or "" for _, _, e in broker.dlq) == ["invalid-resource"] * 12 + ["unsupported-format"] * 3
    contact.write_text(good)  # the fix
    code, out = run_cli(monkeypatch, broker, "resubmit", "--reason", "invalid-resource", "--max", "10")
    assert code == 0
    left = sum(1 for _, _, e in broker.dlq if e.reason == "invalid-resource")
    assert left == 2
    assert "--max" in out, f"{left} invalid-resource message(s) still dead-lettered, and the output says:\n{out}"


async def _dead_lettered_after_a_fault(admin_env: dict[str, str], env: dict[str, str]) -> tuple[str, End, int]:
    """One patient's Create on an app that has been running (its outcome tables exist), under the fault `env`
    holds, retried for the window (2 h) and dead-lettered: its row id, its dead-letter, how many copies were
    scheduled."""
    async with OutcomeStore.from_settings(Settings.from_env(admin_env, need_outcomes=True)) as store:
        await store.ensure_tables()
    broker = DeadLetterBroker(batch=10)
    app = app_on(broker, {**env, "WRITEBACK_RETRY_WINDOW_HOURS": "2"})
    row, columns = patient()
    broker.send(create("contact", row, columns), row=row)
    await broker.run()
    await app.aclose()
    [(_, _message, end)] = broker.dlq
    return row, end, broker.copies_scheduled


async def test_a_message_dead_lettered_after_a_broken_map_has_its_row_in_the_outcome_log(
        admin_env: dict[str, str], maps_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A map deployed with a misspelt element (`birthDat`) on an app that has been running (its outcome tables
    exist). Every message retries as config-error and, past WRITEBACK_RETRY_WINDOW_HOURS, is dead-lettered
    `retries-exhausted`. docs/operations.md (section 1) says only the start-up fault itself is outside the outcome
    log, "every other outcome is also a row in the outcome log"; yet `logs --status failed` showed nothing at all:
    neither the retries nor the dead-letter (whose log record also had no table and no record id)."""
    contact = maps_copy / "contact.yaml"
    contact.write_text(contact.read_text().replace("target: birthDate", "target: birthDat"))
    _, end, _ = await _dead_lettered_after_a_fault(admin_env, {**admin_env, "WRITEBACK_MAPS_DIR": str(maps_copy)})
    assert end.reason == "retries-exhausted" and "birthDat" in end.description
    code, out = await asyncio.to_thread(run_cli, monkeypatch, None, "logs", "--status", "failed", "--since", "7d",
                                        "--json")
    assert code == 0
    logged = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert any(r["outcome"] == "dead-lettered" and r["reason"] == "retries-exhausted" for r in logged), \
        f"`logs --status failed` shows {len(logged)} outcome(s) for a message now in the dead-letter queue"


async def test_a_wrong_fhir_setting_has_its_tries_and_its_dead_letter_in_the_outcome_log(
        admin_env: dict[str, str]) -> None:
    """The sixteenth review's y1: FHIR_URL set without its scheme (OUTCOMES_* sound). Only a fault in the OUTCOMES_*
    settings is outside the outcome log (docs/operations.md, section 1); the log under a fault was built from every
    setting, so a wrong FHIR setting left it empty for a day of retries and their dead-letter."""
    row, end, copies = await _dead_lettered_after_a_fault(
        admin_env, {**admin_env, "FHIR_URL": "fhir.contoso.example/r4"})
    assert end.reason == "retries-exhausted" and "FHIR_URL" in end.description
    assert copies > 1  # retried for the window, as the docs say
    async with OutcomeStore.from_settings(Settings.from_env(admin_env, need_outcomes=True)) as store:
        rows = await store.query(since=timedelta(days=7), limit=1000)
    tries = [r for r in rows if r.outcome == "config-error" and r.record_id == row]
    ended = [r for r in rows if r.outcome == "dead-lettered" and r.reason == "retries-exhausted" and r.record_id == row]
    assert tries and ended, (f"{copies + 1} tries and a dead-letter; outcome rows: "
                             f"{[(r.outcome, r.reason) for r in rows if r.record_id == row]}")


async def test_logs_says_when_limit_cut_the_list(admin_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Working through many failures, the administrator reads `logs` (default --limit 200). When more outcomes
    match than the limit, the output ends "N outcome(s)" exactly as when that is all of them: nothing says the list
    was cut at --limit (here 3 outcomes, --limit 2: "2 outcome(s)")."""
    broker = DeadLetterBroker(batch=10)
    app = app_on(broker, admin_env)
    for _ in range(3):
        row = str(uuid.uuid4())
        broker.send(create("msemr_condition", row, {"msemr_conditionid": row, "versionnumber": 1}), row=row)
    await broker.run()
    await app.aclose()
    code, everything = await asyncio.to_thread(run_cli, monkeypatch, None, "logs", "--since", "1h")
    assert code == 0 and everything.rstrip().endswith("3 outcome(s)")
    code, cut = await asyncio.to_thread(run_cli, monkeypatch, None, "logs", "--since", "1h", "--limit", "2")
    assert code == 0
    assert "--limit" in cut or "more" in cut, cut


async def test_dead_letters_that_cannot_succeed_are_discarded_by_reason_or_id_and_nothing_else_is(
        admin_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """(A new user's trial.) Bodies no resubmission can help (XML from a misconfigured endpoint: `unsupported-format`)
    stayed in the dead-letter queue for good, and the alert on a non-empty dead-letter queue with them: `resubmit`
    dead-lettered them again, and nothing removed them. `discard` removes them, by reason or by message id, and
    leaves every other dead-lettered message; it never empties the dead-letter queue wholesale."""
    broker = DeadLetterBroker(batch=20)
    app = app_on(broker, {**admin_env, "WRITEBACK_MAPS_DIR": str(DEFAULT_MAPS_DIR)})
    for i in range(3):
        broker.send(b"<Entity>" + str(i).encode() + b"</Entity>")
    broker.send(b'{"MessageName": "Update"}')  # no table, no row: malformed-message
    broker.send(b'{"MessageName": "Update", "PrimaryEntityName": "contact"}')
    await broker.run()
    await app.aclose()
    reasons = sorted(e.reason or "" for _, _, e in broker.dlq)
    assert reasons == ["malformed-message"] * 2 + ["unsupported-format"] * 3

    code, out = run_cli(monkeypatch, broker, "discard")
    assert code == cli.EXIT_USAGE and "name what to discard" in capsys.readouterr().err
    assert len(broker.dlq) == 5  # nothing removed without a reason or an id

    # Removing needs the Receiver role only (docs/operations.md): a sign-in without Send removes all the same, and
    # cannot resubmit.
    code, out = run_cli(monkeypatch, broker, "resubmit", "--reason", "unsupported-format", send=False)
    assert code == cli.EXIT_USAGE and "Data Sender" in capsys.readouterr().err and len(broker.dlq) == 5
    code, out = run_cli(monkeypatch, broker, "discard", "--reason", "unsupported-format", send=False)
    assert code == 0 and sorted(e.reason or "" for _, _, e in broker.dlq) == ["malformed-message"] * 2
    assert out.count("  discarded message ") == 3 and "Removed 3 dead-lettered message(s) with reason " \
        "unsupported-format" in out and "2 other dead-lettered message(s) left in place." in out

    (_, first, _), (_, second, _) = broker.dlq
    code, out = run_cli(monkeypatch, broker, "discard", "--message-id", "no-such-id")  # a typo: not a success
    assert code == cli.EXIT_NOT_FOUND and "No dead-lettered message has the id(s): no-such-id." in out
    assert len(broker.dlq) == 2
    code, out = run_cli(monkeypatch, broker, "discard", "--message-id", str(first.message_id))
    assert code == 0 and [m.message_id for _, m, _ in broker.dlq] == [second.message_id]
    assert f"  discarded message {first.message_id} (dead-letter reason malformed-message)" in out
    assert not broker._due  # discarded, not sent again
