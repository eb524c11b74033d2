"""The Azure Functions adapter: a batch of Service Bus messages in, exactly one explicit settlement each out.

`function_app.py` hands the list of `ServiceBusReceivedMessage` of one invocation (azurefunctions-extensions-
bindings-servicebus, trigger with `cardinality=many` and `auto_complete_messages=False`) and the
`ServiceBusMessageActions` to `handle_batch`, which

1. builds the process-wide singletons once, lazily: settings, entity maps, the FHIR delivery (one shared
   httpx client, from `writeback.fhir_client.build_delivery`) and the Table Storage ledger; and, apart from
   them, the retry scheduler (Service Bus sender), so a configuration fault can still be retried;
2. turns each message into a `pipeline.Envelope` and runs `Pipeline.process_many` over the readable ones,
   under a deadline inside the messages' lock (batch triggers get no lock renewal: `FunctionApp.deadline`);
3. settles each message exactly once, as soon as its outcome is recorded, in a worker thread (settlement is a
   synchronous gRPC call into the host; the event loop goes on with the rest of the batch):
   written / skipped → complete; permanent (reject) → dead-letter, `deadletter_reason` = the reason code,
   description = the detail (never patient data); transient, configuration fault, or not finished by the
   deadline → a copy is scheduled on the queue with a growing delay and the message completed
   (`writeback.retry`), and past the retry window it is dead-lettered as `retries-exhausted`;
4. logs one structured record per message whose `extra` fields become Application Insights
   customDimensions (see docs/operations.md).

A message the binding hands over unreadable is abandoned on its own; the rest of the batch goes on. A
configuration fault found while building the singletons (missing or invalid setting, unreadable or invalid
entity map) reschedules every message of the batch and logs one error naming the setting or the map file;
nothing is cached, so the next invocation tries again. Where no retry can be scheduled (no Service Bus
connection, or the send fails), messages are abandoned instead: redelivered at once, never lost. An
unexpected error (a bug) abandons every message not yet settled. `handle` is the same path for one message.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from writeback import build
from writeback.collector import paused, settle_long_lived
from writeback.decide import Decision
from writeback.errors import WritebackError
from writeback.maps import MapSet, load_maps
from writeback.messages import parse_message
from writeback.pipeline import DEADLINE_DETAIL, Delivery, Envelope, Ledger, Pipeline, Progress, Result, give_up
from writeback.reasons import Kind, Reason
from writeback.retry import ATTEMPT, GATE_WAIT, GiveUp, RetryPolicy, batch_jitter, next_step, text_of
from writeback.scheduler import Copy, Scheduler
from writeback.settings import DEADLINE_MARGIN_SECONDS, Settings

log = logging.getLogger("writeback.function")

MAX_DESCRIPTION = 1000  # characters of the dead-letter error description
# Kept, of a batch's lock, for the settlement calls after its retry copies are scheduled (gRPC calls to the host).
SETTLE_SECONDS = 5.0
# The least work an invocation does (its deadline's floor). A message whose lock has less left than this and one
# request's FHIR_TIMEOUT_SECONDS is not worked on.
MIN_WORK_SECONDS = 0.5
STORE_STALLED_DETAIL = ("Table Storage did not answer in time while this message's outcome and what it taught about "
                        "its row were being kept (its work on the FHIR server was over): tried again, and its retry "
                        "finds its write made.")
LOCK_LAPSED_DETAIL = ("The message's lock had ended, or was about to, when this invocation got it (the worker was "
                      "busy, or the batch waited): nothing was written.")  # (what comes of it: the settlement's)

DeliveryFactory = Callable[[Settings], tuple[Delivery, Callable[[], Awaitable[None]]]]
LedgerFactory = Callable[[Settings], tuple[Ledger, Callable[[], Awaitable[None]]]]
SchedulerFactory = Callable[[Settings], Scheduler]


class MessageActions(Protocol):
    """The part of `ServiceBusMessageActions` this adapter uses (keyword arguments as the extension names them)."""

    def complete(self, message: Any) -> None: ...

    def abandon(self, message: Any) -> None: ...

    def deadletter(self, message: Any, deadletter_reason: str | None = None,
                   deadletter_error_description: str | None = None) -> None: ...


def _default_delivery(settings: Settings) -> tuple[Delivery, Callable[[], Awaitable[None]]]:
    from writeback.fhir_client import build_delivery  # noqa: PLC0415 - keeps httpx/authlib off the import path

    return build_delivery(settings)


def _default_ledger(settings: Settings) -> tuple[Ledger, Callable[[], Awaitable[None]]]:
    from writeback.outcomes import OutcomeStore  # noqa: PLC0415 - keeps azure-data-tables off the import path

    store = OutcomeStore.from_settings(settings)
    return store, store.aclose


@dataclass
class Runtime:
    settings: Settings
    maps: MapSet
    pipeline: Pipeline
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    async def aclose(self) -> None:
        for close in reversed(self.closers):
            await close()
        self.closers.clear()


# ---- Service Bus message → Envelope ------------------------------------------------------------------------


def _body(message: Any) -> bytes | str:
    raw = message.body
    if isinstance(raw, bytes | bytearray):
        return bytes(raw)
    if isinstance(raw, str):
        return raw
    if isinstance(raw, Iterable) and not isinstance(raw, Mapping):
        parts = list(raw)  # a data body arrives as a generator of byte sections
        if all(isinstance(part, bytes | bytearray) for part in parts):
            return b"".join(bytes(part) for part in parts)
    return b""  # an AMQP value/sequence body: not from Dataverse; the parser rejects it as not JSON


def envelope_of(message: Any) -> Envelope:
    """`ServiceBusReceivedMessage` → `Envelope`: body bytes, properties as str → str, broker facts."""
    raw_props = message.application_properties or {}
    properties = {text_of(k): text_of(v) for k, v in raw_props.items() if v is not None}
    count = message.delivery_count
    content_type = message.content_type
    message_id = message.message_id
    correlation = getattr(message, "correlation_id", None)
    locked = getattr(message, "locked_until_utc", None)
    return Envelope(
        body=_body(message),
        properties=properties,
        content_type=text_of(content_type) if content_type else None,
        message_id=text_of(message_id) if message_id is not None else None,
        # 0 = not reported: extension 1.0.0b2 decodes the AMQP message without its header section.
        delivery_count=count if isinstance(count, int) else 0,
        correlation_id=text_of(correlation) if correlation else None,
        locked_until=locked.timestamp() if isinstance(locked, datetime) else None,
    )


# ---- telemetry ---------------------------------------------------------------------------------------------


def dimensions(envelope: Envelope, result: Result | None, settlement: str, **more: Any) -> dict[str, Any]:
    """The customDimensions of the per-message log record: ids, codes and counts only."""
    message = result.decision.message if result is not None else None
    correlation = message.correlation_id if message is not None else None
    dims: dict[str, Any] = {
        "message_id": envelope.message_id or "",
        "correlation_id": correlation or "",
        "request_id": (message.request_id if message is not None else None) or "",
        "table": message.table if message is not None else "",
        "record_id": message.record_id if message is not None else "",
        "message_name": message.message_name[:100] if message is not None else "",
        "outcome": result.state if result is not None else "config-error",
        "reason": result.reason.value if result is not None and result.reason else "",
        "settlement": settlement,
        "resource": (result.resource if result is not None else None) or "",
        "provenance": (result.provenance if result is not None else None) or "",
        "issues": len(result.issues) if result is not None else 0,
        "delivery_count": envelope.delivery_count,
        "duration_ms": result.duration_ms if result is not None else 0.0,
    }
    dims.update(more)
    return dims


_LEVEL = {"written": logging.INFO, "skipped": logging.INFO, "retry": logging.WARNING,
          "dead-lettered": logging.ERROR, "config-error": logging.ERROR}


def _log_outcome(dims: Mapping[str, Any], detail: str) -> None:
    outcome = str(dims["outcome"])
    text = ("writeback outcome=%s reason=%s table=%s record=%s message_id=%s correlation=%s settlement=%s "
            "duration_ms=%s: %s")
    if outcome == "config-error":
        count = int(dims.get("messages", 1))
        # Without a scheduler the messages are abandoned (Service Bus redelivers them at once): the record must say
        # so, not promise a delayed retry (found by a new user: alerts and queries read this record).
        if dims["settlement"] == "reschedule":
            how = "retried with a growing delay"
        else:
            it = "it" if count == 1 else "them"
            how = (f"abandoned: Service Bus redelivers {it} at once, until MaxDeliveryCount (no retry copy can be "
                   "scheduled)")
        kept = (f"The message is {how}; fix the configuration (python -m writeback check-config) and it is "
                "processed again." if count == 1 else
                f"All {count} messages of the batch are {how}; fix the configuration "
                "(python -m writeback check-config) and they are processed again.")
        text = ("writeback outcome=%s reason=%s table=%s record=%s message_id=%s correlation=%s settlement=%s "
                "duration_ms=%s: configuration error: %s. " + kept)
    log.log(_LEVEL.get(outcome, logging.ERROR), text, outcome, dims["reason"] or "-", dims["table"] or "-",
            dims["record_id"] or "-", dims["message_id"] or "-", dims["correlation_id"] or "-",
            dims["settlement"], dims["duration_ms"], detail, extra=dict(dims))


def _where(exc: BaseException) -> str:
    """Exception type and innermost frame: its message may quote data, so it is not logged."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return type(exc).__name__
    last = frames[-1]
    return f"{type(exc).__name__} at {last.filename.rsplit('/', 1)[-1]}:{last.lineno} in {last.name}"


def description_for(result: Result) -> str:
    text = result.detail or (result.reason.info.meaning if result.reason else "rejected")
    return text if len(text) <= MAX_DESCRIPTION else text[: MAX_DESCRIPTION - 1] + "…"


# ---- the app -----------------------------------------------------------------------------------------------


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _default_scheduler(settings: Settings) -> Scheduler:
    from writeback.scheduler import ServiceBusScheduler  # noqa: PLC0415 - keeps azure-servicebus off the path

    return ServiceBusScheduler(settings)


@dataclass
class _Retrying:
    """A message of the batch to put back on the queue (or to give up), with the outcome that sent it there."""

    index: int
    envelope: Envelope
    reason: Reason
    detail: str
    result: Result | None
    quiet: bool = False  # a configuration fault's retry: the batch's one record says it (`_log_config_fault`)
    # Its outcome was decided against the retry window (`pipeline.give_up`) and recorded: given up already, or to be
    # retried whatever the clock says by the time its copy is made (the log and the settlement agree: found by
    # review, a message given up after its row said `retry`).
    decided: bool = False


class FunctionApp:
    """Process-wide singletons, built lazily once, and the batch (and single-message) handler.

    `clock` (UTC now) and `margin_seconds` (kept between the invocation's deadline and the end of its lock) are
    the knobs the reliability suite turns; the app uses the defaults."""

    def __init__(self, env: Mapping[str, str] | None = None, *, delivery_factory: DeliveryFactory | None = None,
                 ledger_factory: LedgerFactory | None = None, scheduler_factory: SchedulerFactory | None = None,
                 clock: Callable[[], datetime] = _utcnow, margin_seconds: float = DEADLINE_MARGIN_SECONDS) -> None:
        self._env = env
        self._delivery_factory = delivery_factory or _default_delivery
        self._ledger_factory = ledger_factory or _default_ledger
        self._scheduler_factory = scheduler_factory or _default_scheduler
        self._clock = clock
        self._margin = margin_seconds
        self._runtime: Runtime | None = None
        self._lock: asyncio.Lock | None = None
        self._retries: tuple[Settings, Scheduler | None, str] | None = None
        self._faults: tuple[Ledger, Callable[[], Awaitable[None]]] | None = None

    async def runtime(self) -> Runtime:
        """The singletons; a configuration fault raises ConfigError/MapError and is not cached."""
        if self._runtime is not None:
            return self._runtime
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._runtime is None:
                self._runtime = await self._build()
            return self._runtime

    async def _build(self) -> Runtime:
        settings = Settings.from_env(self._env, need_outcomes=True)
        maps = load_maps(settings.maps_dir)
        ledger, close_ledger = self._ledger_factory(settings)
        try:
            delivery, close_delivery = self._delivery_factory(settings)
        except BaseException:
            await close_ledger()
            raise
        pipeline = Pipeline(maps, settings, delivery, ledger, clock=self._clock)
        settle_long_lived()
        # Which build runs (setup.py): the compiled core is a release's expected speed, the sources a slower one.
        # (Its own logger: "writeback.function" carries the outcome records, one per message.)
        logging.getLogger("writeback.build").info("writeback started: core %s", build.core())
        return Runtime(settings, maps, pipeline, [close_ledger, close_delivery])

    def retry_side(self) -> tuple[Settings, Scheduler | None, str]:
        """The retry settings and the scheduler, built apart from the runtime (and from each other's faults):
        a message that met a wrong FHIR setting must still be put back on the queue. Without a scheduler (no
        Service Bus connection configured) the third item says why, and retries fall back to abandon."""
        if self._retries is None:
            settings = Settings.for_retries(self._env)
            try:
                self._retries = (settings, self._scheduler_factory(settings), "")
            except WritebackError as exc:
                self._retries = (settings, None, exc.detail)
        return self._retries

    async def aclose(self) -> None:
        runtime, self._runtime = self._runtime, None
        if runtime is not None:
            await runtime.aclose()
        retries, self._retries = self._retries, None
        if retries is not None and retries[1] is not None:
            await retries[1].aclose()
        faults, self._faults = self._faults, None
        if faults is not None:
            await faults[1]()

    async def handle(self, message: Any, actions: MessageActions) -> Result | None:
        """Process one message and settle it exactly once: a batch of one."""
        (result,) = await self.handle_batch([message], actions)
        return result

    def deadline(self, envelopes: Iterable[Envelope], settings: Settings) -> float:
        """Seconds this invocation may work on its batch: until the earliest lock of the batch ends, less
        FHIR_TIMEOUT_SECONDS and the margin for settling and scheduling; never more than
        `Settings.invocation_seconds` (the lock may have been taken before the invocation started)."""
        budget = settings.lock_duration_seconds - settings.timeout_seconds - self._margin
        ends = [e.locked_until for e in envelopes if e.locked_until is not None]
        if ends:
            budget = min(budget, min(ends) - self._clock().timestamp() - settings.timeout_seconds - self._margin)
        return max(budget, MIN_WORK_SECONDS)

    def _scheduling_budget(self, envelopes: Iterable[Envelope], settings: Settings) -> float:
        """Seconds scheduling the batch's retry copies may take: until its earliest lock ends, less SETTLE_SECONDS;
        at most FHIR_TIMEOUT_SECONDS, as every other remote call. A send that does not answer in time leaves the
        messages abandoned, not held past their lock (found by review: it had no bound)."""
        budget = float(settings.timeout_seconds)
        ends = [e.locked_until for e in envelopes if e.locked_until is not None]
        if ends:
            budget = min(budget, min(ends) - self._clock().timestamp() - SETTLE_SECONDS)
        return max(budget, 0.5)

    async def handle_batch(self, messages: Sequence[Any], actions: MessageActions) -> list[Result | None]:
        """Process a batch and settle each message exactly once on its own outcome. Returns the results in
        input order (None where none was reached: unreadable, configuration fault, unexpected error)."""
        started = time.perf_counter()
        settler = _Settler(actions, messages)
        results: list[Result | None] = [None] * len(messages)
        readable: dict[int, Envelope] = {}
        for index, message in enumerate(messages):
            try:
                readable[index] = envelope_of(message)
            except Exception as exc:  # the binding handed over something unreadable: keep it, say so
                self._unexpected(settler, index, Envelope(b""), exc)
        retry_settings, _, _ = self.retry_side()
        retrying: list[_Retrying] = []
        fault: tuple[WritebackError, Reason] | None = None
        try:
            if readable:
                try:
                    runtime = await self.runtime()
                except WritebackError as exc:  # ConfigError / MapError: keep the messages, say what to fix
                    reason = exc.reason if exc.reason.kind == Kind.CONFIG else Reason.CONFIG_ERROR
                    fault = exc, reason
                    faults = await self._record_faults(readable, exc, reason, retry_settings, started)
                    retrying = [_Retrying(i, e, reason, exc.detail, faults[i], quiet=True, decided=True)
                                for i, e in readable.items()]
                else:
                    retrying = await self._process(runtime, readable, settler, results)
            scheduled = await self._reschedule(retrying, settler, retry_settings)
            if fault is not None:
                # Once the copies are scheduled or not: the record says what became of the messages (it said
                # `reschedule` of messages then abandoned, the only trace of a fault in OUTCOMES_*: found by review)
                self._log_config_fault(list(readable.values()), *fault, started,
                                       "reschedule" if scheduled else "abandon")
        except Exception as exc:  # a bug, not a message fault: keep what is unsettled (abandon), never lose it
            for index in settler.unsettled():
                self._unexpected(settler, index, readable.get(index, Envelope(b"")), exc)
        finally:
            await settler.drain()
        return results

    async def _process(self, runtime: Runtime, readable: dict[int, Envelope], settler: _Settler,
                       results: list[Result | None]) -> list[_Retrying]:
        """Run the batch through the pipeline until it is done or the deadline comes; settle what ends complete
        or dead-lettered as soon as it is recorded; return what is to be retried."""
        retrying: list[_Retrying] = []
        finished: set[int] = set()
        # A message whose lock is over, or too close to its end to fit a request, is not worked on (`_record_late`).
        now = self._clock().timestamp()
        late = [(index, envelope) for index, envelope in readable.items() if envelope.locked_until is not None
                and envelope.locked_until - now < MIN_WORK_SECONDS + runtime.settings.timeout_seconds]
        if late:
            await self._record_late(runtime, late, now, settler=settler, results=results, retrying=retrying)
            for index, _ in late:
                del readable[index]
        if not readable:
            return retrying
        order = list(readable)
        envelopes = [readable[i] for i in order]

        async def emit(position: int, result: Result) -> None:
            index = order[position]
            results[index] = result
            finished.add(index)
            if result.settlement == "reschedule":
                assert result.reason is not None
                # (one whose outcome could not be recorded was decided before that, and has no row to agree with:
                # its window is checked now, or Table Storage down for days would retry it for good)
                retrying.append(_Retrying(index, envelopes[position], result.reason, result.detail, result,
                                          decided=result.reason is not Reason.OUTCOME_STORE_UNAVAILABLE))
                return
            envelope = envelopes[position]
            settler.settle(index, result.settlement, result,
                           lambda settled: _log_outcome(dimensions(envelope, result, settled), result.detail))

        budget = self.deadline(envelopes, runtime.settings)
        # The pipeline stops its work at the deadline and still records and hands back every outcome (the log and
        # the settlement agree); the outer timeout is the backstop for recording that hangs, inside the margin.
        progress = Progress()
        try:
            async with asyncio.timeout(budget + runtime.settings.timeout_seconds):
                await runtime.pipeline.process_many(envelopes, emit, progress=progress,
                                                    deadline=asyncio.get_running_loop().time() + budget)
        except TimeoutError:
            # Past the pipeline's own deadline, only Table Storage can hold it up; once it is recording, the FHIR
            # work is over, and blaming FHIR's latency would send the administrator the wrong way (found by review).
            reason, detail = (Reason.OUTCOME_STORE_UNAVAILABLE, STORE_STALLED_DETAIL) if progress.recording \
                else (Reason.DEADLINE_REACHED, DEADLINE_DETAIL)
            for position, index in enumerate(order):
                if index not in finished:
                    result = runtime.pipeline.unfinished(envelopes[position], detail, reason)
                    results[index] = result
                    retrying.append(_Retrying(index, envelopes[position], reason, detail, result))
        return retrying

    async def _reschedule(self, retrying: list[_Retrying], settler: _Settler, settings: Settings) -> bool:
        """Schedule a delayed copy of each message and complete it; past the retry window, dead-letter it.
        Copies go out before the originals are completed: a crash in between duplicates, never loses. Returns
        whether the copies (if any) were scheduled: False when they were abandoned instead."""
        if not retrying:
            return True
        _, scheduler, why_not = self.retry_side()
        policy = RetryPolicy.of(settings)
        now, jitter = self._clock(), batch_jitter()
        copies: list[tuple[_Retrying, Copy]] = []
        for item in retrying:
            if item.decided and item.result is not None and item.result.state == "dead-lettered":
                settler.settle(item.index, "deadletter", item.result, _logger(item.envelope, item.result,
                                                                              item.result.detail))
                continue
            step = next_step(policy, properties=item.envelope.properties, message_id=item.envelope.message_id,
                             now=now, jitter=jitter, reason=item.reason,
                             gate_wait=bool(item.result and item.result.decision.extra.get(GATE_WAIT)),
                             window=not item.decided)
            if isinstance(step, GiveUp):
                detail = step.description(item.reason.value, item.detail)
                given_up = Result("dead-lettered", Reason.RETRIES_EXHAUSTED, detail,
                                  item.result.decision if item.result else Decision("reject", None, ""))
                settler.settle(item.index, "deadletter", given_up, _logger(item.envelope, given_up, detail))
                continue
            body = item.envelope.body
            copies.append((item, Copy(body.encode() if isinstance(body, str) else body, step.message_id, step.at,
                                      item.envelope.content_type, item.envelope.correlation_id, step.properties)))
        if not copies:
            return True
        kind = "abandon"
        if scheduler is None:
            log.error("writeback retries cannot be scheduled (%s): %d message(s) abandoned, Service Bus redelivers "
                      "them at once", why_not, len(copies), extra={"outcome": "retry", "settlement": "abandon"})
        else:
            try:
                async with asyncio.timeout(self._scheduling_budget((item.envelope for item, _ in copies), settings)):
                    await scheduler.schedule([copy for _, copy in copies])
                kind = "complete"
            except Exception as exc:
                log.error("writeback scheduling %d retry copies failed (%s); the messages were abandoned and Service "
                          "Bus redelivers them at once", len(copies), _where(exc),
                          extra={"outcome": "retry", "settlement": "abandon", "error": type(exc).__name__})
        for item, copy in copies:
            # (when it is put back for a later try: abandoned, it is not waiting for one)
            more = {"retry_attempt": int(copy.properties[ATTEMPT]), "retry_at": copy.at.isoformat()} \
                if kind == "complete" else {}
            settler.settle(item.index, kind, None, _logger(item.envelope, item.result, item.detail,
                                                           rescheduled=kind == "complete", **more)
                           if item.result and not item.quiet else None)
        return kind == "complete"

    async def _record_late(self, runtime: Runtime, late: list[tuple[int, Envelope]], now: float, *,
                           settler: _Settler, results: list[Result | None], retrying: list[_Retrying]) -> None:
        """The messages handed over with too little lock left to work on (the worker was busy, the batch waited):
        not worked on, since Service Bus may have handed them to another instance already (found by review: the
        deadline's floor had one written and completed). Each one's outcome row is kept (`logs --record` showed
        nothing of it), and where its lock leaves time to settle, a delayed copy is made, as for any retry (an
        abandon would have it back at once, on the same busy worker), or past the retry window it is given up
        before its row is kept, so that the row says dead-lettered as the settlement does. Whether it settles is
        decided once, before the rows are kept, and they are kept together within what the shortest of those locks
        leaves past the settling margin: a slow store must not carry any of them past its lock (found by review: a
        row saying dead-lettered beside an abandon)."""
        lock_left = {index: (envelope.locked_until or now) - now for index, envelope in late}
        settles = {index: left > SETTLE_SECONDS for index, left in lock_left.items()}
        spare = min((left - SETTLE_SECONDS for index, left in lock_left.items() if settles[index]), default=None)
        policy = RetryPolicy.of(runtime.settings)
        unworked = {index: runtime.pipeline.unfinished(envelope, LOCK_LAPSED_DETAIL) for index, envelope in late}
        for index, envelope in late:
            if settles[index]:
                unworked[index] = give_up(envelope, unworked[index], policy, self._clock())
        kept = await asyncio.gather(*(runtime.pipeline.record_unworked(envelope, unworked[index], within=spare)
                                      for index, envelope in late))
        for (index, envelope), result in zip(late, kept, strict=True):
            results[index] = result
            if settles[index]:
                assert result.reason is not None
                retrying.append(_Retrying(index, envelope, result.reason, result.detail, result,
                                          decided=result is unworked[index]))
            else:
                settler.settle(index, "abandon", result, _logger(envelope, result, result.detail))

    async def _record_faults(self, readable: Mapping[int, Envelope], exc: WritebackError, reason: Reason,
                             settings: Settings, started: float) -> dict[int, Result]:
        """Each message's outcome under a configuration fault, with the row its body names, recorded in the outcome
        log where the settings to reach it are sound (a broken map): an administrator's `logs --status failed`
        showed nothing for messages retried, then dead-lettered, for a day (found by an administrator's trial)."""
        policy, now = RetryPolicy.of(settings), self._clock()
        elapsed = round((time.perf_counter() - started) * 1000, 2)
        results: dict[int, Result] = {}
        for index, envelope in readable.items():
            try:
                message = parse_message(envelope.body, envelope.properties, envelope.content_type)
            except (WritebackError, RecursionError):
                message = None
            result = Result("config-error", reason, exc.detail, Decision("reject", reason, exc.detail, message),
                            duration_ms=elapsed)
            results[index] = give_up(envelope, result, policy, now)
        ledger = await self._fault_ledger()
        if ledger is not None:
            try:
                # (bounded: a store that accepts and never answers must not hold the messages past their lock)
                async with asyncio.timeout(settings.timeout_seconds):
                    await asyncio.gather(*(ledger.record(readable[i], r) for i, r in results.items()))
            except (WritebackError, TimeoutError) as error:  # the settlement and its log record still say it
                log.warning("writeback could not record %d configuration-fault outcome(s): %s", len(results),
                            error.detail if isinstance(error, WritebackError) else "the outcome log did not answer",
                            extra={"reason": error.reason.value if isinstance(error, WritebackError) else ""})
        return results

    async def _fault_ledger(self) -> Ledger | None:
        """The outcome log while the runtime cannot be built: from its own settings only (`OUTCOMES_*`; a wrong
        FHIR setting left the log empty: found by review), kept until `aclose`. None when the fault is in those
        settings themselves."""
        if self._faults is None:
            from writeback.outcomes import outcome_settings  # noqa: PLC0415 - keeps azure-data-tables off the path

            try:
                self._faults = self._ledger_factory(outcome_settings(self._env))
            except WritebackError:
                return None
        return self._faults[0]

    def _log_config_fault(self, envelopes: list[Envelope], exc: WritebackError, reason: Reason,
                          started: float, settlement: str) -> None:
        """One error for the whole batch, since every message failed for the same reason: one per
        MESSAGE_IDS_CHARS of its MessageIds, which Application Insights would cut (a value of a custom dimension
        ends at 8,192 characters: 300 GUIDs lost the last 78, found by review)."""
        elapsed = round((time.perf_counter() - started) * 1000, 2)
        for group in _message_id_groups(envelopes):
            dims = dimensions(group[0], None, settlement, reason=reason.value, duration_ms=elapsed,
                              messages=len(group))
            if len(envelopes) > 1:
                dims["message_id"] = ""
                dims["message_ids"] = ",".join(envelope.message_id or "" for envelope in group)
            _log_outcome(dims, exc.detail)

    def _unexpected(self, settler: _Settler, index: int, envelope: Envelope, exc: BaseException) -> None:
        where = _where(exc)

        def report(settled: str) -> None:
            log.error("writeback outcome=retry reason=- message_id=%s settlement=%s: unexpected %s; the message was "
                      "abandoned and Service Bus redelivers it", envelope.message_id or "-", settled, where,
                      extra={"message_id": envelope.message_id or "", "outcome": "retry", "settlement": settled,
                             "error": type(exc).__name__})

        settler.settle(index, "abandon", None, report)


MESSAGE_IDS_CHARS = 8000  # of a record's `message_ids` (Application Insights keeps 8,192 characters of a value)


def _message_id_groups(envelopes: list[Envelope]) -> list[list[Envelope]]:
    groups: list[list[Envelope]] = [[]]
    size = 0
    for envelope in envelopes:
        length = len(envelope.message_id or "") + 1
        if groups[-1] and size + length > MESSAGE_IDS_CHARS:
            groups.append([])
            size = 0
        groups[-1].append(envelope)
        size += length
    return groups


def _logger(envelope: Envelope, result: Result, detail: str, *, rescheduled: bool = False,
            **more: Any) -> Callable[[str], None]:
    """Logs a message's outcome record once its settlement call has returned. A message completed because its
    delayed copy was scheduled is `reschedule`, as its outcome row says (as `complete` its record read as a
    message abandoned: found by an administrator's trial)."""
    def log_it(settled: str) -> None:
        shown = settled.replace("complete", "reschedule", 1) if rescheduled and settled.startswith("complete") \
            else settled  # (`complete-failed` too: it is the rescheduled message's completion that failed)
        _log_outcome(dimensions(envelope, result, shown, **more), detail)
    return log_it


class _Settler:
    """Exactly one settlement call per message. The calls are synchronous gRPC calls into the host, so each runs
    in a worker thread: the event loop goes on delivering the rest of the batch meanwhile. A failed call (lock
    lost, host gone) is logged: the broker redelivers on lock expiry, and the ledger turns the repeat into
    `duplicate`."""

    def __init__(self, actions: MessageActions, messages: Sequence[Any]) -> None:
        self._actions = actions
        self._messages = messages
        self._kinds: dict[int, str] = {}
        self._calls: list[asyncio.Task[None]] = []

    def unsettled(self) -> list[int]:
        return [i for i in range(len(self._messages)) if i not in self._kinds]

    def settle(self, index: int, kind: str, result: Result | None = None,
               then: Callable[[str], None] | None = None) -> None:
        """Start the settlement of message `index` (once: a later call is ignored). `then` is called with what
        happened (`complete`, `deadletter`, `abandon`, or that with `-failed`), e.g. to log the outcome."""
        if index in self._kinds:
            return
        self._kinds[index] = kind
        self._calls.append(asyncio.create_task(self._run(self._messages[index], kind, result, then)))

    async def _run(self, message: Any, kind: str, result: Result | None, then: Callable[[str], None] | None) -> None:
        done = await asyncio.to_thread(self._call, message, kind, result)
        if then is not None:
            then(kind if done else f"{kind}-failed")

    def _call(self, message: Any, kind: str, result: Result | None) -> bool:
        try:
            if kind == "complete":
                self._actions.complete(message)
            elif kind == "deadletter":
                assert result is not None and result.reason is not None
                self._actions.deadletter(message, deadletter_reason=result.reason.value,
                                         deadletter_error_description=description_for(result))
            else:
                self._actions.abandon(message)
        except Exception as exc:
            log.error("writeback settlement %s failed (%s); Service Bus redelivers the message when its lock "
                      "expires", kind, _where(exc), extra={"settlement": kind, "error": type(exc).__name__})
            return False
        return True

    async def drain(self) -> None:
        """Wait for every settlement call started (they finish even if the invocation is being cancelled)."""
        while self._calls:
            calls, self._calls = self._calls, []
            await asyncio.gather(*calls, return_exceptions=True)


_APP = FunctionApp()


async def handle(message: Any, actions: MessageActions) -> None:
    """Entry point for a single message (a trigger with cardinality one)."""
    with paused():
        await _APP.handle(message, actions)


async def handle_batch(messages: Sequence[Any], actions: MessageActions) -> None:
    """Entry point for `function_app.py` (a trigger with cardinality many)."""
    # The collector is paused until the batch's results are dropped (`collector.paused`): the first collection
    # after it then finds what the batch left, not everything it made.
    with paused():
        await _APP.handle_batch(messages, actions)


async def reset() -> None:
    """Close and forget the process-wide singletons (tests; a worker never needs it)."""
    await _APP.aclose()
