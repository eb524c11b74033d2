"""`python -m bench` (`make bench`): how fast, and is it right.

1. Core path, one process on one core, the median of BENCH_CORE_REPEATS (3) runs: parse → decide → map →
   validate → row facts (consent gates, parents' FHIR ids) → build the requests the write path sends first (the
   read of each write's resource, by id or by row identifier, and the searches of lookups not resolved yet; for a
   Create of a row the batch itself creates, a resource known absent, the `PUT <Type>/<uuid5(table, row)>`
   converged from nothing), JSON-encoded in bundles as they would be sent. Of several whole-row changes of one
   row only the newest is built, as `Pipeline.process_many` does, and a resource an earlier write of the batch
   goes to is not read (a later wave starts from the copy that write is answered with). Each batch of
   BENCH_INVOCATION messages runs with the cyclic collector paused, as `Pipeline.process_many` runs it.
2. End to end against the FHIR dev server, each run on a fresh server with the same messages:
   - pipeline: `Pipeline.process_many` + `BatchDelivery` (batch bundles: reads, `converge`, `PUT` with `ifMatch`,
     Provenance `PUT`s alongside the next wave; pooled keep-alive client),
   - baseline: what the original product did (bench/baseline.py),
   - server ceiling: the same reads, resources and Provenances, pre-rendered (recorded from an untimed pipeline
     run on a server of its own), sent with the pooled client and the same concurrency as the server takes them
     best, whatever grouping the pipeline chose: per `process_many` call, its reads all at once in full batch
     bundles, then its writes in the fewest waves (each resource's n-th write in wave n, a write referring to a
     resource the call creates in a wave after that create's, full bundles), each wave's Provenance `PUT`s
     alongside the next wave; no mapping, no deciding, no converging.
   The pipeline and the ceiling run BENCH_REPEATS times (7), alternating; the medians are reported.
   After each run the outcome of every message and the server are checked (`check_results`, `verify`);
   correctness is part of the result.
3. Scaling: core path and pipeline end to end at 100 … 10,000 messages.
4. The baseline, last (peak memory is taken before it: see `main`).
5. A remote FHIR service: the pipeline end to end with BENCH_REMOTE_MS (50) ms added before each request
   (`DistantClient`), as a service in another building or region answers. On loopback the server's CPU bounds a
   run; at a distance, how many round trips one after the other a batch needs does. Reported, no floor.

Each end-to-end run also prints the CPU seconds this process and the server used, and the medians give the
shortest a pipeline run could take on this machine's cores (`cpu_budget`): the highest ratio to the ceiling the
machine allows, however well the pipeline overlapped its work with the server's.

The machine's 1-minute load average is printed at the start and with every end-to-end run. The benchmark itself
keeps about two processes busy (its Python and the dev server), so ~2 during the runs is its own; well above
that, or above ~0.5 at the start, something else competes for this machine's two cores and the figures measure
that too.

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
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import httpx

from bench.baseline import run_baseline
from bench.corpus import generate
from devtools.services import FhirDevServer, fhir_dev_server
from writeback import build, messages, validation
from writeback.auth import TokenProvider, fhir_tokens
from writeback.bundles import Answer, BatchDelivery
from writeback.collector import paused, settle_long_lived
from writeback.converge import ItemEdit, RowEdit, converge
from writeback.decide import Decision, Target, WritePlan
from writeback.errors import WritebackError
from writeback.facts import facts_of, merged, resolve
from writeback.fhir_client import FhirClient, SendWindow, encode, new_http_client, read_path
from writeback.mapping import resolve_refs, resolve_refs_in
from writeback.maps import MapSet, load_maps
from writeback.marks import Version, item_of, mark_of, marks_in
from writeback.paths import Assignment
from writeback.pipeline import Envelope, Pipeline, Result
from writeback.provenance import provenance_id
from writeback.reasons import Reason
from writeback.settings import DEFAULT_MAPS_DIR, Settings

CORE_N = int(os.environ.get("BENCH_CORE_N", "5000"))
E2E_N = int(os.environ.get("BENCH_E2E_N", "1000"))
INVOCATION = int(os.environ.get("BENCH_INVOCATION", "1000"))  # messages per process_many call (one trigger batch)
REPEATS = int(os.environ.get("BENCH_REPEATS", "7"))  # runs of the pipeline and of the ceiling (median counts)
CORE_REPEATS = int(os.environ.get("BENCH_CORE_REPEATS", "3"))  # runs of the core path per size (median counts)
VERIFY_CHUNK = 500  # entries per round of reads when verifying
CORE_SCALES = (100, 1000, 10000)
CORE_FLOOR = 2000  # msgs/s on the core path (the product's floor)
E2E_FLOOR = 0.90  # end to end, of the server's ceiling measured in the same run
E2E_SCALES = (100, 1000, 10000)
REMOTE_SECONDS = int(os.environ.get("BENCH_REMOTE_MS", "50")) / 1000


def forget() -> None:
    """What the process remembers of the GUIDs, dates and items it read and validated, forgotten: each run starts
    as a new process would (what a run remembers would flatter the next)."""
    messages.forget()
    validation.forget()


def log(text: str) -> None:
    print(text, flush=True)


def load() -> str:
    """The 1-minute load average (see the module docstring for how to read it)."""
    return f"{os.getloadavg()[0]:.2f}"


def settings_for(server: FhirDevServer) -> Settings:
    return Settings.from_env({
        "FHIR_URL": server.base_url, "FHIR_TOKEN_URL": server.token_url, "FHIR_CLIENT_ID": server.client_id,
        "FHIR_CLIENT_SECRET": server.client_secret, "WRITEBACK_META_SOURCE": "urn:bench:writeback",
    })


def _newest_per_row(plans: Iterable[WritePlan]) -> list[WritePlan]:
    """Of several whole-row changes of one row, the newest (what `Pipeline.process_many` writes)."""
    kept: dict[Any, WritePlan] = {}
    for n, plan in enumerate(plans):
        edit = plan.writes[0].edit
        key: Any = (plan.source.table, plan.source.record_id) if plan.full and isinstance(edit, RowEdit) else n
        order = plan.source.version.compare(kept[key].source.version) if key in kept else 1
        if not order:
            key = n  # the same version or none to compare: both are written
        if key not in kept or order == 1:
            kept[key] = plan
    return list(kept.values())


# ---- 1. core path ---------------------------------------------------------------------------------------


def build_requests(pipeline: Pipeline, envelopes: Sequence[Envelope], client: FhirClient, size: int) -> int:
    """What `Pipeline.process_many` does before its first round trip, and the entries that round trip sends,
    JSON-encoded in bundles of `size`. Returns the bytes that would be sent."""
    maps, settings = pipeline.maps, pipeline.settings
    decisions = [pipeline.plan(e) for e in envelopes]
    known = merged(f for f in (facts_of(d.message, maps, settings) for d in decisions if d.message is not None)
                   if f is not None)
    created = {(d.message.table, d.message.record_id) for d in decisions
               if d.message is not None and d.message.message_name == "Create"}
    plans = [p for p in (resolve(d, known, maps, settings, created=created).plan for d in decisions) if p is not None]
    entries: list[dict[str, Any]] = []
    searched: set[Any] = set()
    targeted: set[tuple[str, str, str]] = set()
    for plan in _newest_per_row(plans):
        for write in plan.writes:
            target, edit = write.target, write.edit
            resource = (target.resource_type, target.identifier_system, target.identifier_value)
            if resource in targeted:
                continue  # a later wave: it starts from the copy the earlier write is answered with, no read
            targeted.add(resource)
            if isinstance(edit, RowEdit) and edit.full and target.fhir_id is None \
                    and (plan.source.table, plan.source.record_id) in created:
                if plan.refs:
                    edit = replace(edit, owned=tuple(Assignment(a.path, resolve_refs(a.value, plan.ref_ids), a.column)
                                                     for a in edit.owned),
                                   rendered=resolve_refs_in(edit.rendered, edit.owned, plan.ref_ids)
                                   if edit.rendered else None)
                decided = converge(None, edit, target.resource_type, target.new_id)
                assert decided.resource is not None
                entries.append({"resource": client.stamp(decided.resource),
                                "request": {"method": "PUT", "url": f"{target.resource_type}/{target.new_id}"}})
            else:
                entries.append({"request": {"method": "GET", "url": read_path(target)}})
        for ref in plan.refs:
            if ref not in plan.ref_ids and ref not in searched:
                searched.add(ref)
                entries.append({"request": {"method": "GET", "url": f"{ref.resource_type}?identifier="
                                            f"{ref.system}|{ref.row_id}&_count=2"}})
    sent = 0
    for i in range(0, len(entries), size):
        sent += len(encode({"resourceType": "Bundle", "type": "batch", "entry": entries[i:i + size]}))
    return sent


def core(maps: MapSet, count: int, seed: int = 7) -> dict[str, float]:
    """The median of CORE_REPEATS runs over the same corpus (one run is at the mercy of the machine's noise)."""
    settings = Settings.for_planning({})
    pipeline = Pipeline(maps, settings, None)
    client = FhirClient("http://fhir.invalid/R4", None, None, settings)  # type: ignore[arg-type]  # stamp() only
    envelopes = generate(count, seed)
    build_requests(pipeline, envelopes[:50], client, settings.bundle_size)  # warm up
    runs = []
    for _ in range(CORE_REPEATS):
        gc.collect()
        forget()  # every run validates its corpus from scratch: what a run remembers would flatter the next
        wall, cpu = time.perf_counter(), time.process_time()
        for i in range(0, len(envelopes), INVOCATION):  # one trigger batch at a time, as the function gets them
            # With the collector paused, as `Pipeline.process_many` runs each batch (`collector.paused`), and the
            # young collection that finds what the batch left made after it, as the function's next allocations
            # make it. (Unpaused, every full collection walked all that was alive, the corpus included: at 5,000
            # messages about a quarter of the figure was collector time the product does not spend.)
            with paused():
                build_requests(pipeline, envelopes[i:i + INVOCATION], client, settings.bundle_size)
            gc.collect(0)
        runs.append((time.perf_counter() - wall, time.process_time() - cpu))
    wall, cpu = sorted(runs)[len(runs) // 2]
    return {"messages": count, "seconds": wall, "cpu_seconds": cpu, "msgs_per_s": count / wall,
            "us_per_msg": wall / count * 1e6}


# ---- 2. end to end --------------------------------------------------------------------------------------


@dataclass
class Run:
    name: str
    messages: int
    writes: int  # versions written (each with its Provenance)
    seconds: float
    verified: bool
    problems: list[str]
    cpu: Timing | None = None

    @property
    def msgs_per_s(self) -> float:
        return self.messages / self.seconds


@dataclass
class Timing:
    """A timed run: wall seconds, and the CPU seconds this process and the server used meanwhile (None where the
    platform does not tell the server's)."""

    seconds: float = 0.0
    python_cpu: float = 0.0
    server_cpu: float | None = None


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@contextmanager
def timed(server: FhirDevServer) -> Iterator[Timing]:
    timing = Timing()
    server_before, python_before, started = server.cpu_seconds(), _own_cpu(), time.perf_counter()
    yield timing
    timing.seconds = time.perf_counter() - started
    timing.python_cpu = _own_cpu() - python_before
    server_after = server.cpu_seconds()
    if server_before is not None and server_after is not None:
        timing.server_cpu = server_after - server_before


async def _tokens(settings: Settings) -> TokenProvider:
    tokens = fhir_tokens(settings)
    await tokens.token()  # both sides cache the token; fetch it outside the timing
    return tokens


@dataclass
class _Write:
    """One resource write the pipeline made: its entry (resource pre-rendered) and its Provenance's body."""

    resource_type: str
    entry: dict[str, Any]
    provenance: dict[str, Any]
    created: bool  # sent without If-Match: the resource did not exist


@dataclass
class Recording:
    """What a pipeline run sent: per `process_many` call, the reads its writes start from (their If-Match needs
    the version: a write protocol without them could not order anything) and its resource writes, in the order
    the server took them."""

    invocations: list[list[_Write]] = field(default_factory=list)
    reads: list[list[dict[str, Any]]] = field(default_factory=list)

    @property
    def writes(self) -> int:
        return sum(len(writes) for writes in self.invocations)

    def waves(self, invocation: int) -> list[list[_Write]]:
        """A call's writes as the fewest waves a server can take them in: each resource's writes in waves one
        after the other (their order kept), a write referring to a resource the call creates in a wave after that
        create's (FHIR's batch rules allow no interdependent entries: `BatchDelivery._wave`), whatever bundles and
        flights the pipeline sent them in."""
        out: list[list[_Write]] = []
        last: dict[str, int] = {}  # each resource's latest wave
        made: dict[str, int] = {}  # the wave that creates each resource the call creates
        for write in self.invocations[invocation]:
            url = write.entry["request"]["url"]
            after = [made[r] for r in _references(write.entry["resource"]) if r in made and r != url]
            n = last[url] = max([last.get(url, -1), *after]) + 1
            if write.created:
                made[url] = n
            while len(out) <= n:
                out.append([])
            out[n].append(write)
        return [wave for wave in out if wave]


def _references(value: Any) -> Iterator[str]:
    """Every `reference` a resource holds, however deep."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "reference" and isinstance(item, str):
                yield item
            else:
                yield from _references(item)
    elif isinstance(value, list):
        for item in value:
            yield from _references(item)


class RecordingDelivery(BatchDelivery):
    """`BatchDelivery` that keeps every read, every resource `PUT` the server took and the Provenance written for
    it, per `process_many` call (`begin`)."""

    def __init__(self, client: FhirClient) -> None:
        super().__init__(client)
        self.writes: list[list[tuple[dict[str, Any], str]]] = []  # (entry, versioned) per call
        self.reads: list[list[dict[str, Any]]] = []  # the read entries per call
        self.provenances: dict[str, dict[str, Any]] = {}  # by the version they name

    def begin(self) -> None:
        self.writes.append([])
        self.reads.append([])

    async def send(self, entries: Sequence[dict[str, Any]],
                   window: SendWindow | None = None) -> list[Answer | WritebackError]:
        answers = await super().send(entries, window)
        for entry, answer in zip(entries, answers, strict=True):
            request = entry["request"]
            if request["method"] == "GET" and not request["url"].startswith("Provenance/") \
                    and "_history" not in request["url"]:
                self.reads[-1].append(entry)
            if request["method"] != "PUT" or not isinstance(answer, Answer) or not answer.ok:
                continue
            if request["url"].startswith("Provenance/"):
                self.provenances[entry["resource"]["target"][0]["reference"]] = entry["resource"]
            elif (versioned := _versioned(answer, request["url"])) is not None:
                self.writes[-1].append((entry, versioned))
        return answers

    def recording(self) -> Recording:
        out = Recording(reads=self.reads)
        for call in self.writes:
            out.invocations.append([])
            for entry, versioned in call:
                request = {k: v for k, v in entry["request"].items() if k != "ifMatch"}  # no reads: no version
                out.invocations[-1].append(_Write(request["url"].split("/")[0], {"resource": entry["resource"],
                                                                                 "request": request},
                                                  self.provenances[versioned], "ifMatch" not in entry["request"]))
        return out


class DistantClient(FhirClient):
    """A stand-in for distance, not for the server: every request waits `latency` seconds before it is sent to
    the dev server on loopback, as one to a FHIR service elsewhere waits for the network."""

    latency = 0.0

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        await asyncio.sleep(self.latency)
        return await super().request(method, path, **kwargs)


async def run_pipeline(maps: MapSet, server: FhirDevServer, envelopes: list[Envelope],
                       record: bool = False, latency: float = 0.0) -> tuple[Timing, list[Result], Recording | None]:
    settings = settings_for(server)
    http = new_http_client(settings)
    tokens = await _tokens(settings)
    try:
        client = FhirClient(settings.fhir_url, http, tokens, settings)
        if latency:
            client = DistantClient(settings.fhir_url, http, tokens, settings)
            client.latency = latency
        delivery = RecordingDelivery(client) if record else BatchDelivery(client)
        pipeline = Pipeline(maps, settings, delivery)
        forget()  # each run starts as a new process would: the same corpus again must not find its items known
        results: list[Result] = []
        # Paused as the function's entry point pauses it (`collector.paused`). There each invocation's objects
        # are gone when the collector comes back, so the collection after it finds only what it left (a
        # planned batch leaves no cyclic garbage); here the results are kept to be checked, so the collection
        # that would find them all alive is made once, after the timing, not as part of the product's cost.
        with paused(), timed(server) as timing:
            for i in range(0, len(envelopes), INVOCATION):
                if isinstance(delivery, RecordingDelivery):
                    delivery.begin()
                results += await pipeline.process_many(envelopes[i:i + INVOCATION])
        return timing, results, delivery.recording() if isinstance(delivery, RecordingDelivery) else None
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


def _versioned(answer: Answer | WritebackError, url: str) -> str | None:
    if not isinstance(answer, Answer) or not answer.ok:
        return None
    version = answer.etag.removeprefix("W/").strip('"') or str(((answer.resource or {}).get("meta") or {})
                                                               .get("versionId") or "")
    return f"{url}/_history/{version}" if version else None


async def run_ceiling(server: FhirDevServer, recording: Recording) -> tuple[Timing, list[str], list[str]]:
    """What the pipeline sent, pre-rendered, as fast as batch bundles go: each call's reads (all at once), then
    its writes in the fewest waves (`Recording.waves`: full bundles, whatever the pipeline's grouping was), each
    wave's Provenances (their id and target naming the version this server answered with: the only work left)
    alongside the next wave. No planning, no mapping, no decisions."""
    settings = settings_for(server)
    http = new_http_client(settings)
    tokens = await _tokens(settings)
    sender = BatchDelivery(FhirClient(settings.fhir_url, http, tokens, settings))
    problems: list[str] = []
    versions: list[str] = []

    async def provenances(writes: list[_Write], answers: list[Answer | WritebackError]) -> None:
        entries = []
        for write, answer in zip(writes, answers, strict=True):
            versioned = _versioned(answer, write.entry["request"]["url"])
            if versioned is None:
                problems.append(f"ceiling write failed: {answer}")
                continue
            versions.append(versioned)
            p = {**write.provenance, "id": provenance_id(versioned), "target": [{"reference": versioned}]}
            entries.append({"resource": p, "request": {"method": "PUT", "url": f"Provenance/{p['id']}"}})
        for answer in await sender.send(entries):
            if not isinstance(answer, Answer) or not answer.ok:
                problems.append(f"ceiling provenance failed: {answer}")

    try:
        with paused(), timed(server) as timing:  # paused as the pipeline runs (`run_pipeline`)
            for invocation, reads in enumerate(recording.reads):
                pending: list[asyncio.Task[None]] = []
                for answer in await sender.send(reads):
                    if not isinstance(answer, Answer) or answer.status >= 500:
                        problems.append(f"ceiling read failed: {answer}")
                try:
                    for writes in recording.waves(invocation):
                        answers = await sender.send([w.entry for w in writes])
                        pending.append(asyncio.create_task(provenances(writes, answers)))
                finally:
                    await asyncio.gather(*pending)
        return timing, versions, problems
    finally:
        await tokens.aclose()
        await http.aclose()


# ---- verification -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """A Dataverse row as FHIR must hold it: its own resource, or (a child row) one item in its parent's."""

    table: str
    row_id: str
    target: Target  # its resource, or its parent's
    element: str | None  # the parent's element holding the item (a child row), else None
    newest: Version


def expected_rows(decisions: Sequence[Decision]) -> list[Row]:
    rows: dict[tuple[str, str], Row] = {}
    for d in decisions:
        plan = d.plan
        if plan is None:
            continue
        write = plan.writes[0]  # a child row that moved: its new parent
        element = write.edit.element if isinstance(write.edit, ItemEdit) else None
        key = (plan.source.table, plan.source.record_id)
        version = plan.source.version
        known = rows.get(key)
        if known is None or (version.compare(known.newest) or 0) > 0:
            rows[key] = Row(key[0], key[1], write.target, element, version)
    return list(rows.values())


def check_results(decisions: Sequence[Decision], results: Sequence[Result], invocation: int) -> tuple[list[str],
                                                                                                        list[str]]:
    """Per message: written → the versions it wrote (to check on the server), its Provenance named after the
    first; skipped `stale` → a newer message of its row in the same `process_many` call was written; nothing
    else is expected of this corpus. Returns the versions written and the problems."""
    problems: list[str] = []
    versions: list[str] = []
    if len(results) != len(decisions):
        return versions, [f"{len(results)} results for {len(decisions)} messages"]
    for i, (d, r) in enumerate(zip(decisions, results, strict=True)):
        what = f"#{i} {d.table} {d.record_id} {d.message.message_name if d.message else '?'}"
        if d.plan is None:
            problems.append(f"{what}: planned {d.decision} {d.reason} {d.detail}")
        elif r.state == "written":
            if not r.resource or "/_history/" not in r.resource:
                problems.append(f"{what}: written, no version ({r.resource})")
                continue
            also = [str(v) for v in r.extra.get("also", [])]
            versions += [r.resource, *also]
            if str(r.provenance).split("/_history/")[0] != f"Provenance/{provenance_id(r.resource)}":
                problems.append(f"{what}: Provenance {r.provenance} is not the one of {r.resource}")
        elif r.state == "skipped" and r.reason is Reason.STALE:
            lo = i // invocation * invocation
            plan = d.plan
            newer = [j for j in range(lo, min(lo + invocation, len(decisions)))
                     if (o := decisions[j].plan) is not None and j != i
                     and (o.source.table, o.source.record_id) == (plan.source.table, plan.source.record_id)
                     and (o.source.version.compare(plan.source.version) or 0) > 0 and results[j].state == "written"]
            if not newer:
                problems.append(f"{what}: stale, but no newer message of its row in its batch was written")
        else:
            problems.append(f"{what}: {r.state} {r.reason.value if r.reason else ''} {r.detail}")
    return versions, problems


async def verify(maps: MapSet, server: FhirDevServer, envelopes: Sequence[Envelope],
                 versions: Sequence[str]) -> list[str]:
    """On the server: every version written exists and has its Provenance (the one whose id it names), naming
    that version; every row has exactly one resource (a child row: one item in its parent), under its own id,
    holding the row's newest version; Provenances in all: as many as versions written (so exactly one each)."""
    settings = settings_for(server)
    planner = Pipeline(maps, settings, None)
    rows = expected_rows([planner.plan(e) for e in envelopes])
    http = new_http_client(settings)
    tokens = await _tokens(settings)
    sender = BatchDelivery(FhirClient(settings.fhir_url, http, tokens, settings))
    problems: list[str] = []
    try:
        if len(set(versions)) != len(versions):
            problems.append(f"{len(versions) - len(set(versions))} versions reported written twice")
        for start in range(0, len(versions), VERIFY_CHUNK):  # a chunk at a time: peak memory is the pipeline's
            chunk = versions[start:start + VERIFY_CHUNK]
            answers = await sender.send([{"request": {"method": "GET", "url": v}} for v in chunk]
                                        + [{"request": {"method": "GET", "url": f"Provenance/{provenance_id(v)}"}}
                                           for v in chunk])
            for v, res, prov in zip(chunk, answers[:len(chunk)], answers[len(chunk):], strict=True):
                if not isinstance(res, Answer) or not res.ok:
                    problems.append(f"version {v} not found: {_status(res)}")
                if not isinstance(prov, Answer) or not prov.ok or prov.resource is None:
                    problems.append(f"no Provenance for {v}: {_status(prov)}")
                elif prov.resource.get("target") != [{"reference": v}]:
                    problems.append(f"Provenance of {v} names {prov.resource.get('target')}")
        for start in range(0, len(rows), VERIFY_CHUNK):
            part = rows[start:start + VERIFY_CHUNK]
            answers = await sender.send([{"request": {"method": "GET", "url": f"{row.target.resource_type}?"
                                                      f"{row.target.search}&_count=3"}} for row in part])
            for row, answer in zip(part, answers, strict=True):
                problems += _check_row(row, answer)
        count = await sender.send([{"request": {"method": "GET", "url": "Provenance?_summary=count"}}])
        total = count[0].resource.get("total") if isinstance(count[0], Answer) and count[0].resource else None
        if total != len(versions):
            problems.append(f"{total} Provenances on the server for {len(versions)} versions written")
        return problems
    finally:
        await tokens.aclose()
        await http.aclose()


def _status(answer: Answer | WritebackError) -> str:
    return f"HTTP {answer.status}" if isinstance(answer, Answer) else answer.detail


def _check_row(row: Row, answer: Answer | WritebackError) -> list[str]:
    what = f"{row.table} {row.row_id}"
    if not isinstance(answer, Answer) or not answer.ok or answer.resource is None:
        return [f"{what}: search failed: {_status(answer)}"]
    found = [e.get("resource") or {} for e in answer.resource.get("entry") or []]
    if len(found) != 1:
        return [f"{what}: {len(found)} {row.target.resource_type} with {row.target.search}"]
    resource = found[0]
    newest = row.newest.text()
    if row.element is None:
        if resource.get("id") != row.target.new_id:
            return [f"{what}: {row.target.resource_type}/{resource.get('id')}, not under the row's id "
                    f"{row.target.new_id}"]
        mark = mark_of(resource, row.table, row.row_id)
        held = mark.version.text() if mark else None
        return [] if held == newest else [f"{what}: holds version {held}, not the newest {newest}"]
    items = [i for i in resource.get(row.element) or [] if isinstance(i, dict)
             and any((m.table, m.row_id) == (row.table, row.row_id) for m in marks_in(i))]
    if len(items) != 1:
        return [f"{what}: {len(items)} items in {row.target.resource_type}.{row.element} of {row.target.table} "
                f"{row.target.identifier_value}"]
    item = item_of(items, row.table, row.row_id)
    mark = mark_of(item, row.table, row.row_id) if item is not None else None
    held = mark.version.text() if mark else None
    return [] if held == newest else [f"{what}: its item holds version {held}, not the newest {newest}"]


async def e2e(maps: MapSet, kind: str, envelopes: list[Envelope], recording: Recording | None = None,
              latency: float = 0.0) -> Run:
    """One run on a fresh server; `kind` pipeline, baseline or ceiling (which replays `recording`); `latency`,
    seconds before each of the pipeline's requests (`DistantClient`)."""
    with fhir_dev_server() as server:
        problems: list[str] = []
        states = ""
        before = load()
        cpu: Timing | None = None
        if kind == "ceiling":
            assert recording is not None
            cpu, versions, problems = await run_ceiling(server, recording)
            seconds = cpu.seconds
            if len(versions) != recording.writes:
                problems.append(f"{len(versions)} of {recording.writes} recorded writes made")
        else:
            if kind == "pipeline":
                cpu, results, _ = await run_pipeline(maps, server, envelopes, latency=latency)
                seconds, invocation = cpu.seconds, INVOCATION
            else:
                seconds, results = await run_baseline_timed(maps, server, envelopes)
                invocation = 1  # one message at a time
            planner = Pipeline(maps, settings_for(server), None)
            versions, problems = check_results([planner.plan(e) for e in envelopes], results, invocation)
            states = " " + _states(results)
        problems += await verify(maps, server, envelopes, versions)
    run = Run(kind, len(envelopes), len(versions), seconds, not problems, problems, cpu)
    log(f"  {kind:<9} {run.messages:>6} msgs ({run.writes} writes) in {seconds:6.2f}s = {run.msgs_per_s:8.1f} msgs/s"
        f"  load {before}{_cpu_text(cpu)}{states}  verified={run.verified}"
        + (f"  problems={len(problems)}: {problems[:3]}" if problems else ""))
    return run


def _cpu_text(cpu: Timing | None) -> str:
    if cpu is None:
        return ""
    server = f"{cpu.server_cpu:.2f}s" if cpu.server_cpu is not None else "?"
    return f"  cpu: python {cpu.python_cpu:.2f}s server {server}"


def _states(results: Sequence[Result]) -> str:
    counts: dict[str, int] = {}
    for r in results:
        key = r.state + (f"/{r.reason.value}" if r.reason else "")
        counts[key] = counts.get(key, 0) + 1
    return " ".join(f"{k}={v}" for k, v in sorted(counts.items()))


async def record(maps: MapSet, envelopes: list[Envelope]) -> tuple[Recording, Run]:
    """The ceiling's writes: what an (untimed, verified) pipeline run on a server of its own wrote."""
    with fhir_dev_server() as server:
        timing, results, recording = await run_pipeline(maps, server, envelopes, record=True)
        assert recording is not None
        planner = Pipeline(maps, settings_for(server), None)
        versions, problems = check_results([planner.plan(e) for e in envelopes], results, INVOCATION)
        problems += await verify(maps, server, envelopes, versions)
    if recording.writes != len(versions):
        problems.append(f"{recording.writes} writes recorded for {len(versions)} versions written")
    waves = sum(len(recording.waves(n)) for n in range(len(recording.invocations)))
    log(f"  recorded {recording.writes} writes ({waves} waves) for the ceiling  verified={not problems}"
        + (f"  problems={len(problems)}: {problems[:3]}" if problems else ""))
    return recording, Run("recorded", len(envelopes), len(versions), timing.seconds, not problems, problems)


def _median(runs: list[Run]) -> Run:
    return sorted(runs, key=lambda r: r.msgs_per_s)[len(runs) // 2]


def cpu_budget(pipelines: list[Run], ceiling: Run) -> dict[str, Any]:
    """Where the two processes share this machine's cores: the CPU a pipeline run and its server need together
    (medians), and the shortest such a run could take on these cores, however well it overlapped its work with
    the server's. Against the ceiling's time that is the highest ratio this machine allows the pipeline."""
    cores = os.cpu_count() or 1
    timed_runs = [r.cpu for r in pipelines if r.cpu is not None and r.cpu.server_cpu is not None]
    if not timed_runs or ceiling.cpu is None or ceiling.cpu.server_cpu is None:
        return {}
    python = sorted(t.python_cpu for t in timed_runs)[len(timed_runs) // 2]
    server = sorted(t.server_cpu or 0.0 for t in timed_runs)[len(timed_runs) // 2]
    shortest = max((python + server) / cores, python)
    return {"cores": cores, "pipeline_python_s": round(python, 3), "pipeline_server_s": round(server, 3),
            "ceiling_python_s": round(ceiling.cpu.python_cpu, 3), "ceiling_server_s": round(ceiling.cpu.server_cpu, 3),
            "pipeline_min_s": round(shortest, 3), "cpu_bound_vs_ceiling": round(ceiling.seconds / shortest, 4)}


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 1024 / 1024


def python_speed_ms() -> float:
    """The best of three runs of a fixed pure-Python workload (a million additions and dict stores), in ms: how fast
    this machine runs Python today. The core path's msgs/s is an absolute figure and moves with it (the same code
    measured about three times slower on one sitting's machine than on another's); this says which kind of
    sitting a run was."""
    best = float("inf")
    for _ in range(3):
        started, total, seen = time.perf_counter(), 0, {}
        for i in range(1_000_000):
            total += i
            seen[i & 1023] = total
        best = min(best, time.perf_counter() - started)
    return best * 1000


async def main() -> dict[str, Any]:
    started_load = load()
    maps = load_maps(DEFAULT_MAPS_DIR)
    settle_long_lived()  # as the function does once its first invocation has built what it keeps
    speed = python_speed_ms()
    log(f"cores: {os.cpu_count()}  python {sys.version.split()[0]}  load average {load()}  "
        f"fixed Python workload {speed:.0f} ms")
    log(f"core: {build.core()} (setup.py: `make bench` compiles it first)")
    log("1. core path (parse → decide → map → validate → row facts → build the first requests), one core")
    scaling = {n: core(maps, n) for n in sorted({*CORE_SCALES, CORE_N})}
    headline = scaling[CORE_N]
    log(f"  {CORE_N} msgs: {headline['msgs_per_s']:.0f} msgs/s ({headline['us_per_msg']:.0f} µs/msg, "
        f"cpu {headline['cpu_seconds']:.2f}s of {headline['seconds']:.2f}s)")

    log(f"2. end to end, {E2E_N} messages, fresh dev server per run")
    envelopes = generate(E2E_N, seed=11)
    # A run of 1,000 messages takes well under a second, so one run is at the mercy of the machine's noise:
    # the pipeline and the ceiling run REPEATS times, alternating, and the median of each counts.
    recording, recorded = await record(maps, envelopes)
    pipelines: list[Run] = []
    ceilings: list[Run] = []
    for _ in range(REPEATS):
        pipelines.append(await e2e(maps, "pipeline", envelopes))
        ceilings.append(await e2e(maps, "ceiling", envelopes, recording))
    pipeline, ceiling = _median(pipelines), _median(ceilings)
    log(f"  median of {REPEATS}: pipeline {pipeline.msgs_per_s:.1f} msgs/s, ceiling {ceiling.msgs_per_s:.1f} msgs/s "
        f"= {pipeline.msgs_per_s / ceiling.msgs_per_s:.2%} of the ceiling "
        f"(floor {E2E_FLOOR:.0%}: {'met' if pipeline.msgs_per_s >= E2E_FLOOR * ceiling.msgs_per_s else 'not met'})")
    cpu = cpu_budget(pipelines, ceiling)
    if cpu:
        log(f"  cpu (medians): pipeline python {cpu['pipeline_python_s']:.2f}s + server {cpu['pipeline_server_s']:.2f}s"
            f", ceiling python {cpu['ceiling_python_s']:.2f}s + server {cpu['ceiling_server_s']:.2f}s; on "
            f"{cpu['cores']} cores the pipeline's run cannot take less than {cpu['pipeline_min_s']:.2f}s "
            f"= at most {cpu['cpu_bound_vs_ceiling']:.0%} of the ceiling")

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

    log(f"5. a remote FHIR service ({REMOTE_SECONDS * 1000:.0f} ms before each request), {E2E_N} messages")
    distant = await e2e(maps, "pipeline", envelopes, latency=REMOTE_SECONDS)

    runs = [recorded, *pipelines, baseline, *ceilings, *e2e_scaling.values(), distant]
    return {
        "pipeline_msgs_per_s": round(headline["msgs_per_s"], 1),
        "pipeline_messages": CORE_N,
        "e2e_msgs_per_s": round(pipeline.msgs_per_s, 1),
        "baseline_msgs_per_s": round(baseline.msgs_per_s, 1),
        "speedup": round(pipeline.msgs_per_s / baseline.msgs_per_s, 2),
        "server_ceiling_msgs_per_s": round(ceiling.msgs_per_s, 1),
        "e2e_vs_ceiling": round(pipeline.msgs_per_s / ceiling.msgs_per_s, 4),
        # Each pipeline run against the ceiling run after it: how far one sitting's figures spread.
        "e2e_vs_ceiling_pairs": [round(p.msgs_per_s / c.msgs_per_s, 3) for p, c in zip(pipelines, ceilings,
                                                                                        strict=True)],
        # Judged on the unrounded figures (0.8997 is not 0.9).
        "floors_met": {"core_msgs_per_s_2000": headline["msgs_per_s"] >= CORE_FLOOR,
                       "e2e_vs_ceiling_0.90": pipeline.msgs_per_s >= E2E_FLOOR * ceiling.msgs_per_s},
        "e2e_messages": E2E_N,
        "e2e_writes": pipeline.writes,
        "ceiling_writes": ceiling.writes,
        "verified": all(r.verified for r in runs),
        "verified_runs": {r.name + ("" if r.messages == E2E_N else f"_{r.messages}"): all(
            o.verified for o in runs if (o.name, o.messages) == (r.name, r.messages)) for r in runs},
        "e2e_runs": REPEATS,
        "remote": {"latency_ms": round(REMOTE_SECONDS * 1000), "msgs_per_s": round(distant.msgs_per_s, 1),
                   "seconds": round(distant.seconds, 2), "verified": distant.verified},
        "e2e_cpu": cpu,
        "peak_rss_mb": round(peak, 1),
        "python_speed_ms": round(speed, 1),
        "core_build": build.core().split()[0],
        "cores": os.cpu_count(),
        "load_avg_start": float(started_load),
        "load_avg_end": float(load()),
    }


if __name__ == "__main__":
    started = time.perf_counter()
    summary = asyncio.run(main())
    log(f"total {time.perf_counter() - started:.0f}s")
    print(json.dumps(summary), flush=True)
