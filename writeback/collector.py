"""How this process uses CPython's cyclic garbage collector. Nearly everything a batch makes is freed by reference
counting the moment it is done with; the collector only walks it, while the batch's plans and results are alive,
looking for cycles that are not there."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import gc
from collections.abc import Iterator

GC_YOUNG_THRESHOLD = 20_000  # allocations between young collections (CPython's default: 700)

_pauses = 0  # batches running with the collector paused
_paused_by_us = False
# Whether this flow (task, and the tasks it starts) is already inside a pause: another invocation's task is not.
_inside: contextvars.ContextVar[bool] = contextvars.ContextVar("writeback_collector_paused", default=False)


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


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """No automatic collection while a batch runs (at 1,000 messages a batch still made four to six young
    collections, 30 to 100 ms of its CPU, each walking the plans and results alive at that moment). What the
    batch leaves as cyclic garbage waits for the first collection after it: memory held for one batch at most.

    Batches of one process may overlap (one event loop, several invocations): a batch that ends while others
    still run collects at once, so that a steady stream of overlapping batches cannot keep the collector off
    while garbage builds up; the collector runs on its own again when the last ends, and never if something
    else had switched it off before the first began. A pause inside a pause of the same flow (the function's entry
    point around `Pipeline.process_many`) is the outer one's: it ends with it."""
    global _pauses, _paused_by_us  # noqa: PLW0603 - the collector itself is one per process
    if _inside.get():
        yield
        return
    inside = _inside.set(True)
    if _pauses == 0:
        _paused_by_us = gc.isenabled()
        gc.disable()
    _pauses += 1
    try:
        yield
    finally:
        _inside.reset(inside)
        _pauses -= 1
        if _pauses == 0:
            if _paused_by_us:
                _paused_by_us = False
                gc.enable()
        elif _paused_by_us:
            gc.collect()
