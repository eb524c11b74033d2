"""Many writes at once: plans grouped into FHIR `batch` bundles, each entry's outcome mapped back to its plan.

The semantics are `FhirDelivery`'s, entry by entry: a create is a conditional create (`request.ifNoneExist`);
an update is read → apply the planned elements → `PUT` with `request.ifMatch`, and a 412/409 entry is re-read
and retried a bounded number of times (then `conflict`); an update that changes nothing writes nothing; every
write gets its Provenance (deterministic id, `PUT`) naming the version written. Per-entry errors get the same
reason codes and details as the single-request path (the mapping lives in `fhir_client` and is shared).

An update whose resource this call already wrote (a row's Create and then its Update in one batch) starts
from the copy the server answered that write with, not from a read: the `If-Match` on that version makes it
as safe as a read (a change in between is a 412, then read and re-applied like any conflict), and it saves
the read's round trip. An update that would change nothing in that copy is still read (only the server's copy
decides that nothing needs writing). The copies live only as long as the batch (the caller's `memo`).

Grouping rules:
- No two entries for the same resource in one bundle (same type and row identifier, or same logical id): the
  second plan for a resource goes to a later *wave*, and waves run one after the other, so plans for one row
  are applied in the order given. Bundles within a wave run concurrently, at most `max_concurrency` at a time.
- At most `bundle_size` entries per bundle; each bundle is one `FhirClient.request` (auth, retries of the whole
  request) with `x-bundle-processing-logic: parallel`. Entries answered 408/429/5xx are resent, bounded like a
  single request's retries, then `fhir_unavailable`.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from writeback.decide import WritePlan
from writeback.errors import WritebackError
from writeback.fhir_client import (
    BACKOFF_BASE_SECONDS,
    BACKOFF_CAP_SECONDS,
    RETRY_STATUSES,
    FhirClient,
    ambiguous_create,
    found_target,
    id_from_location,
    issues_of,
    json_of,
    kept_changing,
    provenance_refused,
    provenance_unwritten,
    read_path,
    refused,
    target_gone,
    unchanged,
    unnamed_create,
    unversioned_read,
    unversioned_update,
    vanished,
    version_from,
)
from writeback.paths import apply
from writeback.pipeline import Delivered, Issue
from writeback.provenance import build_provenance
from writeback.reasons import Reason

BATCH_HEADERS = {"x-bundle-processing-logic": "parallel"}
Outcome = Delivered | WritebackError
Current = tuple[dict[str, Any], str]  # a resource as the server holds it, and its version
Known = dict[tuple[str, ...], Current]  # what this call wrote, by `_cache_key`
_COPIES = "bundles.copies"  # where `Known` lives in a batch's memo


@dataclass(frozen=True, slots=True)
class Answer:
    """One batch-response entry."""

    status: int
    resource: dict[str, Any] | None
    etag: str
    location: str
    outcome: dict[str, Any] | None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


def _answer(entry: object) -> Answer:
    entry = entry if isinstance(entry, dict) else {}
    response = entry.get("response") if isinstance(entry.get("response"), dict) else {}
    assert isinstance(response, dict)
    raw = str(response.get("status") or "0").strip().split(" ", 1)[0]
    status = int(raw) if raw.isdigit() else 0
    resource = entry.get("resource")
    outcome = response.get("outcome")
    return Answer(status, resource if isinstance(resource, dict) else None, str(response.get("etag") or ""),
                  str(response.get("location") or ""), outcome if isinstance(outcome, dict) else None)


def _entry_issues(answer: Answer) -> tuple[Issue, ...]:
    """Warnings and information the server attached to an entry, without the routine "Created"/"All OK"."""
    body = answer.outcome or answer.resource
    return tuple(i for i in issues_of(body) if not (i.code == "informational" and not i.expression and not i.details))


def _keys(plan: WritePlan) -> tuple[tuple[str, ...], ...]:
    target = plan.target
    by_row = (target.resource_type, "row", target.identifier_system, target.identifier_value)
    return (by_row, (target.resource_type, "id", target.fhir_id)) if target.fhir_id else (by_row,)


def _cache_key(plan: WritePlan) -> tuple[str, ...]:
    """Where an update finds the copy of its resource this call wrote: by logical id when the plan names one,
    else by row identifier (so a row's Create and its Update meet)."""
    target = plan.target
    if target.fhir_id:
        return (target.resource_type, "id", target.fhir_id)
    return (target.resource_type, "row", target.identifier_system, target.identifier_value)


def _remember(known: Known, plan: WritePlan, resource: dict[str, Any] | None, version: str) -> None:
    """Keep the copy a write answered with, if the server sent one (`Prefer: return=minimal` sends none)."""
    if resource is None or not resource.get("id"):
        return
    if resource.get("resourceType") != plan.resource_type:
        return
    known[_cache_key(plan)] = (resource, version)
    known[(plan.resource_type, "id", str(resource["id"]))] = (resource, version)


def waves(plans: Sequence[WritePlan]) -> list[list[int]]:
    """Indexes of `plans` in waves: no resource twice in a wave, each resource's plans in input order."""
    last: dict[tuple[str, ...], int] = {}
    grouped: list[list[int]] = []
    for index, plan in enumerate(plans):
        keys = _keys(plan)
        wave = max((last.get(k, -1) for k in keys), default=-1) + 1
        for k in keys:
            last[k] = wave
        if wave == len(grouped):
            grouped.append([])
        grouped[wave].append(index)
    return grouped


@dataclass(slots=True)
class _Written:
    index: int
    plan: WritePlan
    versioned: str
    created: bool
    issues: tuple[Issue, ...]


class BatchDelivery:
    """`pipeline.Delivery` with `deliver_many`: FHIR batch bundles over one `FhirClient`."""

    def __init__(self, client: FhirClient) -> None:
        self.client = client
        self.settings = client.settings
        self._slots = asyncio.Semaphore(self.settings.max_concurrency)

    async def deliver(self, plan: WritePlan) -> Delivered:
        (outcome,) = await self.deliver_many([plan])
        if isinstance(outcome, WritebackError):
            raise outcome
        return outcome

    async def deliver_many(self, plans: Sequence[WritePlan], memo: dict[Any, Any] | None = None,
                           written: asyncio.Event | None = None) -> list[Delivered | WritebackError]:
        """One outcome per plan, in order: the write and its Provenance, or the error with its reason code.

        `memo` carries the copies written across the calls of one batch (`Pipeline.process_many`); `written`
        is set once every write has been answered, while the last Provenances may still be on their way."""
        outcomes: list[Outcome | None] = [None] * len(plans)
        provenances: list[asyncio.Task[None]] = []
        known: Known = {} if memo is None else memo.setdefault(_COPIES, {})
        try:
            for wave in waves(plans):
                done = await self._wave([(i, plans[i]) for i in wave], outcomes, known)
                # A Provenance changes no resource a later wave touches: it goes out alongside that wave.
                provenances.append(asyncio.create_task(self._provenance(done, outcomes)))
        finally:
            if written is not None:
                written.set()
            await asyncio.gather(*provenances)
        assert all(o is not None for o in outcomes)
        return [o for o in outcomes if o is not None]

    # ---- one wave: no resource twice ---------------------------------------------------------------

    async def _wave(self, items: list[tuple[int, WritePlan]], outcomes: list[Outcome | None],
                    known: Known) -> list[_Written]:
        """The writes of one wave; returns what was written (its Provenance still to send)."""
        stamp = self.client.stamp
        creates = [(i, p) for i, p in items if p.operation == "create"]
        updates = [(i, p) for i, p in items if p.operation != "create"]
        copies: list[Current | None] = [known.get(_cache_key(p)) for _, p in updates]
        merges = [None if c is None else _merged(p, c[0]) for (_, p), c in zip(updates, copies, strict=True)]
        for n, (held, merged) in enumerate(zip(copies, merges, strict=True)):
            # "Nothing to write" is only ever concluded from the server's copy: another system may have changed
            # these elements since our write.
            if held is not None and merged is not None and unchanged(merged, held[0]):
                copies[n] = merges[n] = None
        unread = [(i, p) for (i, p), c in zip(updates, copies, strict=True) if c is None]
        entries: list[dict[str, Any]] = [
            {"resource": stamp(p.resource),
             "request": {"method": "POST", "url": p.resource_type, "ifNoneExist": p.target.search}}
            for _, p in creates]
        entries += [_read_entry(p) for _, p in unread]
        answers = await self.send(entries)
        written: list[_Written] = []
        for (index, plan), answer in zip(creates, answers[:len(creates)], strict=True):
            try:
                written.append(self._created(index, plan, answer, known))
            except WritebackError as exc:
                outcomes[index] = exc
        reads = iter(answers[len(creates):])
        currents = [c if c is not None else _current_or_error(p, next(reads))
                    for (_, p), c in zip(updates, copies, strict=True)]
        await self._update(updates, currents, written, outcomes, known, merges=merges)
        return written

    def _created(self, index: int, plan: WritePlan, answer: Answer | WritebackError, known: Known) -> _Written:
        if isinstance(answer, WritebackError):
            raise answer
        if answer.status == 412:  # as FhirClient.create
            raise ambiguous_create()
        if not answer.ok:
            raise refused(answer.status, answer.outcome, "create")
        version = version_from(answer.etag, answer.resource)
        resource_id = (answer.resource or {}).get("id") or id_from_location(answer.location)
        if not resource_id or not version:
            raise unnamed_create()
        _remember(known, plan, answer.resource, version)
        return _Written(index, plan, f"{plan.resource_type}/{resource_id}/_history/{version}",
                        answer.status == 201, _entry_issues(answer))

    async def _update(self, updates: list[tuple[int, WritePlan]], currents: Sequence[Current | WritebackError],
                      written: list[_Written], outcomes: list[Outcome | None], known: Known, *,
                      merges: Sequence[dict[str, Any] | None]) -> None:
        """`merges`: for the first attempt, each update already applied to its current copy (None: not yet)."""
        pending = updates
        for attempt in range(self.settings.conflict_retries + 1):
            if attempt:
                reads = await self.send([_read_entry(p) for _, p in pending])
                currents = [_current_or_error(p, a) for (_, p), a in zip(pending, reads, strict=True)]
                merges = [None] * len(pending)
            puts: list[tuple[int, WritePlan, str]] = []
            entries: list[dict[str, Any]] = []
            for (index, plan), found, ready in zip(pending, currents, merges, strict=True):
                if isinstance(found, WritebackError):
                    outcomes[index] = found
                    continue
                current, version = found
                merged = ready if ready is not None else _merged(plan, current)
                resource_id = str(current.get("id"))
                if unchanged(merged, current):
                    _remember(known, plan, current, version)
                    written.append(_Written(index, plan, f"{plan.resource_type}/{resource_id}/_history/{version}",
                                            False, ()))
                    continue
                puts.append((index, plan, resource_id))
                entries.append({"resource": self.client.stamp(merged),
                                "request": {"method": "PUT", "url": f"{plan.resource_type}/{resource_id}",
                                            "ifMatch": f'W/"{version}"'}})
            pending = []
            if not puts:
                break
            for (index, plan, resource_id), put in zip(puts, await self.send(entries), strict=True):
                if isinstance(put, WritebackError):
                    outcomes[index] = put
                elif put.status in (409, 412):
                    pending.append((index, plan))  # changed concurrently: re-read and re-apply
                elif put.status in (404, 410):
                    outcomes[index] = vanished(plan, resource_id)
                elif not put.ok:
                    outcomes[index] = refused(put.status, put.outcome, "update")
                else:
                    new_version = version_from(put.etag, put.resource)
                    if not new_version:
                        outcomes[index] = unversioned_update()
                    else:
                        _remember(known, plan, put.resource, new_version)
                        written.append(_Written(index, plan,
                                                f"{plan.resource_type}/{resource_id}/_history/{new_version}",
                                                False, _entry_issues(put)))
            if not pending:
                break
        for index, plan in pending:
            outcomes[index] = kept_changing(plan, self.settings)

    async def _provenance(self, written: list[_Written], outcomes: list[Outcome | None]) -> None:
        settings = self.settings
        provenances = [build_provenance(w.plan, w.versioned, created=w.created, agent=settings.agent,
                                        meta_source=settings.meta_source) for w in written]
        entries = [{"resource": p, "request": {"method": "PUT", "url": f"Provenance/{p['id']}"}} for p in provenances]
        for w, provenance, answer in zip(written, provenances, await self.send(entries), strict=True):
            if isinstance(answer, WritebackError):
                outcomes[w.index] = provenance_unwritten(answer)
            elif not answer.ok:
                outcomes[w.index] = provenance_refused(answer.status, answer.outcome)
            else:
                version = version_from(answer.etag, answer.resource) or ""
                reference = f"Provenance/{provenance['id']}" + (f"/_history/{version}" if version else "")
                outcomes[w.index] = Delivered(w.versioned, reference, w.issues)

    # ---- bundles ---------------------------------------------------------------------------------

    async def send(self, entries: Sequence[dict[str, Any]]) -> list[Answer | WritebackError]:
        """The entries as batch bundles of at most `bundle_size`, concurrently; one answer per entry, in order."""
        if not entries:
            return []
        size = self.settings.bundle_size
        chunks = [entries[i:i + size] for i in range(0, len(entries), size)]

        async def one(chunk: Sequence[dict[str, Any]]) -> list[Answer | WritebackError]:
            async with self._slots:
                return await self._bundle(chunk)

        answered = await asyncio.gather(*(one(c) for c in chunks))
        return [a for chunk in answered for a in chunk]

    async def _bundle(self, entries: Sequence[dict[str, Any]]) -> list[Answer | WritebackError]:
        out: list[Answer | WritebackError | None] = [None] * len(entries)
        todo = list(range(len(entries)))
        started, slept, attempt = time.monotonic(), 0.0, 0
        while todo:
            bundle = {"resourceType": "Bundle", "type": "batch", "entry": [entries[i] for i in todo]}
            try:
                response = await self.client.request("POST", self.client.base_url, json=bundle,
                                                     headers=BATCH_HEADERS)
            except WritebackError as exc:
                for i in todo:
                    out[i] = exc
                break
            if not response.is_success:
                await self._refused_whole(entries, todo, response.status_code, json_of(response), out)
                break
            body = json_of(response)
            listed = (body or {}).get("entry")
            if not isinstance(listed, list) or len(listed) != len(todo):
                error = WritebackError(Reason.FHIR_REJECTED, "the FHIR server's batch answer does not match the batch")
                for i in todo:
                    out[i] = error
                break
            again: list[int] = []
            failure = 0
            for i, raw in zip(todo, listed, strict=True):
                answer = _answer(raw)
                if answer.status in RETRY_STATUSES:
                    again.append(i)
                    failure = answer.status
                elif answer.status in (401, 403):
                    out[i] = WritebackError(Reason.UNAUTHORIZED,
                                            f"the FHIR server refused our credentials (HTTP {answer.status})")
                else:
                    out[i] = answer
            todo = again
            if not todo:
                break
            attempt += 1
            backoff = min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2 ** (attempt - 1))
            delay = random.uniform(backoff / 2, backoff)  # noqa: S311 (jitter)
            spent = max(time.monotonic() - started, slept)
            if attempt > self.settings.max_retries or spent + delay > self.settings.retry_max_seconds:
                for i in todo:
                    method = str(entries[i]["request"]["method"])
                    where = str(entries[i]["request"]["url"]).split("?", maxsplit=1)[0]
                    out[i] = WritebackError(Reason.FHIR_UNAVAILABLE,
                                            f"{method} {where} kept failing (HTTP {failure}) after {attempt} tries")
                break
            await self.client._sleep(delay)
            slept += delay
        return [a if a is not None else WritebackError(Reason.FHIR_REJECTED, "no answer") for a in out]


    async def _refused_whole(self, entries: Sequence[dict[str, Any]], todo: list[int], status: int,
                             body: dict[str, Any] | None, out: list[Answer | WritebackError | None]) -> None:
        """The server refused the bundle as a whole (400, 413, 422, ...): one entry it cannot take must not take
        the others down, on this delivery and on every retry. The bundle is halved until the refused entry
        stands alone (a 413 halves until each part is small enough); that entry gets the refusal as its own."""
        if status in (404, 405):
            error = WritebackError(Reason.CONFIG_ERROR, f"the FHIR server does not take batch bundles at FHIR_URL "
                                   f"(HTTP {status}); check the base URL")
            for i in todo:
                out[i] = error
            return
        if len(todo) == 1:
            [i] = todo
            request = entries[i].get("request") or {}
            what = f"{request.get('method', 'request')} {str(request.get('url', '')).split('?', maxsplit=1)[0]}"
            out[i] = (WritebackError(Reason.FHIR_REJECTED, f"the FHIR server refused the {what} as too large "
                                     "(HTTP 413)") if status == 413 else refused(status, body, what))
            return
        half = len(todo) // 2
        parts = [todo[:half], todo[half:]]
        answered = await asyncio.gather(*(self._bundle([entries[i] for i in part]) for part in parts))
        for part, answers in zip(parts, answered, strict=True):
            for i, answer in zip(part, answers, strict=True):
                out[i] = answer


def _read_entry(plan: WritePlan) -> dict[str, Any]:
    return {"request": {"method": "GET", "url": read_path(plan)}}


def _merged(plan: WritePlan, current: dict[str, Any]) -> dict[str, Any]:
    """What an update writes: the server's copy with the plan's elements (and the row identifier) applied."""
    return apply(current, [*plan.assignments, plan.target.identity])


def _current_or_error(plan: WritePlan, answer: Answer | WritebackError) -> Current | WritebackError:
    try:
        return _current(plan, answer)
    except WritebackError as exc:
        return exc


def _current(plan: WritePlan, answer: Answer | WritebackError) -> Current:
    """What an update applies to, from a read or search entry, with FhirClient.read_target's errors."""
    if isinstance(answer, WritebackError):
        raise answer
    if plan.target.fhir_id:
        if answer.status in (404, 410):
            raise target_gone(plan)
        if not answer.ok:
            raise refused(answer.status, answer.outcome, "read")
        version = version_from(answer.etag, answer.resource)
        if answer.resource is None or version is None:
            raise unversioned_read()
        return answer.resource, version
    if not answer.ok:
        raise refused(answer.status, answer.outcome, "search")
    return found_target(plan, answer.resource or {})
