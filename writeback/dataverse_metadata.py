"""The tables, columns and lookups of a Dataverse environment, read from its Web API CSDL document
(`GET https://<org>.crm.dynamics.com/api/data/v9.2/$metadata`), and where the entity maps disagree with them.

A column a map names that its table does not have cannot be told, from messages, from a column left empty:
Dataverse leaves an empty column out of an image. A whole-row write then clears the element on every resource
written (a map's `firstnme` would remove every patient's first name). The maps are checked against the
environment's own schema before they go live (`check-config --dataverse-metadata FILE`).

In that document a table is an `EntityType` named by its logical name; a plain column is a `Property` of the same
name; a lookup column `x` is the property `_x_value`, and each table it may name is a single-valued
`NavigationProperty` whose `ReferentialConstraint` is on `_x_value` (a customer lookup names two tables).
"""

from __future__ import annotations

import difflib
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping
from dataclasses import field
from pathlib import Path

import defusedxml.ElementTree as DET
from defusedxml import DefusedXmlException

from writeback.immutable import immutable
from writeback.maps import EntityMap, MapSet

# Every table has them, and the product reads them: the row version orders writes, `modifiedon` when it is missing.
VERSION_COLUMNS = ("versionnumber", "modifiedon")


class MetadataError(Exception):
    """The file is not a CSDL document with tables in it (the text names the file, never its content)."""


@immutable
class Table:
    columns: frozenset[str]  # plain columns
    lookups: Mapping[str, frozenset[str]]  # lookup column → the tables it may name
    types: Mapping[str, str] = field(default_factory=dict)  # plain column → its Edm type (`String`, `Int32`, ...)

    def has(self, column: str) -> bool:
        return column in self.columns or column in self.lookups

    def names(self) -> list[str]:
        return sorted(self.columns | set(self.lookups))


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def _lookup_column(prop: str) -> str | None:
    return prop[1:-6] if prop.startswith("_") and prop.endswith("_value") and len(prop) > 7 else None


def read_metadata(path: Path) -> dict[str, Table]:
    """Table logical name → its columns. Read as a stream: an environment's document runs to tens of megabytes."""
    tables: dict[str, Table] = {}
    name: str | None = None
    props: set[str] = set()
    types: dict[str, str] = {}
    targets: dict[str, set[str]] = {}
    nav_type: str | None = None
    bases: dict[str, str] = {}  # table → the entity type it derives from (`BaseType`)
    try:
        events: Iterator[tuple[str, ET.Element]] = DET.iterparse(path, events=("start", "end"))
        for event, element in events:
            tag = _local(element.tag)
            if event == "start":
                if tag == "EntityType":
                    name, props, targets, types = element.get("Name"), set(), {}, {}
                    if name and (base := element.get("BaseType")):
                        bases[name] = base.rpartition(".")[2]
                elif tag == "NavigationProperty" and name is not None:
                    kind = element.get("Type") or ""
                    nav_type = None if kind.startswith("Collection(") else kind.rpartition(".")[2]
                elif tag == "ReferentialConstraint" and nav_type and (column := _lookup_column(
                        element.get("Property") or "")) is not None:
                    targets.setdefault(column, set()).add(nav_type)
                continue
            if tag == "Property" and name is not None and (prop := element.get("Name")):
                props.add(prop)
                types[prop] = (element.get("Type") or "").removeprefix("Edm.")
            elif tag == "NavigationProperty":
                nav_type = None
            elif tag == "EntityType":
                if name:
                    lookups = {c for p in props if (c := _lookup_column(p)) is not None}
                    plain = frozenset(p for p in props if _lookup_column(p) is None)
                    tables[name] = Table(plain, {c: frozenset(targets.get(c, ())) for c in lookups},
                                         {c: types[c] for c in plain})
                name = None
                element.clear()  # the document is large: keep only what was taken from each table
    except OSError as exc:
        raise MetadataError(f"cannot read {path}: {exc.strerror or type(exc).__name__}") from None
    except DefusedXmlException:
        raise MetadataError(f"{path} declares entities or a DTD, which a $metadata document never does") from None
    except ET.ParseError as exc:
        raise MetadataError(f"{path} is not XML (line {exc.position[0]}): save the answer of GET "
                            "<environment URL>/api/data/v9.2/$metadata") from None
    if not tables:
        raise MetadataError(f"{path} holds no table (EntityType): save the answer of GET "
                            "<environment URL>/api/data/v9.2/$metadata")
    return {name: _with_bases(name, tables, bases) for name in tables}


def _with_bases(name: str, tables: Mapping[str, Table], bases: Mapping[str, str]) -> Table:
    """A table with the columns of the types it derives from (an activity table's `subject` is declared on
    `activitypointer`, not on the table itself)."""
    table, seen = tables[name], {name}
    base = bases.get(name)
    while base is not None and base not in seen and base in tables:
        seen.add(base)
        inherited = tables[base]
        table = Table(table.columns | inherited.columns, {**inherited.lookups, **table.lookups},
                      {**inherited.types, **table.types})
        base = bases.get(base)
    return table


def _near(word: str, names: list[str]) -> str:
    found = difflib.get_close_matches(word, names, n=1)
    return f" (did you mean `{found[0]}`?)" if found else ""


# What a column must be, besides present: a plain column, a lookup (to the table named, "" when any will do), or
# either (`type: id` takes a lookup's row id or a plain column's text).
_PLAIN, _EITHER = None, "*"


def _columns(entity_map: EntityMap, consent_column: str) -> Iterator[tuple[str, str, str | None]]:
    """(where the map names it, the column, what it must be)."""
    if entity_map.choice_column:
        yield "resource.column", entity_map.choice_column, _PLAIN
    if entity_map.expansion is None:  # a child row's item has no resource, so no FHIR id, of its own
        yield "identity.fhir_id_column", entity_map.fhir_id_column, _PLAIN
    if entity_map.consent_types:
        where = "consent.column" if entity_map.consent_column else "WRITEBACK_CONSENT_COLUMN (setting)"
        yield where, entity_map.consent_column or consent_column, _PLAIN
    if entity_map.expansion is not None:
        yield "expansion.parent_link", entity_map.expansion.parent_link, entity_map.expansion.parent_table
    for i, attr in enumerate(entity_map.attributes):
        if attr.column is None:
            continue
        kind = (attr.reference_table or "") if attr.action == "lookup" else _EITHER if attr.type == "id" else _PLAIN
        yield f"attributes[{i}].column", attr.column, kind
    for column in VERSION_COLUMNS:
        yield "(the row version the product reads)", column, _PLAIN


# The Edm types whose values each map `type` (and `value_map`) can write (`mapping.convert`): a column of another
# type would make every message of the table refused (`invalid-resource`). A type missing here is not checked.
_WRITES_FROM = {
    "string": {"String", "Int32", "Int64", "Decimal", "Guid"},
    "code": {"String", "Int32", "Int64", "Decimal", "Guid"},
    "id": {"String", "Int32", "Int64", "Decimal", "Guid"},
    "date": {"Date", "DateTimeOffset", "String"},
    "dateTime": {"Date", "DateTimeOffset", "String"},
    "instant": {"DateTimeOffset"},
    "decimal": {"Decimal", "Double", "Int32", "Int64", "String"},
    "integer": {"Int32", "Int64", "Decimal", "String"},
    "boolean": {"Boolean"},
    "value_map": {"Int32", "Int64", "Boolean", "String"},
}


def _type_problem(entity_map: EntityMap, table: Table) -> Iterator[str]:
    for i, attr in enumerate(entity_map.attributes):
        kind = "value_map" if attr.action == "value_map" else attr.type if attr.action == "copy" else None
        edm = table.types.get(attr.column or "")
        if kind is None or not edm or kind not in _WRITES_FROM or edm in _WRITES_FROM[kind]:
            continue
        what = "`action: value_map`" if kind == "value_map" else f"`type: {kind}`"
        yield (f"entity map {entity_map.file}: field `attributes[{i}]` writes {attr.column!r} with {what}, but "
               f"{entity_map.table}.{attr.column} is Edm.{edm}: every value of it would be refused")


def warnings_for(maps: MapSet, tables: Mapping[str, Table]) -> list[str]:
    """What may be wrong, which the document cannot tell: one line each, naming the file, the field and the column.

    A `type: date` on an Edm.DateTimeOffset column. In the Web API a Date Only column is Edm.Date, a User Local or
    Time-Zone Independent one Edm.DateTimeOffset (learn.microsoft.com, power-apps/developer/data-platform/
    behavior-format-date-time-attribute). A User Local value is a UTC instant, and `type: date` writes the date of
    that instant (`mapping.convert`), not the one the user entered: a date entered at local midnight in UTC+2 is
    the day before in UTC. A Time-Zone Independent value is not converted, so its date is right: a warning, not a
    fault. A column changed from User Local to Date Only keeps the UTC values it held until they are converted
    (the `ConvertDateAndTimeBehavior` message)."""
    found: list[str] = []
    for table_name, entity_map in sorted(maps.maps.items()):
        table = tables.get(table_name)
        if table is None:
            continue
        for i, attr in enumerate(entity_map.attributes):
            if attr.action != "copy" or attr.type != "date" or table.types.get(attr.column or "") != "DateTimeOffset":
                continue
            found.append(
                f"entity map {entity_map.file}: field `attributes[{i}]` writes {attr.column!r} with `type: date`, but "
                f"{table_name}.{attr.column} is Edm.DateTimeOffset, not Edm.Date (Date Only): if its behavior is "
                "User Local, the date written is that of the UTC instant, a day off from the one entered for users "
                "away from Greenwich (a day early east of it). Change the column's behavior to Date Only (and "
                "convert the values it holds), or map it with `type: dateTime` where the FHIR element takes one; a "
                "Time-Zone Independent column is right as it is")
    return found


def problems(maps: MapSet, tables: Mapping[str, Table], consent_column: str) -> list[str]:
    """Each place a map names a table or column the environment does not have, a lookup where it needs a plain
    column or the reverse, or a lookup that cannot name the table the map says: one line each, naming the file
    and the field."""
    found: list[str] = []
    for table_name, entity_map in sorted(maps.maps.items()):
        file = entity_map.file
        table = tables.get(table_name)
        if table is None:
            found.append(f"entity map {file}: field `table` names {table_name!r}, which is not a table of this "
                         f"environment{_near(table_name, sorted(tables))}")
            continue
        for where, column, kind in _columns(entity_map, consent_column):
            said = f"entity map {file}: field `{where}` names {column!r}"
            if not table.has(column):
                found.append(f"{said}, which {table_name} does not have{_near(column, table.names())}: it would "
                             "read as empty in every message")
            elif kind is _PLAIN and column in table.lookups:
                found.append(f"{said}, a lookup of {table_name}: map it with `action: lookup` (or `type: id` for "
                             "the row id of a code table)")
            elif kind not in (_PLAIN, _EITHER) and column not in table.lookups:
                found.append(f"{said}, which is not a lookup of {table_name}")
            elif kind and kind != _EITHER and (names := table.lookups[column]) and kind not in names:
                found.append(f"{said}, a lookup to {', '.join(sorted(names))}, not to {kind}")
        found.extend(_type_problem(entity_map, table))
    return found
