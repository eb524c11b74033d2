"""The imperative shell around the pure core: one message in, exactly one `Result` out.

plan (pure) → duplicate / stale checks (ledger) → write + Provenance (delivery) → record (ledger).
Every entry point (the function, `python -m writeback process`, the demo, the benchmark) goes through
`Pipeline.process`, so they cannot drift apart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal, Protocol, TypeVar

from writeback.decide import Decision, WritePlan, narrow, plan_message
from writeback.errors import WritebackError
from writeback.maps import MapSet
from writeback.reasons import Kind, Reason
from writeback.retry import GiveUp, RetryPolicy, next_step
from writeback.settings import Settings

log = logging.getLogger("writeback")
_T = TypeVar("_T")
# Planning gives the event loop a turn this often (messages) while writes are in flight: a turn costs a few
# microseconds, and without it the answers wait until the whole batch is planned.
_YIELD_EVERY = 2

State = Literal["written", "skipped", "dead-lettered", "retry", "config-error"]
_STATE_BY_KIND: dict[Kind, State] = {
    Kind.SKIP: "skipped",
    Kind.REJECT: "dead-lettered",
    Kind.TRANSIENT: "retry",
    Kind.CONFIG: "config-error",
}


@dataclass(frozen=True, slots=True)
class Issue:
    """One OperationOutcome issue the server returned with a successful write (no diagnostics text:
    servers echo submitted values there)."""

    severity: str
    code: str
    expression: str = ""
    details: str = ""


@dataclass(frozen=True, slots=True)
class Delivered:
    """What the delivery adapter reports for a successful write."""

    resource: str  # versioned reference, e.g. Patient/123/_history/<vid>
    provenance: str  # Provenance/<id>/_history/<vid>
    issues: tuple[Issue, ...] = ()


class Delivery(Protocol):
    async def deliver(self, plan: WritePlan) -> Delivered:
        """Write the plan and its Provenance; raise WritebackError with a reason code on failure."""
        ...


@dataclass(frozen=True, slots=True)
class Envelope:
    """A message as the transport hands it over: body plus the broker's facts about it."""

    body: bytes | str
    properties: Mapping[str, Any] | None = None
    content_type: str | None = None
    message_id: str | None = None
    delivery_count: int = 1
    enqueued_at: float | None = None
    correlation_id: str | None = None
    locked_until: float | None = None  # when the broker's lock on this delivery ends (epoch seconds)


@dataclass(frozen=True, slots=True)
class Result:
    state: State
    reason: Reason | None
    detail: str
    decision: Decision
    resource: str | None = None
    provenance: str | None = None
    issues: tuple[Issue, ...] = ()
    duration_ms: float = 0.0
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def settlement(self) -> Literal["complete", "deadletter", "reschedule"]:
        """complete (written, skipped); deadletter; reschedule: a copy is scheduled with a delay and the
        message completed (`writeback.retry`), or, where no copy can be scheduled, it is abandoned."""
        if self.state in ("written", "skipped"):
            return "complete"
        return "deadletter" if self.state == "dead-lettered" else "reschedule"


class Ledger(Protocol):
    """Exactly-once effect on at-least-once delivery, and the outcome log. Implemented over Table Storage."""

    async def seen(self, message_key: str) -> bool:
        """True when this message (MessageId / RequestId) already ended written or skipped."""
        ...

    async def claim(self, plan: WritePlan) -> frozenset[str]:
        """Advance the row's per-column versions to the plan's (ETag-guarded) where the plan is newer.

        Returns the plan's columns that a newer change of the row already claimed (empty: write it all)."""
        ...

    async def record(self, envelope: Envelope, result: Result) -> None:
        """Write the outcome row (and a child row per issue). Never patient data."""
        ...


def message_key(envelope: Envelope, decision: Decision) -> str | None:
    """The identity of a delivery for duplicate detection: Dataverse's RequestId, else the broker's id."""
    if decision.message is not None and decision.message.request_id:
        return decision.message.request_id
    return envelope.message_id


def result_for(decision: Decision, reason: Reason, detail: str, **kw: Any) -> Result:
    return Result(_STATE_BY_KIND[reason.kind], reason, detail, decision, **kw)


@dataclass(slots=True)
class _Batch:
    """One `process_many` call: its messages, their decisions and results (by index), the bound on its
    concurrent I/O, and what the delivery keeps across the call's writes (`memo`: the copies it wrote)."""

    envelopes: Sequence[Envelope]
    decisions: list[Decision]
    results: list[Result | None]
    slots: asyncio.Semaphore
    memo: dict[Any, Any] = field(default_factory=dict)


Emit = Callable[[int, Result], Awaitable[None]]


def _utcnow() -> datetime:
    return datetime.now(UTC)


def give_up(envelope: Envelope, result: Result, policy: RetryPolicy, now: datetime) -> Result:
    """A transient or configuration outcome past the retry window becomes `retries-exhausted` (dead-letter)."""
    if result.settlement != "reschedule":
        return result
    step = next_step(policy, properties=envelope.properties, message_id=envelope.message_id,
                     enqueued_at=envelope.enqueued_at, now=now)
    if not isinstance(step, GiveUp):
        return result
    last = result.reason.value if result.reason else "unknown"
    return replace(result, state="dead-lettered", reason=Reason.RETRIES_EXHAUSTED,
                   detail=step.description(last, result.detail))


class Pipeline:
    def __init__(
        self, maps: MapSet, settings: Settings, delivery: Delivery | None, ledger: Ledger | None = None,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.maps = maps
        self.settings = settings
        self.delivery = delivery
        self.ledger = ledger
        self.clock = clock
        self.retry_policy = RetryPolicy.of(settings)

    def plan(self, envelope: Envelope) -> Decision:
        return plan_message(envelope.body, envelope.properties, self.maps, self.settings, envelope.content_type)

    async def process(self, envelope: Envelope) -> Result:
        started = time.perf_counter()
        decision = self.plan(envelope)
        result = await self._process(envelope, decision)
        result = give_up(envelope, _with_duration(result, started), self.retry_policy, self.clock())
        if self.ledger is not None:
            try:
                await self.ledger.record(envelope, result)
            except WritebackError as exc:
                # The write happened or was refused; only the log failed. Redelivery is safe (duplicate check).
                if result.state in ("written", "skipped"):
                    result = result_for(decision, exc.reason, exc.detail, resource=result.resource,
                                        provenance=result.provenance, issues=result.issues,
                                        duration_ms=result.duration_ms)
        return result

    async def _process(self, envelope: Envelope, decision: Decision) -> Result:
        if decision.decision == "skip":
            assert decision.reason is not None
            return Result("skipped", decision.reason, decision.detail, decision)
        if decision.decision == "reject":
            assert decision.reason is not None
            return result_for(decision, decision.reason, decision.detail)
        plan = decision.plan
        assert plan is not None
        try:
            key = message_key(envelope, decision)
            if self.ledger is not None:
                admitted = await _admit_one(self.ledger, key, decision)
                if isinstance(admitted, Result):
                    return admitted
                decision = admitted
            if self.delivery is None:
                raise WritebackError(Reason.CONFIG_ERROR, "no delivery target is configured")
            assert decision.plan is not None
            delivered = await self.delivery.deliver(decision.plan)
        except WritebackError as exc:
            return result_for(decision, exc.reason, exc.detail)
        return Result("written", None, decision.detail, decision, resource=delivered.resource,
                      provenance=delivered.provenance, issues=delivered.issues)


    async def process_many(self, envelopes: Sequence[Envelope], emit: Emit | None = None) -> list[Result]:
        """Many messages in one go, each with its own `Result`, in input order.

        Same semantics as `process` message by message: skips and rejects need no I/O; the ledger's duplicate
        and stale checks run per row in input order (rows concurrently, at most `max_concurrency` at a time);
        the writes go through the delivery's `deliver_many` (FHIR batch bundles) when it has one; every
        outcome is recorded. A message repeated within the call (same RequestId) is written once: the copy
        is skipped as a duplicate when the first ended written or skipped, else it shares the first's result.

        Planning is CPU work and writing is mostly waiting for the server, so the two overlap: a Create is
        first in its row's order whatever else the batch holds, so the first Create of each row is written
        as soon as a bundle's worth is planned, while the rest is still being planned. Everything else waits
        until the whole batch is planned and the early Creates are written (their Provenances may still be
        on their way: they change no resource), then goes in row order.

        `emit(index, result)` is awaited for each message once its outcome is final and recorded, so the caller
        can settle it while the rest of the batch is still being recorded.
        """
        started = time.perf_counter()
        batch = _Batch(envelopes, [], [None] * len(envelopes), asyncio.Semaphore(self.settings.max_concurrency))
        decisions, results = batch.decisions, batch.results
        writes: list[int] = []
        first_of: dict[str, int] = {}
        copies: list[tuple[int, int]] = []
        early: list[int] = []
        early_rows: set[tuple[str, str, str]] = set()
        flights: list[asyncio.Task[None]] = []
        written: list[asyncio.Event] = []

        def fly(indexes: list[int]) -> None:
            written.append(asyncio.Event())
            flights.append(asyncio.create_task(self._write(batch, indexes, written[-1])))

        try:
            for i, envelope in enumerate(envelopes):
                if flights and i % _YIELD_EVERY == 0:
                    await asyncio.sleep(0)  # one turn of the event loop: the bundles in flight move on
                decision = self.plan(envelope)
                decisions.append(decision)
                if decision.decision != "write" or decision.plan is None:
                    results[i] = await self._process(envelope, decision)
                    continue
                key = message_key(envelope, decision) if self.ledger is not None else None
                if key is not None and key in first_of:
                    copies.append((i, first_of[key]))
                    continue
                if key is not None:
                    first_of[key] = i
                row = _row_of(decision.plan)
                if decision.plan.operation == "create" and row not in early_rows:
                    early_rows.add(row)
                    early.append(i)
                    if len(early) >= self.settings.bundle_size:
                        fly(early)
                        early = []
                else:
                    writes.append(i)
            if early:
                fly(early)
            # The rest starts from what the early Creates wrote; their Provenances may still be on the way.
            await asyncio.gather(*(event.wait() for event in written))
            flights.append(asyncio.create_task(self._write(batch, _in_row_order(decisions, writes))))
        finally:
            # Every write started is awaited before anything else happens, even when planning failed.
            landed = await asyncio.gather(*flights, return_exceptions=True)
        for failure in landed:
            if isinstance(failure, BaseException):
                raise failure
        for i, first in copies:
            earlier = results[first]
            assert earlier is not None
            if earlier.state in ("written", "skipped"):
                results[i] = Result("skipped", Reason.DUPLICATE, "This message was already processed.",
                                    decisions[i])
            else:
                results[i] = replace(earlier, decision=decisions[i])
        now = self.clock()
        done = [give_up(e, _with_duration(r, started), self.retry_policy, now)
                for e, r in zip(envelopes, results, strict=True) if r is not None]
        assert len(done) == len(envelopes)

        async def finish(index: int, result: Result) -> Result:
            if self.ledger is not None:
                result = await self._record(envelopes[index], result)
            if emit is not None:
                await emit(index, result)
            return result

        return await _bounded(batch.slots, [finish(i, r) for i, r in enumerate(done)])

    def unfinished(self, envelope: Envelope, detail: str) -> Result:
        """The outcome of a message the invocation's deadline stopped (its plan, for the log, is pure work)."""
        return Result("retry", Reason.DEADLINE_REACHED, detail, self.plan(envelope))

    async def _write(self, batch: _Batch, writes: list[int], written: asyncio.Event | None = None) -> None:
        """Admit (ledger) and deliver `writes`, each row's in the order given; fills their results. `written` is
        set once every write has been answered (or has failed), their Provenances perhaps still on the way."""
        try:
            if self.ledger is not None:
                writes = await self._admit(batch, writes)
            plans = [batch.decisions[i].plan for i in writes]
            assert all(p is not None for p in plans)
            outcomes = await self._deliver_all([p for p in plans if p is not None], batch.slots, batch.memo,
                                               written)
        finally:
            if written is not None:
                written.set()
        for i, outcome in zip(writes, outcomes, strict=True):
            decision = batch.decisions[i]
            if isinstance(outcome, WritebackError):
                batch.results[i] = result_for(decision, outcome.reason, outcome.detail)
            else:
                batch.results[i] = Result("written", None, decision.detail, decision, resource=outcome.resource,
                                    provenance=outcome.provenance, issues=outcome.issues)

    async def _admit(self, batch: _Batch, writes: list[int]) -> list[int]:
        """The ledger's duplicate and stale checks; the writes still to make. Per row in input order."""
        ledger = self.ledger
        assert ledger is not None
        decisions, results = batch.decisions, batch.results
        rows = _by_row(writes, [d.plan for d in decisions])

        async def admit_row(indexes: list[int]) -> None:
            for i in indexes:
                decision = decisions[i]
                assert decision.plan is not None
                try:
                    admitted = await _admit_one(ledger, message_key(batch.envelopes[i], decision), decision)
                except WritebackError as exc:
                    results[i] = result_for(decision, exc.reason, exc.detail)
                    continue
                if isinstance(admitted, Result):
                    results[i] = admitted
                else:
                    decisions[i] = admitted

        await _bounded(batch.slots, [admit_row(indexes) for indexes in rows.values()])
        return [i for i in writes if results[i] is None]

    async def _deliver_all(self, plans: list[WritePlan], slots: asyncio.Semaphore, memo: dict[Any, Any],
                           written: asyncio.Event | None) -> list[Delivered | WritebackError]:
        if not plans:
            return []
        delivery = self.delivery
        if delivery is None:
            error = WritebackError(Reason.CONFIG_ERROR, "no delivery target is configured")
            return [error] * len(plans)
        deliver_many = getattr(delivery, "deliver_many", None)
        if deliver_many is not None:
            outcomes: list[Delivered | WritebackError] = await deliver_many(plans, memo, written)
            return outcomes
        # One message at a time per row (order kept), rows concurrently.
        outcomes = [WritebackError(Reason.CONFIG_ERROR, "not delivered")] * len(plans)
        rows = _by_row(range(len(plans)), plans)

        async def deliver_row(indexes: list[int]) -> None:
            for i in indexes:
                try:
                    outcomes[i] = await delivery.deliver(plans[i])
                except WritebackError as exc:
                    outcomes[i] = exc

        await _bounded(slots, [deliver_row(indexes) for indexes in rows.values()])
        return outcomes

    async def _record(self, envelope: Envelope, result: Result) -> Result:
        assert self.ledger is not None
        try:
            await self.ledger.record(envelope, result)
        except WritebackError as exc:
            if result.state in ("written", "skipped"):
                return result_for(result.decision, exc.reason, exc.detail, resource=result.resource,
                                  provenance=result.provenance, issues=result.issues,
                                  duration_ms=result.duration_ms)
        return result


async def _admit_one(ledger: Ledger, key: str | None, decision: Decision) -> Decision | Result:
    """The duplicate and stale checks of one write: the decision to deliver (narrowed to the columns no newer
    change wrote), or the skip."""
    assert decision.plan is not None
    if key and await ledger.seen(key):
        return Result("skipped", Reason.DUPLICATE, "This message was already processed.", decision)
    superseded = await ledger.claim(decision.plan)
    narrowed = narrow(decision, superseded) if superseded else decision
    if narrowed is None:
        return Result("skipped", Reason.STALE, "A newer change of this row already wrote every column this "
                      "change carries.", decision)
    return narrowed


def _in_row_order(decisions: Sequence[Decision], writes: list[int]) -> list[int]:
    """`writes` with each row's changes in Dataverse order (create first, then by version): Service Bus does not
    keep a row's messages in order, and applying them in order within a batch means none is narrowed or
    `stale` only because the broker swapped them. Each row keeps the positions its changes had."""
    rows = _by_row(writes, [d.plan for d in decisions])
    position = {i: n for n, i in enumerate(writes)}
    ordered = list(writes)
    for indexes in rows.values():
        if len(indexes) > 1:
            for slot, i in zip(indexes, sorted(indexes, key=lambda i: _change_order(decisions[i])), strict=True):
                ordered[position[slot]] = i
    return ordered


def _change_order(decision: Decision) -> tuple[int, int, float]:
    plan = decision.plan
    assert plan is not None
    src = plan.source
    modified = src.modified_on.timestamp() if src.modified_on is not None else 0.0
    return (plan.operation != "create", src.row_version if src.row_version is not None else 0, modified)


def _row_of(plan: WritePlan) -> tuple[str, str, str]:
    """The FHIR resource a plan writes, by row identifier."""
    target = plan.target
    return target.resource_type, target.identifier_system, target.identifier_value


def _by_row(indexes: Iterable[int], plans: Sequence[WritePlan | None]) -> dict[tuple[str, str, str], list[int]]:
    """`indexes` grouped by the FHIR resource their plan writes, each group in the given order."""
    rows: dict[tuple[str, str, str], list[int]] = {}
    for i in indexes:
        plan = plans[i]
        assert plan is not None
        rows.setdefault(_row_of(plan), []).append(i)
    return rows


async def _bounded(slots: asyncio.Semaphore, work: Sequence[Awaitable[_T]]) -> list[_T]:
    async def one(item: Awaitable[_T]) -> _T:
        async with slots:
            return await item

    return list(await asyncio.gather(*(one(w) for w in work)))


def _with_duration(result: Result, started: float) -> Result:
    return replace(result, duration_ms=round((time.perf_counter() - started) * 1000, 2))
