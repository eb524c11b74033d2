"""The imperative shell around the pure core: messages in, exactly one `Result` each out.

plan (pure) → the facts of the rows they depend on (row state) → resolve (pure: consent gates, parents' and
lookups' FHIR ids) → duplicate checks (ledger) → writes + Provenance (delivery) → facts learned and outcomes
recorded (ledger, where there is one: the function and the demo; `process` and the benchmark run without one).
Every entry point (the function, `python -m writeback process`, the demo, the benchmark)
goes through `Pipeline.process_many`, so they cannot drift apart.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from heapq import heappop, heappush
from typing import Any, Literal, Protocol, TypeVar

from writeback.collector import paused
from writeback.converge import ItemEdit, RemoveItem, RowEdit
from writeback.decide import Decision, RowKey, WritePlan, modified_on, narrow, plan_message, row_version
from writeback.errors import TargetGone, WritebackError
from writeback.facts import (
    CONSENT_GRACE_RETRIES,
    EARLIER_SAVE_GRACE_RETRIES,
    REFERENCE_GRACE_RETRIES,
    RowFacts,
    consent_rows,
    facts_of,
    inherited_gate_table,
    merged,
    remembered_gate_table,
    resolve,
)
from writeback.immutable import evolve, immutable
from writeback.maps import MapSet
from writeback.marks import Version
from writeback.messages import row_of_body
from writeback.paths import Assignment, Select
from writeback.reasons import Kind, Reason
from writeback.retry import (
    RESUBMITTED_FROM,
    GiveUp,
    RetryPolicy,
    attempts_so_far,
    consent_waits_so_far,
    first_tried,
    gate_opened,
    next_step,
    original_id,
    outages_so_far,
)
from writeback.settings import Settings

log = logging.getLogger("writeback")
_T = TypeVar("_T")
# The attempt a one-shot pipeline decides every message as: past every grace period (`facts`).
LAST_GRACE = max(CONSENT_GRACE_RETRIES, REFERENCE_GRACE_RETRIES, EARLIER_SAVE_GRACE_RETRIES)
DEADLINE_DETAIL = ("The invocation's deadline (inside the message lock) came before this message was finished; "
                   "rescheduled.")
# Messages planned before their reads are sent and the writes now ready go out. A slice's reads and writes fill
# about two bundles of 50: fewer, fuller requests than at 50 (each costs the client ~1M instructions and the
# server a round of its own), while the first read still leaves within a few dozen milliseconds.
PLAN_SLICE = 100

State = Literal["written", "skipped", "dead-lettered", "retry", "config-error"]
_STATE_BY_KIND: dict[Kind, State] = {
    Kind.SKIP: "skipped",
    Kind.REJECT: "dead-lettered",
    Kind.TRANSIENT: "retry",
    Kind.CONFIG: "config-error",
}


@immutable
class Issue:
    """One OperationOutcome issue the server returned with a successful write (no diagnostics text:
    servers echo submitted values there)."""

    severity: str
    code: str
    expression: str = ""
    details: str = ""


@immutable
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
    PUTs of a row's own id, so two at once would let an older state overwrite a newer one). `holder` and
    `version`: who asks, for which row version (`writeback.leases`)."""

    async def acquire(self, key: str, seconds: float, holder: str = "", version: str = "") -> bool: ...

    async def release(self, key: str, holder: str = "") -> None: ...


class Delivery(Protocol):
    async def deliver(self, plan: WritePlan) -> Delivered:
        """Carry out the plan, with a Provenance per version written; raise WritebackError with a reason code
        on failure."""
        ...


@immutable
class Envelope:
    """A message as the transport hands it over: body plus the broker's facts about it."""

    body: bytes | str
    properties: Mapping[str, Any] | None = None
    content_type: str | None = None
    message_id: str | None = None
    delivery_count: int = 1
    correlation_id: str | None = None
    locked_until: float | None = None  # when the broker's lock on this delivery ends (epoch seconds)


@immutable
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


Seen = Literal["processed", "tried"] | None


@dataclass(slots=True)
class Progress:
    """How far a `Pipeline.process_many` call got: `recording` once its work on FHIR is over and what it learned
    and its outcomes are being kept (Table Storage alone from there)."""

    recording: bool = False


class Ledger(Protocol):
    """Exactly-once effect on at-least-once delivery, the row state and the outcome log. Implemented over Table
    Storage (`writeback.outcomes.OutcomeStore`)."""

    async def seen(self, message_key: str) -> Seen:
        """Whether this message (RequestId + row, else MessageId) already ended written or skipped (`processed`), or
        was tried before without ending so (`tried`: its outcome was recorded, a retry), or neither (None)."""
        ...

    async def claim(self, plan: WritePlan) -> frozenset[str]:
        """For a Target-only plan: advance the row's per-column versions (ETag-guarded) where the plan is newer.

        Returns the plan's columns that a newer change of the row already claimed (empty: write it all)."""
        ...

    async def facts(self, rows: Iterable[RowKey]) -> dict[RowKey, RowFacts]:
        """What is known about these rows (those with nothing known are left out)."""
        ...

    async def learn(self, facts: Iterable[RowFacts]) -> dict[RowKey, WritebackError]:
        """Keep these facts, merged with what is stored (the newer version's values win); the rows whose facts
        could not be kept, with why (raises `WritebackError` when none could)."""
        ...

    async def acquire(self, key: str, seconds: float, holder: str = "", version: str = "") -> bool:
        """The create lease of one resource (`Leases`), across instances."""
        ...

    async def release(self, key: str, holder: str = "") -> None:
        """Give the create lease back (the create was answered), if `holder` still holds it."""
        ...

    async def record(self, envelope: Envelope, result: Result) -> None:
        """Write the outcome row (and a child row per issue). Never patient data."""
        ...


def message_key(envelope: Envelope, decision: Decision) -> str | None:
    """The identity of a delivery for duplicate detection: Dataverse's RequestId with the row it is about (one
    request of a bulk operation, CreateMultiple/UpdateMultiple, changes many rows), the message and the row version
    it carries (a plug-in that updates the row inside its Create posts a Create and an Update under one
    RequestId); else the MessageId Dataverse posted (a retry copy carries it as a property)."""
    message = decision.message
    if message is not None and message.request_id:
        version = next((str(v) for image in (message.post_image, message.target) if image is not None
                        and (v := image.attributes.get("versionnumber")) is not None), "")
        if not version and message.operation_id and message.operation_id != message.request_id:
            # Without a row version (a step without images: its Target holds `modifiedon`, not `versionnumber`), two
            # saves of the row in one request are told apart by their system jobs: an asynchronous step's
            # OperationId is its own, and Dataverse retrying the job posts it again under the same one (the second
            # save was a `duplicate` of the first, lost: found by review).
            version = f"op{message.operation_id}"
        elif not version and message.target is not None:
            # Where OperationId says nothing more than RequestId (as in some of Dataverse's own samples): by when
            # and which columns they set (names, not values).
            target = message.target.attributes
            when = target.get("modifiedon")
            columns = hashlib.sha256(",".join(sorted(target)).encode()).hexdigest()[:16]
            version = f"{when.isoformat() if isinstance(when, datetime) else ''}~{columns}"
        return f"{message.request_id}.{message.table}.{message.record_id}.{message.message_name}" + (
            f".{version}" if version else "")
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
    step = next_step(policy, properties=envelope.properties, message_id=envelope.message_id, now=now)
    if not isinstance(step, GiveUp):
        return result
    last = result.reason.value if result.reason else "unknown"
    return evolve(result, state="dead-lettered", reason=Reason.RETRIES_EXHAUSTED,
                   detail=step.description(last, result.detail))


def _attempt(envelope: Envelope) -> int:
    """How many times this message was tried before: its retry copies' count, and the broker's redeliveries."""
    return attempts_so_far(envelope.properties) + max(envelope.delivery_count - 1, 0)


def _past_gates(envelope: Envelope) -> int:
    """Of `_attempt`, those that waited for another row: neither for a patient's consent nor ended by an outage, a
    conflict or the deadline (`retry.OUTAGES`). What the grace of a wait for a row counts."""
    return max(_attempt(envelope) - consent_waits_so_far(envelope.properties) - outages_so_far(envelope.properties),
               0)


def _retried(envelope: Envelope) -> bool:
    """Tried before: its earlier try may have written a version whose Provenance is owed (a copy put back from the
    dead-letter queue too, whose retry count `resubmit` resets)."""
    return _attempt(envelope) > 0 or RESUBMITTED_FROM in (envelope.properties or {})


def _from_fhir(stored: Mapping[RowKey, RowFacts], row: RowKey, plan: WritePlan) -> bool:
    """Whether the record the write goes to came from FHIR (a FHIR id in the row facts; a child row's: its patient's):
    only there an ingest put items without the row's mark. A row made in Dataverse never waits (found by review:
    an identifier row's saves received newest first did, for nothing)."""
    record = stored.get(plan.target.row) if isinstance(plan.writes[0].edit, ItemEdit) else stored.get(row)
    return record is not None and bool(record.fhir_id)


def _adopts(plan: WritePlan) -> bool:
    """Whether the write may take over an item an ingest put there: a child row's item, or a list the map selects
    in by optional keys (`name[use?=official]`) or owns by the row's mark (`note[row]`)."""
    edit = plan.writes[0].edit
    if isinstance(edit, ItemEdit):
        return True
    return isinstance(edit, RowEdit) and (edit.row_items or any(
        isinstance(seg, Select) and seg.optional for a in edit.owned for seg in a.path))


def _before_version(decision: Decision) -> Version:
    """The version of the row before the save: its pre image's (unknown without one)."""
    message = decision.message
    if message is None or message.pre_image is None:
        return Version()
    before = message.pre_image.attributes
    return Version(row_version(before), modified_on(before))


def _referred_first(batch: _Batch, indexes: list[int]) -> list[int]:
    """`indexes` with each Create before the messages whose lookups name its row (a patient's, then its visit's,
    then the visit's readings), in the given order otherwise; rows in a cycle of lookups, as they come."""
    creates = {row: i for i in indexes if i in batch.creates and (row := _source_row(batch.decisions[i]))}
    depth: dict[int, int] = {}

    def depth_of(i: int, seen: frozenset[int]) -> int:
        if i not in depth:
            plan = batch.decisions[i].plan
            below = [creates[key] for ref in (plan.refs if plan is not None else ())
                     if (key := (ref.table, ref.row_id)) in creates and creates[key] not in seen]
            depth[i] = 1 + max((depth_of(j, seen | {i}) for j in below), default=-1)
        return depth[i]

    return sorted(indexes, key=lambda i: depth_of(i, frozenset({i})))


def _source_row(decision: Decision) -> RowKey | None:
    message = decision.message
    return (message.table, message.record_id) if message is not None else None


def _with_earlier(newest: Decision, olders: list[Decision]) -> Decision:
    """`newest`, recognising ingested items also by `olders`' pre images, newest first (`Pipeline._newest_per_row`)."""
    plan = newest.plan
    assert plan is not None
    edit = plan.writes[0].edit
    assert isinstance(edit, RowEdit)
    befores: list[tuple[Assignment, ...]] = []
    versions: list[Version] = []
    for older in sorted(olders, key=functools.cmp_to_key(_by_version), reverse=True):
        assert older.plan is not None
        before = older.plan.writes[0].edit
        if isinstance(before, RowEdit) and before.before and before.before not in befores:
            befores.append(before.before)
            versions.append(before.before_version)
    if not befores:
        return newest
    return evolve(newest, plan=plan.with_edit(evolve(edit, earlier=tuple(befores),
                                                        earlier_versions=tuple(versions))))


def _by_version(one: Decision, other: Decision) -> int:
    assert one.plan is not None and other.plan is not None
    return one.plan.source.version.compare(other.plan.source.version) or 0


def _known_as_all(group: list[Decision]) -> list[Decision]:
    """Saves of one child row in a batch, each knowing the unmarked item an ingest put there by every one's pre and
    post image: the newer may be written first (the row state then makes the older `stale`), and its own images
    hold only values between the batch's saves, which FHIR never held."""
    known: list[Mapping[str, Any]] = []
    for decision in group:
        assert decision.plan is not None
        for write in decision.plan.writes:
            if isinstance(write.edit, ItemEdit | RemoveItem):
                known += [k for k in write.edit.known_as if k not in known]
    out = []
    for decision in group:
        plan = decision.plan
        assert plan is not None
        # (the removal from the old parent of a move too: the item there is the ingested one as much)
        writes = tuple(evolve(w, edit=evolve(w.edit, known_as=tuple(known)))
                       if isinstance(w.edit, ItemEdit | RemoveItem) else w for w in plan.writes)
        out.append(evolve(decision, plan=evolve(plan, writes=writes)))
    return out


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
    messages_of: dict[RowKey, list[int]] = field(default_factory=dict)  # each row's messages (`_Rows.all`)
    waited: set[int] = field(default_factory=set)  # messages whose write waits for an earlier save (`_await_earlier`)
    stored: dict[RowKey, RowFacts] = field(default_factory=dict)
    learned: list[RowFacts] = field(default_factory=list)
    created: set[RowKey] = field(default_factory=set)  # rows whose Create in the batch plans a write
    creates: set[int] = field(default_factory=set)  # the messages that are Creates (`_Rows.creates`)
    first_of: dict[str, int] = field(default_factory=dict)
    copies: list[tuple[int, int]] = field(default_factory=list)
    memo: dict[Any, Any] = field(default_factory=dict)
    # The resources being written (by row identifier: system, value), each with the event its last flight sets
    # once they are: a flight that writes or refers to one of them waits for it (a resource made before the writes
    # into it and the references to it, no two writes racing each other).
    busy: dict[tuple[str, str], asyncio.Event] = field(default_factory=dict)


@dataclass
class _Rows:
    """The batch's rows, read ahead: each message's row (None: it names none), each row's last message, the rows
    a Create is among the messages for."""

    of: list[RowKey | None]
    last: dict[RowKey, int]
    created: set[RowKey]
    all: dict[RowKey, list[int]] = field(default_factory=dict)  # each row's messages
    last_of_table: dict[str, int] = field(default_factory=dict)  # each table's last message
    creates: set[int] = field(default_factory=set)  # the messages that are Creates


def _rows_of(envelopes: Sequence[Envelope]) -> _Rows:
    rows = _Rows([], {}, set())
    for index, envelope in enumerate(envelopes):
        named = row_of_body(envelope.body, envelope.content_type)
        row: RowKey | None = None
        if named is not None:
            table, record, create = named
            row = (table, record)
            rows.last[row] = index
            rows.last_of_table[table] = index
            rows.all.setdefault(row, []).append(index)
            if create:
                rows.created.add(row)
                rows.creates.add(index)
        rows.of.append(row)
    return rows


def _of_child_row(plan: WritePlan) -> bool:
    return not isinstance(plan.writes[0].edit, RowEdit)


def _resources(plan: WritePlan) -> set[tuple[str, str]]:
    """The resources a plan writes, by the row identifier they are found by (as its plan knows it before its facts
    are read: the value is empty where only they will tell, a child row's parent named by no column of the
    message)."""
    return {(w.target.identifier_system, w.target.identifier_value) for w in plan.writes}


class Pipeline:
    """Without a ledger (the CLI's `process`, the benchmark) the row facts and create leases live in this
    process only; the function always has the Table Storage ledger."""

    def __init__(
        self, maps: MapSet, settings: Settings, delivery: Delivery | None, ledger: Ledger | None = None,
        clock: Callable[[], datetime] = _utcnow, *, one_shot: bool = False,
    ) -> None:
        """`one_shot`: nothing will be retried (the CLI's `process`), so nothing waits for a message that could
        still come (a lookup's row, a consent given later): each message is decided as on its last try."""
        self.maps = maps
        self.settings = settings
        self.delivery = delivery
        self.ledger = ledger
        self.clock = clock
        self.one_shot = one_shot
        self.retry_policy = RetryPolicy.of(settings)
        self._facts: dict[RowKey, RowFacts] = {}  # without a ledger
        self._slots = asyncio.Semaphore(settings.max_concurrency)

    def plan(self, envelope: Envelope) -> Decision:
        return plan_message(envelope.body, envelope.properties, self.maps, self.settings, envelope.content_type)

    async def process(self, envelope: Envelope) -> Result:
        (result,) = await self.process_many([envelope])
        return result

    def unfinished(self, envelope: Envelope, detail: str, reason: Reason = Reason.DEADLINE_REACHED) -> Result:
        """The outcome of a message the invocation's deadline stopped (its plan, for the log, is pure work)."""
        return Result("retry", reason, detail, self.plan(envelope))

    async def record_unworked(self, envelope: Envelope, result: Result, within: float | None = None) -> Result:
        """Keep the outcome of a message not worked on (its lock nearly over), where there is an outcome log,
        within FHIR_TIMEOUT_SECONDS (and `within` seconds); what it ended as (`outcome-store-unavailable` when it
        could not be kept)."""
        if self.ledger is None:
            return result
        seconds = self.settings.timeout_seconds if within is None else min(self.settings.timeout_seconds, within)
        try:
            async with asyncio.timeout(seconds):
                return await self._record(envelope, result)
        except TimeoutError:
            return result_for(result.decision, Reason.OUTCOME_STORE_UNAVAILABLE, "Table Storage did not answer in "
                              "time to keep this outcome.")

    async def process_many(self, envelopes: Sequence[Envelope], emit: Emit | None = None,
                           deadline: float | None = None, progress: Progress | None = None) -> list[Result]:
        """Many messages in one go, each with its own `Result`, in input order.

        Skips and rejects need no I/O. Writes go while the rest of the batch is planned: a row's writes as soon as
        every message of that row and of each row it depends on (its parent, the patient whose consent it needs,
        its lookups) is planned, since then the facts the batch says about them are whole. The reads the writes
        start from go out a slice at a time as they are planned. For each such group the facts stored for those
        rows are read (what the batch itself says about a row is as new or newer, and wins); a message repeated
        within the call (same RequestId and row) is written once; of several whole-row changes of one row only
        the newest is written (it holds the older ones' changes), the older are `stale`; a group that writes a
        resource an earlier group writes waits until that one's resources are written. Writes go through the
        delivery's `deliver_many` (FHIR batch bundles); every outcome is recorded, and what the batch taught
        about its rows is kept. `emit(index, result)` is awaited for each message once its outcome is final and
        recorded, so the caller can settle it while the rest is still being recorded.

        `deadline` (event-loop time): when it comes, what is still in flight stops and its messages end as
        `deadline-reached` (retried); every message's outcome is still recorded and emitted, so the outcome log and
        the settlement never disagree. `progress` tells the caller how far the call got.
        """
        with paused():  # (`collector.paused`: the batch's garbage is freed as it goes, not searched for)
            return await self._process_many(envelopes, emit, deadline, progress or Progress())

    async def _process_many(self, envelopes: Sequence[Envelope], emit: Emit | None,
                            deadline: float | None, progress: Progress) -> list[Result]:
        started = time.perf_counter()
        batch = _Batch(envelopes, [None] * len(envelopes))
        rows = _rows_of(envelopes)
        batch.created, batch.creates, batch.messages_of = rows.created, rows.creates, rows.all
        prefetch = getattr(self.delivery, "prefetch", None)
        flights: list[asyncio.Task[None]] = []
        reads: list[asyncio.Future[Any]] = []  # sent ahead by the delivery's `prefetch`
        of_row: dict[RowKey, list[int]] = {}  # the planned writes of rows whose last message is still to come
        waiting: list[tuple[int, int, list[int]]] = []  # (the last message they wait for, first index, writes)
        ready: list[int] = []

        async def plan_and_write() -> None:
            nonlocal ready
            for index, envelope in enumerate(envelopes):
                decision = self.plan(envelope)
                batch.decisions.append(decision)
                if decision.message is not None and (
                        fact := facts_of(decision.message, self.maps, self.settings)) is not None:
                    merged((fact,), into=batch.local)
                row = rows.of[index]
                if decision.decision != "write" or decision.plan is None:
                    batch.results[index] = self._settled(decision)
                    if index in rows.creates and row is not None:
                        # Not made under its own id: a lookup to it must not name that id (found by review: an
                        # Observation referred to an Encounter whose Create was refused, at planning or unread)
                        batch.created.discard(row)
                if decision.plan is not None and decision.decision == "write":
                    of_row.setdefault(row or ("", str(index)), []).append(index)
                if row is None or rows.last[row] == index:
                    mine = of_row.pop(row or ("", str(index)), None)
                    if mine:
                        needs = {key for i in mine for key in self._plan_of(batch, i).needs}
                        last = max((rows.last.get(key, -1) for key in needs), default=-1)
                        # A child row of a visit obeys the consent of a patient only the visit's facts name (read
                        # in its flight), a save that does not name its patient the consent of the one its row's
                        # facts do: it waits for every message of that table in the batch (found by review:
                        # planned before a withdrawal later in the batch, it was written).
                        for i in mine:
                            plan = self._plan_of(batch, i)
                            for table in (inherited_gate_table(plan, self.maps),
                                          remembered_gate_table(plan, self.maps)):
                                if table is not None:
                                    last = max(last, rows.last_of_table.get(table, -1))
                        heappush(waiting, (last, mine[0], mine))
                while waiting and waiting[0][0] <= index:
                    ready += heappop(waiting)[2]
                if (index + 1) % PLAN_SLICE == 0 or index + 1 == len(envelopes):
                    first = index + 1 - ((index % PLAN_SLICE) + 1)
                    if prefetch is not None:
                        # (not a child row's parent that only its facts will tell: `PARENT_FROM_FACTS`)
                        reads.extend(prefetch([w.target for d in batch.decisions[first:] if d.decision == "write"
                                  and d.plan is not None for w in d.plan.writes if w.target.identifier_value],
                                          batch.memo))
                    if ready:
                        flights.extend(self._dispatch(batch, sorted(ready)))
                        ready = []
                if flights or prefetch is not None:
                    # Between two messages (each well under a millisecond of CPU work), one turn of the event loop:
                    # what is in flight takes its next step, so the server works while the batch is planned (a
                    # planning thread would not do: the GIL makes each socket call of the loop wait for it).
                    await asyncio.sleep(0)
            assert not waiting and not of_row
            await asyncio.gather(*flights)

        stopped = False
        try:
            async with asyncio.timeout_at(deadline):
                await plan_and_write()
        except TimeoutError:
            stopped = True  # the invocation's deadline: what is in flight stops; every outcome is still recorded
        except BaseException:
            # Failed or cancelled: nothing of this call goes on past it.
            for task in [*flights, *reads]:
                task.cancel()
            await asyncio.gather(*flights, *reads, return_exceptions=True)
            raise
        if stopped:
            for task in flights:
                task.cancel()
            await asyncio.gather(*flights, return_exceptions=True)
            copies = {i for i, _ in batch.copies}
            for index, envelope in enumerate(envelopes):
                if index >= len(batch.decisions):  # not planned yet
                    batch.decisions.append(self.plan(envelope))
                if batch.results[index] is None and index not in copies:
                    batch.results[index] = Result("retry", Reason.DEADLINE_REACHED, DEADLINE_DETAIL,
                                                  batch.decisions[index])
        for read in reads:  # sent ahead for a write that started from a copy it already had
            read.cancel()
        await asyncio.gather(*reads, return_exceptions=True)
        decisions, results = batch.decisions, batch.results
        for i, first_copy in batch.copies:
            earlier = results[first_copy]
            assert earlier is not None
            if earlier.state in ("written", "skipped"):
                results[i] = Result("skipped", Reason.DUPLICATE, "This message was already processed.",
                                    decisions[i])
            else:
                results[i] = evolve(earlier, decision=decisions[i])
        # (a message tried again later, whatever held it back: its save is not in FHIR, so not seen yet either)
        retrying = {i for i, r in enumerate(results) if r is not None and r.settlement == "reschedule"}
        if batch.waited or retrying:
            self._unseen(batch, retrying)
        progress.recording = True
        unkept = await self._keep_facts(batch.stored, merged(batch.learned, into=dict(batch.local)))
        if unkept:
            # What a message told about its row (its FHIR id, type, consent, version) is what orders and gates the
            # row's later messages (an older message of the row's old type is `stale` by it): not kept, the message
            # is tried again, as one whose outcome could not be recorded is, and its retry keeps them (its write,
            # made already, is found made).
            for i, result in enumerate(results):
                message = result.decision.message if result is not None else None
                failure = unkept.get((message.table, message.record_id)) if message is not None else None
                if result is not None and result.state in ("written", "skipped") and failure is not None:
                    results[i] = result_for(result.decision, failure.reason, "What this message tells about "
                                            f"its row could not be kept: {failure.detail}",
                                            resource=result.resource, provenance=result.provenance,
                                            issues=result.issues, extra=result.extra)
        now = self.clock()
        done = [give_up(e, _with_duration(r, started), self.retry_policy, now)
                for e, r in zip(envelopes, results, strict=True) if r is not None]
        assert len(done) == len(envelopes)
        if self.ledger is None and emit is None:
            return done  # nothing to record or hand on (the CLI, the benchmark): no task per message for nothing

        async def finish(index: int, result: Result) -> Result:
            if self.ledger is not None:
                result = await self._record(envelopes[index], result)
            if emit is not None:
                await emit(index, result)
            return result

        return await _bounded(self._slots, [finish(i, r) for i, r in enumerate(done)])

    @staticmethod
    def _plan_of(batch: _Batch, index: int) -> WritePlan:
        plan = batch.decisions[index].plan
        assert plan is not None
        return plan

    def _dispatch(self, batch: _Batch, indexes: list[int]) -> list[asyncio.Task[None]]:
        """Start writing the messages at `indexes` (whole rows, their facts whole in the batch) in up to two
        flights: those that write, or refer to, a row's resource a flight is still writing wait for it; the rest
        go at once. (One flight for the slice made all of it wait whenever one message did: a patient's messages
        straddle two slices in almost every batch, so once a batch was planned its flights went one after the
        other, a round trip each. Against a server 100 ms away a batch of 1,000 took twice as long.)"""
        keys: dict[int, set[tuple[str, str]]] = {}
        writes: dict[int, set[tuple[str, str]]] = {}
        unsure: set[int] = set()
        for i in indexes:
            decision = batch.decisions[i]
            # Every plan the message may still turn out to be (a step without the type column: one per type,
            # `resolve` picks one by the row's facts), each with its own resource and lookups.
            plans = [self._plan_of(batch, i), *(d.plan for d in decision.alternatives.values() if d.plan)]
            writes[i] = {key for plan in plans for key in _resources(plan)}
            if any(not value for _, value in writes[i]):
                unsure.add(i)  # (its resource is known once its facts are read: a child row's parent, say)
            # By the row identifier, whatever the type: a row is one resource, and a reference waits for any write
            # of it, a Create's or an Update's (the first write of a row may be an Update's). And the message's
            # own row: its messages stay in one flight, in order, whatever their plans know of their resource.
            keys[i] = writes[i] | {(ref.system, ref.row_id) for plan in plans for ref in plan.refs} \
                | {(plans[0].source.row_system, plans[0].source.record_id)}
        unfinished = {key: event for key, event in batch.busy.items() if not event.is_set()}
        held = set() if not unfinished else unsure | {i for i in indexes if not keys[i].isdisjoint(unfinished)}
        # Whatever shares a key with a held message is held with it: one flight keeps their order (a create before
        # the writes into it and the references to it, `BatchDelivery`'s waves).
        grew = bool(held)
        while grew:
            touched = {key for i in held for key in keys[i]}
            more = {i for i in indexes if i not in held and not touched.isdisjoint(keys[i])}
            held |= more
            grew = bool(more)
        flights: list[asyncio.Task[None]] = []
        started: set[asyncio.Event] = set()
        for group in ([i for i in indexes if i not in held], [i for i in indexes if i in held]):
            if not group:
                continue
            # One that cannot tell its resource yet waits for every flight still writing, the slice's other one
            # included.
            after = {*unfinished.values(), *started} if unsure.intersection(group) else \
                {unfinished[key] for i in group for key in keys[i] if key in unfinished}
            landed = asyncio.Event()
            started.add(landed)
            batch.busy.update(dict.fromkeys((key for i in group for key in writes[i]), landed))
            flights.append(asyncio.create_task(self._fly(batch, group, after, landed)))
        return flights

    async def _fly(self, batch: _Batch, indexes: list[int], after: set[asyncio.Event],
                   landed: asyncio.Event) -> None:
        """Read the facts the writes depend on, resolve them, and write once the flights before have written the
        same resources. `landed` is set once the resources are written, or nothing will be."""
        try:
            wanted: set[RowKey] = set()
            for i in indexes:
                wanted.update(self._plan_of(batch, i).needs)
            try:
                stored = await self._read_facts(wanted)
                # Only the rows these plans use (`WritePlan.needs`, all `resolve` reads): the whole batch's facts,
                # merged again for every flight, made this quadratic in the batch size.
                known = merged((batch.local[key] for key in wanted if key in batch.local), into=dict(stored))
                # A Target-only change of a clinical row without its patient lookup: the patient its earlier
                # messages named, known only now, is a second read; a child row of a visit needs the visit's
                # facts, then the patient's (`facts.consent_rows`): a third.
                for _ in range(2):
                    later = {row for i in indexes for row in consent_rows(batch.decisions[i], known, self.maps)
                             if row not in wanted}
                    if not later:
                        break
                    wanted |= later
                    stored.update(more := await self._read_facts(later))
                    merged((batch.local[key] for key in later if key in batch.local), into=known)
                    merged(more.values(), into=known)
            except WritebackError as exc:
                for i in indexes:
                    batch.results[i] = result_for(batch.decisions[i], exc.reason, exc.detail)
                    if (row := _source_row(batch.decisions[i])) is not None:
                        batch.created.discard(row)  # (made nothing: the flights after it must not name its id)
                return
            batch.stored.update(stored)
            await asyncio.gather(*(event.wait() for event in after))
            writes = self._resolved(batch, indexes, known)
            writes = self._newest_per_row(batch.decisions, batch.results, writes)
            # Rows' own writes (a whole-row one may create the resource) before the items child rows write into
            # resources: the two own different elements, so only creation cares about their order. Each kind
            # keeps the order given (a row's writes whose versions cannot be compared go in that order).
            writes.sort(key=lambda i: (_of_child_row(self._plan_of(batch, i)), i))
            await self._write(batch, writes, landed)
        finally:
            landed.set()

    def _resolved(self, batch: _Batch, indexes: list[int], known: Mapping[RowKey, RowFacts]) -> list[int]:
        """Resolve the decisions (facts of other rows), settle what is not a write, set duplicates aside; the
        writes to make."""
        writes: list[int] = []
        items: dict[RowKey, list[int]] = {}
        for i in indexes:
            plan = batch.decisions[i].plan
            if plan is not None and isinstance(plan.writes[0].edit, ItemEdit):
                items.setdefault((plan.source.table, plan.source.record_id), []).append(i)
        for group in items.values():
            if len(group) > 1:  # each of a child row's saves knows its item by all their images (`_known_as_all`),
                # those `resolve` then finds `stale` included (an older save a move overtook)
                for i, decision in zip(group, _known_as_all([batch.decisions[i] for i in group]), strict=True):
                    batch.decisions[i] = decision
        # Creates first: one held back (a consent not given, a contact briefly not a Patient) makes nothing under
        # its id, which the lookups of the others must then not name (found by review: a reading named the
        # Encounter of a visit that waited for its patient's consent, and never was written).
        for i in _referred_first(batch, indexes):
            envelope = batch.envelopes[i]
            attempt, past_gates = (_attempt(envelope), _past_gates(envelope)) if not self.one_shot \
                else (LAST_GRACE, LAST_GRACE)
            now = self.clock()
            waited = now - first_tried(envelope.properties, now) if not self.one_shot \
                else timedelta(days=365)
            opened = gate_opened(envelope.properties, now) if not self.one_shot else None
            decision = resolve(batch.decisions[i], known, self.maps, self.settings, attempt=attempt,
                               past_gates=past_gates, created=batch.created,
                               retried=_retried(envelope) and not self.one_shot, waited=waited,
                               since_gate=now - opened if opened is not None else None)
            if decision.decision != "write" or decision.plan is None:
                batch.decisions[i], batch.results[i] = decision, self._settled(decision)
                if i in batch.creates and (row := _source_row(decision)) is not None:
                    batch.created.discard(row)
                continue
            if _retried(envelope):
                decision = evolve(decision, plan=evolve(decision.plan,
                                                          source=evolve(decision.plan.source, retried=True)))
            batch.decisions[i] = decision
            key = message_key(envelope, decision)
            if key is not None and key in batch.first_of:
                batch.copies.append((i, batch.first_of[key]))
                batch.results[i] = Result("skipped", Reason.DUPLICATE, "", decision)  # placeholder, set at the end
                continue
            if key is not None:
                batch.first_of[key] = i
            writes.append(i)
        if not self.one_shot:
            self._await_earlier(batch, indexes, writes)
        return writes

    def _await_earlier(self, batch: _Batch, indexes: list[int], writes: list[int]) -> None:
        """Flag the whole saves of a row when every message of the row in the flight (written, stale or skipped)
        has a pre image naming a version the row's stored facts have not seen (newer than every version they know,
        or a gap between two they have seen: `RowFacts.follows_seen`), an earlier save not seen yet, on their first
        try: on a record from FHIR not marked by the row yet, their write waits once for that save
        (`RowEdit.awaits_earlier`). All of the row's saves in the flight, so that none of them is written in the
        newest's place, nor a copy of it. Not a move (a child row to another patient): that save, when it comes, is
        `stale` by the move, so waiting would not help (docs/reliability.md, "What remains")."""
        rows: dict[RowKey, list[int]] = {}
        for i in writes:
            plan = batch.decisions[i].plan
            assert plan is not None
            if plan.full and (row := _source_row(batch.decisions[i])) in batch.stored \
                    and _from_fhir(batch.stored, row, plan) and _adopts(plan) \
                    and not any(isinstance(w.edit, RemoveItem) for w in plan.writes):
                rows.setdefault(row, []).append(i)
        if not rows:
            return
        for row, group in rows.items():
            if any(_past_gates(batch.envelopes[i]) >= EARLIER_SAVE_GRACE_RETRIES for i in group):
                continue
            known = batch.stored[row]
            # Every message of the row in the batch, those settled when planned included (an echo, a save of other
            # columns): any of them may be the earlier save.
            if any(known.follows_seen(_before_version(batch.decisions[i])) for i in batch.messages_of.get(row, ())):
                continue  # (the earliest says what the others would: each after a save not seen)
            for i in group:
                plan = batch.decisions[i].plan
                assert plan is not None
                edit = plan.writes[0].edit
                assert isinstance(edit, RowEdit | ItemEdit)
                waits = plan.with_edit(evolve(edit, awaits_earlier=True))
                batch.decisions[i] = evolve(batch.decisions[i], plan=waits)

    async def _write(self, batch: _Batch, writes: list[int], landed: asyncio.Event | None = None) -> None:
        """Admit (ledger) and deliver `writes`; fill their results and the facts learned."""
        decisions, results = batch.decisions, batch.results
        if self.ledger is not None:
            admitted = await self._admit(batch.envelopes, decisions, results, writes)
            for i in set(writes) - set(admitted):
                result = results[i]
                if result is not None and result.state != "skipped" and (row := _source_row(decisions[i])):
                    batch.created.discard(row)  # (not sent: made nothing)
            writes = admitted
        plans = [decisions[i].plan for i in writes]

        def written(failed: list[bool]) -> None:
            """The resources are written: a failed Create is off the batch's list of rows it creates before the
            flights waiting for it go on (found by review: a visit named the id of its patient's failed Create)."""
            for i, bad in zip(writes, failed, strict=True):
                # (not only the Create's own message: a newer whole-row save of the row, in its place, makes it)
                if bad and (row := _source_row(decisions[i])) is not None:
                    batch.created.discard(row)
            if landed is not None:
                landed.set()

        delivered = await self._deliver([p for p in plans if p is not None], batch.memo, written)
        for i, outcome in zip(writes, delivered, strict=True):
            decision = decisions[i]
            if isinstance(outcome, WritebackError):
                results[i] = result_for(decision, outcome.reason, outcome.detail)
                if isinstance(outcome, TargetGone):
                    batch.learned.append(RowFacts(*outcome.row, gone=outcome.reference))
                if (row := _source_row(decision)) is not None:
                    batch.created.discard(row)  # (made nothing: the flights after it must not name its id)
                if outcome.reason is Reason.TARGET_PENDING and decision.plan is not None \
                        and decision.plan.awaits_earlier:
                    batch.waited.add(i)
                continue
            # Only of the message's own row: a child row's write into its parent (an MRN into the Patient the
            # contact's FHIR id names) is no resource made or found for the parent row, which may still have one
            # of its own to leave (`facts.resolve`; found by review).
            source = (decision.plan.source.table, decision.plan.source.record_id) if decision.plan else None
            batch.learned += [RowFacts(table, row_id, written=reference, found=reference)
                              for (table, row_id), reference in outcome.ids if (table, row_id) == source]
            if outcome.skipped is not None:
                results[i] = Result("skipped", outcome.skipped, outcome.detail, decision)
            else:
                results[i] = Result("written", None, decision.detail, decision, resource=outcome.resource,
                                    provenance=outcome.provenance, issues=outcome.issues,
                                    extra={"also": list(outcome.also)} if outcome.also else {})

    def _unseen(self, batch: _Batch, retrying: set[int]) -> None:
        """What the batch keeps of the rows whose save waits for an earlier one, with the versions of all the
        row's messages in the batch left out (the copy of the waiting save, the older save set aside as `stale`:
        each came after the earlier save too, or the row would not wait), and of the messages to be tried again
        (`retrying`: held back by the patient's consent, a parent not written yet, an outage), with their own
        versions left out. Kept, one would make a later save of the row, or a copy, received before the retry,
        seem to follow a save already seen, and not wait (found by review: a correction made while consent was off,
        retried after the next correction). Their type, consent and parent are kept, with their own version."""
        whole = {row for i in batch.waited if (row := _source_row(batch.decisions[i])) is not None}
        rows = whole | {row for i in retrying if (row := _source_row(batch.decisions[i])) is not None}
        for row in rows:
            facts = []
            for i in batch.messages_of.get(row, ()):
                message = batch.decisions[i].message
                fact = facts_of(message, self.maps, self.settings) if message is not None else None
                if fact is None:
                    continue
                if row in whole or i in retrying:
                    fact = evolve(fact, version=Version(), seen=(), type_version=fact.type_at,
                                   consent_version=fact.consent_at, parent_version=fact.parent_at)
                facts.append(fact)
            batch.local.pop(row, None)
            merged(facts, into=batch.local)

    def _settled(self, decision: Decision) -> Result:
        assert decision.reason is not None
        if decision.decision == "skip":
            return Result("skipped", decision.reason, decision.detail, decision)
        return result_for(decision, decision.reason, decision.detail)

    async def _read_facts(self, rows: set[RowKey]) -> dict[RowKey, RowFacts]:
        if self.ledger is None:
            return {row: self._facts[row] for row in rows if row in self._facts}
        return await self.ledger.facts(rows)

    async def _keep_facts(self, stored: dict[RowKey, RowFacts] | None,
                          learned: dict[RowKey, RowFacts]) -> Mapping[RowKey, WritebackError]:
        """Keep what the batch taught about its rows, where it adds to what is stored; the rows whose facts could
        not be kept, with why."""
        changed = [fact for key, fact in learned.items()
                   if stored is None or key not in stored or stored[key].merge(fact) != stored[key]]
        if not changed:
            return {}
        if self.ledger is None:
            merged(changed, into=self._facts)
            return {}
        try:
            failed = await self.ledger.learn(changed)
        except WritebackError as exc:
            failed = {(fact.table, fact.row_id): exc for fact in changed}
        if not failed:
            return {}
        error = next(iter(failed.values()))
        log.warning("row facts of %d rows not kept (%s)", len(failed), error.detail,
                    extra={"reason": error.reason.value})
        return failed

    def _newest_per_row(self, decisions: list[Decision], results: list[Result | None], writes: list[int]) -> list[int]:
        """Of several whole-row writes of one row in the batch, the newest: it holds the others' changes. It finds
        the items an ingest put in the resource by its own pre image, else by the older ones' (`RowEdit.earlier`):
        FHIR may hold the row as it was before the batch, not between its saves (with two names or phones without
        `use`, it took another system's)."""
        newest: dict[tuple[str, str, str], int] = {}
        older_ones: dict[tuple[str, str, str], list[int]] = {}
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
            kept = decisions[other].plan
            assert kept is not None
            order = plan.source.version.compare(kept.source.version)
            if not order:
                continue  # the same version or none to compare: both are written, in the order given
            older, newer = (other, i) if order > 0 else (i, other)
            newest[row] = newer
            older_ones.setdefault(row, []).append(older)
            results[older] = Result("skipped", Reason.STALE, "A newer change of this row in the same batch holds "
                                    "this one's changes; that one is written.", decisions[older])
        for row, olders in older_ones.items():
            decisions[newest[row]] = _with_earlier(decisions[newest[row]], [decisions[i] for i in olders])
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
                seen = await ledger.seen(key) if key else None
                if seen == "processed":
                    results[i] = Result("skipped", Reason.DUPLICATE, "This message was already processed.", decision)
                    return
                plan = decision.plan
                assert plan is not None
                if seen == "tried" and not plan.source.retried:
                    # Tried before, though nothing on the message says so: Service Bus redelivered it after it was
                    # abandoned, and the binding does not pass the delivery count. Its earlier try may have written a
                    # version whose Provenance is owed (found by review: a newer save made it `stale`, and that
                    # version never got one).
                    plan = evolve(plan, source=evolve(plan.source, retried=True))
                    decision = decisions[i] = evolve(decision, plan=plan)
                child = isinstance(plan.writes[0].edit, ItemEdit)
                if (plan.full and not child) or plan.awaits_earlier:
                    # Ordered by the version marked in its resource, inside the write (one that may wait for an
                    # earlier save claims nothing: that save, when it comes, must not find itself superseded).
                    return
                superseded = await ledger.claim(plan) if not plan.heal_only else frozenset()
                if plan.link is not None and plan.link in superseded and plan.source.retried:
                    decisions[i] = evolve(decision, plan=evolve(plan, heal_only=True))  # (see `resolve`)
                    return
                if plan.link is not None and plan.link in superseded:
                    # A child row's versions may sit in different parents: a newer change that moved it away from
                    # a parent that had no resource yet could leave no tombstone there, so the row state orders its
                    # parent. Other columns a newer change wrote are kept by the write itself (the item's mark).
                    leaving = tuple(w for w in plan.writes if isinstance(w.edit, RemoveItem))
                    if leaving:
                        # A move received after a newer save that never knew the old parent (its pre image names
                        # the new one): the removal from the old parent is still this move's to make.
                        decisions[i] = evolve(decision, plan=evolve(plan, writes=leaving), detail=(
                            f"{decision.detail[:-1]}; only its removal from the {leaving[0].target.table} it left: a "
                            "newer change of this row already linked it to its parent."))
                        return
                    results[i] = Result("skipped", Reason.STALE, "A newer change of this row already linked it to "
                                        "its parent.", decision)
                    return
                narrowed = narrow(decision, superseded)
                if narrowed is None and plan.source.retried:
                    # Every column was written by a newer change, but this one, tried again, may have written its
                    # own version first, whose Provenance is owed: the write finds it (`stale`, then its history).
                    narrowed = decision
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
                       landed: Callable[[list[bool]], None] | None = None) -> list[Delivered | WritebackError]:
        if not plans:
            return []
        delivery = self.delivery
        if delivery is None:
            return [WritebackError(Reason.CONFIG_ERROR, "no delivery target is configured")] * len(plans)
        deliver_many = getattr(delivery, "deliver_many", None)
        if deliver_many is not None:
            outcomes: list[Delivered | WritebackError] = await deliver_many(plans, memo, self.ledger, landed)
            return outcomes

        async def one(plan: WritePlan) -> Delivered | WritebackError:
            try:
                return await delivery.deliver(plan)
            except WritebackError as exc:
                return exc

        outcomes = await _bounded(self._slots, [one(plan) for plan in plans])
        if landed is not None:
            landed([isinstance(outcome, WritebackError) for outcome in outcomes])
        return outcomes

    async def _record(self, envelope: Envelope, result: Result) -> Result:
        assert self.ledger is not None
        try:
            await self.ledger.record(envelope, result)
        except WritebackError as exc:
            # Tried again until its row is kept: a message dead-lettered without one was in the dead-letter queue
            # with nothing in `logs` about it (found by review); its retry ends the same way, and is recorded.
            if result.state in ("written", "skipped", "dead-lettered"):
                return result_for(result.decision, exc.reason, exc.detail, resource=result.resource,
                                  provenance=result.provenance, issues=result.issues,
                                  duration_ms=result.duration_ms)
        return result


async def _bounded(slots: asyncio.Semaphore, work: Sequence[Awaitable[_T]]) -> list[_T]:
    async def one(item: Awaitable[_T]) -> _T:
        async with slots:
            return await item

    return list(await asyncio.gather(*(one(w) for w in work)))


def _with_duration(result: Result, started: float) -> Result:
    return evolve(result, duration_ms=round((time.perf_counter() - started) * 1000, 2))
