"""The real decorated function, realistic Service Bus messages, a mocked settlement API: one settlement each.

Each test hands the batch trigger a batch of one (tests/function/test_batch_trigger.py covers larger batches).

Written and skipped → complete; permanent → dead-letter with the reason code; transient and configuration fault
→ a delayed copy scheduled and the message completed (abandon where no copy can be scheduled), plus one error
naming the setting for a configuration fault. The outcome log is real (Azurite); the Service Bus sender that
schedules the copies is a recording stand-in (no broker runs here).
"""

from __future__ import annotations

import json
import logging
import typing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from azurefunctions.extensions.bindings.servicebus import ServiceBusConverter, ServiceBusMessageActions

import function_app
from devtools.messages import Lookup, context
from tests.function.conftest import FakeFactory, MockMessageActions, RecordingScheduler, UserFunction
from tests.function.helpers import FIRST, LAST, consent_body, create_body, new_id, reject_body, update_body
from tests.function.sb import received_message
from writeback import functions
from writeback.outcomes import OutcomeStore, outcome_settings
from writeback.reasons import Reason
from writeback.scheduler import Copy

REPO = Path(__file__).resolve().parents[2]
CLAIMS = "http://schemas.microsoft.com/xrm/2011/Claims/"


def outcome_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "writeback.function"]


async def history(record_id: str) -> list[tuple[str, str | None]]:
    async with OutcomeStore.from_settings(outcome_settings()) as store:
        return [(r.outcome, r.reason) for r in await store.query(record_id=record_id)]


def test_binding_is_a_batch_trigger_with_explicit_settlement_on_the_configured_queue() -> None:
    function = function_app.writeback.build()
    binding = json.loads(function.get_function_json())["bindings"]
    assert binding == [{"direction": "IN", "type": "serviceBusTrigger", "name": "messages",
                        "connection": "ServiceBusConnection", "queueName": "%WRITEBACK_QUEUE_NAME%",
                        "cardinality": "MANY", "autoCompleteMessages": False}]
    assert function.get_function_name() == "writeback"
    # The extension binds a list of its SDK type for a batch (collection_model_binding_data), and the
    # settlement client beside it.
    hints = typing.get_type_hints(function.get_user_function())
    assert ServiceBusConverter.check_input_type_annotation(hints["messages"])
    assert hints["message_actions"] is ServiceBusMessageActions


async def test_written_completes(fake_app: functions.FunctionApp, user_function: UserFunction,
                                 actions: MockMessageActions, caplog: pytest.LogCaptureFixture) -> None:
    record = new_id()
    message = received_message(create_body(record, version=4), message_id="sb-written")
    caplog.set_level(logging.INFO, "writeback")
    await user_function(messages=[message], message_actions=actions)
    assert actions.only.kind == "complete" and actions.only.message is message
    assert await history(record) == [("written", None)]
    [rec] = outcome_records(caplog)
    assert rec.levelno == logging.INFO
    dims = rec.__dict__
    assert (dims["message_id"], dims["table"], dims["record_id"], dims["outcome"], dims["reason"],
            dims["settlement"]) == ("sb-written", "contact", record, "written", "", "complete")
    assert dims["correlation_id"] and isinstance(dims["duration_ms"], float)
    assert dims["resource"].startswith("Patient/fake")
    assert FIRST not in rec.getMessage() and LAST not in rec.getMessage()


async def test_skipped_completes(fake_app: functions.FunctionApp, user_function: UserFunction,
                                 actions: MockMessageActions, fake_factory: FakeFactory) -> None:
    record = new_id()
    await user_function(messages=[received_message(consent_body(record))], message_actions=actions)
    assert actions.only.kind == "complete"
    assert fake_factory.delivery.plans == []
    assert await history(record) == [("skipped", "consent-withheld")]


async def test_duplicate_completes_without_second_write(fake_app: functions.FunctionApp,
                                                        user_function: UserFunction,
                                                        fake_factory: FakeFactory) -> None:
    record, request = new_id(), new_id()
    body = create_body(record, request_id=request)
    first, second = MockMessageActions(), MockMessageActions()
    await user_function(messages=[received_message(body, message_id="one")], message_actions=first)
    await user_function(messages=[received_message(body, message_id="two")], message_actions=second)
    assert first.only.kind == "complete" and second.only.kind == "complete"
    assert len(fake_factory.delivery.plans) == 1
    assert await history(record) == [("skipped", "duplicate"), ("written", None)]


async def test_stale_completes(live_app: functions.FunctionApp, user_function: UserFunction) -> None:
    record = new_id()
    newer, older = MockMessageActions(), MockMessageActions()
    await user_function(messages=[received_message(update_body(record, 12))], message_actions=newer)
    await user_function(messages=[received_message(update_body(record, 11))], message_actions=older)
    assert newer.only.kind == "complete" and older.only.kind == "complete"
    assert await history(record) == [("skipped", "stale"), ("written", None)]


async def test_permanent_dead_letters_with_reason(fake_app: functions.FunctionApp, user_function: UserFunction,
                                                  actions: MockMessageActions,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    record = new_id()
    caplog.set_level(logging.INFO, "writeback")
    await user_function(messages=[received_message(reject_body(record))], message_actions=actions)
    settled = actions.only
    assert (settled.kind, settled.reason) == ("deadletter", "invalid-contact-type")
    assert settled.description and record in settled.description
    assert FIRST not in settled.description and LAST not in settled.description
    assert await history(record) == [("dead-lettered", "invalid-contact-type")]
    [rec] = outcome_records(caplog)
    assert rec.levelno == logging.ERROR and rec.__dict__["settlement"] == "deadletter"


@pytest.mark.parametrize(("body", "content_type", "reason"), [
    ((REPO / "samples" / "09_broken_body.json").read_bytes(), "application/json", "malformed-message"),
    (b"<Context><MessageName>Update</MessageName></Context>", "application/xml", "unsupported-format"),
    (b"\x40\x06\x53\x74\x72\x69\x6e\x67", "application/msbin1", "unsupported-format"),
])
async def test_unreadable_bodies_dead_letter(fake_app: functions.FunctionApp, user_function: UserFunction,
                                            actions: MockMessageActions, body: bytes, content_type: str,
                                            reason: str) -> None:
    await user_function(messages=[received_message(body, content_type=content_type)], message_actions=actions)
    assert (actions.only.kind, actions.only.reason) == ("deadletter", reason)


async def test_payload_dropped_property_dead_letters(fake_app: functions.FunctionApp, user_function: UserFunction,
                                                     actions: MockMessageActions) -> None:
    body = json.loads(create_body(new_id()))
    body["InputParameters"] = []
    body["PostEntityImages"] = []
    message = received_message(json.dumps(body), application_properties={
        "MessageMaxSizeExceeded": True, CLAIMS + "EntityLogicalName": "contact"})
    await user_function(messages=[message], message_actions=actions)
    assert (actions.only.kind, actions.only.reason) == ("deadletter", "payload-dropped")


def redelivered(copy: Copy) -> object:
    """The scheduled copy as the trigger receives it when its time has come."""
    return received_message(copy.body, message_id=copy.message_id, content_type=copy.content_type,
                            application_properties=dict(copy.properties))


async def test_transient_schedules_a_delayed_copy_and_completes(
        fake_app: functions.FunctionApp, user_function: UserFunction, fake_factory: FakeFactory,
        scheduler: RecordingScheduler, caplog: pytest.LogCaptureFixture) -> None:
    record = new_id()
    fake_factory.delivery.fail = [Reason.FHIR_UNAVAILABLE]
    first, second = MockMessageActions(), MockMessageActions()
    body = update_body(record, 5)
    caplog.set_level(logging.INFO, "writeback")
    before = datetime.now(UTC)
    await user_function(messages=[received_message(body, message_id="t")], message_actions=first)
    # Not redelivered at once (that burns MaxDeliveryCount in seconds): a copy waits 15 s (less jitter).
    assert first.only.kind == "complete"
    [copy] = scheduler.copies
    assert copy.body == body and copy.message_id == "t~r1" and copy.content_type == "application/json"
    assert copy.properties["writeback-attempt"] == 1 and copy.properties["writeback-original-message-id"] == "t"
    assert timedelta(seconds=11) <= copy.at - before <= timedelta(seconds=16)
    warn = outcome_records(caplog)[0]
    assert warn.levelno == logging.WARNING and warn.__dict__["reason"] == "fhir-unavailable"
    # (completed once its delayed copy is scheduled: `reschedule`, as its outcome row says)
    assert warn.__dict__["settlement"] == "reschedule" and warn.__dict__["retry_attempt"] == 1
    # The copy arrives when its time has come: the same version is not stale, so it goes through this time.
    await user_function(messages=[redelivered(copy)], message_actions=second)
    assert second.only.kind == "complete" and len(scheduler.copies) == 1
    assert await history(record) == [("written", None), ("retry", "fhir-unavailable")]


async def test_a_copy_of_a_row_waiting_for_its_patients_consent_says_so(
        fake_app: functions.FunctionApp, user_function: UserFunction, scheduler: RecordingScheduler) -> None:
    """An MRN saved before its patient's first message: `consent-unknown`, retried. Its copies count the tries
    that waited for the consent (`writeback-consent-waits`), which the waits past that gate do not count."""
    patient_id, row_id = new_id(), new_id()
    row = {"msemr_medicalidentifierid": row_id, "msemr_identifiersystem": "urn:oid:2.16.840.1.113883.4.1",
           "msemr_value": "MRN-1", "versionnumber": 1,
           "msemr_assignee": Lookup("contact", patient_id)}
    body = json.dumps(context("Create", "msemr_medicalidentifier", row_id, row, post=row)).encode()
    await user_function(messages=[received_message(body, message_id="mrn")], message_actions=MockMessageActions())
    await user_function(messages=[redelivered(scheduler.copies[0])], message_actions=MockMessageActions())
    first, second = scheduler.copies
    assert (first.properties["writeback-attempt"], first.properties["writeback-consent-waits"]) == (1, 1)
    assert (second.properties["writeback-attempt"], second.properties["writeback-consent-waits"]) == (2, 2)
    assert await history(row_id) == [("retry", "consent-unknown"), ("retry", "consent-unknown")]


async def test_without_a_scheduler_a_transient_failure_is_abandoned(
        outcome_env: str, user_function: UserFunction, fake_factory: FakeFactory, actions: MockMessageActions,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("FHIR_URL", "http://127.0.0.1:9/fhir")
    app = functions.FunctionApp(delivery_factory=fake_factory)  # no Service Bus connection is set
    monkeypatch.setattr(functions, "_APP", app)
    fake_factory.delivery.fail = [Reason.FHIR_UNAVAILABLE]
    caplog.set_level(logging.INFO, "writeback")
    await user_function(messages=[received_message(create_body(new_id()))], message_actions=actions)
    assert actions.only.kind == "abandon"  # redelivered at once by Service Bus: never lost
    [error] = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("writeback")]
    assert "ServiceBusConnection" in error.getMessage() and "abandoned" in error.getMessage()
    await app.aclose()


async def test_a_failing_scheduler_abandons_instead(fake_app: functions.FunctionApp, user_function: UserFunction,
                                                    fake_factory: FakeFactory, scheduler: RecordingScheduler,
                                                    actions: MockMessageActions) -> None:
    fake_factory.delivery.fail = [Reason.FHIR_UNAVAILABLE]
    scheduler.fail = True
    await user_function(messages=[received_message(create_body(new_id()))], message_actions=actions)
    assert actions.only.kind == "abandon" and scheduler.copies == []


async def test_past_the_retry_window_it_is_dead_lettered(fake_app: functions.FunctionApp,
                                                         user_function: UserFunction, fake_factory: FakeFactory,
                                                         scheduler: RecordingScheduler,
                                                         actions: MockMessageActions) -> None:
    record = new_id()
    fake_factory.delivery.fail = [Reason.FHIR_UNAVAILABLE]
    started = (datetime.now(UTC) - timedelta(hours=24, minutes=1)).isoformat()
    message = received_message(update_body(record, 3), message_id="m~r40", application_properties={
        "writeback-attempt": 40, "writeback-first-tried": started, "writeback-original-message-id": "m"})
    await user_function(messages=[message], message_actions=actions)
    assert (actions.only.kind, actions.only.reason) == ("deadletter", "retries-exhausted")
    assert actions.only.description and "fhir-unavailable" in actions.only.description
    assert "40 time(s)" in actions.only.description and scheduler.copies == []
    assert await history(record) == [("dead-lettered", "retries-exhausted")]


async def test_unauthorized_is_config_error_retried(fake_app: functions.FunctionApp, user_function: UserFunction,
                                                    fake_factory: FakeFactory, actions: MockMessageActions,
                                                    scheduler: RecordingScheduler,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    fake_factory.delivery.fail = [Reason.UNAUTHORIZED]
    caplog.set_level(logging.INFO, "writeback")
    await user_function(messages=[received_message(create_body(new_id()))], message_actions=actions)
    assert actions.only.kind == "complete" and len(scheduler.copies) == 1
    [rec] = outcome_records(caplog)
    assert rec.levelno == logging.ERROR and rec.__dict__["outcome"] == "config-error"
    assert "configuration error" in rec.getMessage() and "unauthorized" in rec.getMessage()


async def test_missing_setting_is_retried_with_one_error(outcome_env: str, user_function: UserFunction,
                                                         actions: MockMessageActions, fake_factory: FakeFactory,
                                                         scheduler: RecordingScheduler,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    app = functions.FunctionApp(delivery_factory=fake_factory, scheduler_factory=scheduler.factory)  # no FHIR_URL
    monkeypatch.setattr(functions, "_APP", app)
    caplog.set_level(logging.DEBUG)
    await user_function(messages=[received_message(create_body(new_id()), message_id="cfg")], message_actions=actions)
    assert actions.only.kind == "complete" and [c.message_id for c in scheduler.copies] == ["cfg~r1"]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("writeback")]
    assert len(errors) == 1
    text = errors[0].getMessage()
    assert "FHIR_URL" in text and "retried" in text and errors[0].exc_info is None
    assert errors[0].__dict__["outcome"] == "config-error" and errors[0].__dict__["reason"] == "config-error"
    assert fake_factory.built == 0
    # Fixed without a restart of the process: the copy builds the app and is written.
    monkeypatch.setenv("FHIR_URL", "http://127.0.0.1:9/fhir")
    again = MockMessageActions()
    await user_function(messages=[redelivered(scheduler.copies[0])], message_actions=again)
    assert again.only.kind == "complete" and fake_factory.built == 1
    await app.aclose()


async def test_invalid_maps_are_retried_naming_the_file(outcome_env: str, user_function: UserFunction,
                                                        actions: MockMessageActions, fake_factory: FakeFactory,
                                                        scheduler: RecordingScheduler,
                                                        monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "contact.yaml").write_text("table: [unclosed\n", encoding="utf-8")
    monkeypatch.setenv("FHIR_URL", "http://127.0.0.1:9/fhir")
    monkeypatch.setenv("WRITEBACK_MAPS_DIR", str(tmp_path))
    app = functions.FunctionApp(delivery_factory=fake_factory, scheduler_factory=scheduler.factory)
    monkeypatch.setattr(functions, "_APP", app)
    caplog.set_level(logging.INFO)
    try:
        await user_function(messages=[received_message(create_body(new_id()))], message_actions=actions)
    finally:
        await app.aclose()  # (its outcome log's client, left open, was reported by asyncio in a later test)
    assert actions.only.kind == "complete" and len(scheduler.copies) == 1
    [error] = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("writeback")]
    assert "contact.yaml" in error.getMessage()


async def test_invalid_setting_value_names_it(outcome_env: str, user_function: UserFunction,
                                              actions: MockMessageActions, monkeypatch: pytest.MonkeyPatch,
                                              fake_factory: FakeFactory, scheduler: RecordingScheduler,
                                              caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("FHIR_URL", "http://fhir.example.org")  # plain http off loopback
    app = functions.FunctionApp(delivery_factory=fake_factory, scheduler_factory=scheduler.factory)
    monkeypatch.setattr(functions, "_APP", app)
    try:
        await user_function(messages=[received_message(create_body(new_id()))], message_actions=actions)
    finally:
        await app.aclose()
    assert actions.only.kind == "complete" and len(scheduler.copies) == 1
    [error] = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("writeback")]
    assert "setting FHIR_URL must use https" in error.getMessage()


async def test_outcome_store_outage_abandons(clean_env: pytest.MonkeyPatch, user_function: UserFunction,
                                             actions: MockMessageActions, fake_factory: FakeFactory,
                                             azurite_tables: object) -> None:
    from devtools.services import AZURITE_ACCOUNT_KEY, free_port

    port = free_port()  # nothing listens there
    clean_env.setenv("FHIR_URL", "http://127.0.0.1:9/fhir")
    clean_env.setenv("OUTCOMES_CONNECTION_STRING",
                     f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={AZURITE_ACCOUNT_KEY};"
                     f"TableEndpoint=http://127.0.0.1:{port}/devstoreaccount1;")
    app = functions.FunctionApp(delivery_factory=fake_factory)
    clean_env.setattr(functions, "_APP", app)
    await user_function(messages=[received_message(create_body(new_id()))], message_actions=actions)
    assert actions.only.kind == "abandon"
    assert fake_factory.delivery.plans == []  # nothing was written without the duplicate/stale checks
    await app.aclose()


async def test_unexpected_error_abandons_without_its_text(fake_app: functions.FunctionApp,
                                                          user_function: UserFunction, actions: MockMessageActions,
                                                          fake_factory: FakeFactory, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    async def broken(plan: object) -> object:
        raise ValueError(f"bad value {FIRST}")

    monkeypatch.setattr(fake_factory.delivery, "deliver", broken)
    await user_function(messages=[received_message(create_body(new_id()))], message_actions=actions)
    assert actions.only.kind == "abandon"
    [error] = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("writeback")]
    assert "ValueError" in error.getMessage() and FIRST not in error.getMessage()


async def test_settlement_failure_is_logged_not_raised(fake_app: functions.FunctionApp,
                                                       user_function: UserFunction,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    actions = MockMessageActions(fail=True)
    await user_function(messages=[received_message(consent_body(new_id()))], message_actions=actions)
    assert actions.only.kind == "complete"
    assert any("settlement complete failed" in r.getMessage() for r in caplog.records)


async def test_singletons_are_built_once(fake_app: functions.FunctionApp, user_function: UserFunction,
                                         fake_factory: FakeFactory) -> None:
    for _ in range(3):
        await user_function(messages=[received_message(consent_body(new_id()))], message_actions=MockMessageActions())
    assert fake_factory.built == 1
    runtime = await fake_app.runtime()
    assert runtime is await fake_app.runtime()
    await fake_app.aclose()
    assert fake_factory.closed == 1


def test_envelope_from_received_message() -> None:
    user = new_id()
    message = received_message(b'{"x": 1}', message_id="mid", content_type="application/json",
                               application_properties={CLAIMS + "User": user, "MessageMaxSizeExceeded": True,
                                                       "Depth": 1})
    envelope = functions.envelope_of(message)
    assert envelope.body == b'{"x": 1}'
    assert envelope.properties == {CLAIMS + "User": user, "MessageMaxSizeExceeded": "True", "Depth": "1"}
    assert (envelope.content_type, envelope.message_id) == ("application/json", "mid")
    assert envelope.delivery_count == 0  # the extension (1.0.0b2) does not decode the AMQP header
