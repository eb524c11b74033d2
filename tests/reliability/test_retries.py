"""Failures that wait instead of burning deliveries, a deadline inside the lock, and bundles that one bad entry
cannot take down (issue 13, sections 2 to 4).

Each scenario runs the real function adapter (`FunctionApp.handle_batch`: settlement, retry scheduling, the
deadline) over the real pipeline, the FHIR dev server (behind a fault-injecting transport) and Azurite, fed by
the queue simulator of tests/reliability/broker.py, whose clock the test controls: a two-hour outage takes no
real time. After each: the invariant of `check_invariant` (every message ended once, one resource per row,
each row's FHIR state is its last Dataverse state, every write has its Provenance).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import httpx
import pytest

from devtools.faults import Fault
from devtools.messages import Lookup, context
from devtools.services import Azurite, FhirDevServer
from tests.delivery.conftest import Fhir, Rig, env_for
from tests.reliability.broker import T0, Broker
from tests.reliability.conftest import Row, check_invariant
from tests.reliability.figures import FIGURES
from tests.reliability.test_fault_injection import TcpProxy
from writeback.functions import FunctionApp
from writeback.outcomes import OutcomeStore
from writeback.settings import DEADLINE_MARGIN_SECONDS

Simulated = Callable[..., tuple[Rig, FunctionApp]]
TWO_HOURS = timedelta(hours=2)


async def _nothing() -> None:
    return None


@pytest.fixture
async def simulated(rig_factory: Callable[..., Rig], ledger: OutcomeStore, azurite_tables: Azurite):
    """`make(broker, **settings)`: a rig (FHIR through the fault transport) and the function app wired to it,
    the Azurite ledger and the broker (its scheduler and clock)."""
    apps: list[FunctionApp] = []

    def make(broker: Broker, env: dict[str, str] | None = None, margin: float = DEADLINE_MARGIN_SECONDS,
             **overrides: str) -> tuple[Rig, FunctionApp]:
        rig = rig_factory(**overrides)
        settings_env = {**env_for(rig.server, **overrides), "OUTCOMES_CONNECTION_STRING":
                        azurite_tables.connection_string, **(env or {})}
        if env is not None:
            env.update(settings_env)  # the scenario changes the settings under the running app
            settings_env = env
        delivery = rig.pipeline.delivery
        assert delivery is not None
        app = FunctionApp(settings_env, delivery_factory=lambda s: (delivery, _nothing),
                          ledger_factory=lambda s: (ledger, _nothing), scheduler_factory=broker.scheduler_factory,
                          clock=broker.clock, margin_seconds=margin)
        broker.app = app
        apps.append(app)
        return rig, app

    yield make
    for app in apps:
        await app.aclose()


def body(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode()


def identifier_row(parent: str, system: str, value: str, version: int = 1) -> tuple[str, bytes]:
    """A medical identifier row of contact `parent`, as its Create step sends it."""
    row_id = Row().id  # any fresh GUID
    columns = {"msemr_medicalidentifierid": row_id, "msemr_assignee": Lookup("contact", parent),
               "msemr_identifiersystem": system, "msemr_value": value, "versionnumber": version}
    return row_id, body(context("Create", "msemr_medicalidentifier", row_id, columns, post=columns))


def outage(broker: Broker, length: timedelta) -> Callable[[], bool]:
    ends = broker.now + length
    return lambda: broker.now < ends


def assert_nothing_dead_lettered(broker: Broker) -> None:
    dead = {seq: [e.reason for e in ends] for seq, ends in broker.ends.items()
            if any(e.settlement == "deadletter" for e in ends)}
    assert dead == {}


# ---- section 2: transient failures wait ------------------------------------------------------------------------


async def test_an_identifier_row_arriving_15_minutes_before_its_patient_is_written_after_it(
        simulated: Simulated, fhir: Fhir):
    broker = Broker(batch=5)
    simulated(broker)
    patient = Row()
    identifier, message = identifier_row(patient.id, "urn:oid:2.16.840.1.113883.4.1", "123-45-6789")
    early = broker.send(message, None)
    broker.send(body(patient.create()), patient.id, at=T0 + timedelta(minutes=15))
    await broker.run()

    assert_nothing_dead_lettered(broker)
    assert broker.end(early).state == "written"
    assert len(broker.results[early]) > 3  # it waited: several retries, spread over the 15 minutes
    assert broker.end(early).at >= T0 + timedelta(minutes=15)
    [resource] = fhir.search(f"Patient?identifier=urn:dataverse:contact|{patient.id}")
    assert {"system": "urn:oid:2.16.840.1.113883.4.1", "value": "123-45-6789"}.items() <= next(
        i for i in resource["identifier"] if i.get("value") == "123-45-6789").items()
    check_invariant(broker, fhir, {patient.id: patient.state})
    FIGURES["retries_scheduled"] += broker.copies_scheduled
    assert identifier


async def test_a_two_hour_fhir_outage_dead_letters_nothing(simulated: Simulated, fhir: Fhir):
    broker = Broker(batch=4)
    rig, _ = simulated(broker)
    down = outage(broker, TWO_HOURS)
    rig.transport.add(Fault(url_contains="/fhir/R4", status=503, times=-1, active=down))
    rows = [Row() for _ in range(4)]
    for row in rows:
        broker.send(body(row.create()), row.id)
        broker.send(body(row.update(lastname="Outage")), row.id)
    await broker.run()

    assert_nothing_dead_lettered(broker)
    # Written, or stale where the row's newer change (holding its whole state) was written instead.
    assert {(broker.end(seq).state, broker.end(seq).reason) for seq in broker.rows} <= {
        ("written", None), ("skipped", "stale")}
    assert max(e.at for ends in broker.ends.values() for e in ends) >= T0 + TWO_HOURS
    fired = sum(f.fired for f in rig.transport.faults)
    assert fired > 20
    check_invariant(broker, fhir, {r.id: r.state for r in rows}, faults=fired)
    FIGURES["outages"] += 1
    FIGURES["retries_scheduled"] += broker.copies_scheduled


async def test_a_two_hour_table_storage_outage_dead_letters_nothing(simulated: Simulated, fhir: Fhir,
                                                                     azurite_tables: Azurite):
    broker = Broker(batch=4)
    simulated(broker)
    back_at = T0 + TWO_HOURS

    async def world(b: Broker) -> None:
        if b.now >= back_at and not azurite_tables.running:
            azurite_tables.start()

    broker.before_invocation = world
    rows = [Row() for _ in range(3)]
    for row in rows:
        broker.send(body(row.create()), row.id)
    azurite_tables.stop()
    try:
        await broker.run()
    finally:
        if not azurite_tables.running:
            azurite_tables.start()
    assert_nothing_dead_lettered(broker)
    reasons = {r.reason.value for results in broker.results.values() for r in results if r.reason}
    assert "outcome-store-unavailable" in reasons
    check_invariant(broker, fhir, {r.id: r.state for r in rows}, faults=1)
    FIGURES["outages"] += 1


async def test_a_two_hour_token_endpoint_outage_dead_letters_nothing(simulated: Simulated, fhir: Fhir,
                                                                      fhir_server: FhirDevServer):
    proxy = TcpProxy(fhir_server.port)
    broker = Broker(batch=4)
    simulated(broker, FHIR_TOKEN_URL=f"http://127.0.0.1:{proxy.port}/oauth2/token")
    back_at = T0 + TWO_HOURS

    async def world(b: Broker) -> None:
        if b.now >= back_at and proxy.server is None:
            await proxy.start()

    broker.before_invocation = world
    rows = [Row() for _ in range(3)]
    for row in rows:
        broker.send(body(row.create()), row.id)
    try:
        await broker.run()
    finally:
        await proxy.stop()
    assert_nothing_dead_lettered(broker)
    reasons = {r.reason.value for results in broker.results.values() for r in results if r.reason}
    assert "fhir-unavailable" in reasons
    check_invariant(broker, fhir, {r.id: r.state for r in rows}, faults=1)
    FIGURES["outages"] += 1


async def test_a_two_hour_configuration_fault_dead_letters_nothing(simulated: Simulated, fhir: Fhir):
    broker = Broker(batch=4)
    env: dict[str, str] = {}
    simulated(broker, env)
    good_url = env.pop("FHIR_URL")  # someone deleted the setting
    back_at = T0 + TWO_HOURS

    async def world(b: Broker) -> None:
        if b.now >= back_at:
            env["FHIR_URL"] = good_url  # and someone put it back

    broker.before_invocation = world
    rows = [Row() for _ in range(3)]
    for row in rows:
        broker.send(body(row.create()), row.id)
    await broker.run()
    assert_nothing_dead_lettered(broker)
    assert all(broker.end(seq).state == "written" for seq in broker.rows)
    assert broker.copies_scheduled >= 3 * 8  # the copies waited it out: 15 s doubling to 15 min, for 2 h
    check_invariant(broker, fhir, {r.id: r.state for r in rows}, faults=1)


async def test_past_the_retry_window_a_message_is_dead_lettered_with_its_own_reason(simulated: Simulated,
                                                                                    fhir: Fhir):
    broker = Broker(batch=4)
    rig, _ = simulated(broker)
    rig.transport.add(Fault(url_contains="/fhir/R4", status=503, times=-1, active=outage(broker, timedelta(hours=25))))
    row = Row()
    seq = broker.send(body(row.create()), row.id)
    await broker.run()
    end = broker.end(seq)
    assert (end.settlement, end.reason) == ("deadletter", "retries-exhausted")
    assert "fhir-unavailable" in end.description and "24" in end.description
    assert T0 + timedelta(hours=24) <= end.at <= T0 + timedelta(hours=24, minutes=16)
    assert broker.deliveries == len(broker.results[seq])  # every delivery ended in a result, none abandoned
    assert not fhir.search(f"Patient?identifier=urn:dataverse:contact|{row.id}")


async def test_a_crash_between_scheduling_the_copy_and_completing_loses_nothing(simulated: Simulated, fhir: Fhir):
    """The copy is on the queue, but the original's completion fails (its lock was lost): the original comes back
    after the lock duration, schedules its copy again under the same MessageId (dropped by duplicate detection),
    and the row is written once."""
    broker = Broker(batch=2)
    rig, _ = simulated(broker)
    rig.transport.add(Fault(url_contains="/fhir/R4", status=503, times=-1, active=outage(broker, timedelta(minutes=6))))
    failed: list[str] = []

    def lose_first_lock(message: Any) -> bool:
        if not failed:
            failed.append(message.message_id)
            return True
        return False

    broker.fail_complete = lose_first_lock
    row = Row()
    seq = broker.send(body(row.create()), row.id)
    await broker.run()
    assert failed and broker.duplicates_dropped >= 1
    assert broker.end(seq).state == "written"
    check_invariant(broker, fhir, {row.id: row.state}, faults=1)


# ---- section 3: a batch never outlives its lock ----------------------------------------------------------------


async def test_an_invocation_stops_at_its_deadline_and_reschedules_what_is_unfinished(simulated: Simulated,
                                                                                       fhir: Fhir):
    broker = Broker(batch=6, lock=timedelta(seconds=40))
    # The margin leaves 0.8 s of real time inside the simulated 40 s lock.
    rig, _ = simulated(broker, margin=38.2, FHIR_TIMEOUT_SECONDS="1")
    slow = rig.transport.add(Fault(method="POST", path_endswith="/R4", delay=2.0, times=2))
    rows = [Row() for _ in range(3)]
    for row in rows:
        broker.send(body(row.create()), row.id)
    for row in rows:
        broker.send(body(row.update(lastname="Late")), row.id)
    await broker.run()

    reasons = [r.reason.value for results in broker.results.values() for r in results if r.reason]
    assert "deadline-reached" in reasons and slow.fired >= 1
    assert_nothing_dead_lettered(broker)
    check_invariant(broker, fhir, {r.id: r.state for r in rows})


async def test_at_the_deadline_the_outcome_log_says_what_happened_to_each_message(
        simulated: Simulated, fhir: Fhir, ledger: OutcomeStore):
    """A deadline that stops the batch while outcomes are being recorded: the log and the settlement must agree.
    Before, a message whose dead-letter outcome was recorded just before the deadline was rescheduled as
    `deadline-reached` (the log said dead-lettered; the dead-letter queue had nothing), and a message the deadline
    stopped got no outcome row at all."""
    broker = Broker(batch=9, lock=timedelta(seconds=40))
    rig, _ = simulated(broker, margin=38.2, FHIR_TIMEOUT_SECONDS="1")
    slow = rig.transport.add(Fault(method="POST", path_endswith="/R4", delay=2.0, times=2))
    # Every third names a FHIR id that does not exist: dead-lettered target-missing once it is read.
    rows = [Row(msemr_azurefhirid=f"gone-{n}") if n % 3 == 0 else Row() for n in range(6)]
    for row in rows:
        broker.send(body(row.create()), row.id)
    await broker.run()
    assert slow.fired >= 1
    results = [r for rs in broker.results.values() for r in rs]
    # The ledger stamps its rows with the wall clock, not the simulator's (whose T0 is a fixed date): the query
    # looks back from the real now, or the test starts failing once that date is a day past (it did, in CI).
    logged = await ledger.query(since=timedelta(hours=1))
    stopped = [r for r in results if r.reason is not None and r.reason.value == "deadline-reached"]
    assert stopped, "the deadline did not stop anything: the test proves nothing"
    assert len([row for row in logged if row.reason == "deadline-reached"]) == len(stopped)
    dead = [end for ends in broker.finals.values() for end in ends if end.settlement == "deadletter"]
    assert sorted(row.reason or "" for row in logged if row.outcome == "dead-lettered") == sorted(
        end.reason or "" for end in dead)


# ---- section 4: one bad entry does not take its batch down -----------------------------------------------------


async def test_a_bundle_refused_whole_for_one_entry_is_split_until_that_entry_is_isolated(
        simulated: Simulated, fhir: Fhir):
    broker = Broker(batch=8)
    rig, _ = simulated(broker)
    poison = Row(lastname="Refused-by-the-server")
    # A server that answers 400 for the whole batch when one entry holds something it refuses.
    rig.transport.add(Fault(method="POST", path_endswith="/R4", status=400, times=-1,
                            body_contains=b"Refused-by-the-server",
                            body={"resourceType": "OperationOutcome",
                                  "issue": [{"severity": "error", "code": "invalid"}]}))
    rows = [Row() for _ in range(6)]
    for row in [*rows[:3], poison, *rows[3:]]:
        broker.send(body(row.create()), row.id)
    await broker.run()
    ends = {broker.rows[seq]: broker.end(seq) for seq in broker.rows}
    assert (ends[poison.id].settlement, ends[poison.id].reason) == ("deadletter", "fhir-rejected")
    assert all(ends[r.id].state == "written" for r in rows)
    check_invariant(broker, fhir, {r.id: r.state for r in rows})


async def test_a_bundle_too_large_is_split_by_size(simulated: Simulated, fhir: Fhir):
    broker = Broker(batch=8)
    rig, _ = simulated(broker)
    too_large = rig.transport.add(Fault(method="POST", path_endswith="/R4", status=413, times=-1))
    limit = 3

    seen: list[int] = []
    rows = [Row() for _ in range(7)]

    def larger_than_limit() -> bool:
        return bool(seen) and seen[-1] > limit

    too_large.active = larger_than_limit

    original = rig.transport.handle_async_request

    async def counting(request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path.endswith("/fhir/R4"):
            seen.append(len(json.loads(request.content).get("entry", [])))
        return await original(request)

    rig.transport.handle_async_request = counting  # type: ignore[method-assign]
    for row in rows:
        broker.send(body(row.create()), row.id)
    await broker.run()
    assert too_large.fired >= 1 and max(seen) > limit
    assert all(broker.end(seq).state == "written" for seq in broker.rows)
    check_invariant(broker, fhir, {r.id: r.state for r in rows})
