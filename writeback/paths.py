"""Element paths into FHIR JSON, and applying values at them.

A path names exactly the part of a resource a map owns, e.g. `telecom[system=phone,use=work].value` or
`name[use=official].given[1]`. A selector `[k=v,...]` picks the list item whose fields match (and creates it
with those fields when none does); an index `[n]` picks a position. Applying the same assignments to an empty
resource gives what a Create writes; applying them to the server's copy gives what an Update writes, leaving
every element no path names untouched.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

JSONValue = Any  # str | int | float | bool | dict | list: what json.loads gives


@dataclass(frozen=True, slots=True)
class Field:
    name: str


@dataclass(frozen=True, slots=True)
class Index:
    position: int


@dataclass(frozen=True, slots=True)
class Select:
    match: tuple[tuple[str, str], ...]


Segment = Field | Index | Select
Path = tuple[Segment, ...]

_SEGMENT = re.compile(r"^([A-Za-z][A-Za-z0-9_]*)((?:\[[^\[\]]+\])*)$")
_BRACKET = re.compile(r"\[([^\[\]]+)\]")
_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


class PathError(ValueError):
    pass


def _split(text: str) -> list[str]:
    """Split on dots outside brackets: selector values may be URIs."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise PathError("has an unbalanced ]")
        elif char == "." and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise PathError("has an unbalanced [")
    parts.append(text[start:])
    return parts


def parse_path(text: str) -> Path:
    if not text or text.strip() != text:
        raise PathError("is empty or has surrounding spaces")
    segments: list[Segment] = []
    for part in _split(text):
        match = _SEGMENT.match(part)
        if not match:
            raise PathError(f"has an invalid segment {part!r}")
        segments.append(Field(match.group(1)))
        for inner in _BRACKET.findall(match.group(2)):
            if inner.isdigit():
                segments.append(Index(int(inner)))
                continue
            pairs: list[tuple[str, str]] = []
            for cond in inner.split(","):
                key, eq, value = cond.partition("=")
                if not eq or not _KEY.match(key.strip()) or not value.strip():
                    raise PathError(f"has an invalid selector [{inner}]")
                pairs.append((key.strip(), value.strip()))
            segments.append(Select(tuple(pairs)))
    return tuple(segments)


def format_path(path: Path) -> str:
    out = ""
    for seg in path:
        if isinstance(seg, Field):
            out += ("." if out else "") + seg.name
        elif isinstance(seg, Index):
            out += f"[{seg.position}]"
        else:
            out += "[" + ",".join(f"{k}={v}" for k, v in seg.match) + "]"
    return out


@dataclass(frozen=True, slots=True)
class Assignment:
    """Set `path` to `value`; `None` removes what the path names (a cleared column).

    `column` is the Dataverse column the value comes from (None for constants and the row identifier): the
    row state orders writes per column, so a late change can be narrowed to the columns no newer change wrote.
    """

    path: Path
    value: JSONValue
    column: str | None = None

    @property
    def element(self) -> str:
        head = self.path[0]
        assert isinstance(head, Field)
        return head.name


def _matches(item: object, select: Select) -> bool:
    return isinstance(item, dict) and all(str(item.get(k)) == v for k, v in select.match)


def _is_empty(value: object) -> bool:
    return value is None or value in ({}, [])


def _set(node: JSONValue, path: Path, value: JSONValue) -> JSONValue:
    """Return `node` with `path` set; containers along the path are created or pruned."""
    if not path:
        # A copy: a later assignment under this one must not reach into the plan's (or the map's) value.
        return _tree_copy(value)
    seg, rest = path[0], path[1:]
    if isinstance(seg, Field):
        obj: dict[str, Any] = node if isinstance(node, dict) else {}
        new = _set(obj.get(seg.name), rest, value)
        if _is_empty(new):
            obj.pop(seg.name, None)
        else:
            obj[seg.name] = new
        return obj
    items: list[Any] = node if isinstance(node, list) else []
    if isinstance(seg, Index):
        if seg.position < len(items):
            new = _set(items[seg.position], rest, value)
            if _is_empty(new):
                del items[seg.position]
            else:
                items[seg.position] = new
        elif value is not None:
            # A list has no holes: a value for position n lands at the end.
            new = _set(None, rest, value)
            if not _is_empty(new):
                items.append(new)
        return items
    for i, item in enumerate(items):
        if _matches(item, seg):
            new = _set(item, rest, value)
            if _is_empty(new) or set(new) <= {k for k, _ in seg.match}:
                del items[i]  # nothing left but the selector: the item itself was cleared
            else:
                items[i] = new
            return items
    if value is not None:
        fresh: dict[str, Any] = dict(seg.match)
        new = _set(fresh, rest, value)
        if not _is_empty(new) and set(new) > {k for k, _ in seg.match}:
            items.append(new)
    return items


def _tree_copy(node: JSONValue) -> JSONValue:
    """A copy of a JSON tree: every dict and list new, the leaves shared (they are immutable). What
    `copy.deepcopy` gives for JSON, several times faster: JSON has no shared or cyclic parts to keep a memo for,
    and an update applies its assignments to a copy of the server's resource in the hot path."""
    if isinstance(node, dict):
        return {key: _tree_copy(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_tree_copy(value) for value in node]
    return node


def apply(resource: dict[str, Any], assignments: Iterable[Assignment]) -> dict[str, Any]:
    """A new resource: `resource` with every assignment applied in order (the input is not changed)."""
    result: dict[str, Any] = _tree_copy(resource)
    for assignment in assignments:
        result = _set(result, assignment.path, assignment.value)
    return result
