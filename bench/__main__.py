"""`python -m bench` (`make bench`): how fast, and is it right.

1. Core path, one process on one core: parse → decide → map → validate → build the requests (bundle entries,
   JSON-encoded as they would be sent) over a seeded corpus mixing every mapped table, creates and updates.
2. End to end against the FHIR dev server, each run on a fresh server with the same messages:
   - pipeline: `Pipeline.process_many` + `BatchDelivery` (batch bundles, pooled keep-alive client),
   - baseline: what the original product did (bench/baseline.py),
   - server ceiling: the same resources and Provenances pre-rendered and sent as batch bundles with the pooled
     client and the same concurrency, no mapping and no reads.
   The pipeline and the ceiling run BENCH_REPEATS times (7), alternating; the medians are reported.
   After each run every write is checked on the server (resource, its Provenance naming that version, no
   duplicates); correctness is part of the result.
3. Scaling: core path and pipeline end to end at 100 … 10,000 messages.
4. The baseline, last (peak memory is taken before it: see `main`).

The last line printed is one JSON object with the headline figures.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bench.baseline import run_baseline
from bench.corpus import generate
from devtools.services import FhirDevServer, fhir_dev_server
from writeback.auth import TokenProvider, fhir_tokens
from writeback.bundles import Answer, BatchDelivery, waves
from writeback.decide import WritePlan
from writeback.fhir_client import FhirClient, new_http_client, read_path
from writeback.functions import settle_long_lived
from writeback.maps import MapSet, load_maps
from writeback.paths import apply
from writeback.pipeline import Envelope, Pipeline, Result
from writeback.provenance import build_provenance
from writeback.settings import DEFAULT_MAPS_DIR, Settings

CORE_N = int(os.environ.get("BENCH_CORE_N", "5000"))
E2E_N = int(os.environ.get("BENCH_E2E_N", "1000"))
INVOCATION = int(os.environ.get("BENCH_INVOCATION", "1000"))  # messages per process_many call (one trigger batch)
REPEATS = int(os.environ.get("BENCH_REPEATS", "7"))  # runs of the pipeline and of the ceiling (median counts)
VERIFY_CHUNK = 500  # writes checked per round of reads
CORE_SCALES = (100, 1000, 10000)
E2E_SCALES = (100, 1000, 10000)


def log(text: str) -> None:
    print(text, flush=True)


def settings_for(server: FhirDevServer) -> Settings:
    return Settings.from_env({
        "FHIR_URL": server.base_url, "FHIR_TOKEN_URL": server.token_url, "FHIR_CLIENT_ID": server.client_id,
        "FHIR_CLIENT_SECRET": server.client_secret, "WRITEBACK_META_SOURCE": "urn:bench:writeback",
    })


# ---- 1. core path ---------------------------------------------------------------------------------------


def build_requests(pipeline: Pipeline, envelopes: Sequence[Envelope], client: FhirClient, size: int) -> int:
    """parse → decide → map → validate, then the first batch of each write (conditional create or read entry),
    JSON-encoded in bundles of `size`. Returns the bytes that would be sent."""
    entries: list[dict[str, Any]] = []
    for envelope in envelopes:
        decision = pipeline.plan(envelope)
        plan = decision.plan
        if plan is None:
            continue
        if plan.operation == "create":
            entries.append({"resource": client.stamp(plan.resource),
                            "request": {"method": "POST", "url": plan.resource_type,
                                        "ifNoneExist": plan.target.search}})
        else:
            entries.append({"request": {"method": "GET", "url": read_path(plan)}})
    sent = 0
    for i in range(0, len(entries), size):
        sent += len(json.dumps({"resourceType": "Bundle", "type": "batch", "entry": entries[i:i + size]}))
    return sent


def core(maps: MapSet, count: int, seed: int = 7) -> dict[str, float]:
    settings = Settings.for_planning({})
    pipeline = Pipeline(maps, settings, None)
    client = FhirClient("http://fhir.invalid/R4", None, None, settings)  # type: ignore[arg-type]  # stamp() only
    envelopes = generate(count, seed)
    build_requests(pipeline, envelopes[:50], client, settings.bundle_size)  # warm up
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    build_requests(pipeline, envelopes, client, settings.bundle_size)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"messages": count, "seconds": wall, "cpu_seconds": cpu, "msgs_per_s": count / wall,
            "us_per_msg": wall / count * 1e6}


# ---- 2. end to end --------------------------------------------------------------------------------------


@dataclass
class Run:
    name: str
    messages: int
    writes: int
    seconds: float
    verified: bool
    problems: list[str]

    @property
    def msgs_per_s(self) -> float:
        return self.messages / self.seconds


async def _tokens(settings: Settings) -> TokenProvider:
    tokens = fhir_tokens(settings)
    await tokens.token()  # both sides cache the token; fetch it outside the timing
    return tokens


async def run_pipeline(maps: MapSet, server: FhirDevServer, envelopes: list[Envelope]) -> tuple[float, list[Result]]:
    settings = settings_for(server)
    http = new_http_client(settings)
    tokens = await _tokens(settings)
    try:
        pipeline = Pipeline(maps, settings, BatchDelivery(FhirClient(settings.fhir_url, http, tokens, settings)))
        started = time.perf_counter()
        results: list[Result] = []
        for i in range(0, len(envelopes), INVOCATION):
            results += await pipeline.process_many(envelopes[i:i + INVOCATION])
        return time.perf_counter() - started, results
    finally:
        await tokens.aclose()
        await http.aclose()


async def run_baseline_timed(maps: MapSet, server: FhirDevServer,
                             envelopes: list[Envelope]) -> tuple[float, list[Result]]:
    settings = settings_for(server)
    tokens = await _tokens(settings)
    try:
        started = time.perf_counter()
        results = await run_baseline(maps, settings, tokens, envelopes)
        return time.perf_counter() - started, results
    finally:
        await tokens.aclose()


async def run_ceiling(maps: MapSet, server: FhirDevServer, envelopes: list[Envelope]) -> tuple[float, list[str]]:
    """The same resource and Provenance writes, pre-rendered (not timed), as fast as batch bundles go."""
    settings = settings_for(server)
    planner = Pipeline(maps, settings, None)
    plans = [p for p in (planner.plan(e).plan for e in envelopes) if p is not None]
    http = new_http_client(settings)
    tokens = await _tokens(settings)
    client = FhirClient(settings.fhir_url, http, tokens, settings)
    sender = BatchDelivery(client)
    problems: list[str] = []
    try:
        prepared = []
        for wave in waves(plans):
            writes = []
            for i in wave:
                plan = plans[i]
                resource = client.stamp(apply(plan.resource, [plan.target.identity]))
                if plan.operation == "create":
                    request = {"method": "POST", "url": plan.resource_type, "ifNoneExist": plan.target.search}
                else:  # conditional update: the server finds the resource itself, no read round trip
                    request = {"method": "PUT", "url": f"{plan.resource_type}?{plan.target.search}"}
                writes.append({"resource": resource, "request": request})
            prepared.append((wave, writes))
        started = time.perf_counter()
        for wave, writes in prepared:
            answers = await sender.send(writes)
            provenances = []
            for i, answer in zip(wave, answers, strict=True):
                if not isinstance(answer, Answer) or not answer.ok or answer.resource is None:
                    problems.append(f"ceiling write failed: {answer}")
                    continue
                versioned = f"{answer.resource['resourceType']}/{answer.resource['id']}/_history/" \
                            f"{answer.resource['meta']['versionId']}"
                p = build_provenance(plans[i], versioned, created=answer.status == 201, agent="",
                                     meta_source=settings.meta_source)
                provenances.append({"resource": p, "request": {"method": "PUT", "url": f"Provenance/{p['id']}"}})
            for answer in await sender.send(provenances):
                if not isinstance(answer, Answer) or not answer.ok:
                    problems.append(f"ceiling provenance failed: {answer}")
        return time.perf_counter() - started, problems
    finally:
        await tokens.aclose()
        await http.aclose()


async def verify(maps: MapSet, server: FhirDevServer, envelopes: list[Envelope],
                 results: list[Result] | None) -> tuple[int, list[str]]:
    """Every write message: written; its resource version exists; its Provenance exists and names that version;
    one resource per row. `results` None (ceiling): only the last two, by search."""
    settings = settings_for(server)
    planner = Pipeline(maps, settings, None)
    decisions = [planner.plan(e) for e in envelopes]
    plans: list[WritePlan] = [d.plan for d in decisions if d.plan is not None]
    http = new_http_client(settings)
    tokens = await _tokens(settings)
    sender = BatchDelivery(FhirClient(settings.fhir_url, http, tokens, settings))
    problems: list[str] = []
    try:
        if results is not None:
            if len(results) != len(envelopes):
                problems.append(f"{len(results)} results for {len(envelopes)} messages")
            written = [r for r, d in zip(results, decisions, strict=False) if d.plan is not None]
            for r in written:
                if r.state != "written":
                    problems.append(f"{r.decision.table} {r.decision.record_id}: {r.state} {r.reason} {r.detail}")
            ok = [r for r in written if r.state == "written" and r.resource and r.provenance]
            for start in range(0, len(ok), VERIFY_CHUNK):  # a chunk at a time: peak memory is the pipeline's
                chunk = ok[start:start + VERIFY_CHUNK]
                reads = [{"request": {"method": "GET", "url": r.resource}} for r in chunk]
                reads += [{"request": {"method": "GET", "url": str(r.provenance).split("/_history")[0]}}
                          for r in chunk]
                answers = await sender.send(reads)
                for r, res, prov in zip(chunk, answers[:len(chunk)], answers[len(chunk):], strict=True):
                    if not isinstance(res, Answer) or not res.ok:
                        problems.append(f"missing {r.resource}")
                    if not isinstance(prov, Answer) or not prov.ok or prov.resource is None:
                        problems.append(f"missing {r.provenance}")
                    elif prov.resource.get("target") != [{"reference": r.resource}]:
                        problems.append(f"{r.provenance} names {prov.resource.get('target')}, not {r.resource}")
        rows = sorted({(p.resource_type, p.target.search) for p in plans})
        answers = await sender.send([{"request": {"method": "GET", "url": f"{t}?{s}&_count=3&_elements=id"}}
                                     for t, s in rows])
        for (t, s), answer in zip(rows, answers, strict=True):
            found = len((answer.resource or {}).get("entry") or []) if isinstance(answer, Answer) else -1
            if found != 1:
                problems.append(f"{found} {t} for {s}")
        count = await sender.send([{"request": {"method": "GET", "url": "Provenance?_summary=count"}}])
        total = count[0].resource.get("total") if isinstance(count[0], Answer) and count[0].resource else None
        if total != len(plans):
            problems.append(f"{total} Provenances on the server for {len(plans)} writes")
        return len(plans), problems
    finally:
        await tokens.aclose()
        await http.aclose()


async def e2e(maps: MapSet, kind: str, envelopes: list[Envelope]) -> Run:
    with fhir_dev_server() as server:
        results: list[Result] | None
        problems: list[str] = []
        if kind == "pipeline":
            seconds, results = await run_pipeline(maps, server, envelopes)
        elif kind == "baseline":
            seconds, results = await run_baseline_timed(maps, server, envelopes)
        else:
            seconds, problems = await run_ceiling(maps, server, envelopes)
            results = None
        writes, found = await verify(maps, server, envelopes, results)
        problems += found
    run = Run(kind, len(envelopes), writes, seconds, not problems, problems)
    log(f"  {kind:<9} {run.messages:>6} msgs ({writes} writes) in {seconds:6.2f}s = {run.msgs_per_s:8.1f} msgs/s"
        f"  verified={run.verified}" + (f"  problems={len(problems)}: {problems[:3]}" if problems else ""))
    return run


def _median(runs: list[Run]) -> Run:
    return sorted(runs, key=lambda r: r.msgs_per_s)[len(runs) // 2]


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 1024 / 1024


async def main() -> dict[str, Any]:
    maps = load_maps(DEFAULT_MAPS_DIR)
    settle_long_lived()  # as the function does once its first invocation has built what it keeps
    log(f"cores: {os.cpu_count()}  python {sys.version.split()[0]}")
    log("1. core path (parse → decide → map → validate → build requests), one core")
    scaling = {n: core(maps, n) for n in sorted({*CORE_SCALES, CORE_N})}
    headline = scaling[CORE_N]
    log(f"  {CORE_N} msgs: {headline['msgs_per_s']:.0f} msgs/s ({headline['us_per_msg']:.0f} µs/msg, "
        f"cpu {headline['cpu_seconds']:.2f}s of {headline['seconds']:.2f}s)")

    log(f"2. end to end, {E2E_N} messages, fresh dev server per run")
    envelopes = generate(E2E_N, seed=11)
    # A run of 1,000 messages takes well under a second, so one run is at the mercy of the machine's noise:
    # the pipeline and the ceiling run REPEATS times, alternating, and the median of each counts.
    pipelines: list[Run] = []
    ceilings: list[Run] = []
    for _ in range(REPEATS):
        pipelines.append(await e2e(maps, "pipeline", envelopes))
        ceilings.append(await e2e(maps, "ceiling", envelopes))
    pipeline, ceiling = _median(pipelines), _median(ceilings)
    log(f"  median of {REPEATS}: pipeline {pipeline.msgs_per_s:.1f} msgs/s, ceiling {ceiling.msgs_per_s:.1f} msgs/s "
        f"= {pipeline.msgs_per_s / ceiling.msgs_per_s:.0%} of the ceiling")

    log("3. scaling")
    e2e_scaling = {}
    for n in E2E_SCALES:
        e2e_scaling[n] = pipeline if n == E2E_N else await e2e(maps, "pipeline", generate(n, seed=13))
    log(f"  {'messages':>8} | {'core msgs/s':>11} | {'core µs/msg':>11} | {'e2e msgs/s':>10} | {'e2e ms/msg':>10}")
    for n in sorted({*scaling, *e2e_scaling}):
        c, e = scaling.get(n), e2e_scaling.get(n)
        core_rate, core_us = (c["msgs_per_s"], c["us_per_msg"]) if c else (float("nan"), float("nan"))
        e2e_rate, e2e_ms = (e.msgs_per_s, e.seconds / e.messages * 1000) if e else (float("nan"), float("nan"))
        log(f"  {n:>8} | {core_rate:>11.0f} | {core_us:>11.1f} | {e2e_rate:>10.1f} | {e2e_ms:>10.2f}")
    # The peak is the pipeline's (and the benchmark's corpora): the baseline runs after it is taken, since its
    # client per request leaves a TLS context per request for the garbage collector, which is the seed's cost.
    peak = peak_rss_mb()

    log(f"4. baseline (the seed's way), {E2E_N} messages")
    baseline = await e2e(maps, "baseline", envelopes)
    log(f"  pipeline / baseline = {pipeline.msgs_per_s / baseline.msgs_per_s:.1f} times")

    runs = [*pipelines, baseline, *ceilings, *e2e_scaling.values()]
    return {
        "pipeline_msgs_per_s": round(headline["msgs_per_s"], 1),
        "pipeline_messages": CORE_N,
        "e2e_msgs_per_s": round(pipeline.msgs_per_s, 1),
        "baseline_msgs_per_s": round(baseline.msgs_per_s, 1),
        "speedup": round(pipeline.msgs_per_s / baseline.msgs_per_s, 2),
        "server_ceiling_msgs_per_s": round(ceiling.msgs_per_s, 1),
        "e2e_vs_ceiling": round(pipeline.msgs_per_s / ceiling.msgs_per_s, 3),
        "e2e_messages": E2E_N,
        "e2e_writes": pipeline.writes,
        "verified": all(r.verified for r in runs),
        "verified_runs": {r.name + ("" if r.messages == E2E_N else f"_{r.messages}"): all(
            o.verified for o in runs if (o.name, o.messages) == (r.name, r.messages)) for r in runs},
        "e2e_runs": REPEATS,
        "peak_rss_mb": round(peak, 1),
        "cores": os.cpu_count(),
    }


if __name__ == "__main__":
    started = time.perf_counter()
    summary = asyncio.run(main())
    log(f"total {time.perf_counter() - started:.0f}s")
    print(json.dumps(summary), flush=True)
