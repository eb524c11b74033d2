"""Row values → FHIR element assignments, by an entity map's attribute maps. Pure.

Errors name the column and the problem, never the value: the value may be patient data.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from writeback.errors import WritebackError
from writeback.maps import AttributeMap, EntityMap
from writeback.messages import Entity, EntityRef, Money, Opaque, OptionSet, Value
from writeback.paths import Assignment, Select, apply
from writeback.paths import Field as PathField
from writeback.reasons import Reason

Row = Mapping[str, Value]
_DATE_TEXT = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def _invalid(detail: str) -> WritebackError:
    return WritebackError(Reason.INVALID_RESOURCE, detail)


def present(value: Value) -> bool:
    return value is not None and value not in ("", ())


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


def _number(value: Value) -> int | float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, Money):
        value = value.value
    if isinstance(value, Decimal):
        try:  # an exponent beyond the decimal context (e.g. 1E+1000000) overflows: no FHIR decimal either
            return int(value) if abs(value) < 2**53 and value == value.to_integral_value() else float(value)
        except ArithmeticError:
            return None
    if isinstance(value, int | float):
        return value
    return None


def convert(attr: AttributeMap, value: Value) -> Any:
    """One column value → the JSON value its element takes."""
    column = attr.column or "(default)"
    if attr.action == "value_map":
        key = _choice_key(value)
        if key is None or key not in attr.values:
            raise _invalid(f"column {column} holds a choice value that the map does not translate")
        return attr.values[key]
    if attr.action == "lookup":
        if not isinstance(value, EntityRef):
            raise _invalid(f"column {column} is not a lookup")
        return {"type": attr.reference_type, "identifier": {"system": attr.reference_system, "value": value.id}}
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
        if isinstance(value, str):
            return value.strip() if kind == "code" else value
        if isinstance(value, int | Decimal) and not isinstance(value, bool):
            return str(value)
        raise _invalid(f"column {column} is not text")
    if kind in ("decimal", "integer"):
        number = _number(value)
        if number is None or (kind == "integer" and not isinstance(number, int)):
            raise _invalid(f"column {column} is not a {kind}")
        return number
    if kind == "boolean":
        if isinstance(value, bool):
            return value
        raise _invalid(f"column {column} is not a boolean")
    raise _invalid(f"column {column} has an unknown type")  # unreachable: the schema lists the types


def attributes_for(entity_map: EntityMap, resource_type: str) -> Iterable[AttributeMap]:
    return (a for a in entity_map.attributes if a.only_for is None or resource_type in a.only_for)


def build_assignments(
    entity_map: EntityMap,
    resource_type: str,
    row: Row,
    columns: set[str] | None,
    prefix: tuple[PathField | Select, ...] = (),
) -> list[Assignment]:
    """Assignments for the mapped columns in `columns` (every mapped column with a value when None)."""
    out: list[Assignment] = []
    for attr in attributes_for(entity_map, resource_type):
        if attr.column is None:
            if columns is None:  # a constant default belongs to a Create only
                out.append(Assignment(prefix + attr.path, attr.default))
            continue
        if columns is not None and attr.column not in columns:
            continue
        value = row.get(attr.column)
        if present(value):
            out.append(Assignment(prefix + attr.path, convert(attr, value), attr.column))
        elif attr.default is not None:
            out.append(Assignment(prefix + attr.path, attr.default, attr.column))
        elif columns is not None:
            out.append(Assignment(prefix + attr.path, None, attr.column))  # cleared in Dataverse: cleared in FHIR
    return out


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def validate(resource: dict[str, Any], *, partial: bool) -> None:
    """fhir.resources (R4B ≅ R4) structural validation; the error names the element, never the value.

    `partial`: the resource holds only the elements one update changes, so required elements may be absent.
    """
    model = get_fhir_model_class(resource["resourceType"])
    try:
        model.model_validate(resource)
    except ValidationError as exc:
        problems = [e for e in exc.errors() if not (partial and e.get("type") == "missing")]
        if problems:
            first = problems[0]
            where = _loc(tuple(first.get("loc", ()))) or "(resource)"
            raise _invalid(f"{resource['resourceType']}.{where} is invalid ({first.get('type', 'error')})") from None
    except (ValueError, TypeError) as exc:  # validators in fhir.resources may raise plain errors
        raise _invalid(f"{resource['resourceType']} failed validation ({type(exc).__name__})") from None


def render(resource_type: str, assignments: Iterable[Assignment]) -> dict[str, Any]:
    return apply({"resourceType": resource_type}, assignments)
