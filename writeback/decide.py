"""One decision per message, write / skip / reject, with a reason code. Pure: no I/O.

`plan_message` is the whole core path (parse → decide → map → validate) that the dry run, the CLI, the
function and the benchmark all call.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal

from writeback.errors import WritebackError
from writeback.mapping import Row, build_assignments, choice_key, convert, present, render, validate
from writeback.maps import EntityMap, MapSet
from writeback.messages import EntityRef, Message, label, parse_message
from writeback.paths import Assignment, Select
from writeback.paths import Field as PathField
from writeback.reasons import Reason
from writeback.settings import Settings

DecisionKind = Literal["write", "skip", "reject"]
_FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


@dataclass(frozen=True, slots=True)
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


@dataclass(frozen=True, slots=True)
class Target:
    """How to find the FHIR resource: by logical id when the row has one, else by the row identifier."""

    resource_type: str
    fhir_id: str | None
    identifier_system: str
    identifier_value: str

    @property
    def search(self) -> str:
        return f"identifier={self.identifier_system}|{self.identifier_value}"

    @property
    def identity(self) -> Assignment:
        """The row identifier every written resource carries, so the row can always be found again."""
        path = (PathField("identifier"), Select((("system", self.identifier_system),)), PathField("value"))
        return Assignment(path, self.identifier_value)


@dataclass(frozen=True, slots=True)
class WritePlan:
    operation: Literal["create", "update"]
    target: Target
    assignments: tuple[Assignment, ...]
    resource: dict[str, Any]
    changes: tuple[str, ...]
    source: Source

    @property
    def resource_type(self) -> str:
        return self.target.resource_type

    @property
    def columns(self) -> frozenset[str]:
        """The Dataverse columns this write carries (what the row state orders per column)."""
        return frozenset(a.column for a in self.assignments if a.column is not None)


@dataclass(frozen=True, slots=True)
class Decision:
    decision: DecisionKind
    reason: Reason | None
    detail: str
    message: Message | None = None
    plan: WritePlan | None = None
    resource_type: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def table(self) -> str | None:
        return self.message.table if self.message else None

    @property
    def record_id(self) -> str | None:
        return self.message.record_id if self.message else None

    def as_json(self) -> dict[str, Any]:
        """The dry-run object of `python -m writeback plan`."""
        return {
            "decision": self.decision,
            "reason": self.reason.value if self.reason else None,
            "detail": self.detail,
            "table": self.table,
            "recordId": self.record_id,
            "message": self.message.message_name if self.message else None,
            "resourceType": self.resource_type,
            "resource": self.plan.resource if self.plan else None,
            "changes": list(self.plan.changes) if self.plan else None,
        }


def _skip(reason: Reason, detail: str, message: Message, resource_type: str | None = None) -> Decision:
    return Decision("skip", reason, detail, message, resource_type=resource_type)


def _reject(reason: Reason, detail: str, message: Message | None, resource_type: str | None = None) -> Decision:
    return Decision("reject", reason, detail, message, resource_type=resource_type)


def _row_version(row: Row) -> int | None:
    value = row.get("versionnumber")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _modified_on(row: Row) -> datetime | None:
    value = row.get("modifiedon")
    return value if isinstance(value, datetime) else None


def _consented(value: object) -> bool:
    key = choice_key(value)  # type: ignore[arg-type]
    return key in ("true", "1")


def _is_echo(message: Message, settings: Settings) -> bool:
    users = {message.initiating_user_id, message.user_id, message.properties.initiating_user,
             message.properties.user}
    return any(u is not None and u.lower() in settings.ignore_user_ids for u in users)


def decide(message: Message, maps: MapSet, settings: Settings) -> Decision:
    entity_map = maps.get(message.table)
    if entity_map is None or not entity_map.writeback:
        why = "has no entity map" if entity_map is None else "has writeback disabled in its entity map"
        return _skip(Reason.NO_ENTITY_MAP, f"Table {label(message.table)} {why}.", message)
    if message.message_name not in entity_map.messages:
        return _skip(Reason.UNSUPPORTED_MESSAGE,
                     f"Message {message.message_name[:40]} is not supported for table {message.table}.", message)
    if _is_echo(message, settings):
        return _skip(Reason.ECHO, "The change was made by the sync's own user (WRITEBACK_IGNORE_USER_IDS).",
                     message)
    if message.payload_dropped or (message.target is None and message.post_image is None):
        if message.payload_dropped:
            return _reject(Reason.PAYLOAD_DROPPED, "Dataverse dropped the payload (MessageMaxSizeExceeded).",
                           message)
        return _reject(Reason.MALFORMED_MESSAGE, f"{message.message_name} has no Target entity.", message)

    old: Row = dict(message.pre_image.attributes) if message.pre_image else {}
    new: dict[str, Any] = dict(old)
    for image in (message.post_image, message.target):
        if image is not None:
            new.update(image.attributes)

    resource_type = entity_map.resource_type
    if resource_type is None:
        key = choice_key(new.get(entity_map.choice_column or ""))
        resource_type = entity_map.choices.get(key) if key is not None else None
        if resource_type is None:
            missing = key is None
            detail = (f"Column {entity_map.choice_column} is {'not in the message' if missing else 'not a mapped type'}"
                      f" for {message.table} {message.record_id}; only "
                      f"{', '.join(sorted(set(entity_map.choices.values())))} can be written.")
            return _reject(Reason.INVALID_CONTACT_TYPE, detail, message)

    if resource_type in entity_map.consent_types:
        column = entity_map.consent_column or settings.consent_column
        if not _consented(new.get(column)):
            state = "is not Yes" if column in new else "is not in the message"
            return _skip(Reason.CONSENT_WITHHELD, f"Consent column {column} {state}.", message, resource_type)

    try:
        return _plan(message, entity_map, resource_type, old, new)
    except WritebackError as exc:
        return _reject(exc.reason, exc.detail, message, resource_type)


def _plan(message: Message, entity_map: EntityMap, resource_type: str, old: Row, new: Row) -> Decision:
    is_create = message.message_name == "Create"
    mapped = {a.column for a in entity_map.attributes if a.column}
    columns: set[str] | None = None
    if not is_create:
        if message.pre_image is not None:
            columns = {c for c in mapped if c in new and new.get(c) != old.get(c)}
        else:
            columns = {c for c in mapped if message.target and c in message.target.attributes}

    expansion = entity_map.expansion
    if expansion is not None:
        link = new.get(expansion.parent_link)
        if not isinstance(link, EntityRef):
            return _reject(Reason.MISSING_PARENT_LINK,
                           f"Column {expansion.parent_link} (the link to the parent {expansion.parent_table}) "
                           "is empty.", message, resource_type)
        key_attr = next(a for a in entity_map.attributes if a.target == expansion.key)
        key_value = old.get(key_attr.column or "") if present(old.get(key_attr.column or "")) else None
        key_value = key_value if key_value is not None else new.get(key_attr.column or "")
        if not present(key_value):
            return _reject(Reason.MISSING_PARENT_LINK,
                           f"Column {key_attr.column} (which names this row's {expansion.element} in the parent) "
                           "is empty.", message, resource_type)
        prefix = (PathField(expansion.element), Select(((expansion.key, str(convert(key_attr, key_value))),)))
        if columns is not None and not columns:
            return _skip(Reason.NO_CHANGE, "The update changes no mapped column.", message, resource_type)
        assignments = build_assignments(entity_map, resource_type, new, columns, prefix)
        target = Target(resource_type, None, expansion.parent_system, link.id)
        operation: Literal["create", "update"] = "update"
    else:
        if columns is not None and not columns:
            return _skip(Reason.NO_CHANGE, "The update changes no mapped column.", message, resource_type)
        assignments = build_assignments(entity_map, resource_type, new, columns)
        fhir_id = new.get(entity_map.fhir_id_column)
        if not (isinstance(fhir_id, str) and _FHIR_ID.match(fhir_id)):
            fhir_id = None
        target = Target(resource_type, fhir_id, entity_map.identifier_system, message.record_id)
        operation = "create" if is_create and fhir_id is None else "update"

    if not assignments:
        return _skip(Reason.NO_CHANGE, "The row has no value in any mapped column.", message, resource_type)
    source = Source(
        table=message.table, record_id=message.record_id, message_name=message.message_name,
        row_system=entity_map.identifier_system if expansion is None else f"urn:dataverse:{message.table}",
        initiating_user_id=message.initiating_user_id, correlation_id=message.correlation_id,
        request_id=message.request_id, organization_id=message.organization_id,
        row_version=_row_version(new), modified_on=_modified_on(new),
    )
    plan = _write_plan(operation, target, tuple(assignments), source)
    return Decision("write", None, _describe(plan), message, plan, resource_type)


def _write_plan(operation: Literal["create", "update"], target: Target, assignments: tuple[Assignment, ...],
                source: Source) -> WritePlan:
    # A created resource carries the row identifier, so the row can always be found again.
    resource = render(target.resource_type, [*assignments, target.identity] if operation == "create" else assignments)
    validate(resource, partial=operation == "update")
    changes = tuple(sorted({a.element for a in assignments} | ({"identifier"} if operation == "create" else set())))
    return WritePlan(operation, target, assignments, resource, changes, source)


def _describe(plan: WritePlan) -> str:
    verb = "Create" if plan.operation == "create" else "Update"
    return f"{verb} {plan.resource_type} ({', '.join(plan.changes)})."


def narrow(decision: Decision, superseded: frozenset[str]) -> Decision | None:
    """The write without the columns a newer change of the row already wrote; None when nothing is left.

    Updates carry only their changed columns, so an older update arriving after a newer one must still write
    the columns the newer one did not touch (else its change is lost), and must not write the others back.
    A create is kept whole: a conditional create never overwrites an existing resource, and while it does not
    exist yet the newer update is still pending (target-missing) and writes its columns afterwards.
    """
    plan = decision.plan
    assert plan is not None
    dropped = plan.columns & superseded
    if not dropped:
        return decision
    kept = tuple(a for a in plan.assignments if a.column is None or a.column not in dropped)
    if not any(a.column is not None for a in kept):
        return None
    if plan.operation == "create":
        return decision
    narrowed = _write_plan(plan.operation, plan.target, kept, plan.source)
    detail = (f"{_describe(narrowed)[:-1]}; not {', '.join(sorted(dropped))}: a newer change of the row "
              "already wrote them.")
    return replace(decision, plan=narrowed, detail=detail)


def plan_message(
    body: bytes | str,
    properties: Mapping[str, Any] | None,
    maps: MapSet,
    settings: Settings,
    content_type: str | None = None,
) -> Decision:
    """The core path every entry point shares. Never raises for anything the message holds."""
    try:
        message = parse_message(body, properties, content_type)
    except WritebackError as exc:
        return _reject(exc.reason, exc.detail, None)
    except RecursionError:
        return _reject(Reason.MALFORMED_MESSAGE, "The body is nested too deeply.", None)
    return decide(message, maps, settings)
