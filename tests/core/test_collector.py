"""`collector.paused`: a batch runs without automatic cyclic collections, and the collector is back, and finds
what the batch left, once the last batch of the process ends."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

from bench.corpus import generate
from writeback.collector import paused
from writeback.maps import load_maps
from writeback.pipeline import Pipeline, Result
from writeback.settings import DEFAULT_MAPS_DIR, Settings


class _Node:
    """An object in a reference cycle: only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def collections() -> Iterator[list[int]]:
    """The generations of the automatic collections made while the test runs."""
    made: list[int] = []

    def seen(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            made.append(info["generation"])

    gc.callbacks.append(seen)
    try:
        yield made
    finally:
        gc.callbacks.remove(seen)


def _churn() -> None:
    """More container allocations than any young threshold, kept alive until the end so they count."""
    kept = [[n] for n in range(3 * max(gc.get_threshold()[0], 700))]
    del kept


def test_a_batch_runs_without_collections_and_its_cyclic_garbage_is_collected_after_it(
        collections: list[int]) -> None:
    assert gc.isenabled()
    with paused():
        garbage = _Node()
        gone = weakref.ref(garbage)
        del garbage
        _churn()
        assert collections == []
        assert not gc.isenabled()
    assert gc.isenabled()
    _churn()  # the next batch's allocations start the collector as usual
    assert collections
    assert gone() is None


def test_the_collector_comes_back_when_the_last_of_overlapping_batches_ends() -> None:
    states: list[tuple[str, bool]] = []
    first_in, second_in, first_done = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def first() -> None:
        with paused():
            first_in.set()
            await second_in.wait()
        states.append(("first ended", gc.isenabled()))
        first_done.set()

    async def second() -> None:
        await first_in.wait()
        with paused():
            second_in.set()
            await first_done.wait()
            states.append(("second still running", gc.isenabled()))
        states.append(("second ended", gc.isenabled()))

    async def both() -> None:
        await asyncio.gather(first(), second())

    asyncio.run(both())
    assert states == [("first ended", False), ("second still running", False), ("second ended", True)]


def test_a_batch_that_ends_while_another_runs_collects_what_it_left(collections: list[int]) -> None:
    """A steady stream of overlapping batches must not keep the collector off while garbage builds up."""
    gone: list[weakref.ref[_Node]] = []
    first_done = asyncio.Event()
    seen: list[tuple[bool, bool]] = []

    async def first() -> None:
        with paused():
            garbage = _Node()
            gone.append(weakref.ref(garbage))
            del garbage
            await asyncio.sleep(0)
        first_done.set()

    async def second() -> None:
        with paused():
            await first_done.wait()
            seen.append((gone[0]() is None, gc.isenabled()))

    async def both() -> None:
        await asyncio.gather(second(), first())

    asyncio.run(both())
    assert seen == [(True, False)]  # collected when the first ended, the second still running without collections


def test_a_pause_inside_a_pause_of_the_same_flow_makes_no_collection(collections: list[int]) -> None:
    """The function's entry point pauses around `Pipeline.process_many`, which pauses too: the inner end must not
    collect while everything the batch made is still alive (that is what a pause is for)."""

    async def invocation() -> list[int]:
        with paused():
            collections.clear()
            with paused():
                kept = [[n] for n in range(50_000)]
            made = list(collections)
            del kept
        return made

    assert asyncio.run(invocation()) == []
    assert gc.isenabled()


def test_a_collector_switched_off_before_stays_off_and_a_failing_batch_restores_it() -> None:
    gc.disable()
    try:
        with paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
    with pytest.raises(RuntimeError), paused():
        raise RuntimeError("the batch failed")
    assert gc.isenabled()


def test_a_pipeline_batch_makes_no_collection_while_it_runs_and_leaves_the_collector_on(
        collections: list[int]) -> None:
    pipeline = Pipeline(load_maps(DEFAULT_MAPS_DIR), Settings.for_planning({}), None)
    envelopes = generate(600, seed=3)
    while_running: list[int] = []

    async def emit(index: int, result: Result) -> None:
        if index == len(envelopes) - 1:  # the last outcome: everything the batch made is still alive
            while_running.extend(collections)

    async def batch() -> int:
        collections.clear()
        return len(await pipeline.process_many(envelopes, emit))

    assert asyncio.run(batch()) == len(envelopes)
    assert while_running == []
    assert gc.isenabled()
