"""Streams of messages through the real FHIR dev server and Azurite under injected faults, redelivered by a
Service Bus simulator; after each scenario the invariant of `check_invariant` holds (tests/reliability/conftest.py).

Retry delays go to the rig's recorded fake sleep, so nothing here waits for a backoff.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from devtools.faults import Fault
from devtools.services import Azurite, FhirDevServer, free_port
from tests.delivery.conftest import Fhir, Rig
from tests.reliability.conftest import Broker, Queued, Row, check_invariant
from tests.reliability.figures import FIGURES
from writeback.bundles import BatchDelivery
from writeback.pipeline import Pipeline, Result
from writeback.reasons import Reason

Wired = Callable[..., tuple[Rig, Pipeline]]


def fired(rig: Rig) -> int:
    return sum(f.fired for f in rig.transport.faults)


def lose_response(request: httpx.Request, response: httpx.Response) -> httpx.Response:
    """The server applied the request, but the answer never arrives."""
    raise httpx.ReadTimeout("injected: response lost after the server applied the request", request=request)


def patient_id(fhir: Fhir, row: Row) -> str:
    [patient] = fhir.search(f"Patient?identifier=urn:dataverse:contact|{row.id}")
    return str(patient["id"])


class TcpProxy:
    """A loopback TCP forwarder that can be taken down and brought back: the token endpoint's availability."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for writer in self.writers:
                writer.close()
            self.writers.clear()
            self.server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


# ---- bounded faults: every stream eventually succeeds ----------------------------------------------------------


async def test_stream_under_http_faults_429_5xx_resets_timeouts_slow(wired: Wired, fhir: Fhir):
    rig, pipeline = wired()
    t = rig.transport
    t.add(Fault(method="POST", url_contains="/Patient", status=429, headers={"Retry-After": "2"}, times=2))
    t.add(Fault(method="POST", url_contains="/Patient", status=503, times=2))
    t.add(Fault(method="POST", url_contains="/Patient", rewrite=lose_response, times=2))  # created, answer lost
    t.add(Fault(method="POST", url_contains="/Patient", error=httpx.ConnectError, times=2))
    t.add(Fault(method="GET", url_contains="/Patient", status=500, times=3))
    t.add(Fault(method="GET", url_contains="/Patient", error=httpx.ReadTimeout, times=2))
    t.add(Fault(method="GET", url_contains="/Patient", delay=0.05, times=4))  # slow answers
    t.add(Fault(method="PUT", url_contains="/Patient/", rewrite=lose_response, times=2))  # updated, answer lost
    t.add(Fault(method="PUT", url_contains="/Patient/", error=httpx.RemoteProtocolError, times=2))
    t.add(Fault(method="PUT", url_contains="/Provenance/", status=502, times=2))
    t.add(Fault(method="PUT", url_contains="/Provenance/", status=429, headers={"Retry-After": "1"}, times=1))
    t.add(Fault(method="PUT", url_contains="/Provenance/", error=httpx.ReadError, times=1, delay=0.05))
    t.add(Fault(method="PUT", url_contains="/Provenance/", status=503, times=3))
    # Bursts past FHIR_MAX_RETRIES abandon the message; the broker redelivers it (never past MaxDeliveryCount).

    broker = Broker(pipeline)
    rows = [Row() for _ in range(8)]
    for row in rows:
        create = row.create()
        broker.send(create, row.id)
        broker.send(create, row.id)  # Dataverse posted it twice
    for n, row in enumerate(rows):
        phone = row.update(telephone1=f"+1 555 02{n:02d}")
        broker.send(phone, row.id)
        broker.send(row.update(address1_city=f"City {n}", lastname=f"Family{n}"), row.id)
        broker.send(phone, row.id)  # a late duplicate of an earlier update
    await broker.run()

    assert all(f.fired == f.times for f in t.faults), [(f.status, f.error, f.fired) for f in t.faults]
    check_invariant(broker, fhir, {r.id: r.state for r in rows}, faults=fired(rig))
    assert all(broker.final(seq).settlement == "complete" for seq in broker.rows)
    reasons = [broker.final(seq).result.reason for seq in broker.rows]
    assert reasons.count(Reason.DUPLICATE) == 16
    assert any(len(results) > 1 for results in broker.results.values())  # something was redelivered
    assert 2.0 in rig.sleeps and 1.0 in rig.sleeps  # Retry-After honoured, through the fake sleep


async def test_storm_of_concurrent_modifications_412(wired: Wired, fhir: Fhir):
    rig, pipeline = wired()
    broker = Broker(pipeline)
    rows = [Row() for _ in range(6)]
    for row in rows:
        broker.send(row.create(), row.id)
    await broker.run(concurrency=4)

    async def other_writer(request: httpx.Request) -> None:
        """Another system changes the resource between our read and our write: our PUT gets 412."""
        resource_id = request.url.path.rsplit("/", 1)[-1]
        current = await asyncio.to_thread(fhir.get, f"Patient/{resource_id}")
        current["extension"] = [{"url": "http://example.org/touched", "valueInteger": FIGURES["concurrent_writes_412"]}]
        FIGURES["concurrent_writes_412"] += 1
        await asyncio.to_thread(fhir.put, current)

    for row in rows:  # three racing writes per update: one more than FHIR_CONFLICT_RETRIES absorbs
        rig.transport.add(Fault(method="PUT", url_contains=f"/Patient/{patient_id(fhir, row)}", before=other_writer,
                                times=5))
    # Several receivers at once, one change per row in flight (two changes of one row in flight at once on two
    # receivers can still overwrite each other's columns: docs/reliability.md).
    for n, row in enumerate(rows):
        broker.send(row.update(mobilephone=f"+1 555 03{n:02d}"), row.id)
    await broker.run(concurrency=len(rows) // 2)
    for n, row in enumerate(rows):
        broker.send(row.update(address1_line1=f"{n} Storm Lane"), row.id)
    await broker.run(concurrency=len(rows) // 2)

    check_invariant(broker, fhir, {r.id: r.state for r in rows}, faults=fired(rig))
    for row in rows:
        [patient] = fhir.search(f"Patient?identifier=urn:dataverse:contact|{row.id}")
        assert patient["extension"][0]["url"] == "http://example.org/touched"  # the other writer's change survived
    assert any(r.reason is Reason.CONFLICT for results in broker.results.values() for r in results)


async def test_table_storage_down_mid_run(wired: Wired, fhir: Fhir, azurite_tables: Azurite):
    rig, pipeline = wired()
    outages = 0
    failures_while_down = 0

    async def stop_storage(_: Any = None) -> None:
        nonlocal outages, failures_while_down
        await asyncio.to_thread(azurite_tables.stop)
        outages += 1
        failures_while_down = 0

    async def after(item: Queued, result: Result) -> None:
        nonlocal failures_while_down
        if item.seq == 3 and result.state == "written":  # down between two messages
            await stop_storage()
        elif azurite_tables.running:
            return
        elif result.reason is Reason.OUTCOME_STORE_UNAVAILABLE:
            failures_while_down += 1
            if failures_while_down >= 2:
                await asyncio.to_thread(azurite_tables.start)

    # Down between the FHIR write and the outcome record: the write happened, the record did not.
    rig.transport.add(Fault(method="PUT", url_contains="/Provenance/", before=stop_storage, times=1))
    broker = Broker(pipeline, after=after)
    rows = [Row() for _ in range(5)]
    try:
        for row in rows:
            broker.send(row.create(), row.id)
        for n, row in enumerate(rows):
            broker.send(row.update(emailaddress1=f"p{n}@example.org"), row.id)
        await broker.run()
    finally:
        if not azurite_tables.running:
            azurite_tables.start()
    assert outages == 2
    FIGURES["outages"] += outages
    check_invariant(broker, fhir, {r.id: r.state for r in rows}, faults=outages)
    retried = [r for results in broker.results.values() for r in results if r.state == "retry"]
    assert retried and all(r.reason is Reason.OUTCOME_STORE_UNAVAILABLE for r in retried)


async def test_token_endpoint_down_then_back(wired: Wired, fhir: Fhir, fhir_server: FhirDevServer):
    proxy = TcpProxy(fhir_server.port)
    rig, pipeline = wired(FHIR_TOKEN_URL=f"http://127.0.0.1:{proxy.port}/oauth2/token")
    outages, failures = 1, 0  # down from the start

    async def after(item: Queued, result: Result) -> None:
        nonlocal failures, outages
        if proxy.server is None and result.reason is Reason.FHIR_UNAVAILABLE:
            failures += 1
            if failures >= 2:
                failures = 0
                await proxy.start()
        elif item.seq == 4 and result.state == "written" and outages == 1:
            await proxy.stop()  # down again, and the cached token expires meanwhile
            assert rig.client.tokens is not None
            rig.client.tokens.invalidate()
            outages += 1

    broker = Broker(pipeline, after=after)
    rows = [Row() for _ in range(4)]
    try:
        for row in rows:
            broker.send(row.create(), row.id)
            broker.send(row.update(lastname="Tokenless"), row.id)
        await broker.run()
    finally:
        await proxy.stop()
    FIGURES["outages"] += outages
    assert outages == 2
    check_invariant(broker, fhir, {r.id: r.state for r in rows}, faults=outages)
    assert sum(len(r) for r in broker.results.values()) == len(broker.rows) + 4


# ---- out-of-order updates ------------------------------------------------------------------------------------


async def test_an_older_update_arriving_after_a_newer_one_of_the_same_column_is_stale(wired: Wired, fhir: Fhir):
    _rig, pipeline = wired()
    broker = Broker(pipeline)
    row = Row()
    broker.send(row.create(), row.id)
    older = row.update(telephone1="+1 555 0401")
    newer = row.update(telephone1="+1 555 0402")
    broker.send(newer, row.id)
    broker.send(older, row.id)
    await broker.run()
    check_invariant(broker, fhir, {row.id: row.state})
    assert broker.final(3).result.reason is Reason.STALE


async def test_an_older_update_of_another_column_arriving_late_is_not_lost(wired: Wired, fhir: Fhir):
    _rig, pipeline = wired()
    broker = Broker(pipeline)
    row = Row()
    broker.send(row.create(), row.id)
    older = row.update(telephone1="+1 555 0501", address1_city="Early City")
    newer = row.update(address1_city="Late City")
    broker.send(newer, row.id)
    broker.send(older, row.id)
    await broker.run()
    check_invariant(broker, fhir, {row.id: row.state})
    late = broker.final(3).result
    assert late.state == "written" and "not address1_city" in late.detail  # narrowed to the phone


async def test_a_shuffled_stream_of_updates_ends_at_each_rows_last_state(wired: Wired, fhir: Fhir):
    """Per row, updates of overlapping columns in random order, some abandoned on the way (redelivered later)."""
    rig, pipeline = wired()
    broker = Broker(pipeline)
    shuffle = random.Random(20261120)
    rows = [Row() for _ in range(4)]
    for row in rows:
        broker.send(row.create(), row.id)
    await broker.run()
    columns = {"telephone1": "+1 555 07{:02d}", "mobilephone": "+1 555 08{:02d}",
               "emailaddress1": "p{:02d}@example.org", "address1_city": "City {:02d}", "lastname": "Name{:02d}"}
    changes = []
    for n in range(30):
        row = shuffle.choice(rows)
        picked = shuffle.sample(sorted(columns), shuffle.randint(1, 3))
        changes.append((row.update(**{c: columns[c].format(n) for c in picked}), row.id))
    shuffle.shuffle(changes)
    for body, row_id in changes:
        broker.send(body, row_id)
    rig.transport.add(Fault(method="PUT", url_contains="/Patient/", status=503, times=6))
    await broker.run()
    check_invariant(broker, fhir, {r.id: r.state for r in rows}, faults=fired(rig))
    reasons = [broker.final(seq).result.reason for seq in broker.rows]
    assert Reason.STALE in reasons  # some changes were entirely superseded ...
    assert any("a newer change of the row already wrote" in broker.final(seq).result.detail
               for seq in broker.rows)  # ... and some were narrowed, not dropped


async def test_batches_apply_each_rows_changes_in_dataverse_order(wired: Wired, fhir: Fhir):
    """The batch trigger's path (process_many + FHIR batch bundles): a row's Create and Updates arrive in one
    batch in the wrong order (the broker does not keep them in order); the batch applies them in version order,
    so none waits for a redelivery, none is narrowed and the row ends at its last state."""
    rig, pipeline = wired()
    pipeline = Pipeline(pipeline.maps, pipeline.settings, BatchDelivery(rig.client), pipeline.ledger)
    broker = Broker(pipeline)
    rows = [Row() for _ in range(5)]
    per_row = []
    for n, row in enumerate(rows):
        per_row.append([(row.create(), row.id), (row.update(telephone1=f"+1 555 09{n:02d}"), row.id),
                        (row.update(telephone1=f"+1 555 19{n:02d}", address1_city=f"Town {n}"), row.id)])
    for changes in per_row:
        for body, row_id in reversed(changes):
            broker.send(body, row_id)
    await broker.run(batch=len(rows) * 3)
    check_invariant(broker, fhir, {r.id: r.state for r in rows})
    assert broker.deliveries == len(rows) * 3  # no redelivery needed
    assert all(broker.final(seq).result.state == "written" for seq in broker.rows)
    assert all("newer change" not in broker.final(seq).result.detail for seq in broker.rows)


async def test_a_shuffled_stream_through_batches_under_faults(wired: Wired, fhir: Fhir):
    rig, pipeline = wired()
    pipeline = Pipeline(pipeline.maps, pipeline.settings, BatchDelivery(rig.client), pipeline.ledger)
    broker = Broker(pipeline)
    shuffle = random.Random(7)
    rows = [Row() for _ in range(6)]
    for row in rows:
        broker.send(row.create(), row.id)
    changes = []
    for n in range(40):
        row = shuffle.choice(rows)
        picked = shuffle.sample(["telephone1", "mobilephone", "emailaddress1", "address1_city"], shuffle.randint(1, 2))
        changes.append((row.update(**{c: f"{c[:4]}-{n}" if c != "emailaddress1" else f"p{n}@example.org"
                                      for c in picked}), row.id))
    shuffle.shuffle(changes)
    for body, row_id in changes:
        broker.send(body, row_id)
    # More failures than one request's retries absorb: some batches are abandoned and redelivered.
    rig.transport.add(Fault(method="POST", url_contains="/fhir/R4", status=503, times=5))
    rig.transport.add(Fault(method="POST", url_contains="/fhir/R4", error=httpx.ReadError, times=3))
    await broker.run(batch=8)
    check_invariant(broker, fhir, {r.id: r.state for r in rows}, faults=fired(rig))


# ---- faults that never end: dead-lettered with the right reason -------------------------------------------------

NEVER_ENDING: dict[str, tuple[Fault | None, str, Reason, int]] = {
    # name: (fault, broker dead-letter reason, the last delivery's reason, deliveries)
    "503 forever": (Fault(method="POST", url_contains="/Patient", status=503, times=-1),
                    "MaxDeliveryCountExceeded", Reason.FHIR_UNAVAILABLE, 5),
    "429 forever": (Fault(method="POST", url_contains="/Patient", status=429, headers={"Retry-After": "5"},
                          times=-1), "MaxDeliveryCountExceeded", Reason.FHIR_UNAVAILABLE, 5),
    "connection reset forever": (Fault(method="POST", url_contains="/Patient", error=httpx.ReadError, times=-1),
                                 "MaxDeliveryCountExceeded", Reason.FHIR_UNAVAILABLE, 5),
    "timeout forever": (Fault(method="POST", url_contains="/Patient", error=httpx.ConnectTimeout, times=-1),
                        "MaxDeliveryCountExceeded", Reason.FHIR_UNAVAILABLE, 5),
    "412 forever": (Fault(method="PUT", url_contains="/Patient/", status=412, times=-1),
                    "MaxDeliveryCountExceeded", Reason.CONFLICT, 5),
    "provenance refused forever": (Fault(method="PUT", url_contains="/Provenance/", status=500, times=-1),
                                   "MaxDeliveryCountExceeded", Reason.PROVENANCE_FAILED, 5),
    "422 (not transient)": (Fault(method="POST", url_contains="/Patient", status=422, times=-1, body={
        "resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "invalid"}]}),
        "fhir-rejected", Reason.FHIR_REJECTED, 1),
    "403 forever": (Fault(method="POST", url_contains="/Patient", status=403, times=-1),
                    "MaxDeliveryCountExceeded", Reason.UNAUTHORIZED, 5),
    "token endpoint down forever": (None, "MaxDeliveryCountExceeded", Reason.FHIR_UNAVAILABLE, 5),
    "table storage down forever": (None, "MaxDeliveryCountExceeded", Reason.OUTCOME_STORE_UNAVAILABLE, 5),
}


@pytest.mark.parametrize("name", list(NEVER_ENDING))
async def test_a_fault_that_never_ends_is_dead_lettered_with_its_reason(name: str, wired: Wired, fhir: Fhir,
                                                                       azurite_tables: Azurite):
    fault, dead_letter_reason, last_reason, deliveries = NEVER_ENDING[name]
    overrides = {"FHIR_TOKEN_URL": f"http://127.0.0.1:{free_port()}/oauth2/token"} if "token" in name else {}
    rig, pipeline = wired(**overrides)
    broker = Broker(pipeline)
    row = Row()
    ok = Row()  # an unaffected row in the same stream still gets through
    if fault is not None and fault.method == "PUT" and "Patient" in fault.url_contains:
        broker.send(row.create(), row.id)
        await broker.run()
        broker.send(row.update(lastname="Contested"), row.id)
        fault = Fault(**{**fault.__dict__, "url_contains": f"/Patient/{patient_id(fhir, row)}"})
    else:
        broker.send(row.create(), row.id)
    outages = 0
    if fault is not None:
        rig.transport.add(fault)
    elif "table storage" in name:
        await asyncio.to_thread(azurite_tables.stop)
        outages = 1
    else:
        outages = 1
    try:
        await broker.run()
    finally:
        if not azurite_tables.running:
            await asyncio.to_thread(azurite_tables.start)
    for fault_ in rig.transport.faults:
        fault_.times = 0  # the fault ends; an unaffected row goes through
    if "token" not in name:
        broker.send(ok.create(), ok.id)
        await broker.run()
    seq = max(s for s, r in broker.rows.items() if r == row.id)
    final = broker.final(seq)
    assert (final.settlement, final.reason) == ("deadletter", dead_letter_reason), final
    assert final.result.reason is last_reason
    assert last_reason.value in final.description or final.reason == last_reason.value
    assert len(broker.results[seq]) == deliveries
    FIGURES["outages"] += outages
    last_rows = {row.id: row.state} if "token" in name else {row.id: row.state, ok.id: ok.state}
    check_invariant(broker, fhir, last_rows, state_exempt={row.id}, faults=fired(rig) + outages)
