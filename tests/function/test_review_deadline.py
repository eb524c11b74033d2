"""Adversarial review of the invocation deadline and of lock safety under slow or hanging dependencies.

The product promises that each invocation has a deadline well inside the Service Bus lock, that what is not
finished by then is rescheduled (a delayed copy, then complete) instead of being worked on past the lock, that a
crash between two steps may duplicate a message but never lose one, and that every message ends in exactly one
state with an outcome row (README "Retries", docs/operations.md section 7 "Timing").

Each test below fails on the code it was written against, for a reason an administrator would notice; its
docstring says what they see and what they should see. The parts are the ones the suite already uses: the real
function adapter (`FunctionApp.handle_batch`), the outcome log and ledger in Azurite, the FHIR dev server behind
the fault-injecting transport (devtools/faults.py), and the Service Bus stand-ins (tests/function, the queue
simulator's `SimMessage`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from devtools.services import Azurite, FhirDevServer
from tests.delivery.conftest import Fhir, Rig, env_for, fhir, maps, rig_factory
from tests.function.conftest import FakeFactory, MockMessageActions, RecordingScheduler
from tests.function.helpers import create_body, new_id
from tests.function.sb import received_message
from tests.function.test_settlement import redelivered
from tests.reliability.broker import SimMessage
from tests.reliability.conftest import BundleFault, Deliveries, Row, audit_history, ledger, ledger_settings
from tests.reliability.test_fault_injection import TcpProxy
from tests.reliability.test_interleavings import marks
from writeback import functions
from writeback.outcomes import OutcomeStore
from writeback.pipeline import Pipeline
from writeback.reasons import Reason
from writeback.settings import Settings

__all__ = ["fhir", "ledger", "ledger_settings", "maps", "rig_factory"]  # the delivery and reliability rigs' fixtures

def _app_on(rig: Rig, ledger: OutcomeStore, settings: Settings, scheduler: RecordingScheduler) -> functions.FunctionApp:
    """The function app over the rig's delivery, this ledger (reached with `settings`) and the recording scheduler,
    FHIR_TIMEOUT_SECONDS 1. The sb.py messages are locked for one more minute: its margin leaves 0.8 s of work
    before the deadline."""
    delivery = rig.pipeline.delivery
    assert delivery is not None
    env = {**env_for(rig.server, FHIR_TIMEOUT_SECONDS="1"),
           "OUTCOMES_CONNECTION_STRING": settings.outcomes_connection_string or "",
           "OUTCOMES_TABLE_PREFIX": settings.outcomes_table_prefix}
    return functions.FunctionApp(env, delivery_factory=lambda s: (delivery, _nothing),
                                 ledger_factory=lambda s: (ledger, _nothing), scheduler_factory=scheduler.factory,
                                 margin_seconds=58.2)


# ---- a batch handed over after its lock lapsed ------------------------------------------------------------------


async def test_a_batch_whose_lock_has_already_lapsed_is_not_written_to_fhir(
        outcome_env: str, fake_factory: FakeFactory, scheduler: RecordingScheduler,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker is busy (a long batch on the same instance, a cold start) and invokes the function with a
    patient's Create whose lock ended 5 s ago: Service Bus has already made the message available again, and
    another instance may be writing it right now. `FunctionApp.deadline` floors the budget at 0.5 s
    (`max(budget, 0.5)`), so the invocation still plans and writes the message to FHIR, then completes it (which the
    real host refuses: the lock is gone). What the administrator sees: the same Create processed twice at the same
    time by two instances (`conflict` on the create lease, or two writes of one version), a `complete-failed`
    settlement, and the promise "never worked on past its lock" (docs/operations.md, Timing) broken. What they
    should see: a message whose lock is over (or too close to its end to fit a request) is not written; it is left
    to its redelivery (or rescheduled), never worked on."""
    monkeypatch.setenv("FHIR_URL", "http://127.0.0.1:9/fhir")
    app = functions.FunctionApp(delivery_factory=fake_factory, scheduler_factory=scheduler.factory)
    now = datetime.now(UTC)
    message = SimMessage(create_body(new_id()), "lapsed-1", {}, now - timedelta(minutes=6),
                         locked_until_utc=now - timedelta(seconds=5))
    actions = MockMessageActions()
    try:
        await app.handle_batch([message], actions)
    finally:
        await app.aclose()
    assert fake_factory.delivery.plans == [], (
        f"a message whose lock ended 5 s before the invocation was written to FHIR and settled "
        f"{[c.kind for c in actions.calls]}")


# ---- a create held past its lease by a token endpoint that answers byte by byte --------------------------------


class DrippingTokenEndpoint(TcpProxy):
    """A loopback TCP forwarder in front of the dev server's token endpoint. Once `armed`, it passes the server's
    answers on one byte every 0.25 s (each byte well inside FHIR_TIMEOUT_SECONDS, so no read times out) until
    `released`, then the rest at once: a token endpoint (or a proxy on its path) answering slowly byte by byte."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.armed = False
        self.dripping = asyncio.Event()
        self.released = asyncio.Event()

    async def stop(self) -> None:
        self.released.set()
        await super().stop()

    async def passed(self, data: bytes, dst: asyncio.StreamWriter, answer: bool) -> None:
        if answer and self.armed and not self.released.is_set():
            self.dripping.set()
            while data and not self.released.is_set():
                dst.write(data[:1])
                await dst.drain()
                data = data[1:]
                await asyncio.sleep(0.25)
        await super().passed(data, dst, answer)


@pytest.fixture
async def dripping_token_endpoint(fhir_server: FhirDevServer) -> AsyncIterator[DrippingTokenEndpoint]:
    proxy = DrippingTokenEndpoint(int(fhir_server.token_url.split(":")[2].split("/")[0]))
    await proxy.start()
    yield proxy
    await proxy.stop()


async def test_a_create_held_past_its_lease_by_a_slow_token_refresh_does_not_overwrite_a_newer_write(
        rig_factory: Callable[..., Rig], ledger: OutcomeStore, ledger_settings: Settings, fhir: Fhir,
        dripping_token_endpoint: DrippingTokenEndpoint) -> None:
    """Instance X has a patient's Create (version 10): it reads (no Patient yet), takes the create lease
    (`BatchDelivery._write`: FHIR_RETRY_MAX_SECONDS + FHIR_TIMEOUT_SECONDS, 90 s by default; 2 s here), and sends
    its `PUT Patient/<row id>`, which the server answers 401 (the token was revoked early). X asks the token
    endpoint for a new token, and the endpoint answers byte by byte: no read of it times out, and nothing but the
    invocation's deadline (lock - FHIR_TIMEOUT_SECONDS - 30 s = 240 s by default) bounds the wait. Meanwhile the
    lease expires, and instance Y, processing the row's next save (version 11, with its images), reads no Patient
    either, takes the expired lease and creates the Patient at version 11. Then X's token arrives and X sends its
    create: a `PUT` without `If-Match`, which overwrites Y's newer version with version 10. What the administrator
    sees: both messages `written`, and the Patient in FHIR showing the older state (the row version marked in it went
    back from 11 to 10) until the row is saved again; two instances wrote one resource at once, which the create
    lease exists to prevent. What they should see: a create that goes out only while its lease still holds (or a
    create that cannot replace a resource made meanwhile), so X's create ends `conflict`, is retried, and finds
    version 11 (`stale`)."""
    proxy = dripping_token_endpoint
    x = rig_factory(FHIR_RETRY_MAX_SECONDS="1", FHIR_TIMEOUT_SECONDS="1",
                    FHIR_TOKEN_URL=f"http://127.0.0.1:{proxy.port}/oauth2/token")
    y = rig_factory(FHIR_RETRY_MAX_SECONDS="1", FHIR_TIMEOUT_SECONDS="1")
    async with OutcomeStore.from_settings(ledger_settings, retry_total=1, retry_backoff=0.05) as own:
        on_x = Pipeline(x.pipeline.maps, x.settings, x.pipeline.delivery, ledger)
        on_y = Pipeline(y.pipeline.maps, y.settings, y.pipeline.delivery, own)
        staged = Deliveries()
        row = Row()
        create = staged.send(row.create(), row.id)  # version 10
        update = staged.send(row.update(lastname="Newer-Name"), row.id)  # version 11, the row's last state

        async def revoked(_: Any) -> None:
            proxy.armed = True  # the token asked for after this 401 comes byte by byte

        x.transport.add(BundleFault(holding="create", status=401, before=revoked, times=1))
        on_x_task = asyncio.create_task(staged.deliver(on_x, create))
        try:
            await asyncio.wait_for(proxy.dripping.wait(), 10)
            await asyncio.sleep(x.settings.retry_max_seconds + x.settings.timeout_seconds + 0.5)  # the lease ran out
            [newer] = await staged.deliver(on_y, update)
            assert newer.state == "written", newer.detail
        finally:
            proxy.released.set()
        [older] = await asyncio.wait_for(on_x_task, 20)
    states = marks(fhir, row)
    assert states[-1] == "11", (
        f"X's create ({older.state} {older.reason}) went out after its lease had expired and Y had written version "
        f"11: the Patient's row versions, oldest first, are {states}")


# ---- the deadline strikes during a Provenance, and the message is abandoned (no copy could be scheduled) ----------


async def _nothing() -> None:
    return None


async def test_a_version_whose_provenance_the_deadline_stopped_gets_it_when_the_abandoned_message_comes_back(
        rig_factory: Callable[..., Rig], ledger: OutcomeStore, ledger_settings: Settings, fhir: Fhir,
        scheduler: RecordingScheduler) -> None:
    """A slow FHIR server: a patient's Update (version 11) is written, and the invocation's deadline comes while its
    Provenance is on its way, so the call stops (`deadline-reached`) with version 11 in FHIR and no Provenance for
    it. Its delayed copy cannot be scheduled (the Service Bus send fails), so the message is abandoned and Service
    Bus redelivers it. Meanwhile another instance writes the row's next save (version 12). The redelivered message
    is handed over as the extension decodes it: `delivery_count` 0 (the extension does not decode the AMQP header,
    `test_envelope_from_received_message`) and no `writeback-attempt`, so the pipeline takes it for a first try,
    finds a newer version (`stale`) and does not look for the Provenance its first try owes (it does so only for a
    message "tried again", `pipeline._retried`). What the administrator sees: the message completed as `stale`, and
    in FHIR a version written by the product with no Provenance, for good (the audit trail the product promises for
    every version it writes, docs/reliability.md "Lost"). What they should see: the Provenance written on the
    redelivery, as it is when the copy could be scheduled (`test_the_deadline_stops_the_calls_work_including_
    provenance_still_on_its_way`)."""
    rig = rig_factory(FHIR_TIMEOUT_SECONDS="1")
    app = _app_on(rig, ledger, ledger_settings, scheduler)
    row = Row()

    async def invoke(body: dict[str, Any], message_id: str, **kw: Any) -> tuple[str, Any]:
        actions = MockMessageActions()
        [result] = await app.handle_batch([received_message(json.dumps(body).encode(), message_id=message_id, **kw)],
                                          actions)
        return actions.only.kind, result

    try:
        assert (await invoke(row.create(), "c10"))[1].state == "written"
        u11 = row.update(lastname="Eleven")
        slow = rig.transport.add(BundleFault(holding="provenance", delay=3.0, times=1))
        scheduler.fail = True
        settled, stopped = await invoke(u11, "u11")
        assert slow.fired == 1 and (settled, stopped.reason) == ("abandon", Reason.DEADLINE_REACHED), stopped.detail
        scheduler.fail = False
        assert (await invoke(row.update(telephone1="+1 555 0112"), "u12"))[1].state == "written"  # version 12
        settled, again = await invoke(u11, "u11", delivery_count=2)  # Service Bus redelivers the abandoned message
        assert settled == "complete", again.detail
    finally:
        await app.aclose()
    [patient] = fhir.search(f"Patient?identifier=urn:dataverse:contact|{row.id}")
    audit = audit_history(fhir, patient, "contact", row.id)
    assert audit.missing == 0, (
        f"the redelivered message ended {again.state} {again.reason}; versions without a Provenance: "
        f"{audit.problems}")


# ---- the deadline stops a create that holds its lease but has sent nothing ----------------------------------------


async def test_a_create_the_deadline_stopped_before_it_was_sent_does_not_block_its_own_retry(
        rig_factory: Callable[..., Rig], ledger: OutcomeStore, ledger_settings: Settings,
        scheduler: RecordingScheduler, dripping_token_endpoint: DrippingTokenEndpoint) -> None:
    """A patient's Create: the invocation reads (no Patient yet), takes the create lease and sends its `PUT
    Patient/<row id>`, which the server refuses 401 (the token expired early: nothing was applied). The token
    endpoint then answers byte by byte, and the invocation's deadline comes while the new token is still on its way:
    the message is rescheduled `deadline-reached`, as it should be. But the create lease stays taken (it is given
    back only once the create's answer is in, `BatchDelivery._write`), though this create was never applied and
    will never be: the lease lasts FHIR_RETRY_MAX_SECONDS + FHIR_TIMEOUT_SECONDS (90 s by default; 31 s here), and
    the message's own retry copies (15 s, then 45 s after the first try) meet it. What the administrator sees:
    `conflict`, "another instance is creating the Patient of contact <id>", on a deployment where no other instance
    is creating anything, the write of a new patient delayed by one or two retries, and every other message of the
    row that would create it waiting too: the fault fixed as item 1 of docs/reliability.md ("A create that failed
    transiently blocks its own retry"), back by way of the deadline. What they should see: a create stopped before
    anything of it could be applied gives its lease back, and the retry writes the Patient."""
    proxy = dripping_token_endpoint
    rig = rig_factory(FHIR_TIMEOUT_SECONDS="1", FHIR_TOKEN_URL=f"http://127.0.0.1:{proxy.port}/oauth2/token")
    app = _app_on(rig, ledger, ledger_settings, scheduler)
    row = Row()

    async def expired(_: Any) -> None:
        proxy.armed = True  # the token asked for after this 401 comes byte by byte

    rig.transport.add(BundleFault(holding="create", status=401, before=expired, times=1))
    try:
        first = MockMessageActions()
        [stopped] = await app.handle_batch([received_message(json.dumps(row.create()).encode(),
                                                             message_id="c10")], first)
        assert stopped is not None
        assert (first.only.kind, stopped.reason) == ("complete", Reason.DEADLINE_REACHED), stopped.detail
        proxy.released.set()  # the token endpoint is quick again
        [copy] = scheduler.copies
        again = MockMessageActions()
        [retried] = await app.handle_batch([redelivered(copy)], again)
    finally:
        await app.aclose()
    assert retried is not None
    assert (retried.state, retried.reason) == ("written", None), f"the retry ended {retried.reason}: {retried.detail}"


# ---- Table Storage stops answering after the write: the backstop's reason ----------------------------------------


class SilentAfterCue(TcpProxy):
    """A loopback TCP forwarder in front of Azurite's Table endpoint that, once `silent`, passes nothing on in either
    direction: Table Storage that keeps the connection open and never answers (a storage failover, a network path
    dropping packets); azure-core waits its read timeout (30 s) and retries."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.silent = False

    async def passed(self, data: bytes, dst: asyncio.StreamWriter, answer: bool) -> None:
        if not self.silent:
            await super().passed(data, dst, answer)


async def test_a_message_written_before_table_storage_stopped_answering_is_not_reported_as_unfinished_by_the_deadline(
        rig_factory: Callable[..., Rig], azurite_tables: Azurite, scheduler: RecordingScheduler, fhir: Fhir,
        caplog: pytest.LogCaptureFixture) -> None:
    """A patient's Update is written to FHIR with its Provenance well before the invocation's deadline; then Table
    Storage stops answering (it keeps the connection open: azure-core waits 30 s per try), so what the message taught
    about its row and its outcome row cannot be written. The adapter's backstop (`FunctionApp._process`, the deadline
    plus FHIR_TIMEOUT_SECONDS) ends the wait, as it should, and reschedules the message, but as `deadline-reached`:
    "The invocation's deadline (inside the message lock) came before this message was finished", whose remedy in the
    README's reason table is "lower maxMessageBatchSize or look at the FHIR service's latency". What the administrator
    sees: every message of the batch (100 with the default batch size) logged as `retry` / `deadline-reached`, FHIR
    blamed, and no word of Table Storage, the one dependency that failed; nothing in the outcome log either. What
    they should see: `outcome-store-unavailable` ("Check the storage account"), as when Table Storage refuses the
    same writes outright (README: "also after the message was written")."""
    upstream = int(azurite_tables.connection_string.split("TableEndpoint=http://127.0.0.1:")[1].split("/")[0])
    silent = SilentAfterCue(upstream)
    await silent.start()
    rig = rig_factory(FHIR_TIMEOUT_SECONDS="1")
    quiet = azurite_tables.connection_string.replace(f"127.0.0.1:{upstream}", f"127.0.0.1:{silent.port}")
    settings = Settings(outcomes_connection_string=quiet, outcomes_table_prefix="dl" + new_id().replace("-", "")[:12])
    store = OutcomeStore.from_settings(settings)
    app = _app_on(rig, store, settings, scheduler)
    row = Row()
    caplog.set_level(logging.INFO, "writeback")
    try:
        [created] = await app.handle_batch([received_message(json.dumps(row.create()).encode())],
                                           MockMessageActions())
        assert created is not None and created.state == "written", created and created.detail

        async def storage_goes_quiet(_: Any) -> None:
            silent.silent = True  # from the update's Provenance on, Table Storage does not answer

        rig.transport.add(BundleFault(holding="provenance", before=storage_goes_quiet, times=1))
        actions = MockMessageActions()
        [result] = await app.handle_batch([received_message(json.dumps(row.update(lastname="Later")).encode(),
                                                            message_id="u11")], actions)
    finally:
        silent.silent = False
        await app.aclose()
        await store.aclose()
        await silent.stop()
    [record] = [r for r in caplog.records if r.name == "writeback.function" and r.__dict__.get("message_id") == "u11"]
    assert result is not None
    assert actions.only.kind == "complete" and len(scheduler.copies) == 1
    [patient] = fhir.search(f"Patient?identifier=urn:dataverse:contact|{row.id}")
    assert patient["name"][0]["family"] == "Later" and audit_history(fhir, patient, "contact", row.id).missing == 0
    assert (result.reason, record.__dict__["reason"]) == (Reason.OUTCOME_STORE_UNAVAILABLE,
                                                          "outcome-store-unavailable"), (
        f"a message written to FHIR before Table Storage stopped answering was logged {record.getMessage()}")
