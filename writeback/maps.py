"""Entity maps: YAML files, one per table, validated against a schema and compiled once at load.

A bad map fails loudly: `MapError` names the file and the field (`attributes[3].target`). After loading,
nothing is parsed per message: paths are parsed, value maps keyed, and cross-map references resolved.
"""

from __future__ import annotations

import difflib
import importlib
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from fhir_core.types import FhirBase
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)

from writeback.errors import MapError
from writeback.immutable import immutable
from writeback.paths import Field as PathField
from writeback.paths import Index, Own, PathError, Select, format_path, parse_path
from writeback.paths import Path as ElementPath
from writeback.validation import closed_codes, required_elements

RESOURCE_TYPES = ("Patient", "Practitioner", "Encounter", "Observation")
# The highest list position a target may name (`given[99]`). FHIR sets none, but each position is one column, and
# every write spans the positions up to the highest a map names in that list (`paths.apply_state` keeps the
# unnamed ones below it as the server has them): `given[99999]` loaded and built 100,000 slots per message, and a
# larger one would exhaust memory. No Dataverse table has near 100 columns for one list (address lines: 3).
MAX_POSITION = 99


def _keys_as_text(raw: Any) -> Any:
    """YAML reads `1:` as int and `true:` as bool; the row's values are compared as text."""
    if isinstance(raw, dict):
        return {_key(k): v for k, v in raw.items()}
    return raw


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# A Dataverse logical name (a table, a column): lowercase letters, digits and underscores, as the message bodies name
# it. A display name (`First Name`) or a schema name (`FirstName`) never matches a body's column: the column would
# read as empty in every image, and a whole-row write clears what it maps (found trying the product: a map naming
# `FirstName` removed every patient's first name).
_LOGICAL = re.compile(r"[a-z_][a-z0-9_]{0,127}")


def _logical_name(value: str) -> str:
    if _LOGICAL.fullmatch(value):
        return value
    near = re.sub(r"[^a-z0-9_]", "", value.lower())
    hint = f" (did you mean `{near}`?)" if near and near != value and _LOGICAL.fullmatch(near) else ""
    raise ValueError(f"is {value!r}, not a Dataverse logical name: lowercase letters, digits and underscores, as "
                     f"the message bodies name it, not its display or schema name{hint}")


LogicalName = Annotated[str, AfterValidator(_logical_name)]


class AttributeSpec(_Strict):
    column: LogicalName | None = None
    target: str
    action: Literal["copy", "default", "value_map", "lookup"] = "copy"
    type: Literal["string", "code", "date", "dateTime", "instant", "decimal", "integer", "boolean", "id"] | None = None
    values: Annotated[dict[str, str | int | bool], BeforeValidator(_keys_as_text)] | None = None
    value: str | int | float | bool | None = None
    resource: str | None = None
    table: LogicalName | None = None  # a lookup's: the table whose rows it names, where two maps make `resource`
    only_for: list[str] | None = None

    @model_validator(mode="after")
    def _action_fields(self) -> AttributeSpec:
        if self.action in ("copy", "value_map", "lookup") and not self.column:
            raise ValueError(f"action {self.action} needs `column`")
        if self.action == "value_map" and not self.values:
            raise ValueError("action value_map needs `values`")
        if self.action == "default" and self.value is None:
            raise ValueError("action default needs `value`")
        if self.action == "lookup" and not self.resource:
            raise ValueError("action lookup needs `resource` (the FHIR type referenced)")
        if self.type is not None and self.action in ("value_map", "lookup"):
            # (ignored, and so misleading: a `type: integer` beside a value map's codes writes the codes as they are)
            raise ValueError(f"`type` is for copy and default; action {self.action} writes "
                             + ("the map's own values" if self.action == "value_map" else "a Reference"))
        if self.table is not None and self.action != "lookup":
            raise ValueError("`table` is a lookup's (the table whose rows it names)")
        return self


class ResourceChoice(_Strict):
    column: LogicalName
    values: Annotated[dict[str, str], BeforeValidator(_keys_as_text)]


class IdentitySpec(_Strict):
    fhir_id_column: LogicalName = "msemr_azurefhirid"
    identifier_system: str

    @field_validator("identifier_system")
    @classmethod
    def _uri(cls, value: str) -> str:
        if ":" not in value or " " in value:
            raise ValueError("must be an absolute URI")
        return value


class ConsentSpec(_Strict):
    applies_to: list[str] = Field(default_factory=lambda: ["Patient"])
    column: LogicalName | None = None  # None: the WRITEBACK_CONSENT_COLUMN setting


class ExpansionSpec(_Strict):
    parent_table: LogicalName
    parent_link: LogicalName
    element: str
    # Earlier maps found a child row's item by the value of this field; items are now found by the mark naming
    # their Dataverse row (two rows with the same system coexist). Accepted and unused, so old maps still load.
    key: str | None = None


class EntityMapSpec(_Strict):
    table: LogicalName
    # Strict: pydantic's lax bool reads the text "yes", "off" or "0" as a boolean, and `writeback: "no"` (quoted) is
    # easily read as turning a table off; YAML's own true/false (and unquoted yes/no) reach here as booleans.
    writeback: StrictBool = True
    messages: list[Literal["Create", "Update"]] = ["Create", "Update"]
    resource: str | ResourceChoice
    identity: IdentitySpec | None = None
    consent: ConsentSpec | None = None
    expansion: ExpansionSpec | None = None
    attributes: list[AttributeSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _identity_or_expansion(self) -> EntityMapSpec:
        if self.expansion is None and self.identity is None:
            raise ValueError("a map needs `identity` (or `expansion` for a child table)")
        return self


def _key(raw: object) -> str:
    return str(raw).lower() if isinstance(raw, bool) else str(raw)


# ---- compiled form -------------------------------------------------------------------------------------


@immutable
class AttributeMap:
    column: str | None
    path: ElementPath
    target: str
    action: str
    type: str | None
    values: Mapping[str, str | int | bool]
    default: str | int | float | bool | None
    reference_type: str | None
    reference_system: str | None
    reference_table: str | None  # the table whose map produces reference_type (whose rows the lookup names)
    only_for: frozenset[str] | None

    @property
    def element(self) -> str:
        head = self.path[0]
        assert isinstance(head, PathField)
        return head.name


@immutable
class Expansion:
    parent_table: str
    parent_link: str
    element: str
    key: str | None
    parent_system: str
    parent_fhir_id_column: str


@immutable
class EntityMap:
    file: str
    table: str
    writeback: bool
    messages: frozenset[str]
    resource_type: str | None  # None: chosen per row by `choice_column`
    choice_column: str | None
    choices: Mapping[str, str]
    fhir_id_column: str
    identifier_system: str
    consent_types: frozenset[str]
    consent_column: str | None
    expansion: Expansion | None
    attributes: tuple[AttributeMap, ...]
    row_items: bool = False  # a target names the row's own item of a list (`[row]`): writes need the row's mark
    # The attributes that write each resource type (`attributes_for`), made at the type's first message: no part of
    # the map's value (not compared, not copied by `dataclasses.replace`).
    by_type: dict[str, tuple[AttributeMap, ...]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def attributes_for(self, resource_type: str) -> tuple[AttributeMap, ...]:
        """The attributes that write `resource_type` (those without `only_for`, and those for it)."""
        found = self.by_type.get(resource_type)
        if found is None:
            found = self.by_type[resource_type] = tuple(a for a in self.attributes
                                                        if a.only_for is None or resource_type in a.only_for)
        return found

    @property
    def resource_types(self) -> frozenset[str]:
        return frozenset(self.choices.values()) if self.resource_type is None else frozenset({self.resource_type})


@dataclass(frozen=True)
class MapSet:
    maps: Mapping[str, EntityMap]
    source: str
    # What planning derives from the maps alone (`decide.shape_of`), made at the first message that needs it. On
    # the set, not on each map: a map's lookups are read with the other maps (whose patients' consent gates it).
    derived: dict[tuple[str, ...], object] = field(default_factory=dict, init=False, repr=False, compare=False)

    def get(self, table: str) -> EntityMap | None:
        return self.maps.get(table)


@cache
def _model_fields(resource_type: str) -> frozenset[str]:
    module = importlib.import_module(f"fhir.resources.R4B.{resource_type.lower()}")
    model = getattr(module, resource_type)
    names: set[str] = set()
    for name, info in model.model_fields.items():
        names.add(name)
        if info.alias:
            names.add(info.alias)
    return frozenset(names)


def _element(model: Any, name: str) -> tuple[Any, Mapping[str, Any]] | None:
    """The model of element `name` of `model` (None for a primitive) and the field's schema extra (fhir.resources
    puts a required binding's codes there: `validation.closed_codes`); None when the model has no such element."""
    for field_name, info in model.model_fields.items():
        if name in (field_name, info.alias):
            extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
            return _model_in(info.annotation), extra
    return None


def _model_in(annotation: Any) -> Any:
    """The FHIR datatype model inside an annotation (`Optional[List[ContactPointType]]` → ContactPoint)."""
    stack = [annotation]
    while stack:
        kind = stack.pop()
        if isinstance(kind, type) and issubclass(kind, FhirBase):
            model: Any = kind  # (a `type` to a build that cannot see fhir.resources: setup.py)
            return model.get_model_klass()
        stack.extend(typing.get_args(kind))
    return None


# Where FHIR R4 allows fewer types of resource in a reference than the R4B models list (the models follow R4B, which
# widened these): http://hl7.org/fhir/R4/observation-definitions.html#Observation.subject
_R4_REFERENCE_TYPES: Mapping[tuple[str, str], frozenset[str]] = {
    ("Observation", "subject"): frozenset({"Patient", "Group", "Device", "Location"}),
}


def _check_reference_type(file: str, where: str, referenced: str, path: ElementPath, *, resource_types: frozenset[str],
                          expansion: Expansion | None) -> None:
    """A lookup's resource type is one the element may refer to: `Observation.subject` a Patient, never a
    Practitioner (that map loaded, and each Observation named its practitioner as its subject; found trying the
    product)."""
    full = (PathField(expansion.element), *path) if expansion is not None else path
    for kind in sorted(resource_types):
        model: Any = importlib.import_module(f"fhir.resources.R4B.{kind.lower()}").__dict__[kind]
        extra: Mapping[str, Any] = {}
        names = [seg.name for seg in full if isinstance(seg, PathField)]
        for name in names:
            found = _element(model, name) if model is not None else None
            if found is None:
                return  # (the path itself is checked elsewhere)
            model, extra = found
        allowed = _R4_REFERENCE_TYPES.get((kind, ".".join(names)))
        if allowed is None:
            listed = extra.get("enum_reference_types")
            allowed = frozenset(listed) if isinstance(listed, list) else None
        if allowed is not None and "Resource" not in allowed and referenced not in allowed:
            raise MapError(file, where, f"is {referenced}, but {kind}.{'.'.join(names)} refers to "
                           f"{', '.join(sorted(allowed))} only (FHIR R4)")


def _repeats(model: Any, name: str) -> bool:
    info = next((i for n, i in model.model_fields.items() if name in (n, i.alias)), None)
    annotation = info.annotation if info is not None else None
    return any(typing.get_origin(a) is list for a in (annotation, *typing.get_args(annotation)))


def _check_elements(file: str, where: str, path: ElementPath, resource_types: frozenset[str],
                    item_of_first: bool = False) -> frozenset[str]:
    """Every element along `path` exists (below the first too: `address[use?=home].ctiy` is refused at load, not
    by every message's validation), and so do the keys of its selectors; a repeating element is followed by the
    item it means (`performer[0]`): a value written as the whole list was refused by every message's validation
    (`Observation.performer is invalid (list_type)`). `item_of_first`: the first element's item is the child row's.
    Returns the codes a required binding allows at its end (empty: any)."""
    codes: set[str] = set()
    for resource_type in sorted(resource_types):
        model: Any = getattr(importlib.import_module(f"fhir.resources.R4B.{resource_type.lower()}"), resource_type)
        extra: Mapping[str, Any] = {}
        named = resource_type
        repeats = True  # (whether the element just named is a list: what an item's position or selector needs)
        for n, seg in enumerate(path):
            if isinstance(seg, PathField):
                found = _element(model, seg.name) if model is not None else None
                if found is None:
                    raise MapError(file, where, f"{named} has no element {seg.name!r}")
                at, listed, the_row_item = n + 1, _repeats(model, seg.name), item_of_first and n == 0
                repeats = listed or the_row_item
                if listed and not the_row_item and (at == len(path) or isinstance(path[at], PathField)):
                    fixed = format_path((*path[:at], Index(0), *path[at:]))
                    raise MapError(file, where, f"names {named}.{seg.name}, a list, without saying which item: "
                                   f"name one, e.g. {fixed}")
                model, extra = found
                named = f"{named}.{seg.name}"
            elif not repeats and isinstance(seg, Index | Select):
                # (its value, written where a list goes, was refused by every message's validation, naming the
                # pydantic error only: `string_type`; found by a new user's trial)
                fixed = format_path((*path[:n], *path[n + 1:]))
                raise MapError(file, where, f"names an item of {named}, which holds one value, not a list: "
                               f"name it without one, {fixed}")
            elif isinstance(seg, Index) and seg.position > MAX_POSITION:
                raise MapError(file, where, f"names position {seg.position} of {named}; a map names positions 0 to "
                               f"{MAX_POSITION} (one column each, written as the list's leading items)")
            elif isinstance(seg, Select) and model is not None:
                for key, value in seg.match:
                    if (element := _element(model, key)) is None:
                        raise MapError(file, where, f"{named} has no element {key!r} to select by")
                    allowed = closed_codes(element[1])
                    if allowed and value not in allowed:
                        # (a selector's code is written on the item it makes: the server would refuse every one)
                        raise MapError(file, where, f"selects {named} by {key} {value!r}, not a code of its required "
                                       f"value set ({', '.join(sorted(allowed))})")
        codes.update(closed_codes(extra) or ())
    return frozenset(codes)


# What each map `type` writes (`mapping.convert`), and the FHIR primitives whose JSON takes it: a number is no
# string, a string no number or boolean. A mismatch was found only by every message's validation, as
# `invalid-resource` blaming the row's data (every contact dead-lettered for a map's `type: integer` on birthDate).
_NUMBERS = frozenset({"Decimal", "Integer", "PositiveInt", "UnsignedInt", "Integer64"})
_FITS: Mapping[str, frozenset[str]] = {
    "integer": _NUMBERS,
    "decimal": frozenset({"Decimal"}),
    "boolean": frozenset({"Boolean"}),
}
_NOT_TEXT = _NUMBERS | {"Boolean"}
# Text that the element's own format refuses: a date and time in a FHIR date (Dataverse sends dates as date and
# time, so `type: dateTime` on birthDate is an easy slip), a date alone in an instant, any date in a time.
_WRONG_FORMAT: Mapping[str, frozenset[str]] = {
    "Date": frozenset({"dateTime", "instant"}),
    "Instant": frozenset({"date"}),
    "Time": frozenset({"date", "dateTime", "instant"}),
}


def _primitive(annotation: Any) -> str | None:
    """The FHIR primitive of an element's annotation (`Annotated[date, Date()]` → Date; bool → Boolean); None for a
    complex element."""
    stack = [annotation]
    while stack:
        kind = stack.pop()
        if kind is bool:
            return "Boolean"
        if typing.get_origin(kind) is typing.Annotated:
            return next((type(m).__name__ for m in typing.get_args(kind)[1:]), None)
        stack.extend(typing.get_args(kind))
    return None


def _end_of(path: ElementPath, resource_type: str) -> tuple[Any, Any] | None:
    """The model (None for a primitive) and the annotation of the element at the end of `path` (its element names
    followed); None where the path names no element (checked elsewhere)."""
    model: Any = getattr(importlib.import_module(f"fhir.resources.R4B.{resource_type.lower()}"), resource_type)
    annotation: Any = None
    for seg in path:
        if isinstance(seg, PathField):
            info = next((i for n, i in model.model_fields.items() if seg.name in (n, i.alias)), None) \
                if model is not None else None
            if info is None:
                return None
            annotation, model = info.annotation, _model_in(info.annotation)
    return (model, annotation) if annotation is not None else None


def _check_lookup_target(file: str, where: str, path: ElementPath, resource_types: frozenset[str]) -> None:
    """A lookup writes a whole FHIR Reference: its target is one (`subject`, `participant[0].individual`), not a
    part of one or a primitive (`generalPractitioner[0].reference` loaded, and every row with the lookup filled was
    `invalid-resource` blaming the row's data: found by an integration engineer's review)."""
    for resource_type in sorted(resource_types):
        end = _end_of(path, resource_type)
        if end is not None and getattr(end[0], "__name__", None) != "Reference":
            what = f"a FHIR {end[0].__name__}" if end[0] is not None else "a primitive"
            raise MapError(file, f"{where}.target", f"is {resource_type}.{format_path(path)}, {what}; a lookup writes "
                           "a whole Reference: name the Reference element itself (e.g. subject, "
                           "generalPractitioner[0])")


def _check_constants(file: str, where: str, path: ElementPath, resource_types: frozenset[str],
                     constants: Mapping[str, object]) -> None:
    """The values a map writes itself (a value map's codes, a default's `value`) are of the JSON type the element at
    the end of `path` takes: each was refused by every message's validation otherwise, as `invalid-resource`
    blaming the row (a code into `maritalStatus`, a CodeableConcept; YAML's unquoted NO, Norway's code, read as
    false into a string: found by an integration engineer's review)."""
    for resource_type in sorted(resource_types):
        end = _end_of(path, resource_type)
        if end is None:
            continue
        model, annotation = end
        for key, value in constants.items():
            if model is not None:
                raise MapError(file, f"{where}{key}", f"is {value!r}, but {resource_type}'s element there is a FHIR "
                               f"{getattr(model, '__name__', 'structure')}, a structure: name the part of it the "
                               "value goes to (e.g. maritalStatus.coding[0].code)")
            primitive = _primitive(annotation)
            if primitive is None:
                continue
            fits = primitive == "Boolean" if isinstance(value, bool) else \
                primitive in _NUMBERS if isinstance(value, int | float) else primitive not in _NOT_TEXT
            if not fits:
                hint = " (YAML reads an unquoted yes, no, on or off as a boolean: quote the code)" \
                    if isinstance(value, bool) else ""
                raise MapError(file, f"{where}{key}", f"is {value!r}, which a FHIR "
                               f"{primitive[:1].lower() + primitive[1:]} cannot hold{hint}")


def _check_type(file: str, where: str, path: ElementPath, resource_types: frozenset[str], kind: str) -> None:
    """The map's `type` writes what the element at the end of `path` takes (see `_FITS`)."""
    for resource_type in sorted(resource_types):
        model: Any = getattr(importlib.import_module(f"fhir.resources.R4B.{resource_type.lower()}"), resource_type)
        annotation: Any = None
        for seg in path:
            if isinstance(seg, PathField) and model is not None:
                info = next((i for n, i in model.model_fields.items() if seg.name in (n, i.alias)), None)
                if info is None:
                    return
                annotation, model = info.annotation, _model_in(info.annotation)
        if model is not None and annotation is not None:
            # A structure (a Coding, a Period, a Reference): a column's value written as all of it was refused by
            # every message's validation ("not a JSON object"; found by a new user's trial).
            raise MapError(file, f"{where}.type", f"is {kind!r}, but {resource_type}'s element there is a FHIR "
                           f"{getattr(model, '__name__', 'structure')}, a structure: name the part of it the column "
                           "goes to")
        primitive = _primitive(annotation) if model is None else None
        if primitive is None:
            continue
        fits = (primitive in _FITS[kind] if kind in _FITS else primitive not in _NOT_TEXT) \
            and kind not in _WRONG_FORMAT.get(primitive, ())
        if not fits:
            raise MapError(file, f"{where}.type", f"is {kind!r}, but {resource_type}'s element there is a FHIR "
                           f"{primitive[:1].lower() + primitive[1:]}")


def _check_codes(file: str, where: str, values: Mapping[str, Any], allowed: frozenset[str]) -> None:
    """The codes a value map (or a default) writes where FHIR binds the element to a required value set
    (Patient.gender, Encounter.status, ...): a misspelt one would reach the server."""
    for key, value in values.items():
        if allowed and str(value) not in allowed:
            raise MapError(file, f"{where}{key}", f"is {value!r}, not a code of the element's required value set "
                           f"({', '.join(sorted(allowed))})")


def _check_choice_key(file: str, where: str, key: str) -> None:
    """A value map's key is what the row sends: a choice column's integer value (`935000000`), or true/false for
    a two-option column. A key no row can send (`one`) left every row of that choice unmapped: invalid-resource."""
    if key in ("true", "false"):
        return
    try:
        int(key)
    except ValueError:
        raise MapError(file, where, f"is a key {key!r} no row can send: a value map's keys are a choice column's "
                       "integer values (935000000) or true/false for a two-option column") from None


def _check_resource(file: str, where: str, resource_type: str) -> None:
    if resource_type not in RESOURCE_TYPES:
        raise MapError(file, where, f"names {resource_type!r}; supported: {', '.join(RESOURCE_TYPES)}")


def _compile_path(file: str, where: str, text: str, resource_types: frozenset[str]) -> ElementPath:
    try:
        path = parse_path(text)
    except PathError as exc:
        raise MapError(file, where, str(exc)) from None
    head = path[0]
    assert isinstance(head, PathField)
    for resource_type in sorted(resource_types):  # (the same error on every run)
        if head.name not in _model_fields(resource_type):
            raise MapError(file, where, f"{resource_type} has no element {head.name!r}")
    owns = [i for i, seg in enumerate(path) if isinstance(seg, Own)]
    if len(owns) > 1 or (owns and (owns[0] + 1 == len(path) or not isinstance(path[owns[0] + 1], PathField))):
        # The row's item carries its mark: an item of elements (`note[row].text`), one per path.
        raise MapError(file, where, "uses [row] other than once, before an element of the item (note[row].text)")
    if owns:
        _check_row_item(file, where, path, owns[0], resource_types)
    return path


# Elements of an item that its mark (an extension) and FHIR's own identity of the item use: not a column's.
_NOT_A_ROW_ITEMS = frozenset({"extension", "modifierExtension", "id"})


def _check_row_item(file: str, where: str, path: ElementPath, at: int, resource_types: frozenset[str]) -> None:
    """`[row]` names an item of a repeating element of a complex datatype (`note`: Annotation), reached by element
    names only (an item found by a selector or a position has no single list to own an item in), and a column
    writes an element of it other than those its mark and id use."""
    if not all(isinstance(seg, PathField) for seg in path[:at]):
        raise MapError(file, where, "uses [row] below a selector or a position: [row] must follow element names "
                       "only (note[row].text)")
    after = path[at + 1]
    assert isinstance(after, PathField)
    if after.name in _NOT_A_ROW_ITEMS:
        raise MapError(file, where, f"writes {after.name} of the row's [row] item, which its mark and id use")
    for resource_type in sorted(resource_types):
        model: Any = getattr(importlib.import_module(f"fhir.resources.R4B.{resource_type.lower()}"), resource_type)
        for seg in path[:at - 1]:
            assert isinstance(seg, PathField)
            found = _element(model, seg.name)
            model = found[0] if found is not None else None
        last = path[at - 1]
        assert isinstance(last, PathField)
        info = next((i for n, i in model.model_fields.items() if last.name in (n, i.alias)), None) \
            if model is not None else None
        annotation = info.annotation if info is not None else None
        repeats = any(typing.get_origin(a) is list for a in (annotation, *typing.get_args(annotation)))
        if not repeats or _model_in(annotation) is None:
            raise MapError(file, where, f"uses [row] on {resource_type}.{format_path(path[:at])}, which is not a "
                           "repeating element of a complex datatype: [row] owns one item of such a list "
                           "(note[row].text)")


def _check_row_items(file: str, attributes: Sequence[AttributeMap]) -> None:
    """One column owns the row's item (a [row] item of several columns could not tell, from a change without
    images, whether a cleared column emptied it); and no other target names an item of that list by a selector
    or a position (it could be the row's item, or another system's)."""
    owners: dict[ElementPath, list[tuple[int, frozenset[str] | None]]] = {}
    for i, attr in enumerate(attributes):
        at = next((n for n, seg in enumerate(attr.path) if isinstance(seg, Own)), None)
        if at is None or attr.column is None:
            continue
        for other, types in owners.get(attr.path[:at], []):
            if types is None or attr.only_for is None or types & attr.only_for:  # (`only_for`: apart, never both)
                raise MapError(file, f"attributes[{i}].target", f"names the [row] item attributes[{other}] owns: "
                               "one column owns the row's item")
        owners.setdefault(attr.path[:at], []).append((i, attr.only_for))
    for i, attr in enumerate(attributes):
        for prefix in owners:
            if attr.path[:len(prefix)] == prefix and len(attr.path) > len(prefix) \
                    and not isinstance(attr.path[len(prefix)], Own):
                raise MapError(file, f"attributes[{i}].target", f"names an item of {format_path(prefix)} by a "
                               "selector or a position, beside the [row] item another target owns there")


def _format_error(err: Mapping[str, Any]) -> tuple[str, str]:
    loc = err.get("loc", ())
    where = ""
    for part in loc:
        if isinstance(part, int):
            where += f"[{part}]"
        elif part in ("str", "ResourceChoice", "function-after[_keys_as_text(), dict[str,union[str,int,bool]]]"):
            continue
        else:
            where += ("." if where else "") + str(part)
    if err.get("type") == "extra_forbidden" and loc and isinstance(loc[-1], str):
        near = difflib.get_close_matches(loc[-1], _spec_keys(), n=1)
        return where, "is not a key entity maps know" + (f" (did you mean `{near[0]}`?)" if near else "")
    if err.get("type") == "bool_type":
        return where, "must be true or false (unquoted)"
    # (a check of ours raises ValueError, which pydantic prefixes; the message says what it is already)
    return where or "(top level)", str(err.get("msg", "is invalid")).removeprefix("Value error, ")


@cache
def _spec_keys() -> tuple[str, ...]:
    """Every key of every part of an entity map (for a misspelt one's likely meaning)."""
    return tuple(sorted({name for model in _Strict.__subclasses__() for name in model.model_fields}))


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: the plain loader keeps the last silently, and
    a second `writeback: false` below the first turned a whole table off (found trying the product)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str | int | float | bool) and key is not None:
                raise _BadKey(type(key).__name__, key_node.start_mark.line + 1, "is not a plain key")
            if key in seen:
                raise _BadKey(str(key)[:60], key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _BadKey(Exception):
    def __init__(self, key: str, line: int, problem: str = "is given twice in one mapping") -> None:
        super().__init__(key, line)
        self.key, self.line, self.problem = key, line, problem


def _read_spec(path: Path) -> EntityMapSpec:
    file = path.name
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 (a safe loader)
    except _BadKey as exc:
        if exc.problem != "is given twice in one mapping":
            raise MapError(file, "(file)", f"holds a key that {exc.problem} (a {exc.key}, line {exc.line})") from None
        raise MapError(file, exc.key, f"is given twice in one mapping (line {exc.line}): YAML would keep the last "
                       "silently; keep one") from None
    except OSError as exc:
        raise MapError(file, "(file)", f"cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:  # an editor's Latin-1 or UTF-16 ("Unicode" in Notepad)
        raise MapError(file, "(file)", f"is not UTF-8 (byte {exc.start} cannot be read as UTF-8): save it as "
                       "UTF-8") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        # The parser's own words (a map file is configuration, never patient data): "expected ',' or '}', but got
        # '['" says what to fix; a line number alone did not (a new user's trial). A character the reader refuses
        # (a control character) has its reason and position in the file instead.
        parts: tuple[object, ...]
        if isinstance(exc, yaml.reader.ReaderError):
            char = exc.character
            at = f" at character {exc.position}"
            parts = (f"{exc.reason} ({f'U+{char:04X}' if isinstance(char, int) else repr(char)})",)
        else:
            parts = (getattr(exc, "context", None), getattr(exc, "problem", None))
        problem = " ".join(str(part) for part in parts if part)
        raise MapError(file, "(file)", f"is not valid YAML{at}" + (f": {problem}" if problem else "")) from None
    if not isinstance(raw, dict):
        raise MapError(file, "(top level)", "must be a mapping")
    try:
        return EntityMapSpec.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        # `resource: str | ResourceChoice`: for a mapping, the str branch's "valid string" hides the real fault.
        first = next((e for e in errors if not (e.get("type") == "string_type" and isinstance(e.get("input"), dict))),
                     errors[0])
        # A misspelt key (`resourc:`) is also a required one missing: the key given, with its hint, says more than
        # "`resource` Field required" (found by a new user's trial).
        first = next((e for e in errors if e.get("type") == "extra_forbidden"), first)
        where, problem = _format_error(first)
        raise MapError(file, where, problem) from None


def _check_one_owner(file: str, attributes: list[AttributeMap]) -> None:
    """Each element is one attribute's: of two with the same target, the later would overwrite the earlier (an
    empty column clearing what the other wrote)."""
    seen: dict[ElementPath, list[tuple[int, frozenset[str] | None]]] = {}
    for i, attr in enumerate(attributes):
        for j, only_for in seen.get(attr.path, []):
            if only_for is None or attr.only_for is None or only_for & attr.only_for:
                raise MapError(file, f"attributes[{i}].target", f"is also attributes[{j}]'s ({attr.target}): one "
                               "element cannot have two sources, the later would overwrite the earlier (for one "
                               "source per resource type, give each `only_for`)")
        seen.setdefault(attr.path, []).append((i, attr.only_for))


def _compile(file: str, spec: EntityMapSpec, specs: Mapping[str, tuple[str, EntityMapSpec]]) -> EntityMap:
    if isinstance(spec.resource, str):
        _check_resource(file, "resource", spec.resource)
        resource_type: str | None = spec.resource
        choice_column, choices = None, {}
    else:
        for k, t in spec.resource.values.items():
            _check_choice_key(file, f"resource.values.{k}", k)
            _check_resource(file, f"resource.values.{k}", t)
        resource_type, choice_column, choices = None, spec.resource.column, dict(spec.resource.values)
    types = frozenset(choices.values()) if resource_type is None else frozenset({resource_type})

    expansion: Expansion | None = None
    identity = spec.identity
    if spec.expansion is not None:
        parent = specs.get(spec.expansion.parent_table)
        if parent is None:
            raise MapError(file, "expansion.parent_table", f"names {spec.expansion.parent_table!r}, which has no map")
        parent_identity = parent[1].identity
        if parent_identity is None:
            raise MapError(file, "expansion.parent_table", "names a table whose map has no identity")
        parent_resource = parent[1].resource
        parent_types = {parent_resource} if isinstance(parent_resource, str) else set(parent_resource.values.values())
        if not types <= parent_types:
            # Its items are written into the parent row's resource: of another type, none is ever found (every
            # child row was skipped `no-entity-map` while `plan` said it would be written: found by a new user).
            raise MapError(file, "resource", f"names {', '.join(sorted(types - parent_types))}, which the map of "
                           f"{spec.expansion.parent_table} ({parent[0]}) does not produce: "
                           f"{', '.join(sorted(parent_types))}")
        element = _compile_path(file, "expansion.element", spec.expansion.element, types)
        if len(element) != 1:
            # (a selector or position stayed at the head of every attribute's path, and planning a child row raised:
            # found by an integration engineer's review)
            raise MapError(file, "expansion.element", f"is {spec.expansion.element!r}; name the repeating element "
                           "alone (identifier): each child row is one item of it, found by the row's mark")
        for kind in sorted(types):
            model = getattr(importlib.import_module(f"fhir.resources.R4B.{kind.lower()}"), kind)
            if not _repeats(model, spec.expansion.element):
                raise MapError(file, "expansion.element", f"is {kind}.{spec.expansion.element}, which holds one "
                               "value, not a list: each child row is one item of a repeating element")
        expansion = Expansion(spec.expansion.parent_table, spec.expansion.parent_link, spec.expansion.element,
                              spec.expansion.key, parent_identity.identifier_system,
                              parent_identity.fhir_id_column)
        identity = identity or parent_identity

    assert identity is not None
    attributes: list[AttributeMap] = []
    for i, attr in enumerate(spec.attributes):
        where = f"attributes[{i}]"
        only_for = frozenset(attr.only_for) if attr.only_for else None
        if only_for and not only_for <= types:
            raise MapError(file, f"{where}.only_for", "names a resource type this map does not produce")
        applies = only_for or types  # the types the target is written into, so the types it must exist in
        if expansion is not None:
            # Child rows map into one item of the parent's list: targets are relative to that item.
            path = parse_path(f"{expansion.element}.{attr.target}") if _valid(attr.target) else ()
            if not path:
                raise MapError(file, f"{where}.target", "is not a valid element path")
            codes = _check_elements(file, f"{where}.target", path, applies, item_of_first=True)
            if any(isinstance(seg, Own) for seg in path):
                raise MapError(file, f"{where}.target", "uses [row] in a child row's map: a child row's item is "
                               "already found by the row's mark; [row] is for a list in the row's own resource")
            path = path[1:]
        else:
            path = _compile_path(file, f"{where}.target", attr.target, applies)
            codes = _check_elements(file, f"{where}.target", path, applies)
        if attr.type is not None and attr.action in ("copy", "default"):
            _check_type(file, where, path if expansion is None else (PathField(expansion.element), *path),
                        applies, attr.type)
        full = path if expansion is None else (PathField(expansion.element), *path)
        if attr.action == "value_map":
            for key in attr.values or {}:
                _check_choice_key(file, f"{where}.values.{key}", key)
            _check_constants(file, f"{where}.values.", full, applies, dict(attr.values or {}))
            _check_codes(file, f"{where}.values.", dict(attr.values or {}), codes)
        elif attr.action == "default" or (attr.value is not None and attr.action == "copy"):
            _check_constants(file, f"{where}.", full, applies, {"value": attr.value})
            _check_codes(file, f"{where}.", {"value": attr.value}, codes)
        ref_system = ref_table = None
        if attr.action == "lookup":
            assert attr.resource is not None
            _check_resource(file, f"{where}.resource", attr.resource)
            _check_lookup_target(file, where, full, applies)
            makers = [s for _, s in specs.values() if s.identity and attr.resource in _types_of(s)]
            if attr.table is not None:
                makers = [s for s in makers if s.table == attr.table]
                if not makers:
                    raise MapError(file, f"{where}.table", f"names {attr.table!r}, whose map (if any) makes no "
                                   f"{attr.resource} with an identity")
            elif len(makers) > 1:
                # (the first by file name was taken, and every row naming the other table's rows was refused: found
                # by an integration engineer's review)
                raise MapError(file, f"{where}.table", f"is not given, and {len(makers)} maps make {attr.resource} "
                               f"({', '.join(sorted(s.table for s in makers))}): name the table whose rows the "
                               "lookup names")
            referenced = makers[0] if makers else None
            if referenced is None or referenced.identity is None:
                raise MapError(file, f"{where}.resource", f"no map produces {attr.resource}, so rows cannot be "
                               "referenced by their Dataverse identifier")
            ref_system, ref_table = referenced.identity.identifier_system, referenced.table
            _check_reference_type(file, f"{where}.resource", attr.resource, path, resource_types=applies,
                                  expansion=expansion)
        attributes.append(AttributeMap(
            column=attr.column, path=path, target=attr.target, action=attr.action, type=attr.type,
            values=dict(attr.values or {}), default=attr.value, reference_type=attr.resource,
            reference_system=ref_system, reference_table=ref_table, only_for=only_for,
        ))
    _check_row_items(file, attributes)
    _check_one_owner(file, attributes)
    if expansion is None:
        _check_required(file, attributes, types)
    _check_item_required(file, attributes, types, expansion)
    consent_types = frozenset(spec.consent.applies_to) if spec.consent else frozenset()
    if not consent_types <= types:
        # A misspelt type would silently switch the consent check off for the type meant.
        raise MapError(file, "consent.applies_to", f"names {', '.join(sorted(consent_types - types))}, which this "
                       f"map does not produce ({', '.join(sorted(types))})")
    return EntityMap(
        file=file, table=spec.table, writeback=spec.writeback, messages=frozenset(spec.messages),
        resource_type=resource_type, choice_column=choice_column, choices=choices,
        fhir_id_column=identity.fhir_id_column, identifier_system=identity.identifier_system,
        consent_types=consent_types, consent_column=spec.consent.column if spec.consent else None,
        expansion=expansion, attributes=tuple(attributes),
        row_items=any(isinstance(seg, Own) for attr in attributes for seg in attr.path),
    )


def _check_required(file: str, attributes: Sequence[AttributeMap], types: frozenset[str]) -> None:
    """Every element FHIR requires of a resource the map makes is written by an attribute (a column or a default):
    else the server refuses every create, and each message is dead-lettered blaming the row's data (found trying
    the product: a map without Observation.code passed every check). The row identifier is the product's own."""
    for kind in sorted(types):
        written = {"identifier", *(a.path[0].name for a in attributes
                                   if isinstance(a.path[0], PathField) and (a.only_for is None or kind in a.only_for)
                                   and _writes_alone(a, 1))}
        for name, names in required_elements(kind):
            if not written.intersection(names):
                raise MapError(file, "attributes", f"write no {kind}.{name}, which FHIR requires (1..1): the server "
                               f"would refuse every {kind} this map makes; map a column or a default to it (a "
                               "default inside it is written only beside a column's value: give it the element "
                               "itself, or a column)")


def _writes_alone(attr: AttributeMap, depth: int) -> bool:
    """Whether the attribute writes the element its path names at `depth` whatever the row holds: a column does
    (its value or its default), and a constant that is that element; a constant further inside (`code.text`) is
    written only where a column's value made the element (`paths.apply_state`), so alone it makes nothing (found by
    review: a map giving Observation.code only by such a constant passed the load checks, and planned no code)."""
    return attr.column is not None or len(attr.path) <= depth


def _items(path: ElementPath, model: Any) -> list[tuple[int, Any]]:
    """Each complex element `path` creates when absent (an item of a list: `component[0]`; or a single element:
    `valueQuantity`), as (the length of its prefix in `path`, its model); not the one the path ends at, which the
    column's value is whole."""
    out: list[tuple[int, Any]] = []
    for i, seg in enumerate(path):
        if not isinstance(seg, PathField) or model is None:
            continue
        found = _element(model, seg.name)
        model = found[0] if found is not None else None
        if model is None:
            continue
        end = i + 2 if i + 1 < len(path) and not isinstance(path[i + 1], PathField) else i + 1
        if end < len(path):
            out.append((end, model))
    return out


def _check_item_required(file: str, attributes: Sequence[AttributeMap], types: frozenset[str],
                         expansion: Expansion | None) -> None:
    """Every element FHIR requires of an item a map creates (`component[0]` needs `code`) is written by an attribute
    too, as `_check_required` asks of the resource: an Observation with only `component[0].valueQuantity.value`
    passed every check, and the server refused every one (the model refuses it: component.0.code Field required)."""
    # A child row's targets are relative to its item of the parent's list ([row] stands for that item).
    lead: ElementPath = (PathField(expansion.element), Own()) if expansion is not None else ()
    for kind in sorted(types):
        resource: Any = getattr(importlib.import_module(f"fhir.resources.R4B.{kind.lower()}"), kind)
        chosen = [(i, a) for i, a in enumerate(attributes) if a.only_for is None or kind in a.only_for]
        paths = [(i, (*lead, *a.path)) for i, a in chosen]
        for i, path in paths:
            for end, model in _items(path, resource):
                prefix = path[:end]
                written = {seg.name for (_, p), (_, a) in zip(paths, chosen, strict=True)
                           if len(p) > end and p[:end] == prefix and isinstance(seg := p[end], PathField)
                           and _writes_alone(a, end + 1 - len(lead))}
                if isinstance(prefix[-1], Select):
                    written.update(key for key, _ in prefix[-1].match)  # the selector writes its keys
                item = format_path(prefix[len(lead):]) or f"the row's item of {format_path(lead[:1])}"
                for name, names in required_elements(model.__name__):
                    if not written.intersection(names):
                        raise MapError(file, f"attributes[{i}].target", f"creates {kind}.{item} but no attribute "
                                       f"writes its {name}, which FHIR requires (1..1): the server would refuse "
                                       f"every {kind} this map makes; map a column or a default to it")


def _valid(target: str) -> bool:
    try:
        parse_path(target)
    except PathError:
        return False
    return True


def _types_of(spec: EntityMapSpec) -> set[str]:
    return {spec.resource} if isinstance(spec.resource, str) else set(spec.resource.values.values())


def load_maps(directory: Path) -> MapSet:
    """Read, validate and compile every `*.yaml` (or `*.yml`) map in `directory`."""
    if not directory.is_dir():
        raise MapError(str(directory), "(folder)", "is not a folder" if directory.exists() else "does not exist")
    specs: dict[str, tuple[str, EntityMapSpec]] = {}
    for path in sorted(directory.glob("*.y*ml")):
        spec = _read_spec(path)
        _check_file_name(path, spec, specs)
        specs[spec.table] = (path.name, spec)
    if not specs:
        raise MapError(str(directory), "(folder)", "holds no *.yaml (or *.yml) entity maps")
    compiled = {table: _compile(file, spec, specs) for table, (file, spec) in specs.items()}
    return MapSet(compiled, str(directory))


def map_faults(directory: Path) -> list[MapError]:
    """What `load_maps` refuses, each map file's first fault, not only the first file's (`check-config`: one round of
    fixes, found by a new user's trial). A file's references to others (its parent, its lookups' types) are checked
    only once every file reads: against a map that does not read, they would fail for that map's fault."""
    try:
        load_maps(directory)
        return []
    except MapError as exc:
        first = exc
    if not directory.is_dir():
        return [first]
    faults: list[MapError] = []
    specs: dict[str, tuple[str, EntityMapSpec]] = {}
    for path in sorted(directory.glob("*.y*ml")):
        try:
            spec = _read_spec(path)
            _check_file_name(path, spec, specs)
        except MapError as exc:
            faults.append(exc)
            continue
        specs[spec.table] = (path.name, spec)
    if not faults:
        for file, spec in specs.values():
            try:
                _compile(file, spec, specs)
            except MapError as exc:
                faults.append(exc)
    return faults or [first]


def _check_file_name(path: Path, spec: EntityMapSpec, specs: Mapping[str, tuple[str, EntityMapSpec]]) -> None:
    if spec.table != path.stem:
        # A table name mistyped in either place would leave that table's messages `no-entity-map` (skipped): the
        # two must agree. (`table: Contact` or `table: contact.orig` is no table name: only renaming fixes that.)
        other = f", or `table: {path.stem}`" if _LOGICAL.fullmatch(path.stem) else (
            "; a file here that is not a map (a backup) must not be named *.yaml or *.yml")
        raise MapError(path.name, "table", f"is {spec.table!r}, but a map's file is named for its table: "
                       f"{spec.table}.yaml{other}")
    if spec.table in specs:
        raise MapError(path.name, "table", f"{spec.table!r} is already mapped by {specs[spec.table][0]}")
