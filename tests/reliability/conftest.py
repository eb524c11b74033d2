"""Reliability rig: the delivery rig (real FHIR dev server behind a FaultyTransport, fake sleep) plus the Table
Storage ledger in Azurite, and a small Service Bus simulator that settles and redelivers as the broker does."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from devtools.services import Azurite
from tests.delivery.conftest import Fhir, Rig, create_message, fhir, maps, new_patient, rig_factory, update_message
from tests.reliability.figures import FIGURES, report
from writeback.outcomes import OutcomeStore
from writeback.pipeline import Envelope, Pipeline, Result
from writeback.reasons import Reason
from writeback.settings import Settings

__all__ = ["fhir", "maps", "rig_factory"]  # fixtures shared with the delivery tests

MAX_DELIVERY_COUNT = 5
IDENTIFIER_SYSTEM = "urn:dataverse:contact"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.write_line(report())


# ---- the broker ---------------------------------------------------------------------------------------------


@dataclass
class Final:
    """How a broker message left the queue: completed or dead-lettered, once."""

    settlement: str  # complete | deadletter
    state: str
    reason: str | None  # dead-letter reason (the Result's reason, or MaxDeliveryCountExceeded)
    description: str
    result: Result


@dataclass
class Queued:
    seq: int
    envelope: Envelope
    row: str | None = None


@dataclass
class Broker:
    """A queue of envelopes. complete/deadletter end a message; abandon puts it back at its place (its sequence
    number) with delivery_count + 1, and after MaxDeliveryCount deliveries dead-letters it with
    MaxDeliveryCountExceeded, as Service Bus does."""

    pipeline: Pipeline
    max_delivery: int = MAX_DELIVERY_COUNT
    # Called after each delivery's settlement (e.g. to end an outage after N failures).
    after: Callable[[Queued, Result], Awaitable[None]] | None = None
    queue: deque[Queued] = field(default_factory=deque)
    finals: dict[int, list[Final]] = field(default_factory=dict)
    results: dict[int, list[Result]] = field(default_factory=dict)
    rows: dict[int, str | None] = field(default_factory=dict)
    deliveries: int = 0
    _seq: int = 0

    def send(self, body: dict[str, Any] | bytes | str, row: str | None = None, **kw: Any) -> int:
        self._seq += 1
        raw = json.dumps(body).encode() if isinstance(body, dict) else body
        kw.setdefault("message_id", uuid.uuid4().hex)
        self.queue.append(Queued(self._seq, Envelope(raw, **kw), row))
        self.rows[self._seq] = row
        FIGURES["messages"] += 1
        return self._seq

    def _requeue(self, item: Queued) -> None:
        position = next((i for i, other in enumerate(self.queue) if other.seq > item.seq), len(self.queue))
        self.queue.insert(position, item)

    async def _deliver(self, item: Queued) -> None:
        self.deliveries += 1
        FIGURES["deliveries"] += 1
        await self._settle(item, await self.pipeline.process(item.envelope))

    async def _deliver_batch(self, items: list[Queued]) -> None:
        """One invocation of the batch trigger: `process_many`, then each message settled on its own result."""
        self.deliveries += len(items)
        FIGURES["deliveries"] += len(items)
        results = await self.pipeline.process_many([item.envelope for item in items])
        for item, result in zip(items, results, strict=True):
            await self._settle(item, result)

    async def _settle(self, item: Queued, result: Result) -> None:
        self.results.setdefault(item.seq, []).append(result)
        settlement = result.settlement
        if settlement == "complete":
            self.finals.setdefault(item.seq, []).append(Final("complete", result.state, None, result.detail, result))
        elif settlement == "deadletter":
            assert result.reason is not None
            self.finals.setdefault(item.seq, []).append(
                Final("deadletter", result.state, result.reason.value, result.detail, result))
        elif item.envelope.delivery_count >= self.max_delivery:
            reason = result.reason.value if result.reason else "?"
            self.finals.setdefault(item.seq, []).append(Final(
                "deadletter", "dead-lettered", "MaxDeliveryCountExceeded",
                f"Message could not be consumed after {self.max_delivery} delivery attempts (last: {reason}: "
                f"{result.detail})", result))
        else:
            envelope = item.envelope
            self._requeue(Queued(item.seq, Envelope(
                envelope.body, envelope.properties, envelope.content_type, envelope.message_id,
                envelope.delivery_count + 1, envelope.enqueued_at), item.row))
        if self.after is not None:
            await self.after(item, result)

    async def run(self, concurrency: int = 1, batch: int = 0) -> None:
        """Deliver until the queue is empty; with concurrency > 1, several receivers at once; with batch > 0,
        up to `batch` messages per invocation (the cardinality-many trigger)."""

        async def receiver() -> None:
            while self.queue:
                if batch:
                    items = [self.queue.popleft() for _ in range(min(batch, len(self.queue)))]
                    await self._deliver_batch(items)
                else:
                    await self._deliver(self.queue.popleft())

        await asyncio.gather(*(receiver() for _ in range(concurrency)))

    def final(self, seq: int) -> Final:
        [final] = self.finals[seq]
        return final


# ---- the ledger ---------------------------------------------------------------------------------------------


@pytest.fixture
async def ledger(azurite_tables: Azurite) -> AsyncIterator[OutcomeStore]:
    settings = Settings(outcomes_connection_string=azurite_tables.connection_string,
                        outcomes_table_prefix="rel" + uuid.uuid4().hex[:12])
    async with OutcomeStore.from_settings(settings, retry_total=1, retry_backoff=0.05) as store:
        await store.ensure_tables()
        yield store


@pytest.fixture
def wired(rig_factory: Callable[..., Rig], ledger: OutcomeStore) -> Callable[..., tuple[Rig, Pipeline]]:
    """A rig and a pipeline over its delivery with the Table Storage ledger."""

    def make(**overrides: str) -> tuple[Rig, Pipeline]:
        rig = rig_factory(**overrides)
        return rig, Pipeline(rig.pipeline.maps, rig.settings, rig.pipeline.delivery, ledger)

    return make


# ---- Dataverse rows that change over time --------------------------------------------------------------------


class Row:
    """One contact row: a Create, then Updates that carry pre and post images and a growing versionnumber."""

    def __init__(self, **columns: Any) -> None:
        self.id, self.state = new_patient(**columns)

    def create(self) -> dict[str, Any]:
        return create_message(self.id, self.state)

    def update(self, **changes: Any) -> dict[str, Any]:
        before = dict(self.state)
        version = int(before["versionnumber"]) + 1
        self.state = {**before, **changes, "versionnumber": version}
        return update_message(self.id, before, {**changes, "versionnumber": version})


# ---- the invariant --------------------------------------------------------------------------------------------


def mapped_state(patient: dict[str, Any] | None) -> dict[str, Any]:
    """The elements the contact map owns, from a Patient (None: no resource)."""
    if patient is None:
        return {}
    name: dict[str, Any] = next((n for n in patient.get("name", []) if n.get("use") == "official"), {})
    telecom = {f"{t.get('system')}/{t.get('use', '')}": t.get("value") for t in patient.get("telecom", [])}
    address: dict[str, Any] = next((a for a in patient.get("address", []) if a.get("use") == "home"), {})
    return {k: v for k, v in {
        "given": name.get("given"), "family": name.get("family"), "birthDate": patient.get("birthDate"),
        "work": telecom.get("phone/work"), "mobile": telecom.get("phone/mobile"), "email": telecom.get("email/"),
        "line": address.get("line"), "city": address.get("city"),
    }.items() if v}


def expected_state(row: dict[str, Any]) -> dict[str, Any]:
    """What a contact row's mapped columns should look like on the server."""
    given = [g for g in (row.get("firstname"), row.get("middlename")) if g]
    lines = [row[c] for c in ("address1_line1", "address1_line2", "address1_line3") if row.get(c)]
    return {k: v for k, v in {
        "given": given or None, "family": row.get("lastname"), "work": row.get("telephone1"),
        "mobile": row.get("mobilephone"), "email": row.get("emailaddress1"), "line": lines or None,
        "city": row.get("address1_city"),
    }.items() if v}


def check_invariant(broker: Any, fhir: Fhir, last_rows: dict[str, dict[str, Any]],
                    *, state_exempt: frozenset[str] | set[str] = frozenset(), faults: int = 0,
                    record: bool = True) -> dict[str, int]:
    """Every message ended exactly once as written / skipped (reason) / dead-lettered (reason); one resource per
    row; each row's final FHIR state is its last Dataverse state; every write has its Provenance.

    `state_exempt`: rows whose change was dead-lettered on purpose (a fault that never ends)."""
    figures = FIGURES if record else Counter[str]()
    figures["scenarios"] += 1
    figures["faults_injected"] += faults
    problems: list[str] = []
    lost = duplicated = 0
    for seq in broker.rows:
        ends = broker.finals.get(seq, [])
        if len(ends) > 1:  # a redelivery after a crash may end once more, as a duplicate: never written twice
            ends = [e for e in ends if e.result is None or e.result.reason is not Reason.DUPLICATE] or ends[:1]
        if len(ends) != 1:
            problems.append(f"message {seq} settled {len(ends)} times")
            lost += not ends
            duplicated += max(0, len(ends) - 1)
            continue
        end = ends[0]
        if end.settlement == "complete":
            assert end.state in ("written", "skipped"), end
            if end.state == "skipped" and end.result.reason is None:
                problems.append(f"message {seq} skipped without a reason")
            figures[end.state] += 1
        else:
            if not end.reason or not end.description:
                problems.append(f"message {seq} dead-lettered without a reason")
            figures["dead_lettered"] += 1
            figures["max_delivery_exceeded"] += end.reason == "MaxDeliveryCountExceeded"
    for row_id, row in last_rows.items():
        found = fhir.search(f"Patient?identifier={IDENTIFIER_SYSTEM}|{row_id}&_count=10")
        if len(found) > 1:
            problems.append(f"row {row_id}: {len(found)} resources")
            duplicated += len(found) - 1
        if row_id in state_exempt:
            continue
        actual = mapped_state(found[0] if found else None)
        if actual != expected_state(row):
            problems.append(f"row {row_id}: final state {actual} != last Dataverse state {expected_state(row)}")
            lost += 1
    for results in broker.results.values():
        for result in results:
            if result.state != "written":
                continue
            assert result.resource and result.provenance, result
            provenance = fhir.get(result.provenance.split("/_history")[0])
            if provenance["target"] != [{"reference": result.resource}]:
                problems.append(f"{result.provenance} targets {provenance['target']}, not {result.resource}")
            # The dev server (Medplum) matches the versioned reference we write, not the bare Patient/<id>.
            if not fhir.search(f"Provenance?target={result.resource}"):
                problems.append(f"no Provenance?target={result.resource}")
    figures["lost"] += lost
    figures["duplicated"] += duplicated
    assert not problems, "\n".join(problems)
    return {"lost": lost, "duplicated": duplicated}
