"""One decision per message, write / skip / reject, with a reason code. Pure: no I/O.

`plan_message` is the whole core path (parse → decide → map → validate) that the dry run, the CLI, the
function and the benchmark all call. A write is a `WritePlan`: one `Write` per FHIR resource the message
changes (two when a child row moves to another parent), each an `Edit` that `writeback.converge` applies to the
server's copy inside the read-modify-write.

With the row's post-image (every Create, and every Update whose step registers a post image) the plan carries
the row's whole state: every element the map owns is set to the row's current value or cleared, so a gate
opening (consent given, a contact type becoming mapped) writes the whole row and any write heals an earlier
miss. Without it (Target only) the plan carries only the columns in the Target, as before, and says so.

What the plan needs from other rows (their FHIR id, a patient's consent) it names in `needs`, `gates` and
`refs`; `writeback.facts.resolve` fills it in from what is known about those rows before anything is written.
"""

from __future__ import annotations

import functools
import hashlib
import re
import urllib.parse
import uuid
from collections.abc import Mapping
from dataclasses import field
from datetime import datetime
from typing import Any, Literal

from writeback.converge import ComponentParts, Edit, ItemEdit, Release, RemoveItem, RowEdit, component_parts
from writeback.errors import WritebackError
from writeback.immutable import evolve, immutable
from writeback.mapping import (
    Row,
    RowRef,
    build_assignments,
    choice_key,
    render,
    render_with_refs,
    resolve_refs_in,
)
from writeback.maps import AttributeMap, EntityMap, MapSet
from writeback.marks import Mark, Version
from writeback.messages import NIL_GUID, EntityRef, Message, decode_body, message_of
from writeback.paths import KEEP, Assignment, Field, Index, Path, Select, format_path, sole_selectors
from writeback.reasons import Reason
from writeback.settings import Settings
from writeback.validation import validate

DecisionKind = Literal["write", "skip", "reject"]
RowKey = tuple[str, str]  # (table, row id)
_FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
# Resource ids of the rows this product creates: the same row always gets the same id (PUT Type/<id>), so a
# Create processed twice, or on two instances at once, cannot make two resources.
RESOURCE_NAMESPACE = uuid.UUID("2f1d6c3e-7a8b-4c5d-9e0f-1a2b3c4d5e6f")
_NAMESPACE_BYTES = RESOURCE_NAMESPACE.bytes
# The parent row of a Target-only change of a child row that does not hold its parent link: not known from the
# message; `facts.resolve` puts the one the row's facts know in its place.
PARENT_FROM_FACTS = ""


# Cached: a row's id is asked for when its message is planned, again when it is written, and for a parent row by
# each of its child rows (uuid5 was a twentieth of planning).
@functools.lru_cache(maxsize=16384)
def resource_id(table: str, row_id: str) -> str:
    """`str(uuid.uuid5(RESOURCE_NAMESPACE, "<table>/<row id>"))`, without building a `UUID` (two thirds of its
    cost): RFC 4122's name-based SHA-1 with its version and variant bits, formatted (tests/core/test_decide.py
    checks it against `uuid.uuid5`)."""
    name = f"{table}/{row_id.lower()}".encode()
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + name, usedforsecurity=False).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50
    digest[8] = (digest[8] & 0x3F) | 0x80
    text = digest.hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


@immutable
class Source:
    """Where a write comes from: the Dataverse row and change, for Provenance and the outcome log."""

    table: str
    record_id: str
    row_system: str  # the identifier system naming this Dataverse row
    message_name: str
    initiating_user_id: str | None
    correlation_id: str | None
    request_id: str | None
    organization_id: str | None
    row_version: int | None
    modified_on: datetime | None
    retried: bool = False  # a later try of this message: a version it wrote earlier may lack its Provenance

    @property
    def version(self) -> Version:
        return Version(self.row_version, self.modified_on)



def identifier_search(system: str, value: str) -> str:
    """`identifier=<system>|<value>` as FHIR's search reads it (search.html#escaping): a `\\`, `,`, `$` or `|` inside
    either part escaped with `\\`, then what a query cannot hold as it is (`&`, `#`, `%`, `+`, spaces) percent-
    encoded. A map's system is any absolute URI, and `urn:example:ids,contact` read unescaped is two codes: the
    row's resource was not found, and a PUT without If-Match replaced it (found by review)."""
    return f"identifier={_token_part(system)}|{_token_part(value)}"


_PLAIN_TOKEN = re.compile(r"[A-Za-z0-9:/._~-]*")  # (a row GUID, `urn:dataverse:contact`: as it is)


def _token_part(text: str) -> str:
    if _PLAIN_TOKEN.fullmatch(text):
        return text
    return urllib.parse.quote(re.sub(r"([\\,$|])", r"\\\1", text), safe=":/@!'()*;=.-_~\\,$")


@immutable
class Target:
    """How to find the FHIR resource: by logical id when known, else by the row identifier; `new_id` is the id
    it is created under when there is none."""

    resource_type: str
    fhir_id: str | None
    identifier_system: str
    identifier_value: str
    new_id: str = ""
    table: str = ""  # the table of the row the resource stands for (the parent, for a child row's item)
    # The FHIR id may name a resource of another type (the row's type changed, and which type the id was given
    # under is not known): read by it, and if it names none of this type, the resource is found by row identifier.
    fhir_id_unsure: bool = False
    # The row's type changed in this save: its resource of this type may be one it left before (`Release`), under
    # `new_id` and without the row identifier. Not found by that, it is looked up by `new_id` before one is made.
    may_exist: bool = False
    # Found by its id alone, never by the row identifier: a resource the row leaves (`Release`) while another one,
    # the one its FHIR id names now, carries that identifier too.
    by_id_only: bool = False

    @property
    def search(self) -> str:
        return identifier_search(self.identifier_system, self.identifier_value)

    @property
    def row(self) -> RowKey:
        return self.table, self.identifier_value

    @property
    def identity(self) -> Assignment:
        """The row identifier every written resource carries, so the row can always be found again."""
        path = (Field("identifier"), Select((("system", self.identifier_system),)), Field("value"))
        return Assignment(path, self.identifier_value, "*")  # "*": this product's, no Dataverse column


@immutable
class Write:
    target: Target
    edit: Edit


@immutable
class WritePlan:
    operation: Literal["create", "update"]
    writes: tuple[Write, ...]
    resource: dict[str, Any]  # what the message says about the resource: the dry run's view, validated
    changes: tuple[str, ...]
    source: Source
    full: bool = True
    cleared: tuple[str, ...] = ()
    gates: tuple[RowKey, ...] = ()  # rows whose (patient) consent must be Yes
    refs: tuple[RowRef, ...] = ()  # lookups to resolve to FHIR references
    ref_ids: Mapping[RowRef, str] = field(default_factory=dict)  # those already resolved
    # Lookups to rows not written yet, on an early try: when their search finds nothing the write waits for them
    # (`target-pending`) rather than refer by identifier only (`facts.REFERENCE_GRACE_RETRIES`).
    awaited: frozenset[RowRef] = frozenset()
    # A child row's parent lookup column, when the message holds it (a whole state, or a save that changed it): the
    # row state orders it as a column, so an older message that names a parent is `stale` once a newer one did.
    link: str | None = None
    # A retry that a newer change overtook (moved the child row elsewhere): it writes nothing, and only looks for
    # the version its earlier try may have written, to give it its owed Provenance (`BatchDelivery._heal`).
    heal_only: bool = False

    @property
    def target(self) -> Target:
        return self.writes[0].target

    @property
    def resource_type(self) -> str:
        return self.target.resource_type

    @property
    def awaits_earlier(self) -> bool:
        """Its write may wait for an earlier save of the row (`converge.RowEdit.awaits_earlier`)."""
        edit = self.writes[0].edit
        return isinstance(edit, RowEdit | ItemEdit) and edit.awaits_earlier

    def with_edit(self, edit: Edit) -> WritePlan:
        """This plan with its first write's edit (the row's own) replaced."""
        return evolve(self, writes=(evolve(self.writes[0], edit=edit), *self.writes[1:]))

    @property
    def assignments(self) -> tuple[Assignment, ...]:
        edit = self.writes[0].edit
        return () if isinstance(edit, RemoveItem | Release) else edit.owned

    @property
    def columns(self) -> frozenset[str]:
        """The Dataverse columns this write carries (what a Target-only write is ordered by, per column)."""
        columns = frozenset(a.column for a in self.assignments if a.column is not None and a.column != "*")
        return columns | {self.link} if self.link else columns

    @property
    def needs(self) -> frozenset[RowKey]:
        """Every row whose facts this plan uses: its own, its parents', its gates', its lookups'."""
        rows = {(self.source.table, self.source.record_id), *self.gates}
        rows.update(w.target.row for w in self.writes)
        rows.update((r.table, r.row_id) for r in self.refs)
        return frozenset(rows)


@immutable
class Decision:
    decision: DecisionKind
    reason: Reason | None
    detail: str
    message: Message | None = None
    plan: WritePlan | None = None
    resource_type: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    # A Target-only change that does not hold the row's type (or consent): its decision for each type the map
    # writes, and whether consent is to be taken from the row facts; `facts.resolve` picks (`_deferred`).
    alternatives: Mapping[str, Decision] = field(default_factory=dict)
    consent_from_facts: bool = False

    @property
    def table(self) -> str | None:
        return self.message.table if self.message else None

    @property
    def record_id(self) -> str | None:
        return self.message.record_id if self.message else None

    def as_json(self) -> dict[str, Any]:
        """The dry-run object of `python -m writeback plan`."""
        plan = self.plan
        return {
            "decision": self.decision,
            "reason": self.reason.value if self.reason else None,
            "detail": self.detail,
            "table": self.table,
            "recordId": self.record_id,
            "message": self.message.message_name if self.message else None,
            "resourceType": self.resource_type,
            "resource": plan.resource if plan else None,
            "changes": list(plan.changes) if plan else None,
            "cleared": list(plan.cleared) if plan else None,
            # Each element the write leaves empty, and the column it is mapped from (empty, or not in the message at
            # all): a misspelt column in a map is here, beside what it would clear on every resource (a new user's
            # trial: `cleared` names only elements emptied whole, and a misspelt `lastname` cleared name.family).
            "clearedBy": _cleared_by(plan) if plan else None,
            "wholeRow": plan.full if plan else None,
            # Mapped columns the message does not hold at all, which a whole row takes as empty (Dataverse leaves
            # empty columns out of images): a column name mistyped in a map is always here, clearing its element.
            "absentColumns": sorted({a.column for a in plan.assignments if a.column and a.column != "*"
                                     and a.column not in row_state(self.message)[1]})
            if plan and plan.full and self.message else None,
            # What the plan alone does not know (it reads no other row): the function checks these rows' facts
            # when it writes (their patient's consent; the FHIR ids lookups refer to), so its outcome may differ.
            "decidedWhenWritten": ([f"type of {self.table} {self.record_id} (not in the message; shown as "
                                    f"{self.resource_type})"] if self.alternatives else [])
            + ([f"consent of {self.table} {self.record_id} (not in the message)"] if self.consent_from_facts else [])
            + ([f"consent of {t} {r}" for t, r in plan.gates]
               + [f"FHIR id of {ref.table} {ref.row_id}" for ref in plan.refs]) if plan else None,
        }


def _cleared_by(plan: WritePlan) -> dict[str, str]:
    """Each element the write leaves empty, and the column it is mapped from (`Decision.as_json`): a child row's
    are inside its item (`identifier[this row].period.end`), and a child row whose parent link is emptied takes
    its whole item off its old parent (found by review: its paths read as the resource's own)."""
    edit = plan.writes[0].edit
    if isinstance(edit, RemoveItem):
        return {f"{edit.element}[this row]": edit.link} if edit.link else {}
    inside = f"{edit.element}[this row]." if isinstance(edit, ItemEdit) else ""
    return {inside + format_path(a.path): a.column for a in plan.assignments
            if a.value is None and a.column and a.column != "*"}


def _skip(reason: Reason, detail: str, message: Message, resource_type: str | None = None) -> Decision:
    return Decision("skip", reason, detail, message, resource_type=resource_type)


def _reject(reason: Reason, detail: str, message: Message | None, resource_type: str | None = None) -> Decision:
    return Decision("reject", reason, detail, message, resource_type=resource_type)


def row_version(row: Row) -> int | None:
    value = row.get("versionnumber")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def modified_on(row: Row) -> datetime | None:
    value = row.get("modifiedon")
    return value if isinstance(value, datetime) else None


def version_of(message: Message, row: Row) -> Version:
    """The row version a message carries: `versionnumber`, else `modifiedon`, else when the operation was created
    (a message holding neither column still gets an order, and a mark the server accepts)."""
    return Version(row_version(row), modified_on(row) or message.operation_created_on)


def consented(value: object) -> bool:
    key = choice_key(value)  # type: ignore[arg-type]
    return key in ("true", "1")


def is_echo(message: Message, settings: Settings) -> bool:
    """Whether the change was made by a user in WRITEBACK_IGNORE_USER_IDS: its InitiatingUserId (the user whose
    request started the pipeline). Not UserId: that is the account the step runs as ("Run in User's Context"), the
    same on every message of a step registered to run as one (found by review: every clinician's save skipped)."""
    users = {message.initiating_user_id, message.properties.initiating_user}
    return any(u is not None and u.lower() in settings.ignore_user_ids for u in users)


def whole_image(message: Message, consent_column: str | None = None) -> bool:
    """Whether the message's post image holds every column of its row that has a value, as the README has steps
    register it (the map's columns and `versionnumber`). Dataverse leaves empty columns out of images, so a mapped
    column such an image lacks, and that neither the Target nor the pre image holds, is empty. An image without
    `versionnumber`, which Dataverse never leaves empty, was registered with a narrower filter (the public samples
    have images of two columns): a column it lacks is not known. Nor is an image whole that lacks a column the map
    cannot do without and Dataverse never leaves empty (the consent column: a two-option column, never null)."""
    image = message.post_image
    if image is None or "versionnumber" not in image.attributes:
        return False
    return consent_column is None or consent_column in image.attributes


def consent_column_of(entity_map: EntityMap, settings: Settings) -> str | None:
    """The column holding a row's consent, for a map that asks for consent."""
    return (entity_map.consent_column or settings.consent_column) if entity_map.consent_types else None


def row_state(message: Message) -> tuple[Row, dict[str, Any], bool]:
    """The row before (pre image) and after, and whether "after" is the row's whole state.

    After = pre ⊕ Target ⊕ post: an Update's Target holds every column the save changed (a cleared one as null),
    so a column it does not hold still has its pre-image value, and the post image, the row as saved, has the last
    word. A column in none of the three is empty when the post image is whole; otherwise it is not known, and
    whole-row writes leave its element as it is (`mapping.build_assignments`). With a post image (or on Create,
    whose Target is the new row) the state is whole."""
    old: Row = dict(message.pre_image.attributes) if message.pre_image else {}
    new: dict[str, Any] = dict(old)
    for image in (message.target, message.post_image):
        if image is not None:
            new.update(image.attributes)
    return old, new, message.post_image is not None or message.message_name == "Create"


def resource_type_of(entity_map: EntityMap, row: Row) -> str | None:
    if entity_map.resource_type is not None:
        return entity_map.resource_type
    key = choice_key(row.get(entity_map.choice_column or ""))
    return entity_map.choices.get(key) if key is not None else None


def _is_fhir_id(value: object) -> bool:
    # "." and ".." match FHIR's id pattern but are path segments: Patient/.. is no resource, whatever it resolves to.
    return isinstance(value, str) and _FHIR_ID.fullmatch(value) is not None and value not in (".", "..")


def fhir_id_of(entity_map: EntityMap, row: Row) -> str | None:
    """The FHIR id the row's column holds; None when it holds none a URL may be built from (`check_fhir_id` refuses
    a save leaving such a value there)."""
    value = row.get(entity_map.fhir_id_column)
    return value if isinstance(value, str) and _is_fhir_id(value) else None


def check_fhir_id(entity_map: EntityMap, row: Row) -> None:
    """A FHIR id column holding something that is no FHIR id: `invalid-resource`, naming the column only. Ignored,
    the row was written under its own identifier as a new resource: a record that came from FHIR twice there."""
    value = row.get(entity_map.fhir_id_column)
    if value is not None and not _is_fhir_id(value):
        raise WritebackError(Reason.INVALID_RESOURCE, f"Column {entity_map.fhir_id_column} holds no FHIR id (1 to 64 "
                             "letters, digits, '-' and '.', not '.' or '..'): clear it, or put the id of the row's "
                             "FHIR resource there, then save the row again.")


def fhir_id_type(entity_map: EntityMap, old: Row, new: Row) -> str | None:
    """The type of the resource the row's FHIR id names, as far as the message tells: the row's type, unless the
    save changed it while keeping the id (pre image: same id, another type). Then the id may be the old type's or
    an older one's (a Patient made a Practitioner and back): None, not known."""
    fhir_id, kind = fhir_id_of(entity_map, new), resource_type_of(entity_map, new)
    if fhir_id is not None and old and fhir_id_of(entity_map, old) == fhir_id:
        before = resource_type_of(entity_map, old)
        if before is not None and before != kind:
            return None
    return kind


def decide(message: Message, maps: MapSet, settings: Settings) -> Decision:
    entity_map = maps.get(message.table)
    if entity_map is None or not entity_map.writeback:
        why = "has no entity map" if entity_map is None else "has writeback disabled in its entity map"
        # (the parser took the table and message names only in a logical name's form: never patient data)
        return _skip(Reason.NO_ENTITY_MAP, f"Table {message.table} {why}.", message)
    if message.message_name not in entity_map.messages:
        return _skip(Reason.UNSUPPORTED_MESSAGE,
                     f"Message {message.message_name} is not supported for table {message.table}.", message)
    if is_echo(message, settings):
        return _skip(Reason.ECHO, "The change was made by the sync's own user (WRITEBACK_IGNORE_USER_IDS); what "
                     "it says about the row (FHIR id, type, consent) is kept.", message)
    if message.payload_dropped or (message.target is None and message.post_image is None):
        if message.payload_dropped:
            return _reject(Reason.PAYLOAD_DROPPED, "Dataverse dropped the payload (MessageMaxSizeExceeded).",
                           message)
        return _reject(Reason.MALFORMED_MESSAGE, f"{message.message_name} has no Target entity.", message)
    if message.record_id == NIL_GUID:
        # A row without its id yet (a Create's step registered in PreOperation): written, every such message
        # would go to one resource, `urn:dataverse:<table>|0000…` (found by a new user's trial).
        return _reject(Reason.MALFORMED_MESSAGE, f"PrimaryEntityId is the nil GUID: the {message.table} row has no "
                       "id yet; register the step in PostOperation (docs/deploy.md).", message)

    old, new, full = row_state(message)
    if not full and message.message_name != "Create":
        deferred = _deferred(message, entity_map, maps, settings, old=old, new=new)
        if deferred is not None:
            return deferred
    resource_type = resource_type_of(entity_map, new)
    if resource_type is None:
        key = choice_key(new.get(entity_map.choice_column or ""))
        mapped = ", ".join(sorted(set(entity_map.choices.values())))
        if key is not None and key.isdigit() and len(key) <= 12:
            # A type of its own that the map does not write (a contact that is a Related Person: next of kin, common
            # in a hospital). Skipped, not dead-lettered: every save of such a contact kept the dead-letter queue,
            # and its alert, from ever being empty (found trying the product). (A choice's value is a number, never
            # patient data: said.) Made so in this save, it leaves the resource of the type it had, as a type change
            # between two mapped types does (found by review).
            leaving = _released(message, entity_map, "", old, Mark(message.table, message.record_id,
                                                                    version_of(message, new)))
            said = f"Column {entity_map.choice_column} is {key}, a type the {message.table} map does not write"
            if leaving:
                before = leaving[0].target.resource_type
                plan = WritePlan("update", tuple(leaving), {"resourceType": before}, (),
                                 _source(message, entity_map.identifier_system, new))
                return Decision("write", None, f"{said}, since this save: the row leaves its {before} (its row "
                                "identifier and mark go; what it holds stays).", message, plan, before)
            return _skip(Reason.NO_ENTITY_MAP, f"{said}; only {mapped} are written back.", message)
        found = "not in the message" if key is None else "not a choice's value"
        detail = (f"Column {entity_map.choice_column} is {found}"
                  f" for {message.table} {message.record_id}; only {mapped} can be written.")
        return _reject(Reason.INVALID_CONTACT_TYPE, detail, message)

    if resource_type in entity_map.consent_types:
        column = entity_map.consent_column or settings.consent_column
        if not consented(new.get(column)):
            state = "is not Yes." if column in new else (
                "is not in the message: empty (a contact saved before the column existed has none), or, if no "
                "patient's message has it, WRITEBACK_CONSENT_COLUMN (or the map's `consent.column`) names another "
                "column, or the step's images leave it out.")
            return _skip(Reason.CONSENT_WITHHELD, f"Consent column {column} {state}", message, resource_type)

    try:
        return _plan(message, entity_map, maps=maps, settings=settings, resource_type=resource_type, old=old,
                     new=new, full=full)
    except WritebackError as exc:
        return _reject(exc.reason, exc.detail, message, resource_type)


def _deferred(message: Message, entity_map: EntityMap, maps: MapSet, settings: Settings, *, old: Row,
              new: Row) -> Decision | None:
    """A Target-only change (a step without images) holds only the columns the save changed: a contact's type and
    consent, when it does not hold them, are what the row's earlier messages said (its row facts). It is planned
    as each type the map writes, and `facts.resolve` picks the row's type and checks its consent there."""
    type_column, consent_column = entity_map.choice_column, consent_column_of(entity_map, settings)
    type_missing = type_column is not None and type_column not in new
    consent_missing = consent_column is not None and consent_column not in new
    if not type_missing and not consent_missing:
        return None
    known = resource_type_of(entity_map, new)
    types = sorted(set(entity_map.choices.values())) if type_missing else [known] if known else []
    decisions: dict[str, Decision] = {}
    for resource_type in types:
        if resource_type in entity_map.consent_types and not consent_missing and consent_column is not None \
                and not consented(new.get(consent_column)):
            decisions[resource_type] = _skip(Reason.CONSENT_WITHHELD, f"Consent column {consent_column} is not "
                                             "Yes.", message, resource_type)
            continue
        try:
            decisions[resource_type] = _plan(message, entity_map, maps=maps, settings=settings,
                                             resource_type=resource_type, old=old, new=new, full=False)
        except WritebackError as exc:
            decisions[resource_type] = _reject(exc.reason, exc.detail, message, resource_type)
    if not decisions:
        return None
    first = next((d for d in decisions.values() if d.decision == "write"), next(iter(decisions.values())))
    return evolve(first, alternatives=decisions if type_missing else {},
                   consent_from_facts=consent_missing)


@immutable
class Shape:
    """What planning a row of a map as one resource type derives from the maps alone (`shape_of`)."""

    entity_map: EntityMap
    mapped: frozenset[str]  # every column the map reads, whatever the type
    # The columns whose change matters: those mapped for this type, and those that move the row or change its type
    # (the consent column, a setting's, is added where it is read: `_plan`).
    relevant: frozenset[str]
    gates: tuple[tuple[str, str], ...]  # (lookup column, table) of the patients whose consent gates the row
    # A change without images: the selectors that alone tell an ingest's item (`paths.sole_selectors`), the
    # map's constants, and the elements the map owns.
    adoptable: frozenset[Path]
    constants: tuple[Assignment, ...]
    elements: frozenset[str]
    parts: ComponentParts  # what the map writes inside an Observation's components (`converge.component_parts`)


def shape_of(entity_map: EntityMap, maps: MapSet, resource_type: str) -> Shape:
    """`Shape` of `entity_map` (one of `maps`) for `resource_type`, made once per set of maps."""
    key = ("decide", entity_map.table, resource_type)
    shape = maps.derived.get(key)
    if isinstance(shape, Shape) and shape.entity_map is entity_map:
        return shape
    attributes = entity_map.attributes_for(resource_type)
    relevant = {a.column for a in attributes if a.column} | {entity_map.fhir_id_column}
    if entity_map.choice_column:
        relevant.add(entity_map.choice_column)
    if entity_map.expansion is not None:
        relevant.add(entity_map.expansion.parent_link)
    shape = Shape(
        entity_map, frozenset(a.column for a in entity_map.attributes if a.column), frozenset(relevant),
        tuple((a.column, table) for a in attributes if a.column and (table := gate_table(a, maps)) is not None),
        sole_selectors(a.path for a in attributes),
        tuple(Assignment(a.path, a.default) for a in attributes if a.column is None),
        frozenset(a.path[0].name for a in attributes if isinstance(a.path[0], Field)),
        component_parts(a.path for a in attributes))
    maps.derived[key] = shape
    return shape


def gate_table(attr: AttributeMap, maps: MapSet) -> str | None:
    """The table of the patient a lookup column names when that patient's consent gates the row, else None."""
    referenced = maps.get(attr.reference_table or "") if attr.action == "lookup" else None
    return referenced.table if referenced is not None and attr.reference_type in referenced.consent_types else None


def gates_of(entity_map: EntityMap, maps: MapSet, resource_type: str, row: Row) -> list[RowKey]:
    """Rows of patients this row belongs to (a lookup to a table whose map asks for consent): their consent
    decides whether this row is written."""
    return [(table, value.id) for column, table in shape_of(entity_map, maps, resource_type).gates
            if isinstance(value := row.get(column), EntityRef)]


def _refs(assignments: tuple[Assignment, ...]) -> tuple[RowRef, ...]:
    return tuple(dict.fromkeys(a.value for a in assignments if isinstance(a.value, RowRef)))


def _plan(message: Message, entity_map: EntityMap, *, maps: MapSet, settings: Settings, resource_type: str,
          old: Row, new: Row, full: bool) -> Decision:
    is_create = message.message_name == "Create"
    version = version_of(message, new)
    mark = Mark(message.table, message.record_id, version)
    target_columns = set(message.target.attributes) if message.target is not None else set()
    shape = shape_of(entity_map, maps, resource_type)
    if not is_create and message.pre_image is not None:
        consent = consent_column_of(entity_map, settings)
        # (a cleared column is absent from the image)
        if not any(new.get(c) != old.get(c) for c in shape.relevant) and (
                consent is None or new.get(consent) == old.get(consent)):
            return _skip(Reason.NO_CHANGE, "The update changes no mapped column (nor the row's type, consent, "
                         "FHIR id or parent).", message, resource_type)
    columns = None if full else {c for c in shape.mapped if c in target_columns}
    expansion = entity_map.expansion
    if not full and expansion is not None and expansion.parent_link in target_columns:
        return _reject(Reason.MISSING_PARENT_LINK, f"Column {expansion.parent_link} (the link to the parent "
                       f"{expansion.parent_table}) changed in a message without images: the row's item cannot be "
                       "moved without its other columns, which such a step does not send. Register the step's pre "
                       "and post images (docs/deploy.md) and save the row again.", message, resource_type)
    if columns is not None and not columns:
        return _skip(Reason.NO_CHANGE, "The update changes no mapped column.", message, resource_type)

    gates = gates_of(entity_map, maps, resource_type, new)
    whole = whole_image(message, consent_column_of(entity_map, settings))
    if expansion is not None:
        return _plan_item(message, entity_map, maps=maps, resource_type=resource_type, old=old, new=new, full=full,
                          columns=columns, mark=mark, gates=gates, whole=whole)

    keep = full and not is_create and not whole
    assignments = tuple(build_assignments(entity_map, resource_type, new, columns, full=full, keep_absent=keep))
    if is_create and not any(a.value is not None for a in assignments if a.column is not None):
        return _skip(Reason.NO_CHANGE, "The row has no value in any mapped column.", message, resource_type)
    check_fhir_id(entity_map, new)
    fhir_id = fhir_id_of(entity_map, new)
    # Of another type before this save: a mapped one, or one no map writes (a Related Person, which left its Patient:
    # made a Patient again, it takes that one up, found by its own id; found by review).
    before = resource_type_of(entity_map, old) if old else None
    retyped = bool(old) and (before not in (None, resource_type) or (
        before is None and entity_map.choice_column is not None
        and choice_key(old.get(entity_map.choice_column)) is not None))
    target = Target(resource_type, fhir_id, entity_map.identifier_system, message.record_id,
                    resource_id(message.table, message.record_id), message.table,
                    fhir_id is not None and fhir_id_type(entity_map, old, new) != resource_type, retyped)
    owned: dict[str, str] = {}  # each element → a column feeding it, one with a value first (errors name that one)
    valued: set[str] = set()  # the elements given a value
    emptied: set[str] = set()  # the elements an assignment clears
    kept: set[str] = set()  # the elements an assignment leaves as the server has them (`KEEP`)
    looked_up: dict[RowRef, None] = {}  # the lookups' rows, in order (`_refs`)
    for a in assignments:  # (one pass for all of these: a pass each was 3% of the core path's instructions)
        element, value, column = a.element, a.value, a.column
        if value is None:
            emptied.add(element)
        elif value is KEEP:
            kept.add(element)
        else:
            valued.add(element)
            if isinstance(value, RowRef):
                looked_up[value] = None
        if column is not None and column != "*" and value is not KEEP and (element not in owned or value is not None):
            owned[element] = column
    refs = tuple(looked_up)
    with_refs = render_with_refs(resource_type, [*assignments, target.identity] if full else assignments,
                                 full=full, own=mark if entity_map.row_items else None)
    rendered: dict[str, Any] = resolve_refs_in(with_refs, assignments, {}) if refs else with_refs
    validate(rendered, partial=True, required=owned if full else None,
             ours={"Identifier": ({"system": target.identifier_system, "value": target.identifier_value},),
                   "Reference": tuple(ref.reference(None) for ref in refs)},
             whole=full and not kept)
    # The rendered state is what a create writes (its lookups resolved first): `converge` starts from it, not from
    # scratch.
    edit = RowEdit(mark, assignments, target.identity, full, rendered=with_refs if full else None,
                   before=_before(entity_map, resource_type, old) if full else (),
                   before_version=Version(row_version(old), modified_on(old)) if full and old else Version(),
                   adoptable=frozenset() if full else shape.adoptable, row_items=entity_map.row_items,
                   constants=() if full else shape.constants, elements=frozenset() if full else shape.elements,
                   parts=None if full or resource_type != "Observation" else shape.parts)
    source = _source(message, entity_map.identifier_system, new)
    writes = [Write(target, edit), *_released(message, entity_map, resource_type, old, mark)]
    plan = WritePlan("create" if is_create else "update", tuple(writes), rendered,
                     (changes := _changes(valued, full, rendered)), source, full,
                     # (an element holding what is written, the row identifier beside a cleared item, is not cleared)
                     tuple(sorted(emptied - valued - kept - set(changes))), tuple(gates), refs)
    detail = _describe(plan, narrow_image=keep)
    if len(writes) > 1:
        detail = detail[:-1] + f"; it leaves its {writes[1].target.resource_type}, which was its type before."
    return Decision("write", None, detail, message, plan, resource_type)


def _released(message: Message, entity_map: EntityMap, resource_type: str, old: Row, mark: Mark) -> list[Write]:
    """A row whose type changed in this save (pre image: another type the map writes) leaves its resource of
    that type (`converge.Release`), found by the FHIR id it had under it, else by the row identifier."""
    before = resource_type_of(entity_map, old) if entity_map.choice_column and old else None
    if before is None or before == resource_type or before not in entity_map.choices.values():
        return []
    fhir_id = fhir_id_of(entity_map, old)
    target = Target(before, fhir_id, entity_map.identifier_system, message.record_id,
                    resource_id(message.table, message.record_id), message.table, fhir_id is not None)
    return [Write(target, Release(mark, target.identity))]


# What identifies an Identifier (or a ContactPoint) in FHIR: its system and value. `use` and `type` describe it and
# are what the write sets, so an ingested item lacking them (or holding others) is still this row's item.
_IDENTITY_FIELDS = ("system", "value")


def _before(entity_map: EntityMap, resource_type: str, old: Row) -> tuple[Assignment, ...]:
    """The row's mapped values before the save (pre image), which find the items an ingest put there
    (`paths.adopt`); none when there is no pre image or it cannot be read as the map's values."""
    if not old:
        return ()
    try:
        return tuple(a for a in build_assignments(entity_map, resource_type, old, None) if a.column is not None)
    except WritebackError:
        return ()


def _item_fields(entity_map: EntityMap, resource_type: str, row: Row) -> dict[str, Any]:
    """What an item the ingest put there, without this product's mark, is recognised by: its system and value
    where the item has them, else its plain top-level fields, else the codings of its `code` (an Observation
    component: its code is what tells it, FHIR obs-7; `converge` matches one coding in common, an ingest's code
    may carry more codings or a display; found by review: a component row added a second diastolic beside the
    one from FHIR)."""
    if not row:
        return {}
    try:
        item = render(resource_type, build_assignments(entity_map, resource_type, row, None))
    except WritebackError:
        return {}
    plain = {k: v for k, v in item.items() if k != "resourceType" and isinstance(v, str | int | bool)}
    identity = {k: plain[k] for k in _IDENTITY_FIELDS if k in plain}
    if len(identity) == len(_IDENTITY_FIELDS) or plain:
        return identity if len(identity) == len(_IDENTITY_FIELDS) else plain
    codings = (item.get("code") or {}).get("coding") if isinstance(item.get("code"), dict) else None
    told = [{k: c[k] for k in ("system", "code") if k in c} for c in codings or () if isinstance(c, dict)
            and c.get("code")]
    if not told:
        return {}
    # A code names a kind of reading, not the reading: its value (or that it has none) too, as the image holds it
    # (found by review: a systolic row moved to a panel holding another systolic took that one over; of two
    # systolics, the second row's correction overwrote the first).
    values = {a.path[0].name for a in entity_map.attributes_for(resource_type)
              if isinstance(a.path[0], Field) and a.path[0].name.startswith("value")}
    return {"code": {"coding": told}, **{k: _value_told(item.get(k)) for k in sorted(values)}}


def _value_told(value: Any) -> Any:
    """What tells a value[x] (`_item_fields`): a Quantity by its number (a unit alone, the map's constant, is no
    value), anything else as it is; None: no value."""
    if isinstance(value, dict):
        return {"value": value["value"]} if value.get("value") is not None else None
    return value


def _plan_item(message: Message, entity_map: EntityMap, *, maps: MapSet, resource_type: str, old: Row, new: Row,
               full: bool, columns: set[str] | None, mark: Mark, gates: list[RowKey], whole: bool) -> Decision:
    expansion = entity_map.expansion
    assert expansion is not None
    link, before = new.get(expansion.parent_link), old.get(expansion.parent_link)
    parent_map = maps.get(expansion.parent_table)
    assert parent_map is not None

    def parent_target(row_id: str) -> Target:
        return Target(resource_type, None, expansion.parent_system, row_id,
                      resource_id(expansion.parent_table, row_id), expansion.parent_table)

    known = tuple(k for k in (_item_fields(entity_map, resource_type, old),
                              _item_fields(entity_map, resource_type, new)) if k)
    if not isinstance(link, EntityRef):
        if isinstance(before, EntityRef):
            # Unlinked: the row belongs to no parent now, so it leaves the one it had (with its tombstone).
            source = _source(message, f"urn:dataverse:{message.table}", new)
            plan = WritePlan("update", (Write(parent_target(before.id), RemoveItem(mark, expansion.element,
                                                                                   known[:1],
                                                                                   link=expansion.parent_link)),),
                             {"resourceType": resource_type}, (expansion.element,), source, full)
            return Decision("write", None, f"Remove the {expansion.element} item of this row from "
                            f"{expansion.parent_table} {before.id}: its column {expansion.parent_link} was cleared.",
                            message, plan, resource_type)
        if full or expansion.parent_link in new:
            return _reject(Reason.MISSING_PARENT_LINK, f"Column {expansion.parent_link} (the link to the parent "
                           f"{expansion.parent_table}) is empty.", message, resource_type)
        # A step without images sends the changed columns only: the parent is the one the row's earlier messages
        # named (its row facts), filled in by `facts.resolve`.
        link = EntityRef(PARENT_FROM_FACTS, expansion.parent_table, None)

    keep = full and message.message_name != "Create" and not whole
    owned = tuple(build_assignments(entity_map, resource_type, new, columns, full=full, keep_absent=keep))
    writes = [Write(parent_target(link.id), ItemEdit(mark, expansion.element, owned, full, known))]
    moved = isinstance(before, EntityRef) and before.id != link.id
    if moved:
        assert isinstance(before, EntityRef)
        writes.append(Write(parent_target(before.id), RemoveItem(mark, expansion.element, known[:1])))
    parent_gates = [(expansion.parent_table, link.id)] if parent_map.consent_types and link.id else []
    item = render(resource_type, [Assignment((Field(expansion.element), Index(0), *a.path), a.value, a.column)
                                  for a in owned if a.value is not None and a.value is not KEEP])
    validate(item, partial=True, whole=full and not any(a.value is KEEP for a in owned))
    source = _source(message, f"urn:dataverse:{message.table}", new)
    changes = (expansion.element,)
    plan = WritePlan("update", tuple(writes), item, changes, source, full, (),
                     tuple(dict.fromkeys([*parent_gates, *gates])), _refs(owned),
                     link=expansion.parent_link if full or expansion.parent_link in new else None)
    detail = _describe(plan, narrow_image=keep)
    if moved:
        detail = detail[:-1] + f"; moved from {expansion.parent_table} {before.id}."  # type: ignore[union-attr]
    return Decision("write", None, detail, message, plan, resource_type)


def _source(message: Message, row_system: str, row: Row) -> Source:
    return Source(
        table=message.table, record_id=message.record_id, message_name=message.message_name, row_system=row_system,
        initiating_user_id=message.initiating_user_id, correlation_id=message.correlation_id,
        request_id=message.request_id, organization_id=message.organization_id,
        row_version=row_version(row), modified_on=modified_on(row) or message.operation_created_on,
    )


def _changes(valued: set[str], full: bool, rendered: Mapping[str, Any]) -> tuple[str, ...]:
    """The elements a write gives a value (`valued`: those its assignments do)."""
    if full:  # what the whole state holds: a constant written only beside a row's value is not there without one
        return tuple(sorted({name for name in valued if name in rendered} | {"identifier"}))
    return tuple(sorted(valued))


def _describe(plan: WritePlan, *, narrow_image: bool = False) -> str:
    verb = "Create" if plan.operation == "create" else "Update"
    what = f"{verb} {plan.resource_type} ({', '.join(plan.changes)}"
    what += f"; cleared {', '.join(plan.cleared)})" if plan.cleared else ")"
    if not plan.full:
        what += ": Target only (no post image on the step), only the columns in the message"
    elif narrow_image:
        what += (": the post image is registered narrower than the README asks (without versionnumber or the "
                 "consent column), so a mapped column it does not hold is left as it is")
    return what + "."


def narrow(decision: Decision, superseded: frozenset[str]) -> Decision | None:
    """A Target-only write without the columns a newer change of the row already wrote; None when nothing is
    left. (A whole-row write is ordered by the version marked in the resource instead: never narrowed.)"""
    plan = decision.plan
    assert plan is not None
    dropped = plan.columns & superseded
    if not dropped or plan.full:
        return decision
    edit = plan.writes[0].edit
    assert isinstance(edit, RowEdit | ItemEdit)
    kept = tuple(a for a in edit.owned if a.column is None or a.column not in dropped)
    if not any(a.column is not None for a in kept):
        return None
    narrowed = evolve(plan.with_edit(evolve(edit, owned=kept)),
                       changes=tuple(sorted({a.element for a in kept if a.value is not None})))
    detail = (f"{_describe(narrowed)[:-1]}; not {', '.join(sorted(dropped))}: a newer change of the row "
              "already wrote them.")
    return evolve(decision, plan=narrowed, detail=detail)


def plan_message(
    body: bytes | str,
    properties: Mapping[str, Any] | None,
    maps: MapSet,
    settings: Settings,
    content_type: str | None = None,
) -> Decision:
    """The core path every entry point shares. Never raises for anything the message holds."""
    try:
        message = message_of(decode_body(body, content_type), properties)
    except WritebackError as exc:
        return _reject(exc.reason, exc.detail, None)
    except RecursionError:
        return _reject(Reason.MALFORMED_MESSAGE, "The body is nested too deeply.", None)
    return decide(message, maps, settings)
