"""A Service Bus queue simulator with a clock the test controls, driving the real function adapter.

It stands in for the broker, which cannot run here (the Service Bus emulator needs Docker). What it does is what
the queue does for this app: a batch of up to `batch` messages per invocation of `FunctionApp.handle_batch`
(the batch trigger's path, settlement included); complete and dead-letter end a message; abandon puts it back
with its delivery count + 1 and dead-letters it as `MaxDeliveryCountExceeded` after `max_delivery`; a lock
that lapses (the settlement call failed) redelivers the message after the lock duration; scheduled messages
(the app's retry copies, sent through this object as its `Scheduler`) are enqueued at their time; a message
whose MessageId was sent within the duplicate-detection window is dropped, as the queue's duplicate detection
does. Time is virtual: when nothing is due, the clock jumps to the next scheduled message, so a two-hour
outage takes no real time. `before_invocation` lets a scenario change the world (an outage starting or ending)
as the clock moves.
"""

from __future__ import annotations

import heapq
import itertools
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.reliability.figures import FIGURES
from writeback.functions import FunctionApp
from writeback.pipeline import Result
from writeback.scheduler import Copy

SEQ = "x-simulator-seq"  # which logical message a delivery (or a retry copy of it) is
T0 = datetime(2026, 11, 30, 8, 0, tzinfo=UTC)


@dataclass
class SimMessage:
    """What the trigger hands the function: the attributes `writeback.functions.envelope_of` reads."""

    body: bytes
    message_id: str
    application_properties: dict[str, Any]
    enqueued_time_utc: datetime
    content_type: str | None = "application/json"
    correlation_id: str | None = None
    delivery_count: int = 1
    locked_until_utc: datetime | None = None

    @property
    def seq(self) -> int:
        return int(self.application_properties[SEQ])


@dataclass
class End:
    """How a logical message left the queue for good."""

    settlement: str  # complete | deadletter
    state: str
    reason: str | None
    description: str
    result: Result | None
    at: datetime


class Actions:
    """The settlement calls of one invocation."""

    def __init__(self, fail_complete: Callable[[SimMessage], bool] | None = None) -> None:
        self.calls: list[tuple[str, SimMessage, str | None, str | None]] = []
        self._fail_complete = fail_complete

    def complete(self, message: SimMessage) -> None:
        if self._fail_complete is not None and self._fail_complete(message):
            raise RuntimeError("injected: the message lock was lost before the settlement")
        self.calls.append(("complete", message, None, None))

    def abandon(self, message: SimMessage) -> None:
        self.calls.append(("abandon", message, None, None))

    def deadletter(self, message: SimMessage, deadletter_reason: str | None = None,
                   deadletter_error_description: str | None = None) -> None:
        self.calls.append(("deadletter", message, deadletter_reason, deadletter_error_description))


@dataclass
class Broker:
    batch: int = 10
    max_delivery: int = 10
    lock: timedelta = timedelta(minutes=5)
    duplicate_window: timedelta = timedelta(minutes=10)
    now: datetime = T0
    before_invocation: Callable[[Broker], Awaitable[None]] | None = None
    fail_complete: Callable[[SimMessage], bool] | None = None  # a settlement that fails (the lock was lost)
    app: FunctionApp | None = None
    ends: dict[int, list[End]] = field(default_factory=dict)
    results: dict[int, list[Result]] = field(default_factory=dict)
    rows: dict[int, str | None] = field(default_factory=dict)
    deliveries: int = 0
    invocations: int = 0
    copies_scheduled: int = 0
    duplicates_dropped: int = 0
    _due: list[tuple[datetime, int, SimMessage]] = field(default_factory=list)
    _ids: dict[str, datetime] = field(default_factory=dict)
    _order: itertools.count[int] = field(default_factory=itertools.count)
    _seq: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def clock(self) -> datetime:
        return self.now

    # ---- sending -------------------------------------------------------------------------------------------

    def _enqueue(self, message: SimMessage, at: datetime) -> bool:
        seen = self._ids.get(message.message_id)
        if seen is not None and self.now - seen < self.duplicate_window:
            self.duplicates_dropped += 1
            return False
        self._ids[message.message_id] = self.now
        heapq.heappush(self._due, (at, next(self._order), message))
        return True

    def send(self, body: bytes, row: str | None = None, *, at: datetime | None = None,
             message_id: str | None = None) -> int:
        """Dataverse posts a message (now, or at `at`)."""
        seq = next(self._seq)
        self.rows[seq] = row
        FIGURES["messages"] += 1
        when = at or self.now
        message = SimMessage(body, message_id or uuid.uuid4().hex, {SEQ: seq}, when)
        self._enqueue(message, when)
        return seq

    async def schedule(self, copies: Sequence[Copy]) -> None:
        """The app's retry copies (the `Scheduler` protocol)."""
        for copy in copies:
            self.copies_scheduled += 1
            self._enqueue(SimMessage(copy.body, copy.message_id, dict(copy.properties), copy.at, copy.content_type,
                                     copy.correlation_id), copy.at)

    async def aclose(self) -> None:
        return None

    def scheduler_factory(self, settings: object) -> Broker:
        return self

    # ---- receiving -----------------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        return len(self._due)

    def _take(self) -> list[SimMessage]:
        if not self._due:
            return []
        if self._due[0][0] > self.now:
            self.now = self._due[0][0]  # nothing is due: time passes until something is
        taken: list[SimMessage] = []
        while self._due and self._due[0][0] <= self.now and len(taken) < self.batch:
            taken.append(heapq.heappop(self._due)[2])
        return taken

    async def run(self, *, until: datetime | None = None, max_invocations: int = 10_000) -> None:
        """Invoke the function until the queue is empty (or the clock passes `until`)."""
        assert self.app is not None
        while self._due and self.invocations < max_invocations:
            if until is not None and self._due[0][0] > until:
                break
            if self.before_invocation is not None:
                await self.before_invocation(self)
            taken = self._take()
            for message in taken:
                message.locked_until_utc = self.now + self.lock
            await self._invoke(taken)

    async def _invoke(self, messages: list[SimMessage]) -> None:
        assert self.app is not None
        self.invocations += 1
        self.deliveries += len(messages)
        FIGURES["deliveries"] += len(messages)
        actions = Actions(self.fail_complete)
        results = await self.app.handle_batch(messages, actions)
        settled = {id(message): (kind, reason, description) for kind, message, reason, description in actions.calls}
        for message, result in zip(messages, results, strict=True):
            if result is not None:
                self.results.setdefault(message.seq, []).append(result)
            kind, reason, description = settled.get(id(message), ("lost-lock", None, None))
            if kind == "complete":
                if result is None or result.settlement == "reschedule":
                    continue  # completed because its delayed copy is on the queue: not the end of it
                self._end(message, End("complete", result.state, result.reason.value if result.reason else None,
                                       result.detail, result, self.now))
            elif kind == "deadletter":
                self._end(message, End("deadletter", "dead-lettered", reason, description or "", result, self.now))
            elif kind == "abandon" or kind == "lost-lock":
                # abandon: back at once; a settlement that failed: back when the lock lapses
                message.delivery_count += 1
                if message.delivery_count > self.max_delivery:
                    self._end(message, End("deadletter", "dead-lettered", "MaxDeliveryCountExceeded",
                                           "delivered too often", result, self.now))
                else:
                    at = self.now if kind == "abandon" else self.now + self.lock
                    heapq.heappush(self._due, (at, next(self._order), message))

    def _end(self, message: SimMessage, end: End) -> None:
        self.ends.setdefault(message.seq, []).append(end)

    @property
    def finals(self) -> dict[int, list[End]]:
        """The ends by logical message, under the name the invariant check reads."""
        return self.ends

    def end(self, seq: int) -> End:
        [only] = self.ends[seq]
        return only
