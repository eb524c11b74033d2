"""Parse the JSON `RemoteExecutionContext` Dataverse posts to Service Bus into plain, typed data.

Pure: bytes and a property mapping in, a `Message` out, or a `WritebackError` with a reason code.
Every error text names fields, never their values.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import field
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, TypeAlias

import msgspec

from writeback.errors import WritebackError
from writeback.immutable import immutable
from writeback.reasons import Reason

CONTRACTS = "http://schemas.microsoft.com/xrm/2011/Contracts"
CLAIMS = "http://schemas.microsoft.com/xrm/2011/Claims/"
MAX_BODY_BYTES = 1024 * 1024  # Dataverse caps bodies at 192 KB; anything near a MiB is not from Dataverse.
MAX_VALUE_DEPTH = 12  # An Entity inside an EntityCollection inside an Entity is as deep as real bodies go.

_DATE = re.compile(r"^/Date\((-?\d{1,15})([+-]\d{4})?\)/$")
_CANONICAL_GUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
# GUIDs and dates as read, by their text: a body repeats its row's id (PrimaryEntityId, the Target's, each image's)
# and its save's time (each image's modifiedon), and a batch its organization's, users' and business unit's ids;
# reading them was nearly a tenth of planning a message. Bounded: emptied when full (cheaper than keeping an order,
# and a batch fills it again with what it repeats). Only what was read without error is kept.
_READ_MAX = 4096
# Texts longer than any GUID or date Dataverse sends are not kept (a long free-text column starting "/Date(" would
# stay in memory otherwise; found by review): `urn:uuid:` and 36 characters; `/Date(-999999999999999+0000)/`.
_GUID_TEXT_MAX = 45
_DATE_TEXT_MAX = 29
_guids_read: dict[str, str] = {}
_dates_read: dict[str, datetime] = {}  # only texts that are dates
# A UTF-16 surrogate, escaped or raw: valid only in pairs; a lone one cannot be written out as UTF-8 again.
_SURROGATE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}|[\ud800-\udfff]")
# Decimals exactly as written ("72.50" keeps its precision, as a FHIR decimal does); lone surrogates, raw or
# escaped, are refused as invalid text.
_BODY = msgspec.json.Decoder(float_hook=Decimal)
_AT_BYTE = re.compile(r"\(byte (\d+)\)")
# What a Dataverse logical name (a table, a column) looks like: ASCII letters, digits and underscores, from a letter
# or underscore (publisher prefixes: `msemr_`). Only a name of this form is kept or shown in an error text: anything
# else in its place was put there by a sender, and may be a patient's name or birth date. Any case is taken (the
# table is lowercased, as it always was); explicit ranges, not \w, so no other script's letters pass. The bound is
# SQL Server's identifier limit (128), wide of any Dataverse name: what it stops is a sentence, not a long name.
# MessageName takes the same form: Dataverse's own (Create, Update) and custom API names (`new_MyAction`).
_LOGICAL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_LOGICAL_FORM = "a logical name (up to 128 ASCII letters, digits and underscores, not starting with a digit)"
NIL_GUID = "00000000-0000-0000-0000-000000000000"
_MIME_TYPE = re.compile(r"[A-Za-z0-9!#$&^_.+-]{1,40}/[A-Za-z0-9!#$&^_.+-]{1,40}")


@immutable
class OptionSet:
    value: int


@immutable
class Money:
    value: Decimal


@immutable
class EntityRef:
    id: str
    logical_name: str
    name: str | None = field(default=None, repr=False)


@immutable
class Opaque:
    """A value of a `__type` this product does not interpret; mapping it is an error, carrying it is not."""

    type_name: str


Value: TypeAlias = (
    "bool | int | float | Decimal | str | datetime | OptionSet | Money | EntityRef | Opaque"
    " | Entity | tuple[Any, ...] | None"
)


@immutable
class Entity:
    logical_name: str
    id: str | None
    attributes: Mapping[str, Value]
    formatted: Mapping[str, str] = field(default_factory=dict, repr=False)


@immutable
class Properties:
    """The Service Bus application properties Dataverse sets beside the body (all optional)."""

    organization: str | None = None
    user: str | None = None
    initiating_user: str | None = None
    entity_logical_name: str | None = None
    request_name: str | None = None
    initiating_user_agent: str | None = None
    max_size_exceeded: bool = False


@immutable
class Message:
    message_name: str
    table: str
    record_id: str
    initiating_user_id: str | None
    user_id: str | None
    correlation_id: str | None
    request_id: str | None
    operation_id: str | None
    organization_id: str | None
    organization_name: str | None
    depth: int | None
    stage: int | None
    operation_created_on: datetime | None
    target: Entity | None
    pre_image: Entity | None
    post_image: Entity | None
    properties: Properties = field(default_factory=Properties)

    @property
    def payload_dropped(self) -> bool:
        return self.properties.max_size_exceeded


def forget() -> None:
    """Forget the GUIDs and dates read (the benchmark starts every run as a new process would)."""
    _guids_read.clear()
    _dates_read.clear()


def _fail(detail: str) -> WritebackError:
    return WritebackError(Reason.MALFORMED_MESSAGE, detail)


def parse_guid(raw: object, where: str) -> str:
    value = raw if type(raw) is str else _unwrap_primitive(raw)  # (a GUID is nearly always a plain string)
    if not isinstance(value, str):
        raise _fail(f"{where} is not a GUID string")
    guid = _guids_read.get(value)
    if guid is not None:
        return guid
    if _CANONICAL_GUID.fullmatch(value):  # the form Dataverse sends; uuid.UUID for the rest (braces, urn:)
        guid = value.lower()
    else:
        try:
            guid = str(uuid.UUID(value))
        except ValueError:
            raise _fail(f"{where} is not a valid GUID") from None
    if len(value) <= _GUID_TEXT_MAX:
        if len(_guids_read) >= _READ_MAX:
            _guids_read.clear()
        _guids_read[value] = guid
    return guid


def _optional_guid(body: Mapping[str, Any], key: str) -> str | None:
    raw = body.get(key)
    if raw is None:
        return None
    return parse_guid(raw, key)


def parse_date(text: str) -> datetime | None:
    """`/Date(ms)/` or `/Date(ms+hhmm)/` → an aware datetime at that instant, in the given offset."""
    if not text.startswith("/Date("):  # most strings are not dates: no regex for them
        return None
    when = _dates_read.get(text)
    if when is not None:
        return when
    when = _read_date(text)
    if when is not None and len(text) <= _DATE_TEXT_MAX:
        if len(_dates_read) >= _READ_MAX:
            _dates_read.clear()
        _dates_read[text] = when
    return when


def _read_date(text: str) -> datetime | None:
    match = _DATE.match(text)
    if not match:
        return None
    millis, offset = match.groups()
    tz: timezone = UTC
    if offset:
        sign = -1 if offset[0] == "-" else 1
        hours, minutes = int(offset[1:3]), int(offset[3:5])
        if hours > 23 or minutes > 59:
            return None
        tz = timezone(sign * timedelta(hours=hours, minutes=minutes))
    try:
        return datetime.fromtimestamp(int(millis) / 1000, tz=tz)
    except (OverflowError, OSError, ValueError):
        return None


def _type_name(raw: Mapping[str, Any]) -> str | None:
    t = raw.get("__type")
    if not isinstance(t, str):
        return None
    return t.split(":", 1)[0]


def _unwrap_primitive(raw: object) -> object:
    """`{"__type": "Guid:#System", "__value": v}` → v; everything else as it is."""
    if isinstance(raw, dict) and "__value" in raw:
        t = raw.get("__type")
        if isinstance(t, str) and t.endswith(":#System"):
            return raw["__value"]
    return raw


def _decimal(raw: int | float | str | Decimal) -> Decimal | None:
    """A finite Decimal, or None: NaN and Infinity are no Dataverse number, and sNaN raises on comparison."""
    try:
        number = Decimal(str(raw))
    except ArithmeticError:
        return None
    return number if number.is_finite() else None


# JSON objects are `dict`s here (`decode_body`): `isinstance` against the `Mapping` ABC costs several times as much,
# and it ran ~40 times per message.
def parse_value(raw: object, where: str, depth: int = 0) -> Value:
    if type(raw) is str:  # most values: text, most of it no date (checked first: a tenth of parsing a body)
        return raw if not raw.startswith("/Date(") or (when := parse_date(raw)) is None else when
    if depth > MAX_VALUE_DEPTH:
        raise _fail(f"{where} is nested too deeply")
    if raw is None or isinstance(raw, bool | int | float):
        return raw
    if isinstance(raw, Decimal):
        if not raw.is_finite():
            raise _fail(f"{where} is not a finite number")
        return raw
    if isinstance(raw, str):
        parsed = parse_date(raw)
        return parsed if parsed is not None else raw
    if isinstance(raw, list):
        return tuple(parse_value(item, f"{where}[]", depth + 1) for item in raw)
    if not isinstance(raw, dict):
        raise _fail(f"{where} has an unreadable value")
    type_name = _type_name(raw)
    if "__value" in raw and isinstance(raw.get("__type"), str) and raw["__type"].endswith(":#System"):
        inner = raw["__value"]
        if type_name == "Guid":
            return parse_guid(raw, where)
        if type_name == "DateTime":
            if not isinstance(inner, str) or (when := parse_date(inner)) is None:
                raise _fail(f"{where} is not a /Date(...)/ value")
            return when
        if type_name == "Decimal" and isinstance(inner, int | float | str | Decimal) and not isinstance(inner, bool):
            number = _decimal(inner)
            if number is None:
                raise _fail(f"{where} is not a decimal")
            return number
        if isinstance(inner, str | int | float | bool | Decimal) or inner is None:
            return inner
        raise _fail(f"{where} wraps an unreadable value")
    if type_name == "OptionSetValue":
        value = raw.get("Value")
        if not isinstance(value, int) or isinstance(value, bool):
            raise _fail(f"{where} is an OptionSetValue without an integer Value")
        return OptionSet(value)
    if type_name == "Money":
        value = raw.get("Value")
        if not isinstance(value, int | float | str | Decimal) or isinstance(value, bool):
            raise _fail(f"{where} is a Money without a numeric Value")
        amount = _decimal(value)
        if amount is None:
            raise _fail(f"{where} is a Money without a numeric Value")
        return Money(amount)
    if type_name == "EntityReference":
        logical = raw.get("LogicalName")
        name = raw.get("Name")
        if not isinstance(logical, str):
            raise _fail(f"{where} is an EntityReference without LogicalName")
        if not _LOGICAL_NAME.fullmatch(logical):  # it is named in errors (a lookup to another table)
            raise _fail(f"{where} is an EntityReference whose LogicalName is not {_LOGICAL_FORM}")
        return EntityRef(parse_guid(raw.get("Id"), f"{where}.Id"), logical, name if isinstance(name, str) else None)
    if type_name == "EntityCollection":
        entities = raw.get("Entities")
        if not isinstance(entities, list):
            raise _fail(f"{where} is an EntityCollection without Entities")
        return tuple(parse_entity(e, f"{where}.Entities[]", depth + 1) for e in entities)
    if type_name == "Entity" or (type_name is None and "Attributes" in raw and "LogicalName" in raw):
        return parse_entity(raw, where, depth + 1)
    return Opaque(type_name or "object")


def label(name: str) -> str:
    """A sender-chosen name (column, image) as error texts show it: itself when it has a logical name's form, else
    a placeholder, since a string of any other form may be patient data put where a name belongs."""
    return name if _LOGICAL_NAME.fullmatch(name) else "<not a logical name>"


def _pairs(raw: object, where: str) -> list[tuple[str, object]]:
    """A serialized collection: `[{"key": k, "value": v}, ...]`."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise _fail(f"{where} is not a key/value collection")
    pairs: list[tuple[str, object]] = []
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("key"), str):
            raise _fail(f"{where} holds an item without a string key")
        pairs.append((item["key"], item.get("value")))
    return pairs


def parse_entity(raw: object, where: str, depth: int = 0, *, known: Mapping[str, Value] | None = None) -> Entity:
    """`known`: values already read (a Target's columns that the post image holds too, with the same or a later
    value): taken from there instead of being read twice (that was a tenth of the core path)."""
    if depth > MAX_VALUE_DEPTH:
        raise _fail(f"{where} is nested too deeply")
    if not isinstance(raw, dict):
        raise _fail(f"{where} is not an Entity")
    logical = raw.get("LogicalName")
    if not isinstance(logical, str) or not logical:
        raise _fail(f"{where} has no LogicalName")
    if not _LOGICAL_NAME.fullmatch(logical):
        raise _fail(f"{where}.LogicalName is not {_LOGICAL_FORM}")
    raw_id = raw.get("Id")
    entity_id = None if raw_id is None else parse_guid(raw_id, f"{where}.Id")
    attributes: dict[str, Value] = {}
    items = raw.get("Attributes")
    if items is not None and not isinstance(items, list):
        raise _fail(f"{where}.Attributes is not a key/value collection")
    for item in items or ():  # (`_pairs`, inlined: a body's columns are most of what parsing it costs)
        if not isinstance(item, dict) or not isinstance(key := item.get("key"), str):
            raise _fail(f"{where}.Attributes holds an item without a string key")
        if known is not None and key in known:
            attributes[key] = known[key]
            continue
        try:
            # Where a value sits is named only when it is unreadable: the name costs more than most values.
            attributes[key] = parse_value(item.get("value"), "", depth + 1)
        except WritebackError as exc:
            raise _fail(f"{where}.Attributes[{label(key)}]{exc.detail}") from None
    formatted = {k: v for k, v in _pairs(raw.get("FormattedValues"), f"{where}.FormattedValues")
                 if isinstance(v, str)}
    return Entity(logical, entity_id, attributes, formatted)


# Dataverse adds an image of its own to an asynchronous step's post images, beside the one registered, before or
# after it (public sample 03): the row's primary name and id only. It is never the row's image.
SYSTEM_IMAGE = "asynchronousstepprimaryname"


def _image(raw: object, where: str, table: str, record_id: str) -> Entity | None:
    """The registered image: not Dataverse's own (`SYSTEM_IMAGE`); of several, the one holding the most columns."""
    images = [(name, value) for name, value in _pairs(raw, where) if value is not None and name.lower() != SYSTEM_IMAGE]
    if not images:
        return None
    # Only the chosen one is parsed (the first of those as wide): a body repeating an image a hundred times costs
    # no more than one.
    name, value = max(images, key=lambda image: _width(image[1]))
    where = f"{where}[{label(name)}]"
    image = parse_entity(value, where)
    _same_row(image, where, table, record_id)
    return image


def _same_row(entity: Entity | EntityRef, where: str, table: str, record_id: str) -> None:
    """A Target or image of another row than the one PrimaryEntityName and PrimaryEntityId name: refused, since its
    columns would be written as that row's (a new Patient under another row's identifier). Dataverse's own bodies
    always agree (the four public samples: Target, images and the `<table>id` column). A body that names no row
    (Associate and Disassociate: PrimaryEntityName `none`, the nil GUID, a Target naming one side of the
    relationship) has nothing to disagree with (found by review)."""
    if table == "none" or record_id == NIL_GUID:
        return
    if entity.logical_name.lower() != table:
        raise _fail(f"{where} is a row of {entity.logical_name.lower()}, not of {table} (PrimaryEntityName)")
    # The nil GUID is a row without its id yet (a Create's Target before the platform gives it one): no other row.
    if entity.id not in (None, NIL_GUID, record_id):
        raise _fail(f"{where}.Id {entity.id} is not {record_id} (PrimaryEntityId)")
    key = entity.attributes.get(f"{table}id") if isinstance(entity, Entity) else None
    if isinstance(key, str) and _CANONICAL_GUID.fullmatch(key) and key.lower() not in (NIL_GUID, record_id):
        raise _fail(f"{where}.Attributes[{table}id] {key.lower()} is not {record_id} (PrimaryEntityId)")


def _width(raw: object) -> int:
    attributes = raw.get("Attributes") if isinstance(raw, dict) else None
    return len(attributes) if isinstance(attributes, list) else 0


def _int_or_none(raw: object) -> int | None:
    return raw if isinstance(raw, int) and not isinstance(raw, bool) else None


def parse_properties(raw: Mapping[str, Any] | None) -> Properties:
    if not raw:
        return Properties()

    def claim(name: str) -> str | None:
        value = raw.get(CLAIMS + name)
        return str(value) if value is not None else None

    exceeded = raw.get("MessageMaxSizeExceeded")
    return Properties(
        organization=claim("Organization"),
        user=claim("User"),
        initiating_user=claim("InitiatingUser"),
        entity_logical_name=claim("EntityLogicalName"),
        request_name=claim("RequestName"),
        initiating_user_agent=claim("InitiatingUserAgent"),
        max_size_exceeded=exceeded is not None and str(exceeded).strip().lower() not in ("false", "0", ""),
    )


def _text_of(body: bytes | str, content_type: str | None) -> str:
    """The body as text that could be a JSON object, or `unsupported-format` / `malformed-message`."""
    if content_type and "json" not in content_type.lower() and content_type.strip():
        kind = content_type.split(";")[0].strip()
        if kind not in ("text/plain", "application/octet-stream"):
            # (named only in a MIME type's form: the property is the sender's to fill)
            shown = repr(kind) if _MIME_TYPE.fullmatch(kind) else "of the message"
            raise WritebackError(Reason.UNSUPPORTED_FORMAT,
                                 f"content type {shown} is not JSON; set the service endpoint's "
                                 "message format to JSON")
    if len(body) > MAX_BODY_BYTES:
        raise _fail(f"body of {len(body)} bytes exceeds the {MAX_BODY_BYTES}-byte limit")
    if isinstance(body, bytes):
        if body.startswith(b"\xef\xbb\xbf"):
            body = body[3:]
        # (A body opening with "{" and then no NUL, as Dataverse's do, is in no wider encoding: not looked into.)
        elif (body[:1] != b"{" or body[1:2] == b"\x00") and (wide := _wide(body)) is not None:
            raise wide
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            if body.lstrip().startswith(b"{"):
                # JSON already: the format is right, the text encoding is not (a Latin-1 name from another sender)
                raise WritebackError(Reason.UNSUPPORTED_FORMAT, f"body is JSON, but not UTF-8 (byte {exc.start} "
                                     "cannot be read as UTF-8): Dataverse sends UTF-8; check the sender, or "
                                     "re-encode the body as UTF-8") from None
            raise WritebackError(Reason.UNSUPPORTED_FORMAT,
                                 "body is not UTF-8 text (binary XML?); set the message format to JSON") from None
    else:
        text = body
    if text[:1] == "{":  # what Dataverse sends: no copies of the body made to look at its start
        return text
    stripped = text.lstrip()
    if not stripped or stripped.rstrip() == "null":
        raise _fail("body is empty" if not stripped else "body is not a JSON object")
    if stripped.startswith("<"):
        raise WritebackError(Reason.UNSUPPORTED_FORMAT,
                             "body is XML; set the service endpoint's message format to JSON")
    if stripped.startswith("["):
        raise _fail("body is a JSON array, not the JSON object of a RemoteExecutionContext")
    if not stripped.startswith("{"):
        try:
            msgspec.json.decode(stripped)
        except (msgspec.DecodeError, UnicodeEncodeError, RecursionError):
            raise WritebackError(Reason.UNSUPPORTED_FORMAT, "body is neither JSON nor XML (plain text?); set the "
                                 "service endpoint's message format to JSON") from None
        # A JSON string or number is JSON from a sender that is not Dataverse, not a message format to change.
        raise _fail("body is JSON but not an object (a string or a number): a RemoteExecutionContext is a JSON "
                    "object")
    return text


# Byte order marks, and the NUL bytes around ASCII that mark UTF-16/32 text without one (RFC 4627 section 3).
_WIDE = ((b"\x00\x00\xfe\xff", "utf-32-be"), (b"\xff\xfe\x00\x00", "utf-32-le"), (b"\xfe\xff", "utf-16-be"),
         (b"\xff\xfe", "utf-16-le"))


def _wide_encoding(body: bytes) -> str | None:
    for bom, encoding in _WIDE:
        if body.startswith(bom):
            return encoding
    nuls = "".join("0" if b == 0 else "x" for b in body[:4])
    return {"000x": "utf-32-be", "x000": "utf-32-le", "0x0x": "utf-16-be", "x0x0": "utf-16-le"}.get(nuls)


def _wide(body: bytes) -> WritebackError | None:
    """JSON or XML in UTF-16/32, said as such (JSON in UTF-16 was refused as "binary XML?"); None for other bytes.
    Checked before reading the body as UTF-8: without a byte order mark such a body is valid UTF-8 (NULs and ASCII),
    which no JSON text is (a NUL in it must be escaped)."""
    encoding = _wide_encoding(body)
    if encoding is not None:
        try:
            start = body.decode(encoding)[:8].lstrip("\ufeff \t\r\n")
        except UnicodeDecodeError:
            start = ""
        width = encoding[:6].upper()
        if start.startswith(("{", "[")):
            return WritebackError(Reason.UNSUPPORTED_FORMAT,
                                  f"body is JSON in {width}: Dataverse sends UTF-8; check the sender, or re-encode "
                                  "the body as UTF-8")
        if start.startswith("<"):
            return WritebackError(Reason.UNSUPPORTED_FORMAT, f"body is XML in {width}; set the service endpoint's "
                                  "message format to JSON")
    return None


def decode_body(body: bytes | str, content_type: str | None = None) -> Mapping[str, Any]:
    """Bytes → the JSON object, or `unsupported-format` / `malformed-message`."""
    text = _text_of(body, content_type)
    try:
        data = _BODY.decode(text)
    except (msgspec.DecodeError, UnicodeEncodeError) as exc:
        if _SURROGATE.search(text):
            raise _fail("body holds an unpaired UTF-16 surrogate (not valid Unicode text)") from None
        raise _fail(f"body is not valid JSON{_where(text, exc)}") from None
    except RecursionError:
        raise _fail("body is nested too deeply") from None
    if not isinstance(data, dict):
        raise _fail("body is not a JSON object")
    return data


def _where(text: str, error: Exception) -> str:
    """" at line L column C" of a decoding error in `text`, where the decoder said which byte."""
    found = _AT_BYTE.search(str(error))
    if found is None:
        return ""
    before = text.encode("utf-8", "surrogatepass")[:int(found.group(1))].decode("utf-8", "replace")
    return f" at line {before.count(chr(10)) + 1} column {len(before) - before.rfind(chr(10))}"


# The members of a body's top level that name its row (`row_named`); the decoder skips the rest without building
# it. Made by `defstruct`, not a class statement: the compiled module (setup.py) would make a class statement a
# native class, which msgspec's metaclass cannot be.
_Head = msgspec.defstruct("_Head", [(name, Any, msgspec.UNSET)
                                    for name in ("PrimaryEntityName", "PrimaryEntityId", "MessageName")])


_HEAD = msgspec.json.Decoder(_Head, float_hook=Decimal)  # numbers as `_BODY` reads them (1e400 is no float)


def row_of_body(body: bytes | str, content_type: str | None = None) -> tuple[str, str, bool] | None:
    """`row_named` of the body, without decoding the rest of it (a batch reads every message's row before it
    plans the first: decoding all its bodies that early kept them all alive at once, the garbage collector
    walking them again and again). The same row wherever `decode_body` reads the body; None where it cannot
    read those members. A body refused for what lies outside them (an integer of thousands of digits) may still
    name its row here: planning rejects it, in its place in the row's order."""
    try:
        head = _HEAD.decode(_text_of(body, content_type))
    except (WritebackError, msgspec.DecodeError, UnicodeEncodeError, RecursionError):
        return None
    return row_named({name: value for name in _Head.__struct_fields__
                      if (value := getattr(head, name)) is not msgspec.UNSET})


def row_named(data: Mapping[str, Any]) -> tuple[str, str, bool] | None:
    """The row a decoded body names at its top level (table, record id, whether the message is a Create), read
    as `message_of` reads it; None when it names none. Nested contexts (ParentContext) name other rows."""
    table = _unwrap_primitive(data.get("PrimaryEntityName"))
    if not isinstance(table, str) or not _LOGICAL_NAME.fullmatch(table) or "PrimaryEntityId" not in data:
        return None
    try:
        record = parse_guid(data["PrimaryEntityId"], "PrimaryEntityId")
    except WritebackError:
        return None
    return table.lower(), record, _unwrap_primitive(data.get("MessageName")) == "Create"


def parse_message(
    body: bytes | str,
    properties: Mapping[str, Any] | None = None,
    content_type: str | None = None,
) -> Message:
    return message_of(decode_body(body, content_type), properties)


def _name(data: Mapping[str, Any], key: str, form: re.Pattern[str], what: str) -> str:
    """A name the body must hold, in its form; the error names the field and the form, never the value."""
    value = _unwrap_primitive(data.get(key))
    if value is None or value == "":
        raise _fail(f"required field {key} is missing")
    if not isinstance(value, str):
        raise _fail(f"{key} is not a string")
    if not form.fullmatch(value):
        raise _fail(f"{key} is not {what}")
    return value


def message_of(data: Mapping[str, Any], properties: Mapping[str, Any] | None = None) -> Message:
    """A decoded body (`decode_body`) and its application properties → the `Message`."""
    props = parse_properties(properties)
    name = _name(data, "MessageName", _LOGICAL_NAME, "a message name (up to 128 ASCII letters, digits and "
                 "underscores, not starting with a digit)")
    table = _name(data, "PrimaryEntityName", _LOGICAL_NAME, _LOGICAL_FORM).lower()
    if "PrimaryEntityId" not in data:
        raise _fail("required field PrimaryEntityId is missing")
    record_id = parse_guid(data["PrimaryEntityId"], "PrimaryEntityId")

    target: Entity | None = None
    post_image = _image(data.get("PostEntityImages"), "PostEntityImages", table, record_id)
    inputs = _pairs(data.get("InputParameters"), "InputParameters")
    for key, value in inputs:
        if key == "Target":
            parsed: Value
            if post_image is not None and isinstance(value, dict) and "Attributes" in value:
                parsed = parse_entity(value, "InputParameters[Target]", known=post_image.attributes)
            else:
                parsed = parse_value(value, "InputParameters[Target]")
            if isinstance(parsed, Entity):
                target = parsed
            elif not isinstance(parsed, EntityRef):  # Delete carries an EntityReference; that's fine
                raise _fail("InputParameters[Target] is not an Entity")
            _same_row(parsed, "InputParameters[Target]", table, record_id)
    created = data.get("OperationCreatedOn")
    created_at = parse_date(created) if isinstance(created, str) else None
    return Message(
        message_name=name,
        table=table,
        record_id=record_id,
        initiating_user_id=_optional_guid(data, "InitiatingUserId"),
        user_id=_optional_guid(data, "UserId"),
        correlation_id=_optional_guid(data, "CorrelationId"),
        request_id=_optional_guid(data, "RequestId"),
        operation_id=_optional_guid(data, "OperationId"),
        organization_id=_optional_guid(data, "OrganizationId"),
        organization_name=str(data["OrganizationName"])[:200] if data.get("OrganizationName") else None,
        depth=_int_or_none(data.get("Depth")),
        stage=_int_or_none(data.get("Stage")),
        operation_created_on=created_at,
        target=target,
        pre_image=_image(data.get("PreEntityImages"), "PreEntityImages", table, record_id),
        post_image=post_image,
        properties=props,
    )
