"""Reliability rig: the delivery rig (real FHIR dev server behind a FaultyTransport, fake sleep) plus the Table
Storage ledger in Azurite, a small Service Bus simulator that settles and redelivers as the broker does, faults
aimed at the kind of FHIR batch bundle they hit, and the invariant every scenario ends with."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from devtools.faults import Fault
from devtools.messages import context
from devtools.services import Azurite
from tests.delivery.conftest import Fhir, Rig, create_message, fhir, maps, new_patient, rig_factory, update_message
from tests.expectations import expected_contact
from tests.reliability.figures import FIGURES, report
from writeback.marks import Version, mark_of
from writeback.outcomes import OutcomeStore
from writeback.pipeline import Envelope, Pipeline, Result
from writeback.reasons import Reason
from writeback.settings import Settings

__all__ = ["fhir", "maps", "rig_factory"]  # fixtures shared with the delivery tests

MAX_DELIVERY_COUNT = 5
IDENTIFIER_SYSTEM = "urn:dataverse:contact"
META_SOURCE = "urn:test:writeback"  # WRITEBACK_META_SOURCE of the delivery rig (tests/delivery/conftest.py)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.write_line(report())


# ---- the broker ---------------------------------------------------------------------------------------------


@dataclass
class Final:
    """How a broker message left the queue: completed or dead-lettered, once."""

    settlement: str  # complete | deadletter
    state: str
    reason: str | None  # dead-letter reason (the Result's reason, or MaxDeliveryCountExceeded)
    description: str
    result: Result


@dataclass
class Queued:
    seq: int
    envelope: Envelope
    row: str | None = None


@dataclass
class Broker:
    """A queue of envelopes. complete/deadletter end a message; abandon puts it back at its place (its sequence
    number) with delivery_count + 1, and after MaxDeliveryCount deliveries dead-letters it with
    MaxDeliveryCountExceeded, as Service Bus does."""

    pipeline: Pipeline
    max_delivery: int = MAX_DELIVERY_COUNT
    # Called after each delivery's settlement (e.g. to end an outage after N failures).
    after: Callable[[Queued, Result], Awaitable[None]] | None = None
    queue: deque[Queued] = field(default_factory=deque)
    finals: dict[int, list[Final]] = field(default_factory=dict)
    results: dict[int, list[Result]] = field(default_factory=dict)
    rows: dict[int, str | None] = field(default_factory=dict)
    deliveries: int = 0
    _seq: int = 0

    def send(self, body: dict[str, Any] | bytes | str, row: str | None = None, **kw: Any) -> int:
        self._seq += 1
        raw = json.dumps(body).encode() if isinstance(body, dict) else body
        kw.setdefault("message_id", uuid.uuid4().hex)
        self.queue.append(Queued(self._seq, Envelope(raw, **kw), row))
        self.rows[self._seq] = row
        FIGURES["messages"] += 1
        return self._seq

    def _requeue(self, item: Queued) -> None:
        position = next((i for i, other in enumerate(self.queue) if other.seq > item.seq), len(self.queue))
        self.queue.insert(position, item)

    async def _deliver(self, item: Queued) -> None:
        self.deliveries += 1
        FIGURES["deliveries"] += 1
        await self._settle(item, await self.pipeline.process(item.envelope))

    async def _deliver_batch(self, items: list[Queued]) -> None:
        """One invocation of the batch trigger: `process_many`, then each message settled on its own result."""
        self.deliveries += len(items)
        FIGURES["deliveries"] += len(items)
        results = await self.pipeline.process_many([item.envelope for item in items])
        for item, result in zip(items, results, strict=True):
            await self._settle(item, result)

    async def _settle(self, item: Queued, result: Result) -> None:
        self.results.setdefault(item.seq, []).append(result)
        settlement = result.settlement
        if settlement == "complete":
            self.finals.setdefault(item.seq, []).append(Final("complete", result.state, None, result.detail, result))
        elif settlement == "deadletter":
            assert result.reason is not None
            self.finals.setdefault(item.seq, []).append(
                Final("deadletter", result.state, result.reason.value, result.detail, result))
        elif item.envelope.delivery_count >= self.max_delivery:
            reason = result.reason.value if result.reason else "?"
            self.finals.setdefault(item.seq, []).append(Final(
                "deadletter", "dead-lettered", "MaxDeliveryCountExceeded",
                f"Message could not be consumed after {self.max_delivery} delivery attempts (last: {reason}: "
                f"{result.detail})", result))
        else:
            envelope = item.envelope
            self._requeue(Queued(item.seq, Envelope(
                envelope.body, envelope.properties, envelope.content_type, envelope.message_id,
                envelope.delivery_count + 1), item.row))
        if self.after is not None:
            await self.after(item, result)

    async def run(self, concurrency: int = 1, batch: int = 0) -> None:
        """Deliver until the queue is empty; with concurrency > 1, several receivers at once; with batch > 0,
        up to `batch` messages per invocation (the cardinality-many trigger)."""

        async def receiver() -> None:
            while self.queue:
                if batch:
                    items = [self.queue.popleft() for _ in range(min(batch, len(self.queue)))]
                    await self._deliver_batch(items)
                else:
                    await self._deliver(self.queue.popleft())

        await asyncio.gather(*(receiver() for _ in range(concurrency)))

    def final(self, seq: int) -> Final:
        [final] = self.finals[seq]
        return final


class Deliveries:
    """Deliveries a scenario stages itself, message by message, on the pipeline (instance) it chooses: what the
    broker would do, in an order the broker would not choose on its own. Kept in the shape `check_invariant`
    reads (rows, finals, results by logical message)."""

    def __init__(self) -> None:
        self.rows: dict[int, str | None] = {}
        self.finals: dict[int, list[Final]] = {}
        self.results: dict[int, list[Result]] = {}
        self.bodies: dict[int, tuple[bytes, str]] = {}  # body, MessageId
        self.deliveries = 0

    def send(self, body: dict[str, Any], row: str | None) -> int:
        """Dataverse posts a message (a copy posted twice is two messages with one RequestId)."""
        seq = len(self.rows) + 1
        self.rows[seq], self.bodies[seq] = row, (json.dumps(body).encode(), uuid.uuid4().hex)
        FIGURES["messages"] += 1
        return seq

    async def deliver(self, pipeline: Pipeline, *seqs: int, delivery_count: int = 1,
                      settles: bool = True) -> list[Result]:
        """One invocation on `pipeline` holding these messages (a batch when more than one). `settles` False: its
        lock lapsed while it worked (the message went to another instance), so its settlement is refused and
        the message does not end here."""
        envelopes = [Envelope(self.bodies[seq][0], message_id=self.bodies[seq][1], delivery_count=delivery_count)
                     for seq in seqs]
        self.deliveries += len(seqs)
        FIGURES["deliveries"] += len(seqs)
        results = await pipeline.process_many(envelopes)
        for seq, result in zip(seqs, results, strict=True):
            self.results.setdefault(seq, []).append(result)
            if not settles:
                continue
            if result.settlement == "complete":
                self.finals.setdefault(seq, []).append(Final("complete", result.state, None, result.detail, result))
            elif result.settlement == "deadletter":
                reason = result.reason.value if result.reason else "?"
                self.finals.setdefault(seq, []).append(Final("deadletter", result.state, reason, result.detail,
                                                             result))
        return results


# ---- faults aimed at one kind of batch bundle ----------------------------------------------------------------


def entry_kind(entry: Mapping[str, Any]) -> str:
    """What a batch entry does: `read` (a GET of a resource or a search), `create` (PUT without If-Match: the
    row's own id), `update` (PUT with If-Match), `provenance` (PUT Provenance/<id>), `check` (a GET of a history
    or of a Provenance: the look a retried message takes for a Provenance it owes)."""
    request = entry.get("request") or {}
    method, url = request.get("method"), str(request.get("url", ""))
    if method == "GET":
        return "check" if url.startswith("Provenance") or "/_history" in url else "read"
    if url.startswith("Provenance/"):
        return "provenance"
    return "update" if "ifMatch" in request else "create"


def bundle_entries(request: httpx.Request) -> list[dict[str, Any]]:
    if request.method != "POST" or not request.url.path.endswith("/R4"):
        return []
    try:
        body = json.loads(request.content)
    except ValueError:
        return []
    entries = body.get("entry") if isinstance(body, dict) else None
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


@dataclass
class BundleFault(Fault):
    """A fault on the FHIR batch bundles (one HTTP request each) that hold an entry of one kind (`entry_kind`),
    optionally only for entries whose URL contains `entry_url`: 429s, 5xx, resets and timeouts happen to whole
    requests, and a bundle of reads fails differently from one of writes (a write may have been applied)."""

    method: str | None = "POST"
    path_endswith: str = "/R4"
    holding: str = ""
    entry_url: str = ""

    def matches(self, request: httpx.Request) -> bool:
        if not super().matches(request):
            return False
        return any(entry_kind(e) == self.holding and self.entry_url in str((e.get("request") or {}).get("url", ""))
                   for e in bundle_entries(request))


def lose_response(request: httpx.Request, response: httpx.Response) -> httpx.Response:
    """The server applied the request, but the answer never arrives."""
    raise httpx.ReadTimeout("injected: response lost after the server applied the request", request=request)


# ---- the ledger ---------------------------------------------------------------------------------------------


@pytest.fixture
def ledger_settings(azurite_tables: Azurite) -> Settings:
    """One scenario's outcome tables; every instance of the scenario opens its own connection to them."""
    return Settings(outcomes_connection_string=azurite_tables.connection_string,
                    outcomes_table_prefix="rel" + uuid.uuid4().hex[:12])


@pytest.fixture
async def ledger(ledger_settings: Settings) -> AsyncIterator[OutcomeStore]:
    async with OutcomeStore.from_settings(ledger_settings, retry_total=1, retry_backoff=0.05) as store:
        await store.ensure_tables()
        yield store


@pytest.fixture
def wired(rig_factory: Callable[..., Rig], ledger: OutcomeStore) -> Callable[..., tuple[Rig, Pipeline]]:
    """A rig and a pipeline over its delivery with the Table Storage ledger."""

    def make(**overrides: str) -> tuple[Rig, Pipeline]:
        rig = rig_factory(**overrides)
        return rig, Pipeline(rig.pipeline.maps, rig.settings, rig.pipeline.delivery, ledger)

    return make


# ---- Dataverse rows that change over time --------------------------------------------------------------------


class Row:
    """One contact row: a Create, then Updates with a growing versionnumber, sent as a step registered with pre
    and post images sends them (`update`: the whole row) or as one registered without images (`target_only`)."""

    def __init__(self, **columns: Any) -> None:
        self.id, self.state = new_patient(**columns)

    @property
    def version(self) -> int:
        return int(self.state["versionnumber"])

    def create(self) -> dict[str, Any]:
        return create_message(self.id, self.state)

    def _next(self, changes: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        before = dict(self.state)
        changes = {**changes, "versionnumber": self.version + 1}
        self.state = {**before, **changes}
        return before, changes

    def update(self, **changes: Any) -> dict[str, Any]:
        before, changes = self._next(changes)
        return update_message(self.id, before, changes)

    def target_only(self, **changes: Any) -> dict[str, Any]:
        """An Update without images: only the changed columns, plus the type and consent columns a contact's
        Target must hold to be written at all (README, Entity maps)."""
        _, changes = self._next(changes)
        kept = {c: self.state[c] for c in ("msemr_contacttype", "msemr_azurefhirsyncenabled")}
        return context("Update", "contact", self.id, {**kept, **changes})


# ---- the invariant --------------------------------------------------------------------------------------------

def mapped_state(resource: Mapping[str, Any] | None) -> dict[str, Any]:
    """Every element the contact map owns, as the server holds it (None: no resource). A second official name,
    a second phone of one use or a second home address, parallel to the one the map owns, shows as a key of its
    own, which no Dataverse row expects."""
    if resource is None:
        return {}
    state: dict[str, Any] = {}
    names = [n for n in resource.get("name", []) if n.get("use") == "official"]
    homes = [a for a in resource.get("address", []) if a.get("use") == "home"]
    for what, found in (("official names", names), ("home addresses", homes)):
        if len(found) > 1:
            state[what] = len(found)
    name = names[0] if names else {}
    home = {k: v for k, v in (homes[0] if homes else {}).items() if k != "use"}
    for telecom in resource.get("telecom", []):
        system, use = telecom.get("system"), telecom.get("use")
        key = f"phone/{use}" if system == "phone" and use in ("work", "home", "mobile") else \
            "email" if system == "email" else None
        if key is not None:
            state[key if key not in state else f"second {key}"] = telecom.get("value")
    state |= {"given": name.get("given"), "family": name.get("family"), "birthDate": resource.get("birthDate"),
              "gender": resource.get("gender"), "address": home or None}
    return {k: v for k, v in state.items() if v is not None}


@dataclass
class Audit:
    """What the history of one row's resource says about our writes."""

    versions: int = 0  # versions this product wrote (meta.source)
    problems: list[str] = field(default_factory=list)
    missing: int = 0  # versions of ours without a Provenance
    extra: int = 0  # Provenances beyond one per version of ours, or naming a version not ours
    ours: set[str] = field(default_factory=set)  # versioned references of ours
    last_mark: Version | None = None


def audit_history(fhir: Fhir, resource: Mapping[str, Any], table: str, row_id: str, *,
                  complete: bool = True) -> Audit:
    """Each version this product wrote has exactly one Provenance naming it exactly (CREATE for the version that
    made the resource, UPDATE after), a version anyone else wrote has none, and the row version marked in the
    resource never goes back (nothing older overwrote anything newer). `complete` False: a Provenance may be
    missing (a fault that never ends refused it)."""
    kind, rid = resource["resourceType"], resource["id"]
    history = [e["resource"] for e in fhir.get(f"{kind}/{rid}/_history?_count=100").get("entry", [])]
    audit = Audit()
    for n, version in enumerate(reversed(history)):  # oldest first
        versioned = f"{kind}/{rid}/_history/{version['meta']['versionId']}"
        provenances = fhir.search(f"Provenance?target={versioned}")
        mark = mark_of(version, table, row_id)
        if mark is not None:
            if audit.last_mark is not None and (mark.version.compare(audit.last_mark) or 0) < 0:
                audit.problems.append(f"{versioned} holds row version {mark.version.text()} after "
                                      f"{audit.last_mark.text()}: an older state overwrote a newer one")
            audit.last_mark = mark.version
        if (version.get("meta") or {}).get("source") != META_SOURCE:
            if provenances:
                audit.extra += len(provenances)
                audit.problems.append(f"{versioned} was not written by us but has {len(provenances)} Provenance(s)")
            continue
        audit.versions += 1
        audit.ours.add(versioned)
        if not provenances and not complete:
            continue
        if len(provenances) != 1:
            audit.missing += not provenances
            audit.extra += max(0, len(provenances) - 1)
            audit.problems.append(f"{versioned}: {len(provenances)} Provenances")
            continue
        [provenance] = provenances
        activity = provenance["activity"]["coding"][0]["code"]
        if provenance["target"] != [{"reference": versioned}] or activity != ("CREATE" if n == 0 else "UPDATE"):
            audit.problems.append(f"{versioned}: its Provenance targets {provenance['target']} as {activity}")
    return audit


def check_invariant(broker: Any, fhir: Fhir, last_rows: dict[str, dict[str, Any]],
                    *, state_exempt: frozenset[str] | set[str] = frozenset(), faults: int = 0,
                    target_only: frozenset[str] | set[str] = frozenset(), record: bool = True) -> dict[str, int]:
    """Every message ended exactly once as written / skipped (reason) / dead-lettered (reason); one resource per
    row; each row's final FHIR state is its last Dataverse state (every mapped element: a column absent or
    empty in the row is absent on the server) and carries that state's row version; every version we wrote has
    exactly one Provenance naming it, and none we did not write has one; the row version marked in the resource
    never went back; every `written` result names a version of ours whose Provenance names it.

    `state_exempt`: rows whose change was dead-lettered on purpose (a fault that never ends): their state may lag
    and a version's Provenance may be missing; the rest still holds for them. `target_only`: rows whose last
    changes came without images; those write no row version, so the marked one may be older than Dataverse's.

    Counted: lost (a message never settled, a row whose state differs, a version of ours without its
    Provenance), duplicated (a message settled twice, a second resource for a row, a second Provenance for a
    version or one for a version not ours)."""
    figures = FIGURES if record else Counter[str]()
    figures["scenarios"] += 1
    figures["faults_injected"] += faults
    problems: list[str] = []
    lost = duplicated = 0
    for seq in broker.rows:
        ends = broker.finals.get(seq, [])
        if len(ends) > 1:  # a redelivery after a crash may end once more, as a duplicate: never written twice
            ends = [e for e in ends if e.result is None or e.result.reason is not Reason.DUPLICATE] or ends[:1]
        if len(ends) != 1:
            problems.append(f"message {seq} settled {len(ends)} times")
            lost += not ends
            duplicated += max(0, len(ends) - 1)
            continue
        end = ends[0]
        if end.settlement == "complete":
            assert end.state in ("written", "skipped"), end
            if end.state == "skipped" and end.result.reason is None:
                problems.append(f"message {seq} skipped without a reason")
            figures[end.state] += 1
        else:
            if not end.reason or not end.description:
                problems.append(f"message {seq} dead-lettered without a reason")
            figures["dead_lettered"] += 1
            figures["max_delivery_exceeded"] += end.reason == "MaxDeliveryCountExceeded"
    ours: set[str] = set()
    for row_id, row in last_rows.items():
        found = fhir.search(f"Patient?identifier={IDENTIFIER_SYSTEM}|{row_id}&_count=10")
        if len(found) > 1:
            problems.append(f"row {row_id}: {len(found)} resources")
            duplicated += len(found) - 1
        exempt = row_id in state_exempt
        if found:
            audit = audit_history(fhir, found[0], "contact", row_id, complete=not exempt)
            problems += audit.problems
            lost += audit.missing
            duplicated += audit.extra
            ours |= audit.ours
            figures["versions_written"] += audit.versions
            marked = audit.last_mark
            order = marked.compare(Version(int(row["versionnumber"]))) if marked is not None else None
            if marked is not None and order is not None and \
                    (order > 0 or (order < 0 and not exempt and row_id not in target_only)):
                problems.append(f"row {row_id}: the resource holds row version {marked.text()}, "
                                f"Dataverse {row['versionnumber']}")
        if exempt:
            continue
        actual = mapped_state(found[0] if found else None)
        if actual != expected_contact(row):
            problems.append(f"row {row_id}: final state {actual} != last Dataverse state {expected_contact(row)}")
            lost += 1
    for results in broker.results.values():
        for result in results:
            if result.state != "written":
                continue
            assert result.resource and result.provenance, result
            if result.resource not in ours and result.resource.startswith("Patient/"):
                problems.append(f"{result.resource} is reported written but is no version of ours")
            provenance = fhir.get(result.provenance.split("/_history")[0])
            if provenance["target"] != [{"reference": result.resource}]:
                problems.append(f"{result.provenance} targets {provenance['target']}, not {result.resource}")
    figures["lost"] += lost
    figures["duplicated"] += duplicated
    assert not problems, "\n".join(problems)
    return {"lost": lost, "duplicated": duplicated}
