"""The 10,000-message stress of the parser and plan path (`plan_message`): mutated public Dataverse bodies and
shipped samples, hostile text (lone surrogates as JSON escapes, NUL, RTL marks, huge strings), wrong `__type`s
and value types, deep nesting and oversized bodies. No unhandled exception, a reason code on every reject, and
bounded time and memory per message (generous correctness bounds, not speed targets).

tests/core/test_fuzz.py explores structure with a few hundred hypothesis examples; this is the bulk run: a fast
seeded mutation loop (random.Random) plus a hypothesis pass over the shape of column values.
"""

from __future__ import annotations

import json
import random
import time
import tracemalloc
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.core.test_fuzz import (
    MAPS,
    PLANNING,
    SEED_TEXTS,
    SEEDS,
    TYPE_NAMES,
    UNICODE,
    check,
    json_values,
    locations,
    swapped,
    typed_values,
)
from tests.reliability.figures import FIGURES
from writeback.decide import Decision, plan_message
from writeback.errors import WritebackError
from writeback.messages import decode_body, row_named, row_of_body
from writeback.reasons import Reason

BULK = 10_000
MAX_SECONDS = 1.0
MAX_BYTES = 50 * 1024 * 1024
# Text that hides in a JSON escape: lone surrogates, NUL, bidi overrides, BOM, separators.
ESCAPES = ["\\ud800", "\\udfff", "\\udbff\\u0041", "\\u0000", "\\u202e", "\\u200f", "\\u2066", "\\ufeff",
           "\\u2028", "\\uffff", "\\ud83d\\ude00", "\\\\", '\\"']
RAW = ["\u0000", "\u202e", "\u200f", "\u061c", "\ufeff", "\u0301" * 500, "\U0010ffff", "\ud800", "\udc00",
       "\r\n", "\t", "\x7f", "\U0001d54f" * 300]
PROPERTIES: list[dict[str, Any] | None] = [
    None, {}, {"MessageMaxSizeExceeded": True}, {"MessageMaxSizeExceeded": "true"},
    {"http://schemas.microsoft.com/xrm/2011/Claims/User": "\ud800"},
    {"http://schemas.microsoft.com/xrm/2011/Claims/EntityLogicalName": ["contact"]},
]
CONTENT_TYPES = [None, "application/json", "application/json; charset=utf-8", "text/plain", "application/xml",
                 "application/msbin1", "", "JSON"]


class Stats:
    def __init__(self) -> None:
        self.count = 0
        self.slowest = 0.0
        self.peak = 0
        self.decisions: dict[str, int] = {}
        self.reasons: set[Reason] = set()

    def plan(self, body: bytes | str, props: dict[str, Any] | None, which: int, content_type: str | None) -> None:
        tracemalloc.reset_peak()
        # What planning allocates on top of what is already held (the body itself, 20 MB when a mutation grew it
        # so, is the test's: counted, it failed a run whose body grew with the seeds, not the product).
        held = tracemalloc.get_traced_memory()[0]
        started = time.perf_counter()
        try:
            decision: Decision = plan_message(body, props, MAPS, PLANNING[which], content_type)
        except Exception:
            FIGURES["fuzz_unhandled"] += 1
            raise
        elapsed = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1] - held
        check(decision)  # a decision; a reject or skip carries a reason of its own class
        # A batch orders its messages by the row each names before it plans them, reading only the top of the
        # body: wherever the whole body is read, the row read there is the row the whole body names.
        try:
            named = row_named(decode_body(body, content_type))
        except (WritebackError, RecursionError):
            pass
        else:
            assert row_of_body(body, content_type) == named, repr(body)[:300]
        self.count += 1
        self.slowest = max(self.slowest, elapsed)
        self.peak = max(self.peak, peak)
        self.decisions[decision.decision] = self.decisions.get(decision.decision, 0) + 1
        if decision.reason is not None:
            self.reasons.add(decision.reason)
        assert elapsed < MAX_SECONDS, (elapsed, repr(body)[:300])
        assert peak < MAX_BYTES, (peak, repr(body)[:300])


def mutate(rng: random.Random, body: Any) -> tuple[str, bool]:
    """Up to four structural mutations, then text-level ones. Returns (text, needs str: holds a raw surrogate)."""
    for _ in range(rng.randint(1, 4)):
        where = locations(body)
        if not where:
            break
        parent, key = rng.choice(where)
        kind = rng.randrange(10)
        if kind == 0:
            del parent[key]
        elif kind == 1:
            parent[key] = swapped(parent[key])
        elif kind == 2:
            parent[key] = rng.choice([None, True, 0, -1, 2**63, 1e308, float("inf"), "", [], {}, "0" * 40])
        elif kind == 3:
            parent[key] = {"__type": rng.choice(TYPE_NAMES), rng.choice(["Value", "__value", "Id"]): parent[key]}
        elif kind == 4:
            parent[key] = rng.choice(RAW) + str(parent[key])[:30]
        elif kind == 5:
            parent[key] = rng.choice(["x", "\u202e", "\u0000"]) * rng.choice([1_000, 60_000, 300_000])
        elif kind == 6 and isinstance(parent, dict):
            parent[rng.choice([str(key).upper(), f"{key}\u200b", "__type", ""])] = parent.pop(key)
        elif kind == 7:
            typed = [(p, k) for p, k in where if k == "__type"]
            if typed:
                p, k = rng.choice(typed)
                p[k] = rng.choice([*TYPE_NAMES, 7, None, ["Entity"], "\ud800"])
        elif kind == 8 and isinstance(parent, list):
            parent.extend(json.loads(json.dumps(parent[: rng.randint(0, 3)])) * rng.randint(1, 50))
        else:
            parent[key] = rng.choice(UNICODE)
    raw_surrogate = False
    try:
        text = json.dumps(body, ensure_ascii=rng.random() < 0.5, allow_nan=rng.random() < 0.5)
    except ValueError:
        text = json.dumps(body, ensure_ascii=True)
    roll = rng.random()
    if roll < 0.15:  # a JSON escape spliced into some string
        at = text.find('"', rng.randrange(max(1, len(text))))
        if at > 0:
            text = text[: at + 1] + rng.choice(ESCAPES) + text[at + 1:]
    elif roll < 0.2:  # deep nesting in place of a value
        depth = rng.choice([50, 1_000, 100_000])
        at = text.find(":", rng.randrange(max(1, len(text))))
        if at > 0:
            rest = text[at + 1:].split(",", 1)
            text = text[: at + 1] + "[" * depth + "1" + "]" * depth + ("," + rest[1] if len(rest) > 1 else "}")
    elif roll < 0.25:
        text = text[: rng.randrange(len(text) + 1)]  # truncated
    elif roll < 0.27:  # an oversized body (Dataverse caps at 256 KB; the queue could hold more)
        text = text[:-1] + ',"Padding":"' + "A" * rng.choice([300_000, 2_000_000]) + '"}'
    elif roll < 0.3:
        text = text.replace('"', "'", rng.randint(1, 3))
    if any("\ud800" <= ch <= "\udfff" for ch in text[:: max(1, len(text) // 5000)]) or "\ud800" in text:
        raw_surrogate = True
    return text, raw_surrogate


def test_ten_thousand_mutated_messages_plan_within_bounds():
    rng = random.Random(20261102)
    stats = Stats()
    tracemalloc.start()
    started = time.perf_counter()
    try:
        for n in range(BULK):
            if n % 25 == 0:  # raw bytes and the seeds' own text, cut and spliced
                seed = rng.choice(SEED_TEXTS).encode("utf-8", "surrogatepass")
                cut = rng.randrange(len(seed) + 1)
                body: bytes | str = seed[:cut] + bytes(rng.randrange(256) for _ in range(rng.randint(0, 40)))
            else:
                text, raw_surrogate = mutate(rng, json.loads(json.dumps(rng.choice(SEEDS))))
                body = text if raw_surrogate or rng.random() < 0.3 else text.encode("utf-8", "surrogatepass")
            stats.plan(body, rng.choice(PROPERTIES), rng.randint(0, 1), rng.choice(CONTENT_TYPES))
    finally:
        tracemalloc.stop()
    total = time.perf_counter() - started
    FIGURES["fuzz_messages"] += stats.count
    FIGURES["fuzz_max_ms_per_message"] = max(FIGURES["fuzz_max_ms_per_message"], round(stats.slowest * 1000))
    FIGURES["fuzz_peak_kib_per_message"] = max(FIGURES["fuzz_peak_kib_per_message"], stats.peak // 1024)
    print(f"fuzz: {stats.count} messages in {total:.1f}s, slowest {stats.slowest * 1000:.1f} ms, "
          f"peak {stats.peak / 1024 / 1024:.1f} MiB, {stats.decisions}, reasons {sorted(stats.reasons)}")
    assert stats.count == BULK
    # The run reached every kind of answer, not only malformed-message.
    assert {"write", "skip", "reject"} <= set(stats.decisions)
    assert {Reason.MALFORMED_MESSAGE, Reason.UNSUPPORTED_FORMAT, Reason.INVALID_RESOURCE} <= stats.reasons


STRUCTURE = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@STRUCTURE
@given(st.data())
def test_any_value_in_any_column_of_a_seed(data):
    """Hypothesis for structure: every column of a seed gets an arbitrary typed or JSON value."""
    body = json.loads(json.dumps(data.draw(st.sampled_from(SEEDS), label="seed")))
    columns = [(p, k) for p, k in locations(body) if k == "value" and isinstance(p, dict) and "key" in p]
    for parent, key in columns:
        if data.draw(st.booleans(), label="replace"):
            parent[key] = data.draw(typed_values | json_values, label="value")
    stats = Stats()
    tracemalloc.start()
    try:
        stats.plan(json.dumps(body), None, data.draw(st.integers(0, 1), label="settings"), None)
    finally:
        tracemalloc.stop()
    FIGURES["fuzz_messages"] += 1
