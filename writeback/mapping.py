"""Row values → FHIR element assignments, by an entity map's attribute maps. Pure.

Errors name the column and the problem, never the value: the value may be patient data.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from writeback.errors import WritebackError
from writeback.immutable import immutable
from writeback.maps import AttributeMap, EntityMap
from writeback.marks import Mark
from writeback.messages import Entity, EntityRef, Money, Opaque, OptionSet, Value
from writeback.paths import KEEP, Assignment, apply, apply_state
from writeback.reasons import Reason

Row = Mapping[str, Value]
_DATE_TEXT = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_DECIMAL_TEXT = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")  # FHIR R4 decimal


def _invalid(detail: str) -> WritebackError:
    return WritebackError(Reason.INVALID_RESOURCE, detail)


@immutable
class RowRef:
    """A lookup to another Dataverse row, to become a FHIR Reference once that row's FHIR id is looked up
    (`writeback.facts`): `Patient/<id>` when known, else the identifier-only reference (the last resort)."""

    table: str
    row_id: str
    resource_type: str
    system: str

    def reference(self, fhir_id: str | None) -> dict[str, Any]:
        identifier = {"system": self.system, "value": self.row_id}
        if fhir_id:
            return {"reference": f"{self.resource_type}/{fhir_id}", "type": self.resource_type,
                    "identifier": identifier}
        return {"type": self.resource_type, "identifier": identifier}


def resolve_refs_in(resource: Mapping[str, Any], assignments: Iterable[Assignment],
                    ids: Mapping[RowRef, str | None]) -> dict[str, Any]:
    """`resolve_refs` of a resource rendered from `assignments`: only the elements a lookup sets are walked, and
    the others are shared with `resource`, not copied (walking the whole resource was a twentieth of the core
    path; nothing changes a resource in place below its top level)."""
    elements = {a.element for a in assignments if isinstance(a.value, RowRef)}
    return {k: resolve_refs(v, ids) if k in elements else v for k, v in resource.items()}


def resolve_refs(node: Any, ids: Mapping[RowRef, str | None]) -> Any:
    """`node` with every RowRef replaced by its reference (ids missing from `ids`: identifier-only)."""
    if isinstance(node, RowRef):
        return node.reference(ids.get(node))
    if isinstance(node, dict):
        return {k: resolve_refs(v, ids) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [resolve_refs(v, ids) for v in node]
    return node


def _choice_key(value: Value) -> str | None:
    if isinstance(value, OptionSet):
        return str(value.value)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | str):
        return str(value)
    return None


def choice_key(value: Value) -> str | None:
    return _choice_key(value)


def _number(value: Value) -> int | float | Decimal | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, Money):
        value = value.value
    if isinstance(value, str):
        # A number held in a text column (a custom table's): `check-config --dataverse-metadata` lets `type: decimal`
        # and `integer` read String columns, and they were refused at run time (found by review). FHIR's decimal
        # syntax only: "72.50" keeps its precision, "seventy" is no number.
        text = value.strip()
        if not _DECIMAL_TEXT.fullmatch(text):
            return None
        value = Decimal(text)
    if isinstance(value, Decimal):
        try:  # an exponent beyond the decimal context (e.g. 1E+1000000) overflows: no FHIR decimal either
            if abs(value) >= Decimal(10) ** 28:
                return None
        except ArithmeticError:
            return None
        return value  # kept as Decimal: FHIR decimals keep their precision ("72.50" is not 72.5)
    if isinstance(value, int | float):
        return value
    return None


_TEXT = frozenset({"string", "code", None})  # the types text is copied into as it is (trimmed)


def convert(attr: AttributeMap, value: Value) -> Any:
    """One column value → the JSON value its element takes."""
    if type(value) is str and attr.type in _TEXT and attr.action not in ("value_map", "lookup"):
        return value.strip()  # (most values: text into text, as the `string` case below has it)
    column = attr.column or "(default)"
    if attr.action == "value_map":
        if isinstance(value, tuple):  # (said apart: "does not translate" sent the administrator to a map that did)
            raise _invalid(f"column {column} is a multi-select choice (several values), which a value map cannot "
                           "write into one element")
        key = _choice_key(value)
        if key is None or key not in attr.values:
            raise _invalid(f"column {column} holds a choice value that the map does not translate")
        return attr.values[key]
    if attr.action == "lookup":
        if not isinstance(value, EntityRef):
            raise _invalid(f"column {column} is not a lookup")
        assert attr.reference_type is not None and attr.reference_system is not None
        if attr.reference_table and value.logical_name and value.logical_name.lower() != attr.reference_table:
            # (a customer lookup may name an account as well as a contact: never a Patient reference by its id)
            raise _invalid(f"column {column} names a row of table {value.logical_name}, and a "
                           f"{attr.reference_type} reference needs a row of {attr.reference_table}")
        return RowRef(attr.reference_table or value.logical_name, value.id, attr.reference_type,
                      attr.reference_system)
    if attr.type == "id" and isinstance(value, EntityRef):
        return value.id  # a lookup to a code table: the row id is the code, the table's system its system
    if isinstance(value, Opaque | Entity | EntityRef | tuple):
        raise _invalid(f"column {column} holds a value kind that {attr.action} cannot write")
    kind = attr.type
    if kind is None:
        if isinstance(value, datetime):
            kind = "dateTime"
        elif isinstance(value, Money | Decimal | float):
            kind = "decimal"
        elif isinstance(value, OptionSet):
            return value.value
        elif isinstance(value, str):
            return value.strip()
        else:
            return value
    if kind == "date":
        if isinstance(value, datetime):
            return value.date().isoformat()
        if isinstance(value, str) and _DATE_TEXT.match(value):
            return value
        raise _invalid(f"column {column} is not a date")
    if kind in ("dateTime", "instant"):
        if isinstance(value, datetime):
            return value.isoformat(timespec="seconds").replace("+00:00", "Z")
        if isinstance(value, date) or (kind == "dateTime" and isinstance(value, str) and _DATE_TEXT.match(value)):
            return str(value)
        raise _invalid(f"column {column} is not a date and time")
    if kind in ("string", "code"):
        if isinstance(value, Money):  # (a Money column's `Edm.Decimal`, which `check-config` lets a string read)
            value = value.value
        if isinstance(value, str):
            return value.strip()
        if isinstance(value, int | Decimal) and not isinstance(value, bool):
            return str(value)
        raise _invalid(f"column {column} is not text")
    if kind in ("decimal", "integer"):
        number = _number(value)
        if kind == "integer" and isinstance(number, Decimal) and number == number.to_integral_value():
            number = int(number)
        if number is None or (kind == "integer" and not isinstance(number, int)):
            raise _invalid(f"column {column} is not a {kind}")
        return number
    if kind == "boolean":
        if isinstance(value, bool):
            return value
        raise _invalid(f"column {column} is not a boolean")
    raise _invalid(f"column {column} has an unknown type")  # unreachable: the schema lists the types


def build_assignments(
    entity_map: EntityMap,
    resource_type: str,
    row: Row,
    columns: set[str] | None,
    *,
    full: bool = False,
    keep_absent: bool = False,
) -> list[Assignment]:
    """Assignments for the mapped columns in `columns` (every mapped column with a value when None).

    `full`: the row's whole state: every mapped column the row holds (an empty one as None: its element is
    cleared), and the constants (`default` without a column). `keep_absent`: a column the row does not hold at all
    (in no image of an Update) is not known: its element is left as it is (`KEEP`, which keeps a list position in
    place); on a Create, whose Target holds every column of the new row, an absent column is empty."""
    out: list[Assignment] = []
    for attr in entity_map.attributes_for(resource_type):
        column = attr.column
        if column is None:
            if columns is None:  # a constant belongs to a Create or to a whole state
                out.append(Assignment(attr.path, attr.default))
            continue
        if columns is not None and column not in columns:
            continue
        value = row.get(column)
        # A value Dataverse holds: not empty, not only whitespace (a form's blank field).
        if value is not None and (value.strip() if isinstance(value, str) else value != ()):
            out.append(Assignment(attr.path, convert(attr, value), column))
        elif attr.default is not None:
            out.append(Assignment(attr.path, attr.default, column))
        elif keep_absent and column not in row:
            out.append(Assignment(attr.path, KEEP, column))
        elif columns is not None or full:
            out.append(Assignment(attr.path, None, column))  # cleared in Dataverse: cleared in FHIR
    return out


def render(resource_type: str, assignments: Iterable[Assignment], *, full: bool = False,
           own: Mark | None = None) -> dict[str, Any]:
    """What the assignments put in an empty resource (lookups as identifier-only references). `own`: the row's
    mark, for the items `[row]` names."""
    assignments = list(assignments)
    rendered = render_with_refs(resource_type, assignments, full=full, own=own)
    if not any(isinstance(a.value, RowRef) for a in assignments):
        return rendered
    out: dict[str, Any] = resolve_refs(rendered, {})
    return out


def render_with_refs(resource_type: str, assignments: Iterable[Assignment], *, full: bool = False,
                     own: Mark | None = None) -> dict[str, Any]:
    """`render` with each lookup left a `RowRef`: `resolve_refs` makes it the reference once the ids are known
    (a create then writes that, without rendering the row again)."""
    base: dict[str, Any] = {"resourceType": resource_type}
    return apply_state(base, assignments, own=own) if full else apply(base, assignments, own)
