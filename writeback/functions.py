"""The Azure Functions adapter: a batch of Service Bus messages in, exactly one explicit settlement each out.

`function_app.py` hands the list of `ServiceBusReceivedMessage` of one invocation (azurefunctions-extensions-
bindings-servicebus, trigger with `cardinality=many` and `auto_complete_messages=False`) and the
`ServiceBusMessageActions` to `handle_batch`, which

1. builds the process-wide singletons once, lazily: settings, entity maps, the FHIR delivery (one shared
   httpx client, from `writeback.fhir_client.build_delivery`) and the Table Storage ledger;
2. turns each message into a `pipeline.Envelope` and runs `Pipeline.process_many` over the readable ones
   (FHIR batch bundles; rows in order; a RequestId repeated within the batch is written once);
3. settles each message exactly once, by its own `Result.settlement`:
   written / skipped → complete; permanent (reject) → dead-letter at once, `deadletter_reason` = the reason
   code, description = the detail (never patient data); transient → abandon (Service Bus redelivers, and
   dead-letters after the queue's MaxDeliveryCount); configuration fault → abandon, never dead-letter;
4. logs one structured record per message whose `extra` fields become Application Insights
   customDimensions (see docs/operations.md).

A message the binding hands over unreadable is abandoned on its own; the rest of the batch goes on. A
configuration fault found while building the singletons (missing or invalid setting, unreadable or invalid
entity map) abandons every message of the batch and logs one error naming the setting or the map file;
nothing is cached, so the next invocation tries again. An unexpected error (a bug) abandons every message not
yet settled. `handle` is the same path for a single message.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from writeback.errors import WritebackError
from writeback.maps import MapSet, load_maps
from writeback.pipeline import Delivery, Envelope, Ledger, Pipeline, Result
from writeback.reasons import Kind, Reason
from writeback.settings import Settings

log = logging.getLogger("writeback.function")

MAX_DESCRIPTION = 1000  # characters of the dead-letter error description

DeliveryFactory = Callable[[Settings], tuple[Delivery, Callable[[], Awaitable[None]]]]
LedgerFactory = Callable[[Settings], tuple[Ledger, Callable[[], Awaitable[None]]]]


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


def _text(value: object) -> str:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


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
    properties = {_text(k): _text(v) for k, v in raw_props.items() if v is not None}
    count = message.delivery_count
    enqueued = message.enqueued_time_utc
    content_type = message.content_type
    message_id = message.message_id
    return Envelope(
        body=_body(message),
        properties=properties,
        content_type=_text(content_type) if content_type else None,
        message_id=_text(message_id) if message_id is not None else None,
        # 0 = not reported: extension 1.0.0b2 decodes the AMQP message without its header section.
        delivery_count=count if isinstance(count, int) else 0,
        enqueued_at=enqueued.timestamp() if enqueued is not None else None,
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
        kept = ("The message was abandoned and stays on the queue; fix the configuration (python -m writeback "
                "check-config) and it is processed again." if count == 1 else
                f"All {count} messages of the batch were abandoned and stay on the queue; fix the configuration "
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


GC_YOUNG_THRESHOLD = 20_000  # allocations between young collections (CPython's default: 700)


@functools.cache
def settle_long_lived() -> None:
    """Move what the process has built by its first invocation (modules, FHIR models, maps, clients) out of the
    cyclic garbage collector's reach (`gc.freeze`): none of it is ever garbage, and every full collection
    walked all of it (nearly a fifth of a large batch's time in the profile). Once per process; what is made
    later is collected as usual.

    Young collections are made rarer too: planning one message allocates a few hundred short-lived objects
    (the FHIR models of its validation), so at the default threshold a batch triggered a young collection
    every few messages, each walking the batch's plans and results that are still alive (a 1,000-message
    batch spent about 45 ms of its ~330 ms of CPU in the collector; 20 ms at this threshold)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


class FunctionApp:
    """Process-wide singletons, built lazily once, and the batch (and single-message) handler."""

    def __init__(self, env: Mapping[str, str] | None = None, *, delivery_factory: DeliveryFactory | None = None,
                 ledger_factory: LedgerFactory | None = None) -> None:
        self._env = env
        self._delivery_factory = delivery_factory or _default_delivery
        self._ledger_factory = ledger_factory or _default_ledger
        self._runtime: Runtime | None = None
        self._lock: asyncio.Lock | None = None

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
        pipeline = Pipeline(maps, settings, delivery, ledger)
        settle_long_lived()
        return Runtime(settings, maps, pipeline, [close_ledger, close_delivery])

    async def aclose(self) -> None:
        runtime, self._runtime = self._runtime, None
        if runtime is not None:
            await runtime.aclose()

    async def handle(self, message: Any, actions: MessageActions) -> Result | None:
        """Process one message and settle it exactly once: a batch of one."""
        (result,) = await self.handle_batch([message], actions)
        return result

    async def handle_batch(self, messages: Sequence[Any], actions: MessageActions) -> list[Result | None]:
        """Process a batch and settle each message exactly once on its own outcome. Returns the results in
        input order (None where none was reached: unreadable, configuration fault, unexpected error)."""
        started = time.perf_counter()
        results: list[Result | None] = [None] * len(messages)
        readable: dict[int, Envelope] = {}
        for index, message in enumerate(messages):
            try:
                readable[index] = envelope_of(message)
            except Exception as exc:  # the binding handed over something unreadable: keep it, say so
                self._unexpected(actions, message, Envelope(b""), exc)
        if not readable:
            return results
        try:
            runtime = await self.runtime()
        except WritebackError as exc:  # ConfigError / MapError: keep the messages, say what to fix
            self._config_fault(actions, [(messages[i], e) for i, e in readable.items()], exc, started)
            return results
        except Exception as exc:
            for index, envelope in readable.items():
                self._unexpected(actions, messages[index], envelope, exc)
            return results
        unsettled = dict(readable)
        try:
            done = await runtime.pipeline.process_many(list(readable.values()))
            for (index, envelope), result in zip(readable.items(), done, strict=True):
                settled = self._settle(actions, messages[index], result.settlement, result)
                del unsettled[index]
                results[index] = result
                _log_outcome(dimensions(envelope, result, settled), result.detail)
        except Exception as exc:  # a bug, not a message fault: keep what is unsettled (abandon), never lose it
            for index, envelope in unsettled.items():
                self._unexpected(actions, messages[index], envelope, exc)
        return results

    def _config_fault(self, actions: MessageActions, batch: list[tuple[Any, Envelope]], exc: WritebackError,
                      started: float) -> None:
        """Abandon the whole batch; one error for it, since every message failed for the same reason."""
        failed = [kind for kind in (self._settle(actions, m, "abandon") for m, _ in batch) if kind != "abandon"]
        elapsed = round((time.perf_counter() - started) * 1000, 2)
        reason = exc.reason if exc.reason.kind == Kind.CONFIG else Reason.CONFIG_ERROR
        dims = dimensions(batch[0][1], None, failed[0] if failed else "abandon", reason=reason.value,
                          duration_ms=elapsed, messages=len(batch))
        if len(batch) > 1:
            dims["message_id"] = ""
            dims["message_ids"] = ",".join(envelope.message_id or "" for _, envelope in batch)
        _log_outcome(dims, exc.detail)

    def _unexpected(self, actions: MessageActions, message: Any, envelope: Envelope, exc: BaseException) -> None:
        settled = self._settle(actions, message, "abandon")
        log.error("writeback outcome=retry reason=- message_id=%s settlement=%s: unexpected %s; the message was "
                  "abandoned and Service Bus redelivers it", envelope.message_id or "-", settled, _where(exc),
                  extra={"message_id": envelope.message_id or "", "outcome": "retry", "settlement": settled,
                         "error": type(exc).__name__})

    def _settle(self, actions: MessageActions, message: Any, kind: str, result: Result | None = None) -> str:
        """One settlement call. A failure (lock lost, host gone) is logged: the broker redelivers on lock expiry,
        and the ledger turns the repeat into `duplicate`."""
        try:
            if kind == "complete":
                actions.complete(message)
            elif kind == "deadletter":
                assert result is not None and result.reason is not None
                actions.deadletter(message, deadletter_reason=result.reason.value,
                                   deadletter_error_description=description_for(result))
            else:
                actions.abandon(message)
        except Exception as exc:
            log.error("writeback settlement %s failed (%s); Service Bus redelivers the message when its lock "
                      "expires", kind, _where(exc), extra={"settlement": kind, "error": type(exc).__name__})
            return f"{kind}-failed"
        return kind


_APP = FunctionApp()


async def handle(message: Any, actions: MessageActions) -> None:
    """Entry point for a single message (a trigger with cardinality one)."""
    await _APP.handle(message, actions)


async def handle_batch(messages: Sequence[Any], actions: MessageActions) -> None:
    """Entry point for `function_app.py` (a trigger with cardinality many)."""
    await _APP.handle_batch(messages, actions)


def default_app() -> FunctionApp:
    return _APP


async def reset() -> None:
    """Close and forget the process-wide singletons (tests; a worker never needs it)."""
    await _APP.aclose()
