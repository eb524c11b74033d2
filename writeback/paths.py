"""Element paths into FHIR JSON, and applying values at them.

A path names exactly the part of a resource a map owns, e.g. `telecom[system=phone,use?=work].value` or
`name[use?=official].given[1]`. A selector `[k=v,...]` picks the list item whose fields match (and creates it
with those fields when none does); an index `[n]` picks a position. Applying the same assignments to an empty
resource gives what a Create writes; applying them to the server's copy gives what an Update writes, leaving
every element no path names untouched.

`[row]` picks the item the row itself marks as its own (`note[row].text`: the row's note among the notes other
systems add), found by that mark (`writeback.marks`), never by its position or its content; see `apply_state`.

`k?=v` marks a key that records from other systems often leave out (`use` on names, telecoms and addresses of
records ingested from FHIR): when no item matches, `adopt` takes the item that has no such key (the one the
ingest put there) instead of adding a parallel one, and writes the key on it, so it matches from then on.

`apply_state` writes a row's whole state: every path a map owns gets the row's value or is cleared; the
positions a map names in one list (`given[0]`, `given[1]`) are written as that list's leading items, without
holes (clearing the first name keeps the middle name); a constant (`default` without a column) is written only
inside an element that holds a value of the row.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from itertools import pairwise
from typing import Any

from writeback.immutable import immutable
from writeback.marks import Mark, mark_of, marks_in, with_mark

JSONValue = Any  # str | int | float | bool | dict | list: what json.loads gives


@immutable
class Field:
    name: str


@immutable
class Index:
    position: int


@immutable
class Select:
    match: tuple[tuple[str, str], ...]
    optional: frozenset[str] = frozenset()  # keys an ingested item may lack (`k?=v`)


@immutable
class Own:
    """`[row]`: the list item that carries the row's mark."""


Segment = Field | Index | Select | Own
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
            if inner.strip() == "row":
                segments.append(Own())
                continue
            pairs: list[tuple[str, str]] = []
            optional: set[str] = set()
            for cond in inner.split(","):
                key, eq, value = cond.partition("=")
                key = key.strip()
                if key.endswith("?"):
                    key = key[:-1].strip()
                    optional.add(key)
                if not eq or not _KEY.match(key) or not value.strip():
                    raise PathError(f"has an invalid selector [{inner}]")
                pairs.append((key, value.strip()))
            segments.append(Select(tuple(pairs), frozenset(optional)))
    return tuple(segments)


def format_path(path: Path) -> str:
    out = ""
    for seg in path:
        if isinstance(seg, Field):
            out += ("." if out else "") + seg.name
        elif isinstance(seg, Index):
            out += f"[{seg.position}]"
        elif isinstance(seg, Own):
            out += "[row]"
        else:
            out += "[" + ",".join(f"{k}{'?' if k in seg.optional else ''}={v}" for k, v in seg.match) + "]"
    return out


@immutable
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
    if not isinstance(item, dict):
        return False
    for key, value in select.match:  # noqa: SIM110 - a loop, not `all` over a generator: it runs for every item
        if str(item.get(key)) != value:
            return False
    return True


def _compatible(item: object, select: Select) -> bool:
    """The item an ingest left without the optional keys: every key either matches or is optional and absent."""
    return isinstance(item, dict) and all(
        str(item.get(k)) == v or (k in select.optional and k not in item) for k, v in select.match)


class _Keep:
    """The value of a column no image holds: its element stays as the server has it."""

    def __repr__(self) -> str:
        return "KEEP"


KEEP: Any = _Keep()


@immutable
class OwnedPrefix:
    """The value of a list whose first positions a map owns: `values` (the row's, in position order, None for an
    empty column) replace its first `count` items, holes closed; the items after them are kept as they are."""

    values: tuple[JSONValue, ...]
    count: int


def _is_empty(value: object) -> bool:
    return value is None or (type(value) in (dict, list) and not value)


def _set(node: JSONValue, path: Path, value: JSONValue, at: int = 0) -> JSONValue:
    """Return `node` with `path[at:]` set; containers along the path are created or pruned. (An index into the
    path, not a slice of it: a new tuple per level was a tenth of the function.)"""
    if at == len(path):
        if isinstance(value, OwnedPrefix):
            current = node if isinstance(node, list) else []
            kept = current[value.count:]
            values = [current[i] if v is KEEP and i < len(current) else v for i, v in enumerate(value.values)]
            out = [_tree_copy(v) for v in values if v is not None and v is not KEEP]
            # What the row adds past the items it had, where the list already holds it next (a middle name another
            # system or the sync put there first), is that item, not a second one.
            added = out[value.count:]
            while added and kept and kept[0] == added[0]:
                added, kept = added[1:], kept[1:]
            return out + kept
        # A copy: a later assignment under this one must not reach into the plan's (or the map's) value.
        return _tree_copy(value) if type(value) in (dict, list) else value
    seg, below = path[at], at + 1
    if isinstance(seg, Field):
        obj: dict[str, Any] = node if isinstance(node, dict) else {}
        new = _set(obj.get(seg.name), path, value, below)
        if new is None or (type(new) in (dict, list) and not new):  # (`_is_empty`, inlined: the hottest call)
            obj.pop(seg.name, None)
        else:
            obj[seg.name] = new
        return obj
    items: list[Any] = node if isinstance(node, list) else []
    if isinstance(seg, Index):
        if seg.position < len(items):
            new = _set(items[seg.position], path, value, below)
            if _is_empty(new):
                del items[seg.position]
            else:
                items[seg.position] = new
        elif value is not None:
            # A list has no holes: a value for position n lands at the end.
            new = _set(None, path, value, below)
            if not _is_empty(new):
                items.append(new)
        return items
    if isinstance(seg, Own):
        raise ValueError("a [row] path is applied with the row's mark (`own`), never by position")
    for i, item in enumerate(items):
        if _matches(item, seg):
            new = _set(item, path, value, below)
            if _is_empty(new) or set(new) <= {k for k, _ in seg.match}:
                del items[i]  # nothing left but the selector: the item itself was cleared
            else:
                items[i] = new
            return items
    if value is not None:
        fresh: dict[str, Any] = dict(seg.match)
        new = _set(fresh, path, value, below)
        if not _is_empty(new) and set(new) > {k for k, _ in seg.match}:
            items.append(new)
    return items


def _unresolved(path: Path) -> bool:
    """A `[row]` in `path` (left there when no mark was given: `_own_items`)."""
    return any(type(seg) is Own for seg in path)


def _tree_copy(node: JSONValue) -> JSONValue:
    """A copy of a JSON tree: every dict and list new, the leaves shared (they are immutable). What
    `copy.deepcopy` gives for JSON, several times faster: JSON has no shared or cyclic parts to keep a memo for,
    and an update applies its assignments to a copy of the server's resource in the hot path."""
    if isinstance(node, dict):
        return {key: _tree_copy(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_tree_copy(value) for value in node]
    return node


def apply(resource: dict[str, Any], assignments: Iterable[Assignment], own: Mark | None = None) -> dict[str, Any]:
    """A new resource: `resource` with every assignment applied in order (the input is not changed). `own`: the
    row's mark, for the items `[row]` names (`_own_items`, as for a change without images)."""
    result: dict[str, Any] = _tree_copy(resource)
    assignments, own_lists = _own_items(result, list(assignments), own)
    for assignment in assignments:
        result = _set(result, assignment.path, assignment.value)
    _mark_own(result, own_lists, own, whole=False)
    return result


# Tags, for one write, the item a `[row]` selector resolved to (as `_PICK` does for `adopt`): not a FHIR key, and
# replaced by the row's mark before the resource is returned.
_OWN = " own"
_OWN_SELECT = Select(((_OWN, "1"),))


def _own_items(result: dict[str, Any], assignments: list[Assignment], own: Mark | None,
               before: Iterable[Assignment] = ()) -> tuple[list[Assignment], list[Path]]:
    """Resolve each `[row]` of `assignments` to the item of its list that is the row's, in `result` (changed in
    place). The item carrying the row's mark, wherever it stands. Else an item no row marks: the one holding the
    row's values before the save (`before`, the pre image: what an ingest, or an earlier release that owned the
    item by its position, put there); else, on a resource the row's whole state was never written to (an ingested
    record: no mark of the row on it) and for a value to write, when the row held a value there before the save
    (or there is no pre image to tell), the one holding the new value, else the first: what the ingest copied
    into the row was that item, whatever order the row's saves arrive in. Else a new item at the end when a value
    is written. Never another system's item on a resource the row has written (its text may equal the row's by
    chance), nor one at a position when the pre image says the row held nothing there before.
    An item whose every owned element is cleared goes (what the map owns in it was its content: a note without
    text is none, and invalid); a clear with no item of the row's touches nothing. Returns the assignments, each
    `[row]` now a selector of that item, and the list paths whose items are to be marked (`_mark_own`)."""
    if own is None:
        return assignments, []  # (a `[row]` left unresolved stops at `_set`: never applied by position)
    groups: dict[Path, list[Assignment]] = {}
    at: dict[int, int] = {}  # the assignments with a `[row]`, by their index: where in their path
    for n, assignment in enumerate(assignments):
        for i, seg in enumerate(assignment.path):
            if type(seg) is Own:
                groups.setdefault(assignment.path[: i + 1], []).append(assignment)
                at[n] = i
                break
    if not groups:
        return assignments, []
    before = tuple(before)
    # Ingested: the row's whole state was never written here (no mark, or one that changes without images alone
    # left); per list, also none of them wrote its columns (the mark's column entries): the row then took that
    # item already, and what is free now is another system's.
    mark = mark_of(result, own.table, own.row_id)
    ingested = mark is None or not mark.version.known
    gone: list[Path] = []
    lists: list[Path] = []
    for prefix, members in groups.items():
        depth = len(prefix)
        found = _navigate(result, prefix[:-1])
        items = [item for item in found if isinstance(item, dict)] if isinstance(found, list) else []
        writes = any(m.value is not None and m.value is not KEEP for m in members)
        mine = next((item for item in items if mark_of(item, own.table, own.row_id) is not None), None)
        if mine is None:
            free = [item for item in items if not marks_in(item)]
            was = [b for b in before if b.path[:depth] == prefix]
            ingest_copied = ingested and writes and (bool(was) or not before) and not (
                mark is not None and any(mark.column(m.column) for m in members if m.column))
            mine = next(iter([item for item in free if _holds(item, was, depth)]
                             or [item for item in free if ingest_copied and _holds(item, members, depth)]
                             or (free[:1] if ingest_copied else [])), None)
        cleared = all(m.value is None for m in members)
        if mine is not None and cleared and isinstance(found, list):
            _set(result, prefix[:-1], [item for item in found if item is not mine] or None)
        if cleared or (mine is None and not writes):
            gone.append(prefix)
            continue
        if mine is not None:
            mine[_OWN] = "1"
        lists.append(prefix[:-1])  # (none tagged: `_set` adds the item, tagged by the selector itself)
    dropped = {id(a) for prefix in gone for a in groups[prefix]}
    out: list[Assignment | None] = list(assignments)
    for n, i in at.items():
        a = assignments[n]
        out[n] = None if id(a) in dropped else Assignment((*a.path[:i], _OWN_SELECT, *a.path[i + 1:]), a.value,
                                                           a.column)
    return [a for a in out if a is not None], lists


def _mark_own(result: dict[str, Any], lists: Iterable[Path], own: Mark | None, *, whole: bool) -> None:
    """The items `_own_items` tagged, marked as the row's: with the version of a whole state (`whole`); a change
    without images marks only an item not marked yet (it is not the row's whole state, and a change that leaves
    the item as it was must not write a new version for its mark alone)."""
    if own is None:
        return
    for path in lists:
        for item in _navigate(result, path) or []:
            if isinstance(item, dict) and item.pop(_OWN, None) is not None \
                    and (whole or mark_of(item, own.table, own.row_id) is None):
                with_mark(item, own, own.table, own.row_id)


def _navigate(node: JSONValue, path: Path) -> JSONValue:
    """What `path` names in `node` (exact selector matches only), or None."""
    for seg in path:
        if isinstance(seg, Field):
            node = node.get(seg.name) if isinstance(node, dict) else None
        elif isinstance(seg, Index):
            node = node[seg.position] if isinstance(node, list) and seg.position < len(node) else None
        elif isinstance(seg, Own):
            return None  # (resolved to the row's item by `_own_items` before anything navigates to it)
        else:
            node = next((item for item in node if _matches(item, seg)), None) if isinstance(node, list) else None
        if node is None:
            return None
    return node


def _holds(item: Any, members: Iterable[Assignment], depth: int) -> bool:
    """Whether `item` holds every value `members` give (below the selector at `depth`), and they give one."""
    given = [m for m in members if m.value is not None and m.value is not KEEP and not isinstance(m.value, OwnedPrefix)]
    return bool(given) and all(_navigate(item, m.path[depth:]) == m.value for m in given)


# Marks, for one `apply_state`, the item a selector that several items match takes (`adopt`). Not a FHIR key (FHIR
# keys are letters and digits): it cannot clash with one, and it is removed before the resource is returned.
_PICK = " pick"


def _in_groups(before: Iterable[Assignment], groups: Mapping[Path, Any]) -> dict[Path, list[Assignment]]:
    previous: dict[Path, list[Assignment]] = {}
    for assignment in before:
        for i, seg in enumerate(assignment.path):
            if isinstance(seg, Select) and assignment.path[: i + 1] in groups:
                previous.setdefault(assignment.path[: i + 1], []).append(assignment)
    return previous


def _was(items: list[Any], befores: list[dict[Path, list[Assignment]]], prefix: Path, depth: int) -> list[Any]:
    """The items holding the row's values before the save, by the first of `befores` that some item holds."""
    for previous in befores:
        if held := [item for item in items if _holds(item, previous.get(prefix, ()), depth)]:
            return held
    return []


def adopt(resource: dict[str, Any], assignments: Iterable[Assignment],
          before: Iterable[Assignment] = (), earlier: Iterable[Iterable[Assignment]] = (), *,
          pinned: Iterable[Assignment] = ()) -> dict[Path, Select]:
    """Give each selector with optional keys (`use?=official`) the item an ingest put there when no item matches
    it: among the items that lack those keys and that no other selector of this write took, the one already
    holding the value to write, else the one holding the row's values before this save (`before`, from the pre
    image: what the ingest copied into Dataverse), else the first; the selector's keys are written on it. A
    selector that only clears takes an item only by its values before (it clears the phone that was the row's,
    never another), after the selectors that write have chosen.

    A selector that several items match (two emails for `telecom[system=email]`) takes, the same way, the one
    holding the new values, else the values before, else the first. When that is not the first, it is marked
    (`_PICK`) and the returned selector (by prefix) names it. Changes `resource` in place (a copy the caller
    owns).

    `earlier`: the pre images of the row's older saves of the same batch, newest first (only the newest is
    written): tried, in turn, when no item holds the values `before` gives (FHIR may hold the row as it was before
    the batch, not between its saves).

    `pinned`: assignments written apart (the row identifier), whose items no selector may take: `identifier[use?=
    usual]` took the row identifier, which has no `use`, and the visit number was never written (found by review).
    Where a pre image is given and neither it nor an older save's holds a value for a selector, the row had none
    there: a free item is another system's (a relative's phone the ingest copied into no column), and a value
    written makes an item of its own (found by review)."""
    groups: dict[Path, list[Assignment]] = {}
    for assignment in (*pinned, *assignments):
        for i, seg in enumerate(assignment.path):
            if isinstance(seg, Select):
                groups.setdefault(assignment.path[: i + 1], []).append(assignment)
    before = tuple(before)
    befores = [_in_groups(before, groups), *(_in_groups(e, groups) for e in earlier)]
    claimed: set[int] = set()
    redirects: dict[Path, Select] = {}
    pending: list[tuple[Path, list[Assignment], list[Any]]] = []
    for prefix, members in groups.items():
        items = _navigate(resource, prefix[:-1])
        if not isinstance(items, list):
            continue
        select = prefix[-1]
        assert isinstance(select, Select)
        matching = [item for item in items if _matches(item, select) and id(item) not in claimed]
        if matching:
            depth = len(prefix)
            pick = next(iter([item for item in matching if _holds(item, members, depth)]
                             or _was(matching, befores, prefix, depth)), matching[0])
            if pick is not next(item for item in items if _matches(item, select)):
                pick[_PICK] = "1"
                redirects[prefix] = Select((*select.match, (_PICK, "1")), select.optional)
            claimed.add(id(pick))
        elif select.optional:
            pending.append((prefix, members, items))
    # Selectors that write a value choose first: a number moved from one column to another (telephone1 to
    # mobilephone in one save) is taken by the column that now holds it, not cleared by the one that held it.
    pending.sort(key=lambda group: not any(m.value is not None and m.value is not KEEP for m in group[1]))
    for prefix, members, items in pending:
        select = prefix[-1]
        assert isinstance(select, Select)
        free = [item for item in items if id(item) not in claimed and _compatible(item, select)]
        depth = len(prefix)
        was = _was(free, befores, prefix, depth)
        writes = any(m.value is not None and m.value is not KEEP for m in members)
        holding = [item for item in free if all(
            m.value is None or m.value is KEEP or isinstance(m.value, OwnedPrefix)
            or _navigate(item, m.path[depth:]) == m.value for m in members)] if writes else []
        # An item already holding the new value is taken before the one holding the old (no second copy of it).
        held_nothing = bool(before) and not any(
            m.value is not None and m.value is not KEEP for previous in befores for m in previous.get(prefix, ()))
        chosen = next(iter(holding or was or (free if writes and not held_nothing else [])), None)
        if chosen is None:
            continue
        claimed.add(id(chosen))
        for key, value in select.match:
            chosen.setdefault(key, value)
    return redirects


def _redirect(assignments: list[Assignment], redirects: dict[Path, Select]) -> list[Assignment]:
    def one(a: Assignment) -> Assignment:
        for prefix, select in redirects.items():
            if a.path[:len(prefix)] == prefix:
                return Assignment((*prefix[:-1], select, *a.path[len(prefix):]), a.value, a.column)
        return a

    return [one(a) for a in assignments]


# In a FHIR datatype, the elements that describe another one: a Coding's display and version name its code in its
# system; a Quantity's code is the coded form of its unit, its unit the text of its code, and its comparator
# qualifies its value. When the map changes
# the described value and does not own the describing one, the describing one (a display the ingest put there, a
# UCUM code) would now misstate it, so it goes. Only below a resource's top level, where these are datatypes.
_DESCRIBED_BY: dict[str, tuple[str, ...]] = {
    "value": ("comparator",),  # a Quantity's "<" was said of the value it stood beside
    "code": ("display", "version", "unit"),
    # (an Identifier's assigner issued the namespace its system names: moved to another hospital's, it is not hers)
    "system": ("code", "display", "version", "assigner"),
    "unit": ("code",),
}


# The parts of a name or an address, which its `text` states in full: when the map changes one and does not own
# `text`, the text (what most applications display) would state the old name or address, so it goes.
_TEXT_PARTS = frozenset({"family", "given", "prefix", "suffix", "line", "city", "district", "state", "postalCode",
                         "country"})


_PLACE_PARTS = frozenset({"city", "state", "postalCode", "country"})  # what an address's district lies within


def _text_parts(result: dict[str, Any], assignments: Iterable[Assignment]) -> list[tuple[Assignment, JSONValue]]:
    """The assignments to parts that a `text` beside them states, with the values they have before the write; not
    where the name or address is text alone (a feed's "Imani Grace Okafor", which the ingest split into columns):
    the parts written there are what the text says."""
    out = []
    for a in assignments:
        # a part (`family`), or a position in one (`given[0]`, as a change without images writes it)
        at = len(a.path) - (2 if isinstance(a.path[-1], Index) else 1)
        part = a.path[at] if at >= 1 else None
        if isinstance(part, Field) and part.name in _TEXT_PARTS and a.value is not KEEP:
            parent = _navigate(result, a.path[:at])
            if isinstance(parent, dict) and any(k in _TEXT_PARTS for k in parent):
                was = _navigate(result, a.path[:at + 1])
                if isinstance(was, list):
                    was = list(was)  # (changed in place by the write: compared with a copy)
                out.append((Assignment(a.path[:at + 1], a.value, a.column), was))
    return out


def _drop_stale_texts(result: dict[str, Any], parts: list[tuple[Assignment, JSONValue]],
                      assignments: list[Assignment]) -> None:
    """Remove, in place, the `text` beside a part the write changed (set, changed or cleared), unless owned; and an
    address's `district` (its county) and `period` (when it was in use) beside a changed city, state, postal code or
    country, unless owned: both were said of the old place (found by review: a patient moved from Brooklyn to Boston
    kept the district Kings, and the Brooklyn address's start in 2010 as the Boston one's)."""
    for a, was in parts:
        if _navigate(result, a.path) == was:
            continue
        parent = _navigate(result, a.path[:-1])
        if not isinstance(parent, dict):
            continue
        if "text" in parent and not _owns(assignments, (*a.path[:-1], Field("text"))):
            del parent["text"]
        part = a.path[-1]
        if isinstance(part, Field) and part.name in _PLACE_PARTS:
            for said in ("district", "period"):
                if said in parent and not _owns(assignments, (*a.path[:-1], Field(said))):
                    del parent[said]


def _same_referent(new: dict[str, Any], was: dict[str, Any]) -> bool:
    """Whether two References name one resource: by their literal references where both have one, else by their
    logical identifiers (system and value)."""
    if new.get("reference") and was.get("reference"):
        return bool(new["reference"] == was["reference"])
    identifier = new.get("identifier")
    return isinstance(identifier, dict) and bool(identifier.get("value")) and was.get("identifier") == identifier


def _displays(result: dict[str, Any], assignments: Iterable[Assignment]) -> list[tuple[Assignment, JSONValue]]:
    """The whole References the assignments write (a lookup's, `RowRef.reference`'s shape) that name what the
    element already names, with the `display` it holds: FHIR's "text that identifies the resource in addition to
    the reference" (another system's, an ingest's), which a save naming the same resource keeps, as a Coding
    written as it was keeps its display."""
    out: list[tuple[Assignment, JSONValue]] = []
    for a in assignments:
        new = a.value
        if not isinstance(new, dict) or "type" not in new or "display" in new:
            continue
        was = _navigate(result, a.path)
        if isinstance(was, dict) and "display" in was and _same_referent(new, was):
            out.append((a, was["display"]))
    return out


def _keep_displays(result: dict[str, Any], displays: Iterable[tuple[Assignment, JSONValue]]) -> None:
    for a, display in displays:
        reference = _navigate(result, a.path)
        if isinstance(reference, dict):  # (a copy `_set` made: changed in place)
            reference["display"] = display


def _described(assignments: Iterable[Assignment], item: bool = False) -> list[Assignment]:
    """The assignments whose value other elements may describe (`item`: the paths are a datatype's own, a child
    row's item, so its top level counts too)."""
    return [a for a in assignments if len(a.path) > (0 if item else 1) and isinstance(a.path[-1], Field)
            and a.path[-1].name in _DESCRIBED_BY and a.value is not KEEP]


def _owns(assignments: Iterable[Assignment], prefix: Path) -> bool:
    return any(a.path[:len(prefix)] == prefix for a in assignments)


def _owns_item(assignments: Iterable[Assignment], list_path: Path, item: object, position: int) -> bool:
    """Whether an assignment writes into this item of the list at `list_path` (by selector or position)."""
    depth = len(list_path)
    for a in assignments:
        if len(a.path) > depth and a.path[:depth] == list_path:
            seg = a.path[depth]
            if (isinstance(seg, Select) and _matches(item, seg)) or (isinstance(seg, Index)
                                                                     and seg.position == position):
                return True
    return False


def _drop_stale(result: dict[str, Any], changed: Iterable[Assignment], assignments: list[Assignment]) -> None:
    """Remove, in place, what described the values of `changed` (which did change) and no assignment owns. A
    coding whose code or system changed also takes its concept's text and other codings with it: they named the
    concept it no longer is (a LOINC body weight beside a code that now says heart rate)."""
    for a in changed:
        parent_path, leaf = a.path[:-1], a.path[-1]
        assert isinstance(leaf, Field)
        parent = _navigate(result, parent_path)
        if isinstance(parent, dict):
            for other in _DESCRIBED_BY[leaf.name]:
                if other in parent and not _owns(assignments, (*parent_path, Field(other))):
                    del parent[other]
        if leaf.name not in ("code", "system") or len(a.path) < 4 or a.path[-3] != Field("coding"):
            continue
        concept = _navigate(result, a.path[:-3])
        if not isinstance(concept, dict):
            continue
        if "text" in concept and not _owns(assignments, (*a.path[:-3], Field("text"))):
            del concept["text"]
        codings = concept.get("coding")
        if isinstance(codings, list):
            concept["coding"] = [c for i, c in enumerate(codings) if _owns_item(assignments, a.path[:-2], c, i)]


def _changed(before: list[tuple[Assignment, JSONValue]], result: dict[str, Any]) -> list[Assignment]:
    """Of the described values and what they were before the write, those the write changed."""
    return [a for a, was in before
            if was is not None and not isinstance(was, dict | list) and _navigate(result, a.path) != was]


def _cleared(value: JSONValue) -> bool:
    return value is None or (isinstance(value, OwnedPrefix) and all(v is None for v in value.values))


def _item_groups(assignments: Iterable[Assignment]) -> dict[Path, list[Assignment]]:
    """The assignments by the list item (of objects) they write into: the path up to its selector or position."""
    groups: dict[Path, list[Assignment]] = {}
    for a in assignments:
        for i, seg in enumerate(a.path[:-1]):
            if isinstance(seg, Select | Index) and isinstance(a.path[i + 1], Field):
                groups.setdefault(a.path[: i + 1], []).append(a)
    return groups


def _held(result: dict[str, Any], groups: Mapping[Path, list[Assignment]]) -> set[Path]:
    """The items that hold something the map owns before the write."""
    return {prefix for prefix, members in groups.items()
            if any(not _is_empty(_navigate(result, m.path)) for m in members)}


def _drop_emptied_items(result: dict[str, Any], groups: Mapping[Path, list[Assignment]],
                        held: set[Path]) -> dict[str, Any]:
    """Of a row's whole state: a list item that held something the map owns, and whose every owned element a
    clear of this write emptied, goes. What the map owns in it was its content (a phone's number, a note's text);
    what is left only qualified that (the phone's rank, the note's author) and alone is an empty item, or an
    invalid one (Annotation.text is required: the server would refuse every later write of the row). An item
    that held nothing the map owns (an address the ingest gave as text only) is not the map's to remove."""
    for prefix, members in groups.items():
        if prefix not in held or not any(_cleared(m.value) for m in members) or any(m.value is KEEP
                                                                                   for m in members):
            continue
        item = _navigate(result, prefix)
        if not isinstance(item, dict) or any(not _is_empty(_navigate(item, m.path[len(prefix):])) for m in members):
            continue
        items = _navigate(result, prefix[:-1])
        if isinstance(items, list):
            result = _set(result, prefix[:-1], [other for other in items if other is not item] or None)
    return result


def _owned_counts(result: dict[str, Any], values: list[Assignment], prefixes: Sequence[Path],
                  images: Sequence[Sequence[Assignment]], items: Mapping[str, int]) -> list[Assignment]:
    """`values` with each owned prefix replacing as many leading items as the row has there now: the values an image
    of `images` (each one the resource may hold of the row) held at those positions, holes closed, where the list
    starts with them. Its empty positions hold nothing of the row's: an item there (another system's third given
    name, moved up when the row's middle name was cleared) is kept, not taken for the row's. No image that the list
    starts with (or none with a value there): every owned position."""
    was = [{a.path: a.value for a in image} for image in images]
    out = []
    unredirected = iter(prefixes)  # (`values` holds them in this order, each redirected as `adopt` chose)
    for assignment in values:
        owned = assignment.value
        if isinstance(owned, OwnedPrefix):
            prefix, current = next(unredirected), _navigate(result, assignment.path)
            if (known := items.get(format_path(prefix))) is not None:
                # (the mark's count, from the row's last whole state: whatever saves wrote nothing since)
                out.append(Assignment(assignment.path, OwnedPrefix(
                    owned.values, min(known, len(current) if isinstance(current, list) else 0)), assignment.column))
                continue
            for candidate in ([v for i in range(len(owned.values))
                               if (v := image.get((*prefix, Index(i)))) is not None and v is not KEEP]
                              for image in was):
                # (an image with none of them says nothing: a pre image without those columns looks the same)
                if candidate and isinstance(current, list) and current[:len(candidate)] == candidate:
                    owned = OwnedPrefix(owned.values, len(candidate))
                    break
            out.append(Assignment(assignment.path, owned, assignment.column))
        else:
            out.append(assignment)
    return out


def list_items(assignments: Iterable[Assignment]) -> dict[str, int]:
    """Of a row's whole state written on nothing (a create): how many leading items of each list whose positions
    the map owns it puts there (`Mark.items`)."""
    counts: dict[str, int] = {}
    for a in assignments:
        if isinstance(a.path[-1], Index):
            key = format_path(a.path[:-1])
            counts[key] = counts.get(key, 0) + (a.value is not None and a.value is not KEEP)
    return counts


def _positional_clears(result: dict[str, Any], values: list[Assignment],
                       before: Iterable[Assignment]) -> list[Assignment]:
    """`values` without the clears, at a position in a list of objects (`note[0].text`), of an item that does not
    hold the row's value before the save (pre image): once the row's item went, whatever sits at that position now
    (another system's note) is not the row's, and clearing it would empty it. Without a pre image, all stay."""
    was = {a.path: a.value for a in before}
    if not was:
        return values
    return [a for a in values if a.value is not None or not _positional(a.path)
            or _navigate(result, a.path) == was.get(a.path)]


def _positional(path: Path) -> bool:
    return any(isinstance(seg, Index) and isinstance(nxt, Field) for seg, nxt in pairwise(path))


def sole_selectors(paths: Iterable[Path]) -> frozenset[Path]:
    """Of the selectors with optional keys in `paths` (a map's targets), those no other selector of the same list
    could also mean (`name[use?=official]`, but none of `telecom[system=phone,use?=work]`, `...use?=home]`): without
    the row's values before the save, only those can tell which item an ingest put there is theirs."""
    by_list: dict[tuple[Path, tuple[tuple[str, str], ...]], set[Path]] = {}
    for path in paths:
        for i, seg in enumerate(path):
            if isinstance(seg, Select) and seg.optional:
                fixed = tuple(kv for kv in seg.match if kv[0] not in seg.optional)
                by_list.setdefault((path[:i], fixed), set()).add(path[: i + 1])
    return frozenset(p for prefixes in by_list.values() if len(prefixes) == 1 for p in prefixes)


def drop_lone_constants(resource: dict[str, Any], assignments: Iterable[Assignment],
                        constants: Iterable[Path]) -> dict[str, Any]:
    """`resource` (changed in place) without an element that `assignments` cleared a value of and that holds only
    the map's constants now (`constants`: their paths): a class with its system and no code, a length with its unit
    and no value. A whole state drops them so (`apply_state`: a constant is written only beside a value of the
    row); a change without images did not (found by review: `class: {system}` and a Duration breaking drt-1)."""
    constants = list(constants)
    cleared = [a.path for a in assignments if a.value is None]
    for parent_path in dict.fromkeys(c[:-1] for c in constants if len(c) > 1):
        if not any(c[:len(parent_path)] == parent_path for c in cleared):
            continue
        names = {c[-1].name for c in constants if c[:-1] == parent_path and isinstance(c[-1], Field)}
        if isinstance(parent_path[-1], Select):  # (the item's selector keys, written with it: `identifier[system=…]`)
            names.update(key for key, _ in parent_path[-1].match)
        parent = _navigate(resource, parent_path)
        if isinstance(parent, dict) and parent and set(parent) <= names:
            resource = _set(resource, parent_path, None)
    return resource


def add_constants(resource: dict[str, Any], assignments: Iterable[Assignment],
                  constants: Iterable[Assignment]) -> dict[str, Any]:
    """`resource` with the map's constants written beside a value `assignments` give in their element (a visit's
    length entered without images: its UCUM unit with it), as a whole state writes them (found by review: the
    length was refused as a Duration without a code)."""
    given = [a.path for a in assignments if a.value is not None and a.value is not KEEP]
    for constant in constants:
        parent_path = constant.path[:-1]
        if parent_path and any(g[:len(parent_path)] == parent_path and len(g) > len(parent_path) for g in given) \
                and isinstance(_navigate(resource, parent_path), dict):
            resource = _set(resource, constant.path, constant.value)
    return resource


def apply_changes(resource: dict[str, Any], assignments: Iterable[Assignment],
                  adoptable: frozenset[Path] | None = None, own: Mark | None = None,
                  pinned: Iterable[Assignment] = (), *, item: bool = False) -> dict[str, Any]:
    """`apply` for a change that carries only some columns (a step without images): a selector with optional keys
    that is the only one of its list (`adoptable`, from `sole_selectors`; None: any) takes the item an ingest put
    there (`adopt`) instead of adding a parallel one, and what described a value it changed goes with it (see
    `_DESCRIBED_BY`)."""
    result: dict[str, Any] = _tree_copy(resource)
    assignments, own_lists = _own_items(result, list(assignments), own)
    adopting = assignments if adoptable is None else [
        a for a in assignments if any(a.path[:len(p)] == p for p in adoptable)]
    redirects = adopt(result, adopting, pinned=pinned) if len(result) > 1 and adopting else {}
    if redirects:
        assignments = _redirect(assignments, redirects)
    before = [(a, _navigate(result, a.path)) for a in _described(assignments, item)]
    parts = _text_parts(result, assignments)
    displays = _displays(result, assignments)
    for assignment in assignments:
        result = _set(result, assignment.path, assignment.value)
    _keep_displays(result, displays)
    _drop_stale(result, _changed(before, result), assignments)
    _drop_stale_texts(result, parts, assignments)
    _unpick(result, redirects)
    _mark_own(result, own_lists, own, whole=False)
    return result


def _unpick(result: dict[str, Any], redirects: dict[Path, Select]) -> None:
    for prefix in redirects:
        for item in _navigate(result, prefix[:-1]) or []:
            if isinstance(item, dict):
                item.pop(_PICK, None)


def apply_state(resource: dict[str, Any], assignments: Iterable[Assignment],
                before: Iterable[Assignment] = (), own: Mark | None = None,
                earlier: Iterable[Iterable[Assignment]] = (), *,
                holds: Sequence[Sequence[Assignment]] = (), items: Mapping[str, int] | None = None,
                written_items: dict[str, int] | None = None, pinned: Iterable[Assignment] = (),
                item: bool = False) -> dict[str, Any]:
    """A new resource: `resource` with a row's whole state written (see the module docstring). `before`: the
    row's state before the save, to recognise the items an ingest put there (`adopt`; `earlier`: its older saves'
    of the same batch). `own`: the row's mark, for the items `[row]` names (`_own_items`). `holds`: of those
    images, the ones that may be what the resource holds of the row (`_owned_counts`); `items`: how many leading
    items of each owned list the row's last whole state put there, as its mark says (known, it wins over
    `holds`); `written_items`, filled in: the same after this write, for the new mark. `pinned`: what is written
    apart (the row identifier), whose items no selector takes (`adopt`)."""
    before = tuple(before)
    result: dict[str, Any] = _tree_copy(resource)
    assignments, own_lists = _own_items(result, list(assignments), own, before)
    values: list[Assignment] = []
    constants: list[Assignment] = []
    lists: dict[Path, dict[int, JSONValue]] = {}
    prefixes: list[Path] = []  # of the owned prefixes in `values`, in order
    for assignment in assignments:
        last = assignment.path[-1]
        if assignment.column is None and assignment.value is not None:
            constants.append(assignment)
        elif isinstance(last, Index):
            lists.setdefault(assignment.path[:-1], {})[last.position] = assignment.value
        elif assignment.value is not KEEP:
            values.append(assignment)
    for prefix, positions in lists.items():
        if all(v is KEEP for v in positions.values()):
            continue
        count = max(positions) + 1
        owned = OwnedPrefix(tuple(positions.get(i, KEEP) for i in range(count)), count)
        values.append(Assignment(prefix, owned, "*"))
        prefixes.append(prefix)
    redirects = adopt(result, [*values, *constants], before, earlier, pinned=pinned) if len(result) > 1 else {}
    if redirects:
        values, constants = _redirect(values, redirects), _redirect(constants, redirects)
    existing = len(result) > 1  # a copy to write over, not an empty resource (what a create renders)
    if existing and prefixes and (holds or items):
        values = _owned_counts(result, values, prefixes, holds, items or {})
    if written_items is not None:
        owned_lists = iter(prefixes)
        for a in values:
            if isinstance(a.value, OwnedPrefix):
                current = _navigate(result, a.path)
                current = current if isinstance(current, list) else []
                written_items[format_path(next(owned_lists))] = sum(
                    1 for i, v in enumerate(a.value.values)
                    if (current[i] if v is KEEP and i < len(current) else v) not in (None, KEEP))
    described = [(a, _navigate(result, a.path)) for a in _described(values, item)] if existing else []
    parts = _text_parts(result, values) if existing else []
    displays = _displays(result, values) if existing else []
    groups: dict[Path, list[Assignment]] = {}
    held: set[Path] = set()
    if existing:
        values = _positional_clears(result, values, before)
        groups = _item_groups(values)
        held = _held(result, groups)
    # (A clear of an element the resource does not hold changes nothing: not walked, most clears of a create are;
    # but a `[row]` no mark resolved is still refused, by `_set`, as `_own_items` says.)
    for constant in constants:  # cleared first: it stays only where the row still has a value beside it
        if constant.element in result or _unresolved(constant.path):
            result = _set(result, constant.path, None)
    for assignment in values:
        if assignment.value is not None or assignment.element in result or _unresolved(assignment.path):
            result = _set(result, assignment.path, assignment.value)
    _keep_displays(result, displays)
    if described:
        _drop_stale(result, _changed(described, result), [*values, *constants])
    if parts:
        _drop_stale_texts(result, parts, [*values, *constants])
    if existing:
        result = _drop_emptied_items(result, groups, held)
    for constant in constants:
        if len(constant.path) == 1 or isinstance(_navigate(result, constant.path[:-1]), dict):
            result = _set(result, constant.path, constant.value)
    _unpick(result, redirects)
    _mark_own(result, own_lists, own, whole=True)
    return result
