"""Writes as FHIR `batch` bundles: each message's plan carried out entry by entry, each outcome mapped back.

A plan is one or two `Write`s (`writeback.decide`); each is a job here, run as a read-modify-write:

1. read the resource (by logical id, else by the row identifier), unless this call already holds the copy the
   server answered an earlier write with; look up the FHIR ids of lookups not known yet, in the same bundle;
2. `writeback.converge` decides on that copy: write (the edit applied), or nothing (`stale`: the copy holds a
   newer version of the row; `same`: this version; `unchanged`: these values), or `absent`;
3. write: `PUT <Type>/<id>` with `ifMatch` on the version read; a 412/409 entry (someone wrote in between) is
   read again and decided again, a bounded number of times (then `conflict`). A resource that does not exist yet
   is created under the row's own id (`PUT <Type>/<uuid5(table, row)>`), by one caller at a time (`Leases`);
4. every version written gets its Provenance, whose id is derived from that version (`PUT`, so a retry
   replaces it), sent alongside the next wave. A message tried again that finds its version already there
   (`same`, or `stale` after a newer change) checks that the version it wrote earlier has its Provenance, and
   writes it if not (the first try's Provenance may have failed).

Grouping rules:
- No two jobs for the same resource in one bundle: a later job for a resource goes to a later *wave*, and waves
  run one after the other, in the order given. Bundles within a wave run concurrently, at most
  `max_concurrency` at a time. At most `bundle_size` entries per bundle; each bundle is one
  `FhirClient.request` (auth, retries of the whole request) with `x-bundle-processing-logic: parallel`. Entries
  answered 408/429/5xx are resent, bounded like a single request's retries, then `fhir_unavailable`.
- A bundle the server refuses as a whole (400, 413, ...) is halved until the entry it refuses stands alone: one
  bad entry does not take the others down.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from writeback.converge import Converged, Edit, ItemEdit, Release, RemoveItem, RowEdit, comparable, converge
from writeback.decide import Target, WritePlan, identifier_search, resource_id
from writeback.errors import NotApplied, WritebackError
from writeback.fhir_client import (
    BACKOFF_BASE_SECONDS,
    BACKOFF_CAP_SECONDS,
    NOT_APPLIED_STATUSES,
    RETRY_STATUSES,
    FhirClient,
    SendWindow,
    being_created,
    found_target,
    issues_of,
    json_of,
    kept_changing,
    provenance_refused,
    provenance_unwritten,
    read_path,
    refused,
    retry_after,
    target_gone,
    target_pending,
    unversioned_read,
    unversioned_update,
    vanished,
    version_from,
)
from writeback.immutable import evolve, immutable
from writeback.leases import RELEASE_HOLDER, LocalLeases
from writeback.mapping import RowRef, resolve_refs, resolve_refs_in
from writeback.marks import MOVED, Version, item_of, mark_of
from writeback.paths import Assignment
from writeback.pipeline import Delivered, Issue, Leases
from writeback.provenance import build_provenance, provenance_id
from writeback.reasons import Reason

BATCH_HEADERS = {"x-bundle-processing-logic": "parallel"}
Outcome = Delivered | WritebackError
Current = tuple[dict[str, Any], str]  # a resource as the server holds it, and its version
Known = dict[tuple[str, ...], Current]  # the copies this call read or wrote, by `_keys`
_COPIES = "bundles.copies"  # where `Known` lives in a batch's memo
_READS = "bundles.reads"  # read path → the read sent ahead of the writes (`prefetch`), in a batch's memo
HISTORY_DEPTH = 50  # versions looked through for a version whose Provenance may be missing


@immutable
class Answer:
    """One batch-response entry."""

    status: int
    resource: dict[str, Any] | None
    etag: str
    outcome: dict[str, Any] | None
    resent: bool = False  # the bundle went out more than once: an earlier copy may have been applied

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


def _answer(entry: object, resent: bool = False) -> Answer:
    entry = entry if isinstance(entry, dict) else {}
    response = entry.get("response") if isinstance(entry.get("response"), dict) else {}
    assert isinstance(response, dict)
    raw = str(response.get("status") or "0").strip().split(" ", 1)[0]
    status = int(raw) if raw.isdigit() else 0
    resource = entry.get("resource")
    outcome = response.get("outcome")
    return Answer(status, resource if isinstance(resource, dict) else None, str(response.get("etag") or ""),
                  outcome if isinstance(outcome, dict) else None, resent)


def _entry_issues(answer: Answer) -> tuple[Issue, ...]:
    """Warnings and information the server attached to an entry, without the routine "Created"/"All OK"."""
    body = answer.outcome or answer.resource
    return tuple(i for i in issues_of(body) if not (i.code == "informational" and not i.expression and not i.details))


def _keys(target: Target) -> tuple[tuple[str, ...], ...]:
    by_id = (target.resource_type, "id", target.fhir_id or "")
    if target.by_id_only:
        return (by_id,)
    by_row = (target.resource_type, "row", target.identifier_system, target.identifier_value)
    return (by_row, by_id) if target.fhir_id else (by_row,)


def waves(targets: Sequence[Target]) -> list[list[int]]:
    """Indexes of `targets` in waves: no resource twice in a wave, each resource's jobs in input order."""
    last: dict[tuple[str, ...], int] = {}
    grouped: list[list[int]] = []
    for index, target in enumerate(targets):
        keys = _keys(target)
        wave = max((last.get(k, -1) for k in keys), default=-1) + 1
        for k in keys:
            last[k] = wave
        if wave == len(grouped):
            grouped.append([])
        grouped[wave].append(index)
    return grouped


@dataclass(slots=True)
class _Job:
    plan_index: int
    plan: WritePlan
    target: Target
    edit: Edit
    current: Current | None = None
    absent: bool = False
    copied: bool = False  # `current` is the copy an earlier write of this call was answered with, not a read
    outcome: _Written | Converged | WritebackError | None = None
    provenance: str | WritebackError | None = None
    owed: bool = False  # its Provenance is looked for (and written where missing) in the resource's history


@dataclass(slots=True)
class _Written:
    versioned: str
    created: bool
    issues: tuple[Issue, ...]


@dataclass(slots=True)
class _Batch:
    known: Known
    ids: dict[RowRef, str | None] = field(default_factory=dict)  # lookups resolved by search in this call
    unsearched: dict[RowRef, WritebackError] = field(default_factory=dict)  # searches that went unanswered
    missing: set[RowRef] = field(default_factory=set)  # searches answered: no such resource (yet)
    leases: Leases = field(default_factory=LocalLeases)
    reads: dict[str, asyncio.Future[Answer | WritebackError]] = field(default_factory=dict)  # sent ahead


class BatchDelivery:
    """`pipeline.Delivery` over one `FhirClient`: one plan, or many at once (`deliver_many`)."""

    def __init__(self, client: FhirClient, leases: Leases | None = None) -> None:
        self.client = client
        self.settings = client.settings
        self.leases = leases or LocalLeases()
        self._slots = asyncio.Semaphore(self.settings.max_concurrency)

    def prefetch(self, targets: Sequence[Target], memo: dict[Any, Any]) -> list[asyncio.Future[Any]]:
        """Send the reads the writes of these targets will start from, now, while the caller goes on (planning the
        rest of a batch); `deliver_many` with the same memo takes the answers. A read is only a starting point:
        the If-Match of the write catches whatever changed after it. Returns what it started, for the caller to
        cancel when it stops."""
        reads: dict[str, asyncio.Future[Answer | WritebackError]] = memo.setdefault(_READS, {})
        paths = list(dict.fromkeys(p for p in (read_path(t) for t in targets) if p not in reads))
        if not paths:
            return []
        sent = asyncio.ensure_future(self.send([{"request": {"method": "GET", "url": path}} for path in paths]))
        loop = asyncio.get_running_loop()
        answers: list[asyncio.Future[Answer | WritebackError]] = [loop.create_future() for _ in paths]
        reads.update(zip(paths, answers, strict=True))

        def share(done: asyncio.Future[list[Answer | WritebackError]]) -> None:
            """Each read's own answer, from the bundle's (a future per read, not a task per read)."""
            for n, answer in enumerate(answers):
                if answer.done():  # cancelled by the caller
                    continue
                if done.cancelled():
                    answer.cancel()
                elif (failure := done.exception()) is not None:
                    answer.set_exception(failure)
                else:
                    answer.set_result(done.result()[n])

        sent.add_done_callback(share)
        return [sent, *answers]

    async def deliver(self, plan: WritePlan) -> Delivered:
        (outcome,) = await self.deliver_many([plan])
        if isinstance(outcome, WritebackError):
            raise outcome
        return outcome

    async def deliver_many(self, plans: Sequence[WritePlan], memo: dict[Any, Any] | None = None,
                           leases: Leases | None = None, landed: Callable[[list[bool]], None] | None = None,
                           ) -> list[Delivered | WritebackError]:
        """One outcome per plan, in order. `memo` carries the copies read and written across the calls of one
        batch (`Pipeline.process_many`); `leases` are the ledger's when the caller has one; `landed` is called once
        every resource is written (the Provenance records may still be on their way), with, per plan, whether a
        write of it failed: a Create that failed made nothing, which what waits for it must know."""
        batch = _Batch({} if memo is None else memo.setdefault(_COPIES, {}), leases=leases or self.leases,
                       reads={} if memo is None else memo.setdefault(_READS, {}))
        jobs = [_Job(i, plan, write.target, write.edit) for i, plan in enumerate(plans) for write in plan.writes]
        # A resource the row leaves because its FHIR id now names another (`facts.resolve`) is left only once the
        # row's write there is made: a mistyped id (`target-missing`) must not take the row off the resource it has
        # (found by review). Those go in a wave of their own, last.
        leaving = [job for job in jobs if _leaves(job)]
        provenances: list[asyncio.Task[None]] = []
        try:
            for wave in [*_waves_of([job for job in jobs if not _leaves(job)]), *_waves_of(leaving)]:
                for job in wave:
                    if _leaves(job) and not _row_written(jobs, job):
                        job.outcome = Converged("same")  # (nothing left: the row's own write was not made)
                done = await self._wave([job for job in wave if job.outcome is None], batch)
                # A Provenance changes no resource a later wave touches: it goes out alongside that wave.
                provenances.append(asyncio.create_task(self._provenance(done)))
            if landed is not None:
                failed = [False] * len(plans)
                for job in jobs:
                    failed[job.plan_index] |= isinstance(job.outcome, WritebackError)
                landed(failed)
        except BaseException:
            # Stopped (the invocation's deadline): nothing goes on past it. A version written without its
            # Provenance is healed when the message is tried again.
            await _cancelled(provenances)
            raise
        await asyncio.gather(*provenances)
        await self._heal([job for job in jobs if job.owed or (isinstance(job.outcome, Converged) and (
            job.outcome.kind == "same" or (job.outcome.kind == "stale" and job.plan.source.retried)))])
        by_plan: list[list[_Job]] = [[] for _ in plans]
        for job in jobs:
            by_plan[job.plan_index].append(job)
        return [_outcome(mine) for mine in by_plan]

    # ---- one wave: no resource twice ---------------------------------------------------------------

    async def _wave(self, jobs: list[_Job], batch: _Batch) -> list[_Job]:
        """The jobs of one wave; returns those that wrote (their Provenance still to send)."""
        unread = []
        for job in jobs:
            known = batch.known.get(_keys(job.target)[0]) or next(
                (batch.known[k] for k in _keys(job.target)[1:] if k in batch.known), None)
            ahead = batch.reads.pop(read_path(job.target), None) if known is None else None
            if ahead is not None:
                self._take_read(job, await ahead, batch)
            elif known is None:
                unread.append(job)
            else:
                job.current, job.copied = known, True
        searches = self._unresolved_refs(jobs, batch)
        answers = await self.send([_read_entry(job.target) for job in unread] + [_search_entry(r) for r in searches])
        for job, answer in zip(unread, answers, strict=False):
            self._take_read(job, answer, batch)
        writing = {job.target.row for job in jobs if isinstance(job.edit, RowEdit) and job.outcome is None}
        for ref, answer in zip(searches, answers[len(unread):], strict=True):
            if isinstance(answer, WritebackError):
                # Unanswered (unreachable, 5xx through every retry): not "no such resource", and a reference made
                # now would be the identifier-only last resort for no reason. The jobs that need it wait (their
                # next try searches again); an answered refusal (a server that cannot search so) falls back.
                batch.unsearched[ref] = answer
                continue
            found = _found_id(ref, answer)
            if found is None and answer.ok:
                batch.missing.add(ref)
            if found is None and (ref.table, ref.row_id) in writing:
                # Not there yet, and a job of this wave writes that row's resource: it is made under the row's id,
                # and the reference goes after it, if it is made (`making` below). A row no job here writes is
                # waited for (`awaited`), however sure its consent: its Create may have been refused (found by
                # review: a visit named the Patient of a Create dead-lettered, which never was).
                found = resource_id(ref.table, ref.row_id)
            batch.ids[ref] = found
        for job in jobs:
            failed = next((batch.unsearched[ref] for ref in job.plan.refs if ref in batch.unsearched), None)
            if job.outcome is None and failed is not None:
                job.outcome = failed
            awaited = next((ref for ref in job.plan.awaited if ref in batch.missing and batch.ids.get(ref) is None),
                           None)
            if job.outcome is None and awaited is not None:
                job.outcome = WritebackError(
                    Reason.TARGET_PENDING, f"The {awaited.resource_type} this row refers to ({awaited.table} "
                    f"{awaited.row_id}) is not in FHIR yet: waiting for it, rather than refer to it by identifier "
                    "only.")
        written: list[_Job] = []
        # FHIR R4 batch rules (http.html#brules): "there SHALL be no interdependencies between the different
        # entries in the Bundle". A write referring to a resource another job of this wave creates (a visit and
        # its patient, new in one Service Bus batch) goes after that create, and only if it was made: else it
        # would name a resource that is not there, which nothing would write again (found by review). A create
        # that failed before it was sent (its own lookup waits) counts as not made too.
        creators = {_made_as(job): job for job in jobs
                    if job.absent and isinstance(job.edit, RowEdit) and not job.plan.heal_only}
        todo = [job for job in jobs if job.outcome is None]
        while todo:
            waiting = {id(job) for job in todo}
            now, later = [], []
            for job in todo:
                makers = _makers(job, creators, batch)
                unmade = next((ref for ref, maker in makers if isinstance(maker.outcome, WritebackError)), None)
                if unmade is not None:
                    job.outcome = WritebackError(
                        Reason.TARGET_PENDING, f"The {unmade.resource_type} this row refers to ({unmade.table} "
                        f"{unmade.row_id}) could not be made in this batch: waiting for it, rather than refer to a "
                        "resource that is not there.")
                elif any(id(maker) in waiting for _, maker in makers):
                    later.append(job)
                else:
                    now.append(job)
            if not now:  # lookups in a cycle, all new: no order satisfies them
                now, later = later, []
            await self._attempts(now, batch, written)
            todo = later
        return written

    async def _attempts(self, pending: list[_Job], batch: _Batch, written: list[_Job]) -> None:
        """Write these jobs, reading and deciding again those changed concurrently (412), a bounded number of
        times."""
        for attempt in range(self.settings.conflict_retries + 1):
            if attempt:
                for job, answer in zip(pending, await self.send([_read_entry(j.target) for j in pending]),
                                       strict=True):
                    job.current, job.absent = None, False
                    self._take_read(job, answer, batch)
                pending = [job for job in pending if job.outcome is None]
            pending = await self._write(pending, batch, written)
            if not pending:
                break
        for job in pending:
            job.outcome = kept_changing(job.target, self.settings)

    def _unresolved_refs(self, jobs: list[_Job], batch: _Batch) -> list[RowRef]:
        refs: dict[RowRef, None] = {}
        for job in jobs:
            for ref in job.plan.refs:
                if ref not in job.plan.ref_ids and ref not in batch.ids and ref not in batch.unsearched:
                    refs[ref] = None
        return list(refs)

    def _take_read(self, job: _Job, answer: Answer | WritebackError, batch: _Batch) -> None:
        try:
            found = _current(job.target, answer)
        except WritebackError as exc:
            job.outcome = exc
            return
        if found is None:
            job.absent = True
        else:
            job.current = found
            _remember(batch.known, job.target, *found)

    async def _write(self, jobs: list[_Job], batch: _Batch, written: list[_Job]) -> list[_Job]:
        """Decide each job on its copy and send the writes; returns the jobs to read and decide again (412)."""
        puts: list[tuple[_Job, str, bool]] = []
        entries: list[dict[str, Any]] = []
        creates: list[tuple[_Job, dict[str, Any]]] = []
        unmade: list[_Job] = []  # releases of a resource of the row's old type that does not exist
        again: list[_Job] = []
        for job in jobs:
            target = job.target
            if job.plan.heal_only and job.current is None:
                job.outcome = Converged("stale")  # nothing there its earlier try could have written
                continue
            if job.absent and target.fhir_id and target.fhir_id_unsure:
                # The id named no resource of this type (it was the row's under another type): find it by the row
                # identifier instead, as a row without a FHIR id is found.
                job.target, job.absent, job.copied = evolve(target, fhir_id=None, fhir_id_unsure=False), False, False
                again.append(job)
                continue
            if target.fhir_id_unsure and job.current is not None and not isinstance(job.edit, RemoveItem | Release) \
                    and not _carries(job.current[0], target, job.edit):
                # A resource of this type under the id exists, but nothing says it is the row's: the id may have
                # been given to the row under its other type, and this one be another record entirely.
                job.outcome = WritebackError(
                    Reason.TARGET_PENDING, f"{target.resource_type}/{target.fhir_id}, which the row's FHIR id names, "
                    "does not carry this row, and the row's type changed: waiting for the row's earlier messages to "
                    "tell which type that id was given under (after two tries it is found by the row identifier).")
                continue
            if job.absent and target.fhir_id is None and target.may_exist and isinstance(job.edit, RowEdit):
                # Before making the row's resource of this type: the one it left when its type changed earlier, if
                # any, is under the row's own id (without the row identifier); it is taken up again, kept as it is.
                job.target, job.absent, job.copied = evolve(target, fhir_id=target.new_id), False, False
                again.append(job)
                continue
            if job.absent and target.fhir_id and not target.may_exist \
                    and not isinstance(job.edit, RemoveItem | Release):
                job.outcome = target_gone(target)
                continue
            current = job.current[0] if job.current is not None else None
            if isinstance(job.edit, Release) and current is None and target.new_id:
                unmade.append(job)  # (see below: nothing to leave, once no older create can make it any more)
                continue
            try:
                decided = converge(current, _resolved(job.edit, job.plan, batch, creating=current is None),
                                   target.resource_type,
                                   target.new_id or resource_id(target.table, target.identifier_value),
                                   retried=job.plan.source.retried)
            except WritebackError as exc:
                job.outcome = exc
                continue
            if job.plan.heal_only and decided.kind in ("write", "absent", "pending"):
                # A retry a newer change overtook writes nothing: as `stale`, it only looks for the version it
                # may have written and owes a Provenance (`_heal`).
                decided = Converged("stale", held=decided.held)
            if decided.kind == "absent" and current is not None:
                # The resource is there, the row's item in it is not: a change sent without images holds only some
                # of the item's columns and cannot make it (its Create, or a save with images, does).
                job.outcome = WritebackError(
                    Reason.TARGET_PENDING, f"The item of {job.plan.source.table} {job.plan.source.record_id} is not "
                    f"in {target.resource_type}/{_resource_id(job)} yet, and this change (a step without images) "
                    "holds only some of its columns: waiting for its Create, or a save sent with images.")
            elif decided.kind == "absent":
                job.outcome = target_pending(target)
            elif decided.kind == "pending" and not job.copied:
                job.outcome = WritebackError(
                    Reason.TARGET_PENDING, f"An earlier save of {job.plan.source.table} {job.plan.source.record_id} "
                    f"has not been received yet, and {target.resource_type}/{_resource_id(job)} came from FHIR: that "
                    "save tells which of its items are the row's. Waiting for it once, then written.")
            elif decided.kind != "write" and job.copied:
                # Only the server's copy may say that nothing needs writing: another system may have changed the
                # resource since this call wrote it.
                job.copied = False
                again.append(job)
            elif decided.kind != "write":
                job.outcome = decided
            elif job.current is None:
                assert decided.resource is not None
                creates.append((job, decided.resource))
            else:
                assert decided.resource is not None
                resource_id_ = str(job.current[0].get("id"))
                puts.append((job, resource_id_, False))
                entries.append({"resource": self.client.stamp(decided.resource),
                                "request": {"method": "PUT", "url": f"{target.resource_type}/{resource_id_}",
                                            "ifMatch": f'W/"{job.current[1]}"'}})
        # Long enough for a create's request with all its retries (then it is answered, or it was cancelled at the
        # invocation's deadline, inside the lock).
        lease = self.settings.retry_max_seconds + self.settings.timeout_seconds
        leased_at = time.monotonic()  # (before the lease is taken: its expiry is reckoned from then)
        if unmade:
            # The row's resource of its old type is not there to leave: but an older message of the row (its Create,
            # on another instance, which read "absent" too) may be about to make it, and it would then stand for
            # the row beside the new type's for good. The release takes that resource's create lease and keeps it
            # until it expires, as a create does: an older create that has not taken it yet cannot any more (its
            # retry is `stale` by the row facts this change leaves); a newer one can (`leases.take`). One that
            # holds it is creating it now: the release is tried again later, and leaves what it made.
            held = await asyncio.gather(*(batch.leases.acquire(f"{job.target.resource_type}/{job.target.new_id}",
                                                               lease, RELEASE_HOLDER, job.edit.mark.version.stored())
                                          for job in unmade), return_exceptions=True)
            for job, mine in zip(unmade, held, strict=True):
                if isinstance(mine, BaseException) and not isinstance(mine, WritebackError):
                    raise mine
                job.outcome = mine if isinstance(mine, WritebackError) else (
                    Converged("same") if mine else being_created(job.target))
        # The creates of this call hold their leases under a name of their own, so that giving one back can never
        # give back another caller's (one that took it over after it expired while this call was held up).
        creator = f"create-{uuid.uuid4().hex}"
        if creates:
            held = await asyncio.gather(*(batch.leases.acquire(f"{job.target.resource_type}/{resource['id']}", lease,
                                                               creator, job.edit.mark.version.stored())
                                          for job, resource in creates), return_exceptions=True)
            for (job, resource), mine in zip(creates, held, strict=True):
                if isinstance(mine, WritebackError):  # the lease store is out of reach: this create waits
                    job.outcome = mine
                    continue
                if isinstance(mine, BaseException):
                    raise mine
                if not mine:
                    job.outcome = being_created(job.target)
                    continue
                puts.append((job, str(resource["id"]), True))
                entries.append({"resource": self.client.stamp(resource),
                                "request": {"method": "PUT", "url": f"{job.target.resource_type}/{resource['id']}"}})
        window = SendWindow(leased_at + lease - self.settings.timeout_seconds) \
            if any(created for _, _, created in puts) else None
        try:
            answered = await self.send(entries, window)
        except BaseException:
            # Stopped (the invocation's deadline) before any of it could be applied (a create refused 401, its new
            # token still on its way): its leases are given back, or its own retry would meet them as another
            # instance's create, `conflict` (found by review).
            if window is not None and window.unapplied:
                await _give_back(batch.leases, [f"{job.target.resource_type}/{rid}" for job, rid, created in puts
                                                if created], creator, self.settings.timeout_seconds)
            raise
        # A create the server refused frees its lease at once: nothing was written, the next try may create. One
        # that was applied keeps it until it expires, so that a writer that read "absent" before it cannot PUT an
        # older state over it (it gets `conflict`, and its retry reads the resource); one whose answer never
        # came, or an earlier try of which may have been applied, keeps it too.
        released = await asyncio.gather(*(
            batch.leases.release(f"{job.target.resource_type}/{resource_id_}", creator)
            for (job, resource_id_, created), put in zip(puts, answered, strict=True)
            if created and (isinstance(put, NotApplied) or (
                isinstance(put, Answer) and not put.ok and not put.resent))), return_exceptions=True)
        # A lease not released expires on its own (the create then waits that long); only that is lost.
        for failed in released:
            if isinstance(failed, BaseException) and not isinstance(failed, WritebackError):
                raise failed
        for (job, resource_id_, created), put in zip(puts, answered, strict=True):
            if isinstance(put, WritebackError):
                job.outcome = put
            elif put.status in (409, 412):
                job.copied = False
                again.append(job)  # changed concurrently: read it again and decide again
            elif put.status in (404, 410):
                job.outcome = vanished(job.target, resource_id_)
            elif not put.ok:
                job.outcome = refused(put.status, put.outcome, "update" if not created else "create")
            else:
                version = version_from(put.etag, put.resource)
                if not version:
                    job.outcome = unversioned_update()
                    continue
                if put.resource is not None:
                    _remember(batch.known, job.target, put.resource, version)
                if job.target.fhir_id is None:  # an answer without a body still names the resource it wrote
                    job.target = evolve(job.target, fhir_id=resource_id_)
                job.outcome = _Written(f"{job.target.resource_type}/{resource_id_}/_history/{version}", created,
                                       _entry_issues(put))
                if created and put.resent:
                    # The create went out twice: the first may have made the resource and the second another
                    # version of it. Which version is the CREATE is read from its history (`_heal`).
                    job.owed = True
                else:
                    written.append(job)
        return again

    async def _provenance(self, jobs: list[_Job]) -> None:
        settings = self.settings
        made = []
        for job in jobs:
            assert isinstance(job.outcome, _Written)
            made.append(build_provenance(job.plan.source, job.outcome.versioned, created=job.outcome.created,
                                         agent=settings.agent, meta_source=settings.meta_source))
        entries = [{"resource": p, "request": {"method": "PUT", "url": f"Provenance/{p['id']}"}} for p in made]
        for job, provenance, answer in zip(jobs, made, await self.send(entries), strict=True):
            if isinstance(answer, WritebackError):
                job.provenance = provenance_unwritten(answer)
            elif not answer.ok:
                job.provenance = provenance_refused(answer.status, answer.outcome)
            else:
                version = version_from(answer.etag, answer.resource) or ""
                job.provenance = f"Provenance/{provenance['id']}" + (f"/_history/{version}" if version else "")

    async def _heal(self, jobs: list[_Job]) -> None:
        """Every version that took a job's row version must have its one Provenance: a message that finds its
        version in place (`same`: its earlier try, a resent request or another copy of it wrote it; or, tried
        again, `stale`) may have written a version whose Provenance failed or was never sent."""
        located = [(job, rid) for job in jobs if (rid := _resource_id(job))]
        if not located:
            return
        histories = await self.send([{"request": {"method": "GET", "url": f"{job.target.resource_type}/{rid}/"
                                                  f"_history?_count={HISTORY_DEPTH}"}} for job, rid in located])
        owed: list[tuple[_Job, str, bool]] = []
        for (job, _), answer in zip(located, histories, strict=True):
            if isinstance(answer, Answer) and answer.ok and answer.resource is not None:
                owed += [(job, versioned, first) for versioned, first in self._versions_of(job, answer.resource)]
            elif job.owed:
                job.provenance = WritebackError(Reason.PROVENANCE_FAILED, "the history of a resource created by a "
                                                "resent request could not be read to write its Provenance")
        found = await self.send([{"request": {"method": "GET", "url": f"Provenance/{provenance_id(v)}"}}
                                 for _, v, _ in owed])
        missing = [(job, v, first) for (job, v, first), answer in zip(owed, found, strict=True)
                   if isinstance(answer, Answer) and answer.status in (404, 410)]
        settings = self.settings
        made = [build_provenance(job.plan.source, v, created=first, agent=settings.agent,
                                 meta_source=settings.meta_source) for job, v, first in missing]
        answers = await self.send([{"resource": p, "request": {"method": "PUT", "url": f"Provenance/{p['id']}"}}
                                   for p in made])
        failed = {id(job) for (job, _, _), answer in zip(missing, answers, strict=True)
                  if isinstance(answer, WritebackError) or not answer.ok}
        for job, versioned, first in missing:
            if id(job) not in failed and isinstance(job.outcome, Converged):
                # It found its own version in place, with no Provenance: this message's earlier try (or resent
                # request) wrote it. It did write, and now the version has its Provenance.
                job.outcome = _Written(versioned, first, ())
                job.provenance = f"Provenance/{provenance_id(versioned)}"
        for job, _ in located:
            if id(job) in failed:
                job.provenance = WritebackError(Reason.PROVENANCE_FAILED, "the Provenance of a version this message "
                                                "wrote could not be written")
            elif job.owed and isinstance(job.outcome, _Written) and job.provenance is None:
                job.provenance = f"Provenance/{provenance_id(job.outcome.versioned)}"

    def _versions_of(self, job: _Job, history: Mapping[str, Any]) -> list[tuple[str, bool]]:
        """The versions in a history bundle (newest first) written by this product (meta.source) that hold this
        job's row version, each with whether it is the version that created the resource."""
        resources = [e.get("resource") for e in history.get("entry") or [] if isinstance(e, dict)]
        oldest_first = [r for r in reversed(resources) if isinstance(r, dict)]
        complete = len(resources) < HISTORY_DEPTH  # else the oldest version shown is not the first
        want = job.edit.mark.version
        out: list[tuple[str, bool]] = []
        before: Mapping[str, Any] | None = None
        took = False  # the version before held the job's row version too
        for n, resource in enumerate(oldest_first):
            held = _marked(resource, job.edit)
            ours = (resource.get("meta") or {}).get("source") == self.settings.meta_source
            version = str((resource.get("meta") or {}).get("versionId") or "")
            holds = held is not None and held.compare(want) == 0
            # A version that only kept the row version another write left (a later change of other columns, a
            # child row's item written into the resource) is that write's: its Provenance is its own. One that
            # repeats the one before exactly is a resent request's (a server that versions an identical PUT).
            if holds and ours and version and (not took or (before is not None and comparable(resource)
                                                             == comparable(before))):
                out.append((f"{job.target.resource_type}/{resource.get('id')}/_history/{version}",
                            n == 0 and complete))
            took, before = holds, resource
        return out

    # ---- bundles ---------------------------------------------------------------------------------

    async def send(self, entries: Sequence[dict[str, Any]],
                   window: SendWindow | None = None) -> list[Answer | WritebackError]:
        """The entries as batch bundles of at most `bundle_size`, concurrently; one answer per entry, in order.
        `window`: a create lease's (`FhirClient.request`)."""
        if not entries:
            return []
        size = self.settings.bundle_size
        chunks = [entries[i:i + size] for i in range(0, len(entries), size)]

        async def one(chunk: Sequence[dict[str, Any]]) -> list[Answer | WritebackError]:
            # Only a bundle holding a create is bound by the create lease's window: an If-Match update is safe
            # whenever it goes (found by review: updates sharing a wave with one create were refused).
            bound = window if any(_creates(entry) for entry in chunk) else None
            async with self._slots:
                return await self._bundle(chunk, bound)

        answered = await asyncio.gather(*(one(c) for c in chunks))
        return [a for chunk in answered for a in chunk]

    async def _bundle(self, entries: Sequence[dict[str, Any]],
                      window: SendWindow | None = None) -> list[Answer | WritebackError]:
        out: list[Answer | WritebackError | None] = [None] * len(entries)
        todo = list(range(len(entries)))
        started, slept, attempt = time.monotonic(), 0.0, 0
        maybe_applied: set[int] = set()  # entries an earlier answer does not rule out were applied
        while todo:
            bundle = {"resourceType": "Bundle", "type": "batch", "entry": [entries[i] for i in todo]}
            try:
                response = await self.client.request("POST", self.client.base_url, json=bundle,
                                                     headers=BATCH_HEADERS, window=window)
            except WritebackError as exc:
                for i in todo:
                    out[i] = exc
                break
            if not response.is_success:
                await self._refused_whole(entries, todo, response.status_code, json_of(response), out, window=window)
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
            resent = bool(response.extensions.get("writeback.resent"))
            for i, raw in zip(todo, listed, strict=True):
                answer = _answer(raw, resent or i in maybe_applied)
                if answer.status in RETRY_STATUSES:
                    again.append(i)
                    failure = answer.status
                    if resent or answer.status not in NOT_APPLIED_STATUSES:
                        maybe_applied.add(i)
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
            # The wait a throttled entry's answer asks for, which the Azure FHIR service puts on the bundle's own
            # answer (found by review: resent after a quarter second, told to wait seconds)
            wait = retry_after(response)
            delay = wait if wait is not None else random.uniform(backoff / 2, backoff)  # noqa: S311 (jitter)
            spent = max(time.monotonic() - started, slept)
            if attempt > self.settings.max_retries or spent + delay > self.settings.retry_max_seconds:
                for i in todo:
                    method = str(entries[i]["request"]["method"])
                    where = str(entries[i]["request"]["url"]).split("?", maxsplit=1)[0]
                    kind = WritebackError if i in maybe_applied else NotApplied
                    out[i] = kind(Reason.FHIR_UNAVAILABLE,
                                  f"{method} {where} kept failing (HTTP {failure}) after {attempt} tries")
                break
            await self.client._sleep(delay)
            slept += delay
        return [a if a is not None else WritebackError(Reason.FHIR_REJECTED, "no answer") for a in out]


    async def _refused_whole(self, entries: Sequence[dict[str, Any]], todo: list[int], status: int,
                             body: dict[str, Any] | None, out: list[Answer | WritebackError | None],
                             *, window: SendWindow | None = None) -> None:
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
        answered = await asyncio.gather(*(self._bundle([entries[i] for i in part], window) for part in parts))
        for part, answers in zip(parts, answered, strict=True):
            for i, answer in zip(part, answers, strict=True):
                out[i] = answer


def _carries(resource: Mapping[str, Any], target: Target, edit: Edit) -> bool:
    """Whether the resource says it is the row's: its mark (or tombstone), or the row identifier."""
    table, row_id = edit.mark.table, edit.mark.row_id
    if mark_of(dict(resource), table, row_id) or mark_of(dict(resource), table, row_id, MOVED):
        return True
    return any(isinstance(i, dict) and i.get("system") == target.identifier_system
               and i.get("value") == target.identifier_value for i in resource.get("identifier") or [])


def _resource_id(job: _Job) -> str:
    if job.current is not None and job.current[0].get("id"):
        return str(job.current[0]["id"])
    return job.target.fhir_id or ""


def _marked(resource: Mapping[str, Any], edit: Edit) -> Version | None:
    """The version of the edit's row that a copy holds (on the resource, on its item, or as a tombstone); for a
    change without images, the version that wrote its columns, when it is the change's own."""
    table, row_id = edit.mark.table, edit.mark.row_id
    if isinstance(edit, RowEdit):
        mark = mark_of(dict(resource), table, row_id)
    elif isinstance(edit, ItemEdit):
        item = item_of(resource.get(edit.element) or [], table, row_id)
        mark = mark_of(item, table, row_id) if item is not None else None
    else:
        mark = mark_of(dict(resource), table, row_id, MOVED)
    if mark is None:
        return None
    if isinstance(edit, RowEdit | ItemEdit) and not edit.full:
        want = edit.mark.version
        if any((mark.column(a.column) or Version()).compare(want) == 0 for a in edit.owned if a.column):
            return want
    return mark.version


def _resolved(edit: Edit, plan: WritePlan, batch: _Batch, *, creating: bool = False) -> Edit:
    """The edit with its lookups as FHIR references (`Type/<id>` where the id is known); `creating` (no resource
    yet), its rendered state too, which a create writes."""
    if isinstance(edit, RemoveItem | Release) or not plan.refs:
        return edit
    ids = {**batch.ids, **plan.ref_ids}
    owned = tuple(Assignment(a.path, resolve_refs(a.value, ids), a.column) if isinstance(a.value, RowRef) else a
                  for a in edit.owned)
    if isinstance(edit, RowEdit):
        return evolve(edit, owned=owned, rendered=resolve_refs_in(edit.rendered, edit.owned, ids)
                       if creating and edit.rendered is not None else None)
    return evolve(edit, owned=owned)


def _creates(entry: Mapping[str, Any]) -> bool:
    """A resource `PUT` without If-Match: a create under the row's id."""
    request = entry.get("request") or {}
    return request.get("method") == "PUT" and "ifMatch" not in request


async def _give_back(leases: Leases, names: Sequence[str], holder: str, seconds: float) -> None:
    """Release these leases, within `seconds`: one not released expires on its own."""
    try:
        async with asyncio.timeout(seconds):
            await asyncio.gather(*(leases.release(name, holder) for name in names), return_exceptions=True)
    except TimeoutError:
        pass


def _made_as(job: _Job) -> tuple[str, str]:
    """The resource a job makes if it finds none: under the row's own id (`decide.resource_id`)."""
    target = job.target
    return target.resource_type, target.new_id or resource_id(target.table, target.identifier_value)


def _makers(job: _Job, making: Mapping[tuple[str, str], _Job], batch: _Batch) -> list[tuple[RowRef, _Job]]:
    """The lookups of this job that name a resource another job of its wave creates (or was to), with that job."""
    if not job.plan.refs or isinstance(job.edit, RemoveItem | Release):
        return []
    found = []
    for ref in job.plan.refs:
        fhir_id = job.plan.ref_ids.get(ref) or batch.ids.get(ref)  # as `_resolved` makes the reference
        maker = making.get((ref.resource_type, fhir_id)) if fhir_id else None
        if maker is not None and maker is not job:
            found.append((ref, maker))
    return found


def _leaves(job: _Job) -> bool:
    """A release of the resource a row leaves because its FHIR id now names another one (`facts.resolve`)."""
    return job.target.by_id_only and isinstance(job.edit, Release)


def _waves_of(jobs: list[_Job]) -> list[list[_Job]]:
    return [[jobs[i] for i in wave] for wave in waves([job.target for job in jobs])]


def _row_written(jobs: list[_Job], leaving: _Job) -> bool:
    """Whether the row's own write of `leaving`'s plan is made (written, or its values already there)."""
    own = next((job for job in jobs if job.plan is leaving.plan and isinstance(job.edit, RowEdit)), None)
    return own is not None and (isinstance(own.outcome, _Written) or (
        isinstance(own.outcome, Converged) and own.outcome.kind in ("unchanged", "same")))


def _outcome(jobs: list[_Job]) -> Outcome:
    """A plan's outcome from its jobs: the first error, else what was written, else why nothing was."""
    for job in jobs:
        if isinstance(job.outcome, WritebackError):
            return job.outcome
        if isinstance(job.provenance, WritebackError):
            return job.provenance
    # (Not a heal-only job's: the resource it read is one a newer change left, the row's no more.)
    ids = tuple((job.target.row, f"{job.target.resource_type}/{fid}") for job in jobs if not isinstance(
        job.edit, Release) and not job.plan.heal_only and (
        fid := str(job.current[0].get("id") or "") if job.current is not None else job.target.fhir_id))
    written = [job for job in jobs if isinstance(job.outcome, _Written)]
    if written:
        first = written[0]
        assert isinstance(first.outcome, _Written)
        if not isinstance(first.provenance, str):  # a version owed its Provenance whose history was never read
            return WritebackError(Reason.PROVENANCE_FAILED, "the Provenance of a version this message wrote "
                                  "could not be written")
        also = tuple(str(job.outcome.versioned) for job in written[1:] if isinstance(job.outcome, _Written))
        return Delivered(first.outcome.versioned, first.provenance, first.outcome.issues, also=also, ids=ids)
    kinds = [job.outcome.kind for job in jobs if isinstance(job.outcome, Converged)]
    held = next((job.outcome.held for job in jobs if isinstance(job.outcome, Converged) and job.outcome.held), None)
    if "stale" in kinds:
        detail = (f"The FHIR server already holds a newer version of this row ({held.text() if held else '?'}); "
                  "this change is part of it.")
        return Delivered(skipped=Reason.STALE, detail=detail, ids=ids)
    detail = ("The FHIR server already holds this version of the row." if "same" in kinds
              else "The FHIR server already holds these values.")
    return Delivered(skipped=Reason.NO_CHANGE, detail=detail, ids=ids)


async def _cancelled(tasks: Sequence[asyncio.Task[Any]]) -> None:
    """Cancel `tasks` and wait until they have stopped."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _read_entry(target: Target) -> dict[str, Any]:
    return {"request": {"method": "GET", "url": read_path(target)}}


def _search_entry(ref: RowRef) -> dict[str, Any]:
    return {"request": {"method": "GET",
                        "url": f"{ref.resource_type}?{identifier_search(ref.system, ref.row_id)}&_count=2"}}


def _found_id(ref: RowRef, answer: Answer) -> str | None:
    """The id of the one resource a lookup's search found."""
    if answer.ok and answer.resource is not None:
        found = [e["resource"] for e in answer.resource.get("entry") or []
                 if isinstance(e, dict) and isinstance(e.get("resource"), dict)
                 and e["resource"].get("resourceType") == ref.resource_type]
        if len(found) == 1 and found[0].get("id"):
            return str(found[0]["id"])
    return None


def _remember(known: Known, target: Target, resource: dict[str, Any], version: str) -> None:
    if resource.get("resourceType") != target.resource_type or not resource.get("id"):
        return
    for key in _keys(target):
        known[key] = (resource, version)
    known[(target.resource_type, "id", str(resource["id"]))] = (resource, version)


def _current(target: Target, answer: Answer | WritebackError) -> Current | None:
    """What a write applies to, from a read or search entry; None when the resource does not exist."""
    if isinstance(answer, WritebackError):
        raise answer
    if target.fhir_id:
        if answer.status in (404, 410):
            return None
        if not answer.ok:
            raise refused(answer.status, answer.outcome, "read")
        version = version_from(answer.etag, answer.resource)
        if answer.resource is None or version is None:
            raise unversioned_read()
        return answer.resource, version
    if not answer.ok:
        raise refused(answer.status, answer.outcome, "search")
    return found_target(target, answer.resource or {})
