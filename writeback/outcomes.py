"""The Table Storage ledger: outcome log, duplicate detection and per-row version state.

Implements `writeback.pipeline.Ledger` over azure-data-tables (async) and the queries behind
`python -m writeback logs`. Four tables, all named `<OUTCOMES_TABLE_PREFIX><name>`:

``outcomes``  The outcome log, one row per processed delivery.
    PartitionKey ``<yyyymmdd>-<status>``: the UTC day and the status group (`written`, `skipped`, `failed`;
    `failed` = dead-lettered, retry and config-error). RowKey ``<inverted µs>-<uid>``: microseconds since the
    epoch subtracted from 10^16-1, so rows sort newest first and "since T" is one RowKey bound.
    "All failures of the last 24 hours" reads two partitions (`<today>-failed`, `<yesterday>-failed`) with a
    RowKey range: no table scan, however large the log grows. Old days can be deleted partition by partition.

``history``  The same rows again, partitioned by the Dataverse record id (lower-case GUID), same RowKey.
    "The history of one Dataverse row" is a single-partition query, newest first.

    In both tables a delivery's OperationOutcome issues (warnings, information) are child rows right after
    their parent: RowKey ``<parent RowKey>-<nnn>``, ``Kind`` = ``issue``. Parent and children are written in
    one entity-group transaction, so a reader never sees half an outcome.

``messages``  Duplicate detection. PartitionKey = the message key (Dataverse RequestId with the table and row id,
    else the MessageId Dataverse posted; hashed when it holds characters Table Storage refuses in keys), RowKey
    ``m``. Written only when a delivery ended written or skipped: a message that failed may and must come again.

``rowstate``  Per Dataverse row (PartitionKey = record id, RowKey = table logical name), two things:
    - its facts (`writeback.facts`): ``FactsVersion``, ``ResourceType``, ``Consent``, ``FhirId`` (and
      ``FhirType``, the type of the resource it names), ``Written``
      (`Type/<id>` of the resource found or written for it), ``Gone`` (`Type/<id>` its FHIR id names, found missing
      on the server since), ``Parent`` (a child row's parent), ``Echoed`` (JSON
      column → version: the mapped columns the FHIR→Dataverse sync set, column names only), ``Seen`` (the
      `versionnumber`s of the row's messages seen, newest 16, comma-separated: a save whose pre image names one
      between them that none has waits for it): what other rows' writes, and the row's own older saves, need to know
      about it, merged by version;
    - for Target-only writes and child rows, the version that last wrote each column (``Columns``: JSON column →
      [versionnumber, modifiedon]; ``Version``, ``ModifiedOn`` for people reading it), so an older change arriving
      late writes only the columns no newer change wrote, and is `stale` when a newer change wrote all of them.
    Both are advanced with ETag concurrency (If-Match, MERGE): a writer whose read went out of date gets 412,
    re-reads and compares again. Create leases (one per resource to create, PartitionKey = `Type/<id>`, RowKey
    ``lease``, ``Until``) live in the same table.

No row holds patient data: only ids, names of tables and messages, codes, counts, times, and the `detail`
texts, which the core keeps free of values. Every Table Storage failure becomes
`WritebackError(Reason.OUTCOME_STORE_UNAVAILABLE)` (transient: the message is retried after a delay).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeVar

from azure.core import MatchConditions
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
    ServiceRequestError,
)
from azure.data.tables import EdmType, EntityProperty, UpdateMode
from azure.data.tables.aio import TableClient, TableServiceClient
from azure.identity.aio import DefaultAzureCredential

from writeback.decide import RowKey, WritePlan
from writeback.errors import ConfigError, WritebackError
from writeback.facts import RowFacts
from writeback.immutable import evolve, immutable
from writeback.leases import RELEASE_HOLDER, Lease, give_back, take
from writeback.marks import Version
from writeback.pipeline import Envelope, Result, Seen, State, message_key
from writeback.reasons import Reason
from writeback.settings import SPEC_BY_NAME, Settings, checked_outcome_store

Status = Literal["written", "skipped", "failed"]
STATUSES: tuple[Status, ...] = ("written", "skipped", "failed")
STATUS_OF_STATE: dict[State, Status] = {
    "written": "written",
    "skipped": "skipped",
    "dead-lettered": "failed",
    "retry": "failed",
    "config-error": "failed",
}

CLAIM_ATTEMPTS = 6  # read-compare-write rounds on 412/409 before giving up (transient)
FACT_READS = 16  # row state reads or writes of one batch in flight at once
MAX_ISSUE_ROWS = 99  # an entity-group transaction holds at most 100 entities: the parent + 99 issues
MAX_TEXT = 2000  # characters of `detail` kept per row (Table Storage allows 32K; the log needs far less)
_INVERT = 10**16 - 1  # microseconds since the epoch fit in 16 digits until the year 2286
_KEY_SAFE = re.compile(r"^[A-Za-z0-9._:@-]{1,200}$")  # no / \ # ? or control characters in keys

T = TypeVar("T")


def status_of(state: State) -> Status:
    return STATUS_OF_STATE[state]


def table_names(prefix: str) -> dict[str, str]:
    return {name: f"{prefix}{name}" for name in ("outcomes", "history", "messages", "rowstate")}


def inverted_key(when: datetime) -> str:
    micros = int(when.timestamp() * 1_000_000)
    return f"{_INVERT - micros:016d}"


def day_of(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y%m%d")


def safe_key(raw: str) -> str:
    """A value usable as PartitionKey/RowKey: itself when plain, else a stable hash."""
    if _KEY_SAFE.match(raw):
        return raw
    return "h-" + hashlib.sha256(raw.encode("utf-8")).hexdigest()


def record_key(record_id: str) -> str:
    return safe_key(record_id.strip().lower())


def _unavailable(exc: BaseException, what: str) -> WritebackError:
    hint = ""
    if isinstance(exc, ClientAuthenticationError) or getattr(exc, "status_code", None) == 403:
        role = "Reader (or Contributor)" if what == "read the outcome log" else "Contributor"
        hint = (f"; check OUTCOMES_CONNECTION_STRING, or the identity and its Storage Table Data {role} role "
                "for OUTCOMES_TABLE_ENDPOINT (`az login` on an administrator's machine)")
    elif isinstance(exc, ServiceRequestError):
        # No answer at all (refused, name not found, timed out): the endpoint is wrong or down (found by a new
        # user: the type name alone did not say where to look).
        hint = ("; no answer from the Table Storage endpoint: check OUTCOMES_CONNECTION_STRING or "
                "OUTCOMES_TABLE_ENDPOINT (the account's name, the network path to it), or whether the storage "
                "account (Azurite, locally) is running")
    return WritebackError(Reason.OUTCOME_STORE_UNAVAILABLE,
                          f"Table Storage could not be used to {what} ({type(exc).__name__}){hint}")


def _text(value: str | None, limit: int = MAX_TEXT) -> str | None:
    if value is None:
        return None
    return value if len(value) <= limit else value[: limit - 1] + "…"


def _int64(value: int | None) -> EntityProperty | None:
    return None if value is None else EntityProperty(value, EdmType.INT64)


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, EntityProperty) else value


def _entity(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


# ---- configuration ----------------------------------------------------------------------------------------


def outcome_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Only the Table Storage settings, validated like `Settings.from_env` (for the admin commands, which
    must work without FHIR settings)."""
    env = os.environ if env is None else env

    def get(name: str) -> str:
        return (env.get(name) or SPEC_BY_NAME[name].default or "").strip()

    conn = get("OUTCOMES_CONNECTION_STRING")
    endpoint = checked_outcome_store(get("OUTCOMES_TABLE_ENDPOINT"), conn)
    if not endpoint and not conn:
        raise ConfigError("OUTCOMES_TABLE_ENDPOINT", "is not set (nor OUTCOMES_CONNECTION_STRING)")
    prefix = get("OUTCOMES_TABLE_PREFIX")
    if not prefix.isalnum() or not prefix[:1].isalpha() or len(prefix) > 40:
        raise ConfigError("OUTCOMES_TABLE_PREFIX", "must be letters and digits, starting with a letter")
    return Settings(outcomes_endpoint=endpoint, outcomes_connection_string=conn, outcomes_table_prefix=prefix)


# ---- the rows read back by `logs` -------------------------------------------------------------------------


@immutable
class IssueRow:
    severity: str
    code: str
    expression: str
    details: str


@immutable
class OutcomeRow:
    row_key: str
    recorded_at: datetime
    outcome: str
    status: str
    reason: str | None
    detail: str
    settlement: str | None
    table: str | None
    record_id: str | None
    message_name: str | None
    message_id: str | None
    message_key: str | None
    correlation_id: str | None
    operation: str | None
    resource: str | None
    provenance: str | None
    delivery_count: int | None
    duration_ms: float | None
    issue_count: int
    issues: tuple[IssueRow, ...] = ()

    def as_json(self) -> dict[str, Any]:
        return {
            "recordedAt": self.recorded_at.isoformat(), "outcome": self.outcome, "status": self.status,
            "reason": self.reason, "detail": self.detail, "settlement": self.settlement, "table": self.table,
            "recordId": self.record_id, "message": self.message_name, "messageId": self.message_id,
            "messageKey": self.message_key, "correlationId": self.correlation_id, "operation": self.operation,
            "resource": self.resource, "provenance": self.provenance, "deliveryCount": self.delivery_count,
            "durationMs": self.duration_ms, "issueCount": self.issue_count,
            "issues": [{"severity": i.severity, "code": i.code, "expression": i.expression, "details": i.details}
                       for i in self.issues],
        }


def _outcome_row(entity: Mapping[str, Any], issues: tuple[IssueRow, ...]) -> OutcomeRow:
    recorded = entity.get("RecordedAt")
    return OutcomeRow(
        row_key=str(entity["RowKey"]),
        recorded_at=recorded if isinstance(recorded, datetime) else datetime.fromtimestamp(0, UTC),
        outcome=str(entity.get("Outcome", "")),
        status=str(entity.get("Status", "")),
        reason=entity.get("Reason"),
        detail=str(entity.get("Detail", "")),
        settlement=entity.get("Settlement"),
        table=entity.get("Table"),
        record_id=entity.get("RecordId"),
        message_name=entity.get("MessageName"),
        message_id=entity.get("MessageId"),
        message_key=entity.get("MessageKey"),
        correlation_id=entity.get("CorrelationId"),
        operation=entity.get("Operation"),
        resource=entity.get("Resource"),
        provenance=entity.get("Provenance"),
        delivery_count=_plain(entity.get("DeliveryCount")),
        duration_ms=_plain(entity.get("DurationMs")),
        issue_count=int(_plain(entity.get("IssueCount")) or 0),
        issues=issues,
    )


def _group(entities: Iterable[Mapping[str, Any]]) -> list[OutcomeRow]:
    """Entities of one partition in RowKey order → outcome rows with their issue rows attached."""
    rows: list[OutcomeRow] = []
    parent: Mapping[str, Any] | None = None
    issues: list[IssueRow] = []
    for entity in entities:
        if entity.get("Kind") == "issue":
            if parent is not None and str(entity["RowKey"]).startswith(str(parent["RowKey"])):
                issues.append(IssueRow(str(entity.get("Severity", "")), str(entity.get("Code", "")),
                                       str(entity.get("Expression", "")), str(entity.get("Details", ""))))
            continue
        if parent is not None:
            rows.append(_outcome_row(parent, tuple(issues)))
        parent, issues = entity, []
    if parent is not None:
        rows.append(_outcome_row(parent, tuple(issues)))
    return rows


def _facts_of(row: RowKey, entity: Mapping[str, Any]) -> RowFacts | None:
    if not any(k in entity for k in ("FactsVersion", "ResourceType", "Consent", "FhirId", "Written", "Parent",
                                     "FhirType", "Echoed", "Seen", "TypeBefore", "Gone")):
        return None
    consent = entity.get("Consent")
    kind = entity.get("ResourceType")
    fhir_id = entity.get("FhirId")  # ("" is kept: an id a save cleared, facts.NO_FHIR_ID, an older one must not undo)
    parent = entity.get("Parent")  # "" is kept: a child row known to be linked to no parent (facts.NO_PARENT)
    return RowFacts(row[0], row[1], Version.parse(str(entity.get("FactsVersion") or "")),
                    str(kind) if isinstance(kind, str) else None, consent if isinstance(consent, bool) else None,
                    fhir_id if isinstance(fhir_id, str) else None, entity.get("Written") or None,
                    parent if isinstance(parent, str) else None, entity.get("FhirType") or None,
                    # (absent in a row state kept before they were: `FactsVersion` stands for them, as it did)
                    type_version=Version.parse(str(entity.get("TypeVersion") or "")),
                    consent_version=Version.parse(str(entity.get("ConsentVersion") or "")),
                    parent_version=Version.parse(str(entity.get("ParentVersion") or "")),
                    echoed=_echoed_of(entity.get("Echoed")), seen=_seen_of(entity.get("Seen")),
                    type_before=entity.get("TypeBefore") or None,
                    retyped=Version.parse(str(entity.get("Retyped") or "")), gone=entity.get("Gone") or None)


def _seen_of(raw: object) -> tuple[int, ...]:
    """``Seen``: `versionnumber`s, comma-separated → `RowFacts.seen`; anything unreadable is left out."""
    if not isinstance(raw, str):
        return ()
    return tuple(sorted({int(part) for part in raw.split(",") if part.isdigit()}))


def _echoed_of(raw: object) -> tuple[tuple[str, Version], ...]:
    """``Echoed``: JSON column → stored version (`RowFacts.echoed`); anything unreadable is no column."""
    try:
        data = json.loads(raw) if isinstance(raw, str) and raw else {}
    except ValueError:
        return ()
    if not isinstance(data, dict):
        return ()
    parsed = ((str(column), Version.parse(str(at))) for column, at in data.items())
    return tuple(sorted((column, at) for column, at in parsed if at.known))


_FACT_VERSIONS = ("TypeVersion", "ConsentVersion", "ParentVersion")


# ---- the ledger --------------------------------------------------------------------------------------------


Stamp = tuple[int | None, datetime | None]  # (Dataverse versionnumber, modifiedon) of the change that wrote


def _stamps(current: Mapping[str, Any] | None) -> tuple[dict[str, Stamp], Stamp]:
    """The per-column stamps of a row state, and the stamp of a column it has none for.

    A row state written before per-column stamps existed holds only the row's version: every column counts
    as written at that version (the old, row-wide ordering), never as unwritten, also after the first
    per-column claim (kept under the key ``*``, which no Dataverse column can have).
    """
    if current is None:
        return {}, (None, None)
    raw = current.get("Columns")
    if not raw:
        legacy: Stamp = (_plain(current.get("Version")), current.get("ModifiedOn"))
        return {"*": legacy}, legacy
    stamps: dict[str, Stamp] = {}
    for column, (version, modified) in json.loads(raw).items():
        stamps[column] = (version, datetime.fromisoformat(modified) if modified else None)
    return stamps, stamps.get("*", (None, None))


def _dump_stamps(stamps: Mapping[str, Stamp]) -> str:
    return json.dumps({c: [v, m.isoformat() if m else None] for c, (v, m) in sorted(stamps.items())},
                      separators=(",", ":"))


def _older(plan: WritePlan, version: int | None, modified: datetime | None) -> bool | None:
    """True: the plan is older than the stored state; False: same or newer; None: not comparable."""
    src = plan.source
    if src.row_version is not None and version is not None:
        return src.row_version < version
    if src.modified_on is not None and modified is not None:
        return src.modified_on < modified
    return None


def _newer(plan: WritePlan, version: int | None, modified: datetime | None) -> bool:
    src = plan.source
    if src.row_version is not None and version is not None:
        return src.row_version > version
    if src.modified_on is not None and modified is not None:
        return src.modified_on > modified
    return True  # not comparable: record what the plan knows, so the next change can be compared


class OutcomeStore:
    """`pipeline.Ledger` over Table Storage, plus the queries of `python -m writeback logs`."""

    def __init__(self, service: TableServiceClient, prefix: str = "writeback",
                 close: Callable[[], Awaitable[None]] | None = None) -> None:
        self._service = service
        self._names = table_names(prefix)
        self.missing: set[str] = set()  # tables a read found not to exist (`logs` says so: a wrong prefix)
        self._tables: dict[str, TableClient] = {}
        self._ready = False
        self._lock = asyncio.Lock()
        self._close = close

    @classmethod
    def from_settings(cls, settings: Settings, *, retry_total: int = 3, retry_backoff: float = 0.4,
                      credential: Any | None = None) -> OutcomeStore:
        """Connection string (Azurite, or a key) or endpoint + Microsoft Entra ID (managed identity).

        The transport is azure-core's default for async clients, aiohttp (a requirement): one pooled session of
        real async I/O. The requests-based one it replaced ran each call in a thread over a pool of ten
        connections, and a batch's concurrent calls logged "Connection pool is full" warnings by the dozen.
        """
        options: dict[str, Any] = {
            "retry_total": retry_total,
            "retry_backoff_factor": retry_backoff,
            "retry_backoff_max": 5,
            "connection_timeout": 10,
            "read_timeout": 30,
        }
        close: Callable[[], Awaitable[None]] | None = None
        if settings.outcomes_connection_string:
            try:
                service = TableServiceClient.from_connection_string(settings.outcomes_connection_string, **options)
            except ValueError:  # (its text may quote the secret: not passed on)
                raise ConfigError("OUTCOMES_CONNECTION_STRING", "is not a connection string the Table Storage "
                                  "client accepts") from None
        elif settings.outcomes_endpoint:
            if credential is None:
                credential = DefaultAzureCredential(exclude_interactive_browser_credential=True)
                close = credential.close
            service = TableServiceClient(settings.outcomes_endpoint, credential=credential, **options)
        else:
            raise ConfigError("OUTCOMES_TABLE_ENDPOINT", "is not set (nor OUTCOMES_CONNECTION_STRING)")
        return cls(service, settings.outcomes_table_prefix, close)

    @property
    def names(self) -> dict[str, str]:
        return dict(self._names)

    async def aclose(self) -> None:
        for table in self._tables.values():
            await table.close()
        await self._service.close()
        if self._close is not None:
            await self._close()

    async def __aenter__(self) -> OutcomeStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def ensure_tables(self) -> None:
        """Create the four tables once per process (idempotent; retried on the next call after a failure)."""
        if self._ready:
            return
        async with self._lock:
            if self._ready:
                return
            try:
                for name, table in self._names.items():
                    self._tables[name] = await self._service.create_table_if_not_exists(table)
            except AzureError as exc:
                raise _unavailable(exc, "create the outcome tables") from None
            self._ready = True

    async def _table(self, name: str) -> TableClient:
        await self.ensure_tables()
        return self._tables[name]

    def _reader(self, name: str) -> TableClient:
        """A table to read only: never created here, so a reader role (Storage Table Data Reader) is enough."""
        return self._tables[name] if self._ready else self._service.get_table_client(self._names[name])

    async def _call(self, what: str, op: Awaitable[T]) -> T:
        try:
            return await op
        except (ResourceNotFoundError, ResourceExistsError, ResourceModifiedError):
            raise
        except AzureError as exc:
            raise _unavailable(exc, what) from None

    # -- Ledger ------------------------------------------------------------------------------------------

    async def seen(self, message_key: str) -> Seen:
        table = await self._table("messages")
        try:
            marker = await self._call("check for a duplicate", table.get_entity(safe_key(message_key), "m"))
        except ResourceNotFoundError:
            return None
        return "processed" if marker.get("Outcome") in ("written", "skipped") else "tried"

    async def claim(self, plan: WritePlan) -> frozenset[str]:
        src = plan.source
        columns = plan.columns
        if (src.row_version is None and src.modified_on is None) or not columns:
            return frozenset()  # nothing to order by, or nothing a later change could supersede
        table = await self._table("rowstate")
        pk, rk = record_key(src.record_id), safe_key(src.table)
        mine: Stamp = (src.row_version, src.modified_on)
        for _ in range(CLAIM_ATTEMPTS):
            try:
                current = await self._call("read the row state", table.get_entity(pk, rk))
            except ResourceNotFoundError:
                current = None
            stamps, fallback = _stamps(current)
            superseded = frozenset(c for c in columns if _older(plan, *stamps.get(c, fallback)))
            advance = [c for c in columns - superseded if _newer(plan, *stamps.get(c, fallback))]
            if not advance:
                return superseded  # nothing newer to record (a redelivery of the same version, or all stale)
            stamps.update(dict.fromkeys(advance, mine))
            row = fallback if current is None else (_plain(current.get("Version")), current.get("ModifiedOn"))
            if _newer(plan, *row):
                row = mine
            entity = _entity({
                "PartitionKey": pk, "RowKey": rk,
                "Version": _int64(row[0]), "ModifiedOn": row[1],
                "Columns": _dump_stamps(stamps),
                "UpdatedAt": datetime.now(UTC),
                "RequestId": src.request_id,
            })
            try:
                if current is None:
                    await self._call("claim the row", table.create_entity(entity))
                else:  # MERGE: the row's facts (learn) share the entity
                    await self._call("claim the row", table.update_entity(
                        entity, mode=UpdateMode.MERGE, etag=current.metadata["etag"],
                        match_condition=MatchConditions.IfNotModified))
            except (ResourceModifiedError, ResourceExistsError):
                continue  # another instance got there first: read again and compare again
            except ResourceNotFoundError:
                continue  # deleted under us: start over
            return superseded
        raise WritebackError(Reason.CONFLICT,
                             f"the row state of {src.table} {src.record_id} kept changing in Table Storage "
                             f"through {CLAIM_ATTEMPTS} re-reads")

    async def facts(self, rows: Iterable[RowKey]) -> dict[RowKey, RowFacts]:
        table = await self._table("rowstate")
        slots = asyncio.Semaphore(FACT_READS)

        async def one(row: RowKey) -> RowFacts | None:
            async with slots:
                try:
                    entity = await self._call("read the row state", table.get_entity(record_key(row[1]),
                                                                                       safe_key(row[0])))
                except ResourceNotFoundError:
                    return None
            return _facts_of(row, entity)

        found = await asyncio.gather(*(one(row) for row in rows))
        return {fact.key: fact for fact in found if fact is not None}

    async def learn(self, facts: Iterable[RowFacts]) -> dict[tuple[str, str], WritebackError]:
        table = await self._table("rowstate")
        slots = asyncio.Semaphore(FACT_READS)
        facts = list(facts)

        async def one(fact: RowFacts) -> None:
            async with slots:
                await self._learn(table, fact)

        # Each row on its own: one row that cannot be kept (out of reach, or changing through every re-read) must
        # not make the others' messages be tried again.
        kept = await asyncio.gather(*(one(fact) for fact in facts), return_exceptions=True)
        failed: dict[tuple[str, str], WritebackError] = {}
        for fact, outcome in zip(facts, kept, strict=True):
            if isinstance(outcome, WritebackError):
                failed[(fact.table, fact.row_id)] = outcome
            elif isinstance(outcome, BaseException):
                raise outcome
        return failed

    async def _learn(self, table: TableClient, fact: RowFacts) -> None:
        pk, rk = record_key(fact.row_id), safe_key(fact.table)
        for _ in range(CLAIM_ATTEMPTS):
            try:
                current = await self._call("read the row state", table.get_entity(pk, rk))
            except ResourceNotFoundError:
                current = None
            known = _facts_of(fact.key, current) if current is not None else None
            merged = fact if known is None else known.merge(fact)
            if merged == known or (merged.found is not None and evolve(merged, found=None) == known):
                return  # (`found` is an event, never kept: alone it changes nothing stored)
            entity = _entity({
                "PartitionKey": pk, "RowKey": rk, "FactsVersion": merged.version.stored() or None,
                "ResourceType": merged.resource_type, "Consent": merged.consent, "FhirId": merged.fhir_id,
                "Written": merged.written, "Parent": merged.parent, "FhirType": merged.fhir_type,
                "Echoed": json.dumps({column: at.stored() for column, at in merged.echoed}) if merged.echoed else None,
                "Seen": ",".join(map(str, merged.seen)) if merged.seen else None,
                "TypeBefore": merged.type_before, "Retyped": merged.retyped.stored() or None,
                # "" once found again (None, MERGE would keep the old value)
                "Gone": merged.gone or ("" if known is not None and known.gone else None),
                # "" (not None, which MERGE would leave as it was): the same as FactsVersion
                # (`stored`: modifiedon beside a versionnumber, so a message without the number is still ordered)
                **{name: version.stored() if version != merged.version else "" for name, version in
                   zip(_FACT_VERSIONS, (merged.type_at, merged.consent_at, merged.parent_at), strict=True)},
                "UpdatedAt": datetime.now(UTC),
            })
            try:
                if current is None:
                    await self._call("keep the row's facts", table.create_entity(entity))
                else:
                    await self._call("keep the row's facts", table.update_entity(
                        entity, mode=UpdateMode.MERGE, etag=current.metadata["etag"],
                        match_condition=MatchConditions.IfNotModified))
            except (ResourceModifiedError, ResourceExistsError, ResourceNotFoundError):
                continue  # another instance wrote it meanwhile: merge with theirs
            return
        raise WritebackError(Reason.CONFLICT, f"the row state of {fact.table} {fact.row_id} kept changing in Table "
                             f"Storage through {CLAIM_ATTEMPTS} re-reads")

    async def acquire(self, key: str, seconds: float, holder: str = "", version: str = "") -> bool:
        """The create lease of one resource (`writeback.leases`, whose rules decide): an entity that one instance
        inserts (atomic), or replaces with the ETag it read (expired, or granted while it runs)."""
        table = await self._table("rowstate")
        pk, rk = safe_key(key), "lease"
        now = datetime.now(UTC).timestamp()
        try:
            await self._call("take the create lease", table.create_entity(
                _lease_entity(pk, Lease(now + seconds, holder, version))))
            return True
        except ResourceExistsError:
            pass
        try:
            held = await self._call("read the create lease", table.get_entity(pk, rk))
        except ResourceNotFoundError:
            return False
        current = _lease_of(held)
        lease = take(current, now, seconds, holder, version)
        if lease is None:
            return False
        if lease is current:
            return True  # granted again to its holder: as it is, not extended
        try:
            await self._call("take over the create lease", table.update_entity(
                _lease_entity(pk, lease), mode=UpdateMode.REPLACE, etag=held.metadata["etag"],
                match_condition=MatchConditions.IfNotModified))
        except (ResourceModifiedError, ResourceNotFoundError):
            return False
        return True

    async def release(self, key: str, holder: str = "") -> None:
        """Give the create lease back, if `holder` still holds it (`leases.give_back`)."""
        table = await self._table("rowstate")
        pk, rk = safe_key(key), "lease"
        # Gone already, taken over meanwhile, or out of reach (it expires on its own).
        with contextlib.suppress(ResourceNotFoundError, ResourceModifiedError, WritebackError):
            held = await self._call("read the create lease", table.get_entity(pk, rk))
            current = _lease_of(held)
            lease = give_back(current, datetime.now(UTC).timestamp(), holder)
            if lease is current:
                return
            etag = str(held.metadata["etag"])
            if lease is None:
                await self._call("release the create lease", table.delete_entity(
                    pk, rk, etag=etag, match_condition=MatchConditions.IfNotModified))
            else:
                await self._call("release the create lease", table.update_entity(
                    _lease_entity(pk, lease), mode=UpdateMode.REPLACE, etag=etag,
                    match_condition=MatchConditions.IfNotModified))

    async def record(self, envelope: Envelope, result: Result) -> None:
        now = datetime.now(UTC)
        rk = f"{inverted_key(now)}-{uuid.uuid4().hex[:12]}"
        status = status_of(result.state)
        decision = result.decision
        message = decision.message
        plan = decision.plan
        key = message_key(envelope, decision)
        common = {
            "Status": status,
            "Outcome": result.state,
            "RecordedAt": now,
            "MessageId": _text(envelope.message_id, 200),
            "Table": message.table if message else None,
            "RecordId": message.record_id if message else None,
        }
        parent = _entity({
            **common,
            "Kind": "outcome",
            "Reason": result.reason.value if result.reason else None,
            "Detail": _text(result.detail),
            "Settlement": result.settlement,
            "MessageKey": _text(key, 200),
            "CorrelationId": message.correlation_id if message else None,
            "MessageName": _text(message.message_name, 100) if message else None,
            "ResourceType": decision.resource_type,
            "Operation": plan.operation if plan else None,
            "RowVersion": _int64(plan.source.row_version) if plan else None,
            "Resource": _text(result.resource, 400),
            "Provenance": _text(result.provenance, 400),
            "DeliveryCount": envelope.delivery_count,
            "DurationMs": float(result.duration_ms),
            "IssueCount": len(result.issues),
        })
        children = [
            _entity({
                **common,
                "Kind": "issue",
                "Severity": _text(issue.severity, 40),
                "Code": _text(issue.code, 80),
                "Expression": _text(issue.expression, 400),
                "Details": _text(issue.details),
            })
            for issue in result.issues[:MAX_ISSUE_ROWS]
        ]

        def group(pk: str) -> list[tuple[str, dict[str, Any]]]:
            ops = [("upsert", {**parent, "PartitionKey": pk, "RowKey": rk})]
            ops += [("upsert", {**child, "PartitionKey": pk, "RowKey": f"{rk}-{n:03d}"})
                    for n, child in enumerate(children, start=1)]
            return ops

        outcomes = await self._table("outcomes")
        writes: list[Awaitable[Any]] = [
            self._call("write the outcome log", outcomes.submit_transaction(group(f"{day_of(now)}-{status}")))]
        if message is not None:
            history = await self._table("history")
            writes.append(self._call("write the row history",
                                     history.submit_transaction(group(record_key(message.record_id)))))
        for done in await asyncio.gather(*writes, return_exceptions=True):
            if isinstance(done, WritebackError):
                raise done
            if isinstance(done, BaseException):
                raise _unavailable(done, "write the outcome log") from None
        if key:
            # Only once its rows are kept: written beside them, a marker kept while the row's history failed made
            # the message's retry a `duplicate`, and `logs --record` never showed the write (found by review).
            # Processed (written, skipped): its repeats are duplicates. Tried (any other end): its redelivery, whose
            # delivery count the binding does not pass, is known as a retry by it (`Pipeline._admit`); made only
            # where no marker is, so a processed one stays so.
            processed = result.state in ("written", "skipped")
            what = "record the message as processed" if processed else "record the message as tried"
            messages = await self._table("messages")
            marker = _entity({
                "PartitionKey": safe_key(key), "RowKey": "m", "Outcome": result.state,
                "Reason": result.reason.value if result.reason else None, "RecordedAt": now,
                "Table": common["Table"], "RecordId": common["RecordId"], "MessageKey": _text(key, 200),
            })
            try:
                await self._call(what, messages.upsert_entity(marker) if processed else messages.create_entity(marker))
            except ResourceExistsError:
                pass  # (only the tried marker's create meets one: a marker is there, and stays)
            except AzureError as exc:
                raise _unavailable(exc, what) from None

    # -- queries (python -m writeback logs) ---------------------------------------------------------------

    async def _query(self, table: TableClient, flt: str, params: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        try:
            async for entity in table.query_entities(flt, parameters=params):
                yield dict(entity)
        except ResourceNotFoundError:
            self.missing.add(table.table_name)
            return  # the table does not exist yet: nothing was recorded
        except AzureError as exc:
            raise _unavailable(exc, "read the outcome log") from None

    async def _partition(self, table: TableClient, pk: str, since: datetime, status: Status | None,
                         limit: int) -> list[OutcomeRow]:
        flt = "PartitionKey eq @pk and RowKey lt @until"
        params: dict[str, Any] = {"pk": pk, "until": inverted_key(since) + "~"}
        if status is not None:
            flt += " and Status eq @status"
            params["status"] = status
        entities: list[dict[str, Any]] = []
        parents = 0
        async for entity in self._query(table, flt, params):
            if entity.get("Kind") != "issue":
                parents += 1
                if parents > limit:
                    break
            entities.append(entity)
        return _group(entities)

    async def query(self, *, status: Status | None = None, since: timedelta = timedelta(hours=24),
                    record_id: str | None = None, limit: int = 200, now: datetime | None = None) -> list[OutcomeRow]:
        """Outcome rows newest first: of one Dataverse row (`record_id`), else of every row, since `now - since`."""
        now = now or datetime.now(UTC)
        start = now - since
        if record_id is not None:
            history = self._reader("history")
            rows = await self._partition(history, record_key(record_id), start, status, limit)
        else:
            outcomes = self._reader("outcomes")
            days = []
            day = start.astimezone(UTC).date()
            while day <= now.astimezone(UTC).date():
                days.append(day.strftime("%Y%m%d"))
                day += timedelta(days=1)
            wanted = (status,) if status is not None else STATUSES
            parts = await asyncio.gather(*(self._partition(outcomes, f"{d}-{s}", start, None, limit)
                                           for d in days for s in wanted))
            rows = [row for part in parts for row in part]
        rows = [row for row in rows if row.recorded_at >= start]
        rows.sort(key=lambda row: row.row_key)
        return rows[:limit]

    async def row_state(self, table: str, record_id: str) -> dict[str, Any] | None:
        """The stored version state of one Dataverse row (for tests and troubleshooting)."""
        rowstate = await self._table("rowstate")
        try:
            entity = await self._call("read the row state", rowstate.get_entity(record_key(record_id),
                                                                                 safe_key(table)))
        except ResourceNotFoundError:
            return None
        return {k: _plain(v) for k, v in entity.items()}


def _lease_entity(pk: str, lease: Lease) -> dict[str, Any]:
    """A create lease as its entity (`writeback.leases.Lease`: the release's lease a create took over as `Under*`)."""
    entity: dict[str, Any] = {"PartitionKey": pk, "RowKey": "lease", "Until": datetime.fromtimestamp(lease.until, UTC),
                              "Holder": lease.holder, "Version": lease.version}
    if lease.under is not None:
        entity["UnderUntil"] = datetime.fromtimestamp(lease.under.until, UTC)
        entity["UnderVersion"] = lease.under.version
    return entity


def _lease_of(entity: Mapping[str, Any]) -> Lease:
    """The lease an entity holds; one written before holders and versions were kept is a creator's, unnamed."""
    def seconds(value: object) -> float:
        return value.timestamp() if isinstance(value, datetime) else 0.0

    under = None
    if isinstance(entity.get("UnderUntil"), datetime):
        under = Lease(seconds(entity["UnderUntil"]), RELEASE_HOLDER, str(entity.get("UnderVersion") or ""))
    return Lease(seconds(entity.get("Until")), str(entity.get("Holder") or ""), str(entity.get("Version") or ""),
                 under)
