"""Is a resource valid FHIR R4: fhir.resources' models (R4B ≅ R4 for what maps write), and the invariants they leave
out. Pure. Errors name the element, never the value: the value may be patient data.

A resource is validated element by element: each top-level element's value (each item of a repeating element) goes
through the model's own type for that element (a pydantic `TypeAdapter` of the field's annotation: the validators
the whole model would run on it), and the checks the whole model makes beside its fields are made here: no unknown
element (the models forbid extras), no null in a list (in a repeating primitive, a null only where its `_` sibling
holds that item: FHIR's JSON, which the models leave out), required elements, one type per choice element. FHIR's
primitive rules the models leave out (`_primitives`) reach every value, a contained resource's by the type it names.
An item found valid is remembered (a bounded table of its exact value, `repr`, types included): the statuses, codes,
classes and units every row repeats, and the elements a row's next save leaves unchanged, are not validated again.
An item of a shape found valid before (a contact point, a name: the same elements, new values) has its values
checked by the model's types for them instead of the whole model again (`_values_valid`). The invariants the models
leave out (`check_invariants`) are checked with each item, so remembered items skip them too.
"""

from __future__ import annotations

import functools
import re
import types
import typing
from collections.abc import Collection, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from pydantic import TypeAdapter, ValidationError

from writeback.errors import WritebackError
from writeback.immutable import immutable
from writeback.reasons import Reason

# Items remembered as valid, per process. A table of this size holds a few thousand messages' worth of repeated
# values; when it is full it starts again (cheaper than keeping an order, and it fills again within a batch).
VALID_ITEMS_MAX = 20_000
_valid: set[tuple[str, str, bool, str]] = set()
# The shapes of complex items the model has found valid (`_shape_of`: their elements, nesting and the Python type
# of each value, not the values), by resource type, element and mode. Few: a map writes each element one way.
_valid_shapes: set[tuple[str, str, bool, Any]] = set()


def forget() -> None:
    """Forget the items and shapes remembered as valid (the benchmark starts every run as a new process would)."""
    _valid.clear()
    _valid_shapes.clear()


def _invalid(detail: str) -> WritebackError:
    return WritebackError(Reason.INVALID_RESOURCE, detail)


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


@immutable
class _Element:
    adapter: TypeAdapter[Any]  # of the value, or of one item when the element repeats
    repeats: bool
    required: bool  # min cardinality 1 (a complex element the model requires, or `element_required`)
    datatype: str  # the FHIR datatype of a complex value (of each item): "Identifier", "Reference", ...
    primitive: str | None = None  # the check of `_PRIMITIVES` its value needs (a primitive element)
    codes: frozenset[str] | None = None  # a required binding's codes (`closed_codes`)
    complex: bool = False  # a complex datatype's or a resource's value: a JSON object


# What FHIR R4 asks of primitive values and the models leave out. "space": a uri, url, canonical, oid, uuid or
# id holds no whitespace (their regexes: `\S*`, ...); "text": a string or markdown holds no control character
# but tab, CR and LF (the FHIR engine refuses the write otherwise: better `invalid-resource`, naming the column,
# at planning than `fhir-rejected` from the server, and the dry run says so too).
# And each primitive's JSON type (FHIR's JSON format): a boolean is true or false, an integer and a decimal are
# numbers, every other primitive is a string. The models coerce in pydantic's lax mode ("1.5" to a decimal, 1 to
# a boolean, text holding JSON to a complex element), but what is sent is the resource as planned, not the
# model's copy: a decimal copied from a text column went to the server as a JSON string.
_PRIMITIVES = {"Uri": "space", "Url": "space", "Canonical": "space", "Oid": "space", "Uuid": "space",
               "Id": "space", "String": "text", "Markdown": "text", "Decimal": "decimal", "Integer": "integer",
               "PositiveInt": "integer", "UnsignedInt": "integer"}
# A contained resource's datatype in the models: its elements are those of the type it names.
_ANY_RESOURCE = frozenset({"Resource", "DomainResource"})
_UCUM = "http://unitsofmeasure.org"
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
# The JSON type each check asks for, and its name in the error. (bool is a subclass of int: types compared exactly.)
_JSON_TYPES: Mapping[str, tuple[frozenset[type], str]] = {
    "space": (frozenset({str}), "string"), "text": (frozenset({str}), "string"),
    "string": (frozenset({str}), "string"), "boolean": (frozenset({bool}), "boolean"),
    "integer": (frozenset({int}), "integer"), "decimal": (frozenset({int, float, Decimal}), "number"),
}


def _primitive(item: Any) -> str | None:
    """The check a primitive element's value needs (`_JSON_TYPES`); None for anything else."""
    if item is bool:
        return "boolean"
    if typing.get_origin(item) is not typing.Annotated:
        return None  # (a complex datatype, or `fhir_comments`)
    return next((_PRIMITIVES[type(m).__name__] for m in typing.get_args(item)[1:]
                 if type(m).__name__ in _PRIMITIVES), "string")


@functools.cache
def _shape(datatype: str) -> Mapping[str, tuple[str, str]]:
    """A complex datatype's elements that need a primitive check (`(a check of `_JSON_TYPES`, "")`), hold a code of a
    required binding (`("codes", "")`: `_bindings`) or hold a complex datatype to look into (`("complex", its
    name)`), by JSON name."""
    try:
        model = get_fhir_model_class(datatype)
    except (KeyError, ValueError, ImportError):
        return {}
    out: dict[str, tuple[str, str]] = {}
    for name, info in model.model_fields.items():
        inner = _optional_inner(info.annotation)
        item = _optional_inner(typing.get_args(inner)[0]) if typing.get_origin(inner) is list else inner
        if closed_codes(info.json_schema_extra) is not None:  # (text: a value not text the model refuses)
            out[info.alias or name] = ("codes", "")
        elif (check := _primitive(item)) is not None:
            out[info.alias or name] = (check, "")
        elif (kind := _complex_kind(item)) is not None:
            out[info.alias or name] = ("complex", kind)
    return out


def _complex_kind(annotation: Any) -> str | None:
    """The FHIR datatype a model's annotation names (`abc.PeriodType`: "Period"); None for a primitive."""
    kind = getattr(_optional_inner(annotation), "__name__", "")
    return kind.removesuffix("Type") if kind.endswith("Type") and len(kind) > 4 else None


@functools.cache
def _bindings(datatype: str) -> Mapping[str, frozenset[str]]:
    """A complex datatype's `code` elements with a required binding, by JSON name: their codes."""
    out: dict[str, frozenset[str]] = {}
    for name, info in get_fhir_model_class(datatype).model_fields.items():
        if (codes := closed_codes(info.json_schema_extra)) is not None:
            out[info.alias or name] = codes
    return out


def _refuse_codes(kind: str, codes: frozenset[str], value: Any, loc: tuple[int | str, ...]) -> None:
    # The models accept any code (fhir.resources leaves bindings to its users): the server would store
    # Observation.status "finished". The detail lists the value set's codes, never the value.
    for i, one in enumerate(value) if isinstance(value, list) else ((None, value),):
        if isinstance(one, str) and one not in codes:
            where = loc if i is None else (*loc, i)
            raise _invalid(f"{kind}.{_loc(where)} is invalid (not a code of its required value set: "
                           f"{', '.join(sorted(codes))})")


def _primitives(kind: str, check: str, value: Any, loc: tuple[int | str, ...]) -> None:
    """`value` (of the `check` of `_shape`, or of a complex datatype's name) as FHIR's primitives ask."""
    if value is None:
        return  # absent, to the models too
    if (json_type := _JSON_TYPES.get(check)) is not None:
        if type(value) not in json_type[0]:
            raise _invalid(f"{kind}.{_loc(loc)} is invalid (not a JSON {json_type[1]})")
        if check in {"space", "text"} and (
                any(c.isspace() for c in value) if check == "space" else _CONTROL.search(value)):
            what = "holds whitespace" if check == "space" else "holds a control character"
            raise _invalid(f"{kind}.{_loc(loc)} is invalid ({what})")
        return
    if not isinstance(value, dict):
        raise _invalid(f"{kind}.{_loc(loc)} is invalid (not a JSON object)")
    if check in _ANY_RESOURCE and isinstance(value.get("resourceType"), str):
        check = value["resourceType"]  # a contained resource: the elements of the type it names
    shape = _shape(check)
    for key, item in value.items():
        found = shape.get(key)
        if found is None:
            continue
        if isinstance(item, list) and (found[0] != "complex" or key.startswith("_")) and None in item:
            _paired_nulls(kind, value, key, item, loc)
        if found[0] == "codes":
            _refuse_codes(kind, _bindings(check)[key], item, (*loc, key))
            continue
        one_check = found[0] if found[0] != "complex" else found[1]
        if isinstance(item, list):
            for i, one in enumerate(item):
                _primitives(kind, one_check, one, (*loc, key, i))
        else:
            _primitives(kind, one_check, item, (*loc, key))


# fhir.resources copies the codes a required binding allows from the element's short text (its `title`, e.g.
# "registered | preliminary | final | amended +") into `enum_values`; FHIR ends a short with "+" when the value set
# has more codes than the short shows. So a trailing "+" marks a truncated list, not an open binding (fhir.resources
# carries no binding strength at all). In R4 an element of type `code` whose short lists codes has a required
# binding (Observation.status, Encounter.status, Identifier.use, ContactPoint.system, AdministrativeGender, ...), so
# a code outside the value set is refused. The rest of each truncated list that the supported resources reach is
# taken from the R4 value set, keyed by the codes fhir.resources does list (test_value_sets checks none is missing).
_REST_OF_TRUNCATED: Mapping[tuple[str, ...], tuple[str, ...]] = {
    # http://hl7.org/fhir/R4/valueset-observation-status.html
    ("registered", "preliminary", "final", "amended"): ("corrected", "cancelled", "entered-in-error", "unknown"),
    # http://hl7.org/fhir/R4/valueset-encounter-status.html
    ("planned", "arrived", "triaged", "in-progress", "onleave", "finished", "cancelled"): ("entered-in-error",
                                                                                          "unknown"),
}


def closed_codes(json_schema_extra: Any) -> frozenset[str] | None:
    """The codes FHIR allows in a `code` element with a required binding, from its field's `json_schema_extra`;
    None when the element lists none, or when its list is truncated and its value set unknown here."""
    listed = json_schema_extra.get("enum_values") if isinstance(json_schema_extra, dict) else None
    if not listed:
        return None
    if "etc." in listed:
        # An open list ("text/cql | text/fhirpath | application/x-fhir-query | etc.": Expression.language, an
        # extensible binding): the codes shown are examples, not the value set (found by review).
        return None
    if listed[-1] != "+":
        return frozenset(listed)
    rest = _REST_OF_TRUNCATED.get(tuple(listed[:-1]))
    return None if rest is None else frozenset((*listed[:-1], *rest))


def _optional_inner(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


@functools.cache
def _elements(resource_type: str) -> Mapping[str, _Element]:
    """The resource's elements by their JSON name, with the model's type for each."""
    out: dict[str, _Element] = {}
    for name, info in get_fhir_model_class(resource_type).model_fields.items():
        inner = _optional_inner(info.annotation)
        repeats = typing.get_origin(inner) is list
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        # (an item of a repeating primitive is Optional: a null stands for it where its `_name` sibling holds one)
        item = _optional_inner(typing.get_args(inner)[0]) if repeats else inner
        out[info.alias or name] = _Element(TypeAdapter(item), repeats,
                                           info.is_required() or extra.get("element_required") is True,
                                           getattr(item, "__name__", "").removesuffix("Type"), _primitive(item),
                                           closed_codes(extra), _complex_kind(item) is not None)
    return out


@functools.cache
def _required(resource_type: str) -> tuple[str, ...]:
    return tuple(name for name, element in _elements(resource_type).items() if element.required)


def required_elements(resource_type: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """What a resource of this type must hold (1..1): each element, or choice element with its types' names
    (`value[x]`), as (name, the element names that give it)."""
    return (*((name, (name,)) for name in _required(resource_type)),
            *((f"{prefix}[x]", names) for prefix, names in _required_choices(resource_type)))


@functools.cache
def _required_choices(resource_type: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Each choice element the resource requires (`MedicationRequest.medication[x]`, 1..1): its name and its
    types' element names."""
    groups: dict[str, list[str]] = {}
    for name, info in get_fhir_model_class(resource_type).model_fields.items():
        extra = info.json_schema_extra
        if isinstance(extra, dict) and extra.get("one_of_many_required") is True:
            groups.setdefault(str(extra.get("one_of_many")), []).append(info.alias or name)
    return tuple((prefix, tuple(names)) for prefix, names in groups.items())


@functools.cache
def choice_siblings(resource_type: str) -> Mapping[str, tuple[str, ...]]:
    """Each type of a choice element of the resource (`value[x]`: valueQuantity, valueString, ...) → the element's
    other types. A resource holds one type of a choice element at most (FHIR), so writing one removes the others."""
    groups: dict[str, list[str]] = {}
    for name, info in get_fhir_model_class(resource_type).model_fields.items():
        extra = info.json_schema_extra
        if isinstance(extra, dict) and isinstance(prefix := extra.get("one_of_many"), str):
            groups.setdefault(prefix, []).append(info.alias or name)
    return {one: tuple(other for other in group if other != one) for group in groups.values() for one in group}


def validate(resource: dict[str, Any], *, partial: bool, required: Mapping[str, str] | None = None,
             ours: Mapping[str, Collection[Mapping[str, Any]]] | None = None, whole: bool = False) -> None:
    """Structural validation (fhir.resources); the error names the element, never the value.

    `partial`: the resource holds only the elements the map owns, so required elements may be absent, except
    those in `required` (owned element → the column that feeds it): a row's whole state that leaves one of those
    empty cannot make a valid resource (Encounter.class, Observation.code, ...).
    `ours`: values this product built, by FHIR datatype, valid by construction from a map's checked constants and
    row GUIDs (the row identifier, the identifier-only reference of a lookup), and taken as such only where an
    element of that datatype holds them: each row has its own, so remembering them would only push out what
    repeats.
    `whole`: each element holds everything the map owns in it (the row's whole state, no column left as the server
    has it), so an item missing an element FHIR requires of it (`component[0]` without `code`) is refused as the
    model refuses it: the map owns that element (`maps` refuses a map that creates the item without it), and its
    column is empty.
    """
    kind = str(resource["resourceType"])
    siblings = choice_siblings(kind)
    for name, value in resource.items():
        if name not in siblings or value is None:  # (None: absent)
            continue
        clash = [other for other in siblings[name] if resource.get(other) is not None]
        if clash:
            # The model's own error for this names no element ("(resource) is invalid"): say which, and whence.
            both = [name, *clash]
            columns = [required[e] for e in both if required and e in required]
            whence = f" (columns {', '.join(columns)})" if len(columns) == len(both) else ""
            raise _invalid(f"{kind} holds {' and '.join(both)}{whence}: a choice element holds one type at most; "
                           "leave only one of them with a value in Dataverse")
    elements = _elements(kind)
    for name, value in resource.items():
        if name == "resourceType" or value is None:  # (None: absent, to the models too)
            continue
        if (element := elements.get(name)) is None:
            raise _invalid(f"{kind}.{name} is invalid (extra_forbidden)")
        known = ours.get(element.datatype, ()) if ours else ()
        if not element.repeats:
            if value not in known:
                _check(kind, element, value, (name,), partial=partial, whole=whole)
            continue
        if not isinstance(value, list):
            raise _invalid(f"{kind}.{name} is invalid (list_type)")
        if any(item is None for item in value):
            if element.primitive is None and not name.startswith("_"):
                raise _invalid(f"{kind}.{name} is invalid (list_type)")  # (the models refuse it too)
            _paired_nulls(kind, resource, name, value, ())
        for i, item in enumerate(value):
            if item is not None and item not in known:
                _check(kind, element, item, (name, i), partial=partial, whole=whole)
    for prefix, names in _required_choices(kind):  # absent like a required element: the same rule
        if all(resource.get(n) is None for n in names):
            if not partial:
                raise _invalid(f"{kind}.{prefix}[x] is invalid (missing)")
            owned = [required[n] for n in names if required and n in required]
            if owned:
                raise _invalid(f"{kind}.{prefix}[x] is required, and column {', '.join(owned)} that gives it "
                               "is empty")
    for name in _required(kind):
        # (a primitive given by its extensions alone is there, as the model has it: `_status` with an extension)
        if resource.get(name) is None and not _extended(resource.get(f"_{name}")):
            if not partial:
                raise _invalid(f"{kind}.{name} is invalid (missing)")
            if required and name in required:
                raise _invalid(f"{kind}.{name} is required, and column {required[name]} that gives it is empty")


def _paired_nulls(kind: str, container: Mapping[str, Any], name: str, items: list[Any],
                  loc: tuple[int | str, ...]) -> None:
    """FHIR's JSON: an item of a repeating primitive is null only where its `_name` sibling holds that item's id or
    extensions, and the other way round (both arrays the same length). The models take any null in such a list."""
    partner_name = name[1:] if name.startswith("_") else f"_{name}"
    partner = container.get(partner_name)
    for i, item in enumerate(items):
        if item is None and not (isinstance(partner, list) and len(partner) == len(items) and partner[i] is not None):
            raise _invalid(f"{kind}.{_loc((*loc, name, i))} is invalid (null, with nothing at its place in "
                           f"{partner_name})")


def _extended(sibling: Any) -> bool:
    return isinstance(sibling, dict) and bool(sibling.get("extension"))


def _check(kind: str, element: _Element, value: Any, loc: tuple[int | str, ...], *, partial: bool,
           whole: bool = False) -> None:
    key = (kind, str(loc[0]), partial and not whole, repr(value))
    if key in _valid:
        return
    if element.primitive is not None or element.complex:
        # First, so that a value of another JSON type than its element's is named where it is: the model reads
        # text holding JSON into a complex element, and some of its validators raise on a number (a `url`).
        _primitives(kind, element.primitive or element.datatype, value, loc)
    shape = (*key[:3], _shape_of(value)) if isinstance(value, dict) and element.datatype else None
    if shape is None or shape not in _valid_shapes or not _values_valid(element.datatype, value):
        _model_check(kind, element, value, loc, partial=partial, whole=whole)
        if shape is not None:
            if len(_valid_shapes) >= VALID_ITEMS_MAX:
                _valid_shapes.clear()
            _valid_shapes.add(shape)
    if element.codes is not None:
        _refuse_codes(kind, element.codes, value, loc)
    _per1(kind, value, loc)
    if element.datatype == "Duration" and (whole or not partial):
        # (a change without images names the value alone: its code is checked where it meets the server's copy,
        # `check_invariants` in `converge`)
        _drt1(kind, value, loc)
    if len(_valid) >= VALID_ITEMS_MAX:
        _valid.clear()
    _valid.add(key)


# An item of a shape the model has found valid differs from that one in its values only: each value goes through
# the model's own type for its element (the validators the model runs on it, a pydantic `TypeAdapter` of the
# field's annotation), and the model's checks across elements, which look at which elements are present only
# (nulls in lists, required elements, one type per choice), would say what they said of that item. About a tenth
# of the model's cost for a contact point or a name. A value its type refuses sends the item through the whole
# model, whose error names the element.
def _shape_of(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple((key, _shape_of(item)) for key, item in value.items())
    if isinstance(value, list):
        return (list, *(_shape_of(item) for item in value))
    return type(value)



@functools.cache
def _value_types(datatype: str) -> Mapping[str, tuple[TypeAdapter[Any], str | None]] | None:
    """A complex datatype's elements by JSON name: the model's type for the value (for each item, when the element
    repeats) and, for a complex element, its datatype's name. None for a datatype this cannot look into."""
    try:
        model = get_fhir_model_class(datatype)
    except (KeyError, ValueError, ImportError):
        return None
    out: dict[str, tuple[TypeAdapter[Any], str | None]] = {}
    for name, info in model.model_fields.items():
        inner = _optional_inner(info.annotation)
        item: Any = typing.get_args(inner)[0] if typing.get_origin(inner) is list else info.annotation
        # (a contained resource's elements are its own type's, which it names itself: not looked into)
        complex_kind = kind if (kind := _complex_kind(item)) not in _ANY_RESOURCE else None
        out[info.alias or name] = (TypeAdapter(item), complex_kind)
    return out


def _values_valid(datatype: str, value: dict[str, Any]) -> bool:
    """Each value of an item of a shape found valid, through the model's type for its element."""
    types_of = _value_types(datatype)
    if types_of is None:
        return False
    for key, item in value.items():
        if (found := types_of.get(key)) is None:
            return False
        adapter, complex_kind = found
        for one in item if isinstance(item, list) else (item,):
            if isinstance(one, dict):
                if complex_kind is None or not _values_valid(complex_kind, one):
                    return False
                continue
            try:
                adapter.validate_python(one)
            except (ValidationError, ValueError, TypeError, AttributeError, KeyError):
                return False  # (the whole model says why)
    return True


def _model_check(kind: str, element: _Element, value: Any, loc: tuple[int | str, ...], *, partial: bool,
                 whole: bool) -> None:
    """`value` through the model's type for its element; raises what the model refuses, naming the element."""
    try:
        element.adapter.validate_python(value)
    except ValidationError as exc:
        for error in exc.errors():
            kind_of = str(error.get("type", "error"))
            where = tuple(error.get("loc", ()))
            if partial and "missing" in kind_of and not (whole and where):
                continue  # an element the map does not own may be absent
            if kind_of == "extra_forbidden":
                # The unknown name is the input's, not the model's: text a column held (JSON in a text column
                # mapped onto a complex element) must not reach the detail.
                raise _invalid(f"{kind}.{_loc((*loc, *where[:-1]))} holds an element FHIR does not define "
                               "(extra_forbidden)") from None
            raise _invalid(f"{kind}.{_loc((*loc, *where))} is invalid ({kind_of})") from None
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        # Validators in fhir.resources raise plain errors too: a `url` that is a number (AttributeError), a
        # contained resource of a type FHIR does not define (KeyError).
        raise _invalid(f"{kind}.{_loc(loc)} is invalid ({type(exc).__name__})") from None


def _when(text: str) -> tuple[datetime, int] | None:
    """A FHIR date/dateTime/instant as an instant and its precision (characters), for comparisons."""
    try:
        if len(text) == 4:
            return datetime(int(text), 1, 1, tzinfo=UTC), 4
        if len(text) == 7:
            return datetime(int(text[:4]), int(text[5:7]), 1, tzinfo=UTC), 7
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)), len(text)


def _backwards(start: str, end: str) -> bool:
    """per-1: end before start, compared at the precision both have."""
    a, b = _when(start), _when(end)
    if a is None or b is None:
        return False
    if a[1] > 10 and b[1] > 10:
        return b[0] < a[0]
    n = min(a[1], b[1], 10)
    return end[:n] < start[:n]


def check_required_kept(resource: Mapping[str, Any], columns: Mapping[str, str]) -> None:
    """A change without images that empties an element FHIR requires (`columns`: the elements it writes → a column
    feeding each) cannot make a valid resource, as a whole state that leaves it empty cannot (`validate`'s
    `required`): refused here, naming the column, not by the server (found by review: Encounter.class cleared)."""
    kind = str(resource.get("resourceType", "(resource)"))
    try:
        required = set(_required(kind))
    except (KeyError, ValueError, ImportError):
        return
    for name, column in columns.items():
        if name in required and resource.get(name) in (None, [], {}):
            raise _invalid(f"{kind}.{name} is required, and column {column} that gives it is empty")


def check_invariants(resource: Mapping[str, Any]) -> None:
    """FHIR invariants fhir.resources does not check, for the elements maps write. per-1: a Period's end is not
    before its start; drt-1: a Duration of the resource (Encounter.length) with a value has a UCUM code of time.
    (`validate` checks them too, for each item it has not seen before.)"""
    kind = str(resource.get("resourceType", "(resource)"))
    _per1(kind, resource, ())
    try:
        elements = _elements(kind)
    except (KeyError, ValueError, ImportError):
        return
    for name, value in resource.items():
        if (element := elements.get(name)) is not None and element.datatype == "Duration":
            _drt1(kind, value, (name,))


def _drt1(kind: str, value: Any, loc: tuple[int | str, ...]) -> None:
    """drt-1, which the models leave out: a Duration with a value has a code, and UCUM's if a system is named
    ("45" of what: Encounter.length from a column holding a number, found by review)."""
    if isinstance(value, dict) and value.get("value") is not None and (
            not value.get("code") or value.get("system", _UCUM) != _UCUM):
        raise _invalid(f"{kind}.{_loc(loc)} holds a value without a UCUM code of time (FHIR invariant drt-1): map "
                       "its code and system, e.g. constants `min` and http://unitsofmeasure.org")


def _per1(kind: str, node: Any, where: tuple[str | int, ...]) -> None:
    # `where` is a tuple, made into text only for the error: formatting it at every node was most of the cost.
    if isinstance(node, dict):
        start, end = node.get("start"), node.get("end")
        if isinstance(start, str) and isinstance(end, str) and _backwards(start, end):
            raise _invalid(f"{kind}.{_loc(where)} ends before it starts (FHIR invariant per-1)")
        for key, value in node.items():
            if isinstance(value, dict | list):
                _per1(kind, value, (*where, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            if isinstance(value, dict | list):
                _per1(kind, value, (*where, i))
