"""The batch trigger (cardinality many): the real decorated function gets the list the extension decodes from the
host's `collection_model_binding_data`, and every message is settled exactly once on its own outcome.

Settlement is the mocked `ServiceBusMessageActions` (it is a gRPC call into the Functions host); the outcome log
is real (Azurite), and the end-to-end test writes to the real FHIR dev server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from typing import Any

import httpx
import pytest

from devtools.messages import context
from tests.function.conftest import (
    FakeFactory,
    MockMessageActions,
    RecordingScheduler,
    UserFunction,
    patients_of,
    rows_of,
)
from tests.function.helpers import FIRST, LAST, consent_body, create_body, new_id, patient, reject_body, update_body
from tests.function.sb import host_content, received_batch
from writeback import functions
from writeback.bundles import BatchDelivery
from writeback.decide import WritePlan
from writeback.fhir_client import build_delivery
from writeback.pipeline import Delivered
from writeback.settings import Settings

SYNC_USER = "7d2e4f60-1a3b-4c5d-8e9f-0a1b2c3d4e5f"  # the FHIR-to-Dataverse sync's application user


def echo_body(record_id: str) -> bytes:
    """A create made by the sync's own user: skipped as `echo` when that user is in WRITEBACK_IGNORE_USER_IDS."""
    row = patient(record_id, 1)
    return json.dumps(context("Create", "contact", record_id, row, post=row, user_id=SYNC_USER)).encode()


def batch(*bodies: bytes, **ids: bytes) -> list[Any]:
    """One invocation's messages, decoded by the extension; keyword bodies get that name as their MessageId."""
    contents = [host_content(body) for body in bodies]
    contents += [host_content(body, message_id=name) for name, body in ids.items()]
    return received_batch(contents)


def outcome_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "writeback.function" and r.getMessage().startswith(
        "writeback outcome=")]


async def history(record_id: str) -> list[tuple[str, str | None]]:
    """The outcome rows of one Dataverse row; sorted, since one batch records its messages concurrently."""
    return sorted(((r.outcome, r.reason) for r in await rows_of(record_id)), key=repr)


async def test_mixed_batch_settles_each_message_on_its_own_outcome(
        fake_app: functions.FunctionApp, user_function: UserFunction, fake_factory: FakeFactory,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("WRITEBACK_IGNORE_USER_IDS", SYNC_USER)
    created, other, updated, withheld, echoed, rejected = (new_id() for _ in range(6))
    messages = batch(create_body(created), create_body(other), update_body(updated, 7), consent_body(withheld),
                     echo_body(echoed), reject_body(rejected))
    actions = MockMessageActions()
    caplog.set_level(logging.INFO, "writeback")
    await user_function(messages=messages, message_actions=actions)

    assert len(actions.calls) == len(messages)
    assert [actions.of(m).kind for m in messages] == ["complete"] * 5 + ["deadletter"]
    dead = actions.of(messages[-1])
    assert dead.reason == "invalid-contact-type"
    assert dead.description and rejected in dead.description and FIRST not in dead.description
    assert len(fake_factory.delivery.plans) == 3
    assert await history(created) == [("written", None)]
    assert await history(other) == [("written", None)]
    assert await history(updated) == [("written", None)]
    assert await history(withheld) == [("skipped", "consent-withheld")]
    assert await history(echoed) == [("skipped", "echo")]
    assert await history(rejected) == [("dead-lettered", "invalid-contact-type")]
    # One structured record per message, as for a single message, each logged once its settlement returned
    # (settlements run concurrently, so in no particular order).
    records = outcome_records(caplog)
    assert sorted((r.__dict__["record_id"], r.__dict__["outcome"], r.__dict__["reason"], r.__dict__["settlement"])
                  for r in records) == sorted([
        (created, "written", "", "complete"), (other, "written", "", "complete"),
        (updated, "written", "", "complete"), (withheld, "skipped", "consent-withheld", "complete"),
        (echoed, "skipped", "echo", "complete"), (rejected, "dead-lettered", "invalid-contact-type", "deadletter")])
    assert sorted(r.__dict__["message_id"] for r in records) == sorted(m.message_id for m in messages)
    assert all(FIRST not in r.getMessage() and LAST not in r.getMessage() for r in records)


async def test_of_several_whole_row_changes_in_a_batch_only_the_newest_is_written(
        fake_app: functions.FunctionApp, user_function: UserFunction, fake_factory: FakeFactory) -> None:
    """Each carries the row's whole state, so the newest holds the others' changes: one write, one version."""
    record, unrelated = new_id(), new_id()
    messages = batch(update_body(record, 3, telephone1="+1 206 555 0303"), create_body(unrelated),
                     create_body(record, version=1), update_body(record, 2, telephone1="+1 206 555 0202"))
    actions = MockMessageActions()
    await user_function(messages=messages, message_actions=actions)
    assert [actions.of(m).kind for m in messages] == ["complete"] * 4
    mine = [p for p in fake_factory.delivery.plans if p.target.identifier_value == record]
    assert [(p.operation, p.source.row_version) for p in mine] == [("update", 3)]
    assert await history(record) == [("skipped", "stale"), ("skipped", "stale"), ("written", None)]


async def test_a_duplicate_within_the_batch_is_written_once(fake_app: functions.FunctionApp,
                                                            user_function: UserFunction,
                                                            fake_factory: FakeFactory) -> None:
    record, request = new_id(), new_id()
    body = create_body(record, request_id=request)
    messages = batch(first=body, again=body)  # Service Bus delivered Dataverse's one post twice
    actions = MockMessageActions()
    await user_function(messages=messages, message_actions=actions)
    assert [actions.of(m).kind for m in messages] == ["complete", "complete"]
    assert len(fake_factory.delivery.plans) == 1
    assert await history(record) == [("skipped", "duplicate"), ("written", None)]


async def test_a_configuration_fault_retries_the_whole_batch_with_one_error(
        outcome_env: str, user_function: UserFunction, fake_factory: FakeFactory, scheduler: RecordingScheduler,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    app = functions.FunctionApp(delivery_factory=fake_factory, scheduler_factory=scheduler.factory)  # no FHIR_URL
    monkeypatch.setattr(functions, "_APP", app)
    messages = batch(a=create_body(new_id()), b=consent_body(new_id()), c=reject_body(new_id()))
    actions = MockMessageActions()
    caplog.set_level(logging.DEBUG)
    await user_function(messages=messages, message_actions=actions)
    assert [actions.of(m).kind for m in messages] == ["complete"] * 3
    assert sorted(c.message_id for c in scheduler.copies) == ["a~r1", "b~r1", "c~r1"]
    [error] = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("writeback")]
    text = error.getMessage()
    assert "FHIR_URL" in text and "All 3 messages of the batch are retried" in text
    assert error.__dict__["outcome"] == "config-error" and error.__dict__["messages"] == 3
    assert error.__dict__["message_ids"] == "a,b,c" and error.exc_info is None
    assert fake_factory.built == 0
    await app.aclose()


async def test_a_configuration_fault_without_a_scheduler_says_the_batch_is_abandoned(
        outcome_env: str, user_function: UserFunction, fake_factory: FakeFactory, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Found by a new user: with no Service Bus connection to schedule retry copies, the configuration fault's
    record promised a delayed retry while the messages were abandoned; alerts and queries read that record."""
    app = functions.FunctionApp(delivery_factory=fake_factory)  # no FHIR_URL, no Service Bus connection
    monkeypatch.setattr(functions, "_APP", app)
    messages = batch(a=create_body(new_id()), b=create_body(new_id()))
    actions = MockMessageActions()
    caplog.set_level(logging.DEBUG)
    await user_function(messages=messages, message_actions=actions)
    assert [actions.of(m).kind for m in messages] == ["abandon"] * 2
    fault = next(r for r in caplog.records if r.__dict__.get("outcome") == "config-error")
    assert fault.__dict__["settlement"] == "abandon" and "are abandoned" in fault.getMessage()
    assert "growing delay" not in fault.getMessage()
    await app.aclose()


@pytest.mark.parametrize(("name", "value"), [("OUTCOMES_CONNECTION_STRING", "garbage"),
                                           ("OUTCOMES_TABLE_ENDPOINT", "http://127.0.0.1:1")])
async def test_a_malformed_storage_setting_is_a_configuration_fault_not_a_bug(
        name: str, value: str, outcome_env: str, user_function: UserFunction, fake_factory: FakeFactory,
        scheduler: RecordingScheduler, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Found trying the product as a new user: the Table Storage client refused these with a ValueError, logged as
    an unexpected error and abandoned, so Service Bus redelivered each message until MaxDeliveryCountExceeded."""
    monkeypatch.setenv("FHIR_URL", "http://127.0.0.1:9/fhir")
    monkeypatch.delenv("OUTCOMES_CONNECTION_STRING")
    monkeypatch.setenv(name, value)
    app = functions.FunctionApp(delivery_factory=fake_factory, scheduler_factory=scheduler.factory)
    monkeypatch.setattr(functions, "_APP", app)
    messages = batch(a=create_body(new_id()))
    actions = MockMessageActions()
    await user_function(messages=messages, message_actions=actions)
    assert [actions.of(m).kind for m in messages] == ["complete"]  # its copy waits (section 2 of #13)
    assert [c.message_id for c in scheduler.copies] == ["a~r1"]
    [error] = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("writeback")]
    assert error.__dict__["outcome"] == "config-error" and name in error.getMessage()
    assert value not in error.getMessage() and error.exc_info is None
    await app.aclose()


async def test_an_unreadable_message_is_abandoned_alone(fake_app: functions.FunctionApp,
                                                        user_function: UserFunction,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    first, last = new_id(), new_id()
    # A model_binding_data without content: the extension hands over None in its place.
    messages = received_batch([host_content(create_body(first)), b"", host_content(consent_body(last))])
    assert messages[1] is None
    actions = MockMessageActions()
    await user_function(messages=messages, message_actions=actions)
    assert [actions.of(m).kind for m in messages] == ["complete", "abandon", "complete"]
    assert await history(first) == [("written", None)]
    assert await history(last) == [("skipped", "consent-withheld")]
    [error] = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("writeback")]
    assert "unexpected AttributeError" in error.getMessage() and "abandoned" in error.getMessage()


async def test_a_failed_settlement_does_not_stop_the_others(fake_app: functions.FunctionApp,
                                                            user_function: UserFunction,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    records = [new_id() for _ in range(3)]
    messages = batch(create_body(records[0]), reject_body(records[1]), consent_body(records[2]))
    actions = MockMessageActions(fail_for=[messages[1]])  # its lock was lost
    caplog.set_level(logging.INFO, "writeback")
    await user_function(messages=messages, message_actions=actions)
    assert [actions.of(m).kind for m in messages] == ["complete", "deadletter", "complete"]
    assert any("settlement deadletter failed" in r.getMessage() for r in caplog.records)
    assert sorted((r.__dict__["record_id"], r.__dict__["settlement"]) for r in outcome_records(caplog)) == sorted([
        (records[0], "complete"), (records[1], "deadletter-failed"), (records[2], "complete")])
    assert await history(records[0]) == [("written", None)]


async def test_an_unexpected_error_abandons_every_unsettled_message(
        fake_app: functions.FunctionApp, user_function: UserFunction, fake_factory: FakeFactory,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    async def broken(plan: WritePlan) -> Delivered:
        raise ValueError(f"bad value {FIRST}")

    monkeypatch.setattr(fake_factory.delivery, "deliver", broken)
    messages = batch(create_body(new_id()), consent_body(new_id()), reject_body(new_id()))
    actions = MockMessageActions()
    await user_function(messages=messages, message_actions=actions)
    assert [actions.of(m).kind for m in messages] == ["abandon"] * 3
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("writeback")]
    assert len(errors) == 3 and all("ValueError" in r.getMessage() for r in errors)
    assert all(FIRST not in r.getMessage() for r in errors)


async def test_the_fhir_target_writes_in_bundles_and_the_alternate_one_at_a_time() -> None:
    delivery, aclose = build_delivery(Settings.from_env({"FHIR_URL": "http://127.0.0.1:9/fhir"}))
    await aclose()
    assert isinstance(delivery, BatchDelivery)
    alternate, close_alternate = build_delivery(Settings.from_env({
        "WRITEBACK_TARGET": "alternate", "ALTERNATE_ENDPOINT_URL": "https://alt.example.org/writeback",
        "ALTERNATE_TOKEN_URL": "https://login.example.org/token", "ALTERNATE_CLIENT_ID": "c",
        "ALTERNATE_CLIENT_SECRET": "s"}))
    await close_alternate()
    assert not hasattr(alternate, "deliver_many")  # one at a time


async def test_batch_end_to_end(live_app: functions.FunctionApp, user_function: UserFunction,
                                fhir: httpx.Client) -> None:
    """Creates, updates (one of a resource written earlier, one of a row created in the same batch: only its
    newest state is written), a duplicate, a skip and a reject in one invocation: FHIR batch bundles to the dev
    server, outcome rows in Azurite."""
    existing = new_id()
    earlier = MockMessageActions()
    await user_function(messages=batch(create_body(existing, version=1)), message_actions=earlier)
    assert earlier.only.kind == "complete"

    lone, twice, repeated, withheld, rejected = (new_id() for _ in range(5))
    request = new_id()
    messages = batch(
        create_body(lone, version=1),
        update_body(existing, 2, telephone1="+1 206 555 0102"),
        create_body(twice, version=1),
        update_body(twice, 2, telephone1="+1 206 555 0202"),
        create_body(repeated, version=1, request_id=request),
        create_body(repeated, version=1, request_id=request),
        consent_body(withheld),
        reject_body(rejected),
    )
    actions = MockMessageActions()
    await user_function(messages=messages, message_actions=actions)

    assert [actions.of(m).kind for m in messages] == ["complete"] * 7 + ["deadletter"]
    assert actions.of(messages[-1]).reason == "invalid-contact-type"
    assert await history(lone) == [("written", None)]
    assert await history(existing) == [("written", None)] * 2
    assert await history(twice) == [("skipped", "stale"), ("written", None)]  # one write of its newest state
    assert await history(repeated) == [("skipped", "duplicate"), ("written", None)]
    assert await history(withheld) == [("skipped", "consent-withheld")]
    assert await history(rejected) == [("dead-lettered", "invalid-contact-type")]
    assert patients_of(fhir, withheld) == [] and patients_of(fhir, rejected) == []

    for record in (lone, existing, twice, repeated):
        [resource] = patients_of(fhir, record)  # one resource per row, whatever the batch held
        assert resource["name"][0]["family"] == LAST
    phones = {record: [t["value"] for t in patients_of(fhir, record)[0].get("telecom", [])]
              for record in (existing, twice)}
    assert phones == {existing: ["+1 206 555 0102"], twice: ["+1 206 555 0202"]}  # the later change won

    # Every write has its Provenance on the server, naming the very version written.
    written = [row for record in (lone, existing, twice, repeated) for row in await rows_of(record)
               if row.outcome == "written"]
    assert len(written) == 5
    for row in written:
        assert row.resource and "/_history/" in row.resource and row.provenance
        assert row.settlement == "complete" and row.message_id
        provenance = fhir.get(f"/{row.provenance.split('/_history/')[0]}").json()
        assert provenance["resourceType"] == "Provenance"
        assert [t["reference"] for t in provenance["target"]] == [row.resource]
        version = fhir.get(f"/{row.resource}")
        assert version.status_code == 200, row.resource
    assert {row.message_id for row in written} == {m.message_id for m in [
        earlier.only.message, messages[0], messages[1], messages[3], messages[4]]}


async def test_settlement_calls_do_not_block_the_event_loop(fake_app: functions.FunctionApp,
                                                            user_function: UserFunction) -> None:
    """A settlement is a synchronous gRPC call into the host: while one blocks, the rest of the batch moves on."""
    loop_thread = threading.get_ident()
    ticks = 0
    blocked_loop: list[str] = []

    class SlowHost(MockMessageActions):
        def complete(self, message: Any) -> None:
            if threading.get_ident() == loop_thread:
                blocked_loop.append("complete ran on the event loop's thread")
            seen = ticks
            deadline = time.monotonic() + 5
            while ticks == seen and time.monotonic() < deadline:  # the loop must tick while this call waits
                time.sleep(0.005)
            if ticks == seen:
                blocked_loop.append("the event loop did not run while a settlement call was in progress")
            super().complete(message)

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.001)
            ticks += 1

    messages = batch(*(consent_body(new_id()) for _ in range(4)))
    actions = SlowHost()
    beat = asyncio.create_task(ticker())
    try:
        await user_function(messages=messages, message_actions=actions)
    finally:
        beat.cancel()
    assert blocked_loop == []
    assert [actions.of(m).kind for m in messages] == ["complete"] * 4
