"""The imperative shell around the pure core: messages in, exactly one `Result` each out.

plan (pure) → the facts of the rows they depend on (row state) → resolve (pure: consent gates, parents' and
lookups' FHIR ids) → duplicate checks (ledger) → writes + Provenance (delivery) → facts learned and outcomes
recorded (ledger). Every entry point (the function, `python -m writeback process`, the demo, the benchmark)
goes through `Pipeline.process_many`, so they cannot drift apart.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal, Protocol, TypeVar

from writeback.converge import ItemEdit, RowEdit
from writeback.decide import Decision, RowKey, WritePlan, narrow, plan_message
from writeback.errors import WritebackError
from writeback.facts import RowFacts, facts_of, merged, resolve
from writeback.maps import MapSet
from writeback.reasons import Kind, Reason
from writeback.retry import GiveUp, RetryPolicy, attempts_so_far, next_step, original_id
from writeback.settings import Settings

log = logging.getLogger("writeback")
_T = TypeVar("_T")
PLAN_SLICE = 50  # messages planned between two turns of the event loop (the reads of a slice go out meanwhile)

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
    """What the delivery reports for a plan it carried out: the version written and its Provenance, or, when the
    server already held this version of the row (or a newer one, or these very values), the skip reason."""

    resource: str = ""  # versioned reference, e.g. Patient/123/_history/<vid>
    provenance: str = ""  # Provenance/<id>/_history/<vid>
    issues: tuple[Issue, ...] = ()
    skipped: Reason | None = None  # stale / no-change: nothing was written
    detail: str = ""
    also: tuple[str, ...] = ()  # further versions written by the same message (a child row moved between parents)
    ids: tuple[tuple[tuple[str, str], str], ...] = ()  # ((table, row id), "Type/<id>") of rows' resources found


class Leases(Protocol):
    """Who creates a resource: one caller at a time per resource, for `seconds` (creates are unconditional
    PUTs of a row's own id, so two at once would let an older state overwrite a newer one)."""

    async def acquire(self, key: str, seconds: float) -> bool: ...

    async def release(self, key: str) -> None: ...


class Delivery(Protocol):
    async def deliver(self, plan: WritePlan) -> Delivered:
        """Carry out the plan, with a Provenance per version written; raise WritebackError with a reason code
        on failure."""
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
    """Exactly-once effect on at-least-once delivery, the row state and the outcome log. Implemented over Table
    Storage (`writeback.outcomes.OutcomeStore`)."""

    async def seen(self, message_key: str) -> bool:
        """True when this message (RequestId + row, else MessageId) already ended written or skipped."""
        ...

    async def claim(self, plan: WritePlan) -> frozenset[str]:
        """For a Target-only plan: advance the row's per-column versions (ETag-guarded) where the plan is newer.

        Returns the plan's columns that a newer change of the row already claimed (empty: write it all)."""
        ...

    async def facts(self, rows: Iterable[RowKey]) -> dict[RowKey, RowFacts]:
        """What is known about these rows (those with nothing known are left out)."""
        ...

    async def learn(self, facts: Iterable[RowFacts]) -> None:
        """Keep these facts, merged with what is stored (the newer version's values win)."""
        ...

    async def acquire(self, key: str, seconds: float) -> bool:
        """The create lease of one resource (`Leases`), across instances."""
        ...

    async def release(self, key: str) -> None:
        """Give the create lease back (the create was answered)."""
        ...

    async def record(self, envelope: Envelope, result: Result) -> None:
        """Write the outcome row (and a child row per issue). Never patient data."""
        ...


def message_key(envelope: Envelope, decision: Decision) -> str | None:
    """The identity of a delivery for duplicate detection: Dataverse's RequestId with the row it is about (one
    request of a bulk operation, CreateMultiple/UpdateMultiple, changes many rows), else the MessageId Dataverse
    posted (a retry copy carries it as a property)."""
    message = decision.message
    if message is not None and message.request_id:
        return f"{message.request_id}.{message.table}.{message.record_id}"
    return original_id(envelope.properties, envelope.message_id) or None


def result_for(decision: Decision, reason: Reason, detail: str, **kw: Any) -> Result:
    return Result(_STATE_BY_KIND[reason.kind], reason, detail, decision, **kw)


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


def _attempt(envelope: Envelope) -> int:
    """How many times this message was tried before: its retry copies' count, and the broker's redeliveries."""
    return attempts_so_far(envelope.properties) + max(envelope.delivery_count - 1, 0)


def _retried(envelope: Envelope) -> bool:
    return _attempt(envelope) > 0


def _row_of(plan: WritePlan) -> tuple[str, str, str]:
    """The FHIR resource a plan's (first) write goes to, by row identifier."""
    target = plan.target
    return target.resource_type, target.identifier_system, target.identifier_value


@dataclass
class _Batch:
    """One `process_many` call as it goes: decisions and results by message, the facts the batch says (`local`)
    and has read (`stored`) and learned by writing, duplicates, and what the delivery keeps across the call."""

    envelopes: Sequence[Envelope]
    results: list[Result | None]
    decisions: list[Decision] = field(default_factory=list)
    local: dict[RowKey, RowFacts] = field(default_factory=dict)
    stored: dict[RowKey, RowFacts] = field(default_factory=dict)
    learned: list[RowFacts] = field(default_factory=list)
    created: set[RowKey] = field(default_factory=set)
    first_of: dict[str, int] = field(default_factory=dict)
    copies: list[tuple[int, int]] = field(default_factory=list)
    flown: set[int] = field(default_factory=set)  # written (or being written) early
    memo: dict[Any, Any] = field(default_factory=dict)


# Where a message names its row: read off the body's text before it is planned, to know which rows have more
# than one message in the batch (a regex over the bytes is a tiny fraction of parsing them).
_ROW_FIELDS = re.compile(rb'"(MessageName|PrimaryEntityName|PrimaryEntityId)"\s*:\s*"([^"]{1,100})"')


def _rows_of(envelopes: Sequence[Envelope]) -> dict[RowKey, list[str]]:
    """(table, row id) → the message names of that row's messages in the batch (unreadable bodies: none)."""
    rows: dict[RowKey, list[str]] = {}
    for envelope in envelopes:
        body = envelope.body.encode() if isinstance(envelope.body, str) else envelope.body
        found = {name.decode(): value.decode(errors="replace") for name, value in _ROW_FIELDS.findall(body[:4096])}
        if "PrimaryEntityName" in found and "PrimaryEntityId" in found:
            key = (found["PrimaryEntityName"].lower(), found["PrimaryEntityId"].lower())
            rows.setdefault(key, []).append(found.get("MessageName", ""))
    return rows


def _early(decision: Decision, rows: Mapping[RowKey, list[str]]) -> bool:
    """A write that can go before the batch is planned: the only message of its row in the batch, writing the
    row's own resource (nothing later in the batch changes that resource's state or its order)."""
    plan = decision.plan
    if decision.decision != "write" or plan is None or not plan.full or len(plan.writes) != 1:
        return False
    if not isinstance(plan.writes[0].edit, RowEdit):
        return False
    return len(rows.get((plan.source.table, plan.source.record_id), ())) == 1


class Pipeline:
    """Without a ledger (the CLI's `process`, the benchmark) the row facts and create leases live in this
    process only; the function always has the Table Storage ledger."""

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
        self._facts: dict[RowKey, RowFacts] = {}  # without a ledger
        self._leases: Leases | None = ledger
        self._slots = asyncio.Semaphore(settings.max_concurrency)

    def plan(self, envelope: Envelope) -> Decision:
        return plan_message(envelope.body, envelope.properties, self.maps, self.settings, envelope.content_type)

    async def process(self, envelope: Envelope) -> Result:
        (result,) = await self.process_many([envelope])
        return result

    def unfinished(self, envelope: Envelope, detail: str) -> Result:
        """The outcome of a message the invocation's deadline stopped (its plan, for the log, is pure work)."""
        return Result("retry", Reason.DEADLINE_REACHED, detail, self.plan(envelope))

    async def process_many(self, envelopes: Sequence[Envelope], emit: Emit | None = None) -> list[Result]:
        """Many messages in one go, each with its own `Result`, in input order.

        Skips and rejects need no I/O. Planning (CPU work) goes a slice at a time, and the server is not left
        idle meanwhile: each slice's reads go out at once, and its writes that depend on nothing later in the
        batch (a row's only message in the batch, whose own resource it writes) are written while the next
        slices are planned. Everything else waits for the whole batch: the facts of every row it depends on are
        read once (what the batch itself says about a row is as new or newer, and wins); a message repeated
        within the call (same RequestId and row) is written once; of several whole-row changes of one row only
        the newest is written (it holds the older ones' changes), the older are `stale`. Writes go through the
        delivery's `deliver_many` (FHIR batch bundles); every outcome is recorded, and what the batch taught
        about its rows is kept. `emit(index, result)` is awaited for each message once its outcome is final and
        recorded, so the caller can settle it while the rest is still being recorded.
        """
        started = time.perf_counter()
        batch = _Batch(envelopes, [None] * len(envelopes))
        rows = _rows_of(envelopes)
        batch.created = {(table, row) for (table, row), names in rows.items() if "Create" in names}
        prefetch = getattr(self.delivery, "prefetch", None)
        flights: list[asyncio.Task[None]] = []
        landed: list[asyncio.Event] = []  # set when a flight's resources are written (its Provenance may follow)
        try:
            for first in range(0, len(envelopes), PLAN_SLICE):
                planned = [self.plan(e) for e in envelopes[first:first + PLAN_SLICE]]
                batch.decisions += planned
                merged((f for d in planned if d.message is not None
                        and (f := facts_of(d.message, self.maps, self.settings)) is not None), into=batch.local)
                if prefetch is not None:
                    prefetch([w.target for d in planned if d.decision == "write" and d.plan is not None
                              for w in d.plan.writes], batch.memo)
                early = [first + n for n, d in enumerate(planned) if _early(d, rows)]
                if early:
                    batch.flown.update(early)
                    landed.append(asyncio.Event())
                    flights.append(asyncio.create_task(self._fly(batch, early, dict(batch.local), landed[-1])))
                await asyncio.sleep(0)  # one turn of the event loop: the reads and early writes go out
            # Every write's facts (early ones too: a write the early facts could not decide comes back here).
            wanted = set(batch.local)
            for d in batch.decisions:
                if d.decision == "write" and d.plan is not None:
                    wanted.update(d.plan.needs)
            try:
                stored: dict[RowKey, RowFacts] | None = await self._read_facts(wanted)
            except WritebackError as exc:
                stored, unread = None, exc
            # The rest writes resources the early writes may touch: they go once those are answered. A Provenance
            # changes no resource, so the early writes' Provenance may still be on its way.
            await asyncio.gather(*(event.wait() for event in landed))
        except BaseException:
            await asyncio.gather(*flights, return_exceptions=True)
            raise
        rest = [i for i, r in enumerate(batch.results) if r is None and i not in batch.flown]
        if stored is None:
            for i in rest:
                if batch.decisions[i].decision == "write":
                    batch.results[i] = result_for(batch.decisions[i], unread.reason, unread.detail)
            stored = {}
        batch.stored.update(stored)
        known = merged(batch.local.values(), into=dict(stored))
        writes = self._resolved(batch, [i for i in rest if batch.results[i] is None], known)
        writes = self._newest_per_row(batch.decisions, batch.results, writes)
        await self._write(batch, writes)
        await asyncio.gather(*flights)
        decisions, results = batch.decisions, batch.results
        for i, first in batch.copies:
            earlier = results[first]
            assert earlier is not None
            if earlier.state in ("written", "skipped"):
                results[i] = Result("skipped", Reason.DUPLICATE, "This message was already processed.",
                                    decisions[i])
            else:
                results[i] = replace(earlier, decision=decisions[i])
        await self._keep_facts(batch.stored, merged(batch.learned, into=dict(batch.local)))
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

        return await _bounded(self._slots, [finish(i, r) for i, r in enumerate(done)])

    async def _fly(self, batch: _Batch, indexes: list[int], local: dict[RowKey, RowFacts],
                   landed: asyncio.Event) -> None:
        """Write a slice's early writes while the next slices are planned. A write its facts cannot decide yet
        (a patient's consent not known so far) is left to the rest of the batch, which knows more. `landed` is
        set once the resources are written, or nothing will be."""
        try:
            await self._fly_now(batch, indexes, local, landed)
        finally:
            landed.set()

    async def _fly_now(self, batch: _Batch, indexes: list[int], local: dict[RowKey, RowFacts],
                       landed: asyncio.Event) -> None:
        wanted: set[RowKey] = set()
        for i in indexes:
            plan = batch.decisions[i].plan
            assert plan is not None
            wanted.update(plan.needs)
        try:
            stored = await self._read_facts(wanted)
        except WritebackError:
            batch.flown.difference_update(indexes)  # the rest of the batch reads them again and reports
            return
        batch.stored.update(stored)
        known = merged(local.values(), into=dict(stored))
        await self._write(batch, self._resolved(batch, indexes, known, early=True), landed)

    def _resolved(self, batch: _Batch, indexes: list[int], known: Mapping[RowKey, RowFacts], *,
                  early: bool = False) -> list[int]:
        """Resolve the decisions (facts of other rows), settle what is not a write, set duplicates aside; the
        writes to make. `early`: a decision that is not a write is left as it was, for the rest of the batch."""
        writes: list[int] = []
        for i in indexes:
            envelope = batch.envelopes[i]
            decision = resolve(batch.decisions[i], known, self.maps, self.settings, attempt=_attempt(envelope),
                               created=batch.created)
            if decision.decision != "write" or decision.plan is None:
                if early:
                    batch.flown.discard(i)
                    continue
                batch.decisions[i], batch.results[i] = decision, self._settled(decision)
                continue
            if _retried(envelope):
                decision = replace(decision, plan=replace(decision.plan,
                                                          source=replace(decision.plan.source, retried=True)))
            batch.decisions[i] = decision
            key = message_key(envelope, decision)
            if key is not None and key in batch.first_of:
                batch.copies.append((i, batch.first_of[key]))
                batch.results[i] = Result("skipped", Reason.DUPLICATE, "", decision)  # placeholder, set at the end
                continue
            if key is not None:
                batch.first_of[key] = i
            writes.append(i)
        return writes

    async def _write(self, batch: _Batch, writes: list[int], landed: asyncio.Event | None = None) -> None:
        """Admit (ledger) and deliver `writes`; fill their results and the facts learned."""
        decisions, results = batch.decisions, batch.results
        if self.ledger is not None:
            writes = await self._admit(batch.envelopes, decisions, results, writes)
        plans = [decisions[i].plan for i in writes]
        delivered = await self._deliver([p for p in plans if p is not None], batch.memo, landed)
        for i, outcome in zip(writes, delivered, strict=True):
            decision = decisions[i]
            if isinstance(outcome, WritebackError):
                results[i] = result_for(decision, outcome.reason, outcome.detail)
                continue
            batch.learned += [RowFacts(table, row_id, written=reference)
                              for (table, row_id), reference in outcome.ids]
            if outcome.skipped is not None:
                results[i] = Result("skipped", outcome.skipped, outcome.detail, decision)
            else:
                results[i] = Result("written", None, decision.detail, decision, resource=outcome.resource,
                                    provenance=outcome.provenance, issues=outcome.issues,
                                    extra={"also": list(outcome.also)} if outcome.also else {})

    def _settled(self, decision: Decision) -> Result:
        assert decision.reason is not None
        if decision.decision == "skip":
            return Result("skipped", decision.reason, decision.detail, decision)
        return result_for(decision, decision.reason, decision.detail)

    async def _read_facts(self, rows: set[RowKey]) -> dict[RowKey, RowFacts]:
        if self.ledger is None:
            return {row: self._facts[row] for row in rows if row in self._facts}
        return await self.ledger.facts(rows)

    async def _keep_facts(self, stored: dict[RowKey, RowFacts] | None, learned: dict[RowKey, RowFacts]) -> None:
        """Keep what the batch taught about its rows, where it adds to what is stored."""
        changed = [fact for key, fact in learned.items()
                   if stored is None or key not in stored or stored[key].merge(fact) != stored[key]]
        if not changed:
            return
        if self.ledger is None:
            merged(changed, into=self._facts)
            return
        try:
            await self.ledger.learn(changed)
        except WritebackError as exc:  # the facts are learned again from the next message of the row
            log.warning("row facts not kept (%s)", exc.detail, extra={"reason": exc.reason.value})

    def _newest_per_row(self, decisions: list[Decision], results: list[Result | None], writes: list[int]) -> list[int]:
        """Of several whole-row writes of one row in the batch, the newest: it holds the others' changes."""
        newest: dict[tuple[str, str, str], int] = {}
        for i in writes:
            plan = decisions[i].plan
            assert plan is not None
            if not (plan.full and isinstance(plan.writes[0].edit, RowEdit)):
                continue
            row = _row_of(plan)
            other = newest.get(row)
            if other is None:
                newest[row] = i
                continue
            older, newer = sorted((other, i), key=lambda n: _order(decisions[n]))
            if _order(decisions[older]) == _order(decisions[newer]):
                continue  # not comparable (no version): both are written, in the order given
            newest[row] = newer
            results[older] = Result("skipped", Reason.STALE, "A newer change of this row in the same batch holds "
                                    "this one's changes; that one is written.", decisions[older])
        return [i for i in writes if results[i] is None]

    async def _admit(self, envelopes: Sequence[Envelope], decisions: list[Decision], results: list[Result | None],
                     writes: list[int]) -> list[int]:
        """The ledger's duplicate check, and for Target-only writes and child rows the order by row state."""
        ledger = self.ledger
        assert ledger is not None

        async def admit(i: int) -> None:
            decision = decisions[i]
            try:
                key = message_key(envelopes[i], decision)
                if key and await ledger.seen(key):
                    results[i] = Result("skipped", Reason.DUPLICATE, "This message was already processed.", decision)
                    return
                plan = decision.plan
                assert plan is not None
                child = isinstance(plan.writes[0].edit, ItemEdit)
                if plan.full and not child:
                    return  # ordered by the version marked in its resource, inside the write
                superseded = await ledger.claim(plan)
                if plan.full and superseded:
                    # A child row's versions may sit in different parents: a newer change that moved it away from
                    # a parent that had no resource yet could leave no tombstone there, so the row state orders it.
                    results[i] = Result("skipped", Reason.STALE, "A newer change of this row was already taken on.",
                                        decision)
                    return
                narrowed = narrow(decision, superseded)
            except WritebackError as exc:
                results[i] = result_for(decision, exc.reason, exc.detail)
                return
            if narrowed is None:
                results[i] = Result("skipped", Reason.STALE, "A newer change of the row already wrote every column "
                                    "this change carries.", decision)
            else:
                decisions[i] = narrowed

        await _bounded(self._slots, [admit(i) for i in writes])
        return [i for i in writes if results[i] is None]

    async def _deliver(self, plans: list[WritePlan], memo: dict[Any, Any],
                       landed: asyncio.Event | None = None) -> list[Delivered | WritebackError]:
        if not plans:
            return []
        delivery = self.delivery
        if delivery is None:
            return [WritebackError(Reason.CONFIG_ERROR, "no delivery target is configured")] * len(plans)
        deliver_many = getattr(delivery, "deliver_many", None)
        if deliver_many is not None:
            outcomes: list[Delivered | WritebackError] = await deliver_many(plans, memo, self._leases, landed)
            return outcomes

        async def one(plan: WritePlan) -> Delivered | WritebackError:
            try:
                return await delivery.deliver(plan)
            except WritebackError as exc:
                return exc

        return await _bounded(self._slots, [one(plan) for plan in plans])

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


def _order(decision: Decision) -> tuple[int, float]:
    plan = decision.plan
    assert plan is not None
    source = plan.source
    return (source.row_version if source.row_version is not None else -1,
            source.modified_on.timestamp() if source.modified_on is not None else -1.0)


async def _bounded(slots: asyncio.Semaphore, work: Sequence[Awaitable[_T]]) -> list[_T]:
    async def one(item: Awaitable[_T]) -> _T:
        async with slots:
            return await item

    return list(await asyncio.gather(*(one(w) for w in work)))


def _with_duration(result: Result, started: float) -> Result:
    return replace(result, duration_ms=round((time.perf_counter() - started) * 1000, 2))
