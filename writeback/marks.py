"""Which Dataverse row, at which version, produced what a FHIR resource holds: kept in the resource itself.

Every resource this product writes for a row carries, as an extension, the row and the version (Dataverse
`versionnumber`, else `modifiedon`) whose state it holds; every item a child row puts inside a parent (a
medical identifier inside its patient's `Patient.identifier`) carries the same about that child row. A write
compares its own version with the mark inside its read-modify-write (`If-Match`), after every 412 and every
retry, so an older state never overwrites a newer one, whichever instance writes, and nothing outside the
resource has to be claimed first. An item moved to another parent leaves a tombstone (the same extension under
another URL) with the version that moved it, so an older change cannot put it back.

    {"url": "urn:dataverse-fhir-writeback:row",
     "extension": [{"url": "table", "valueString": "contact"},
                   {"url": "id", "valueString": "<row id>"},
                   {"url": "version", "valueString": "1234"}]}

The version is text: `versionnumber` is a 64-bit number (FHIR `integer` is 32-bit), and a row without it is
marked `@<modifiedon, ISO 8601>`. Beside a `versionnumber`, `modifiedon` is kept too (`{"url": "modified"}`): a
message that holds no `versionnumber` (a Target without it) is then still ordered against the mark.

A change without images (Target only) is not the row's whole state: it leaves the mark's version as it is and
records, per column it writes, its own version (`{"url": "column", "extension": [name, version]}` beside the
three above). A later Target-only change of that column is compared with it, and a whole state older than it
keeps that column as the newer change left it; a whole state as new or newer drops the entry (it holds that
change). So changes without images are ordered per column inside the same If-Match write. Pure.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from writeback.immutable import immutable

ROW = "urn:dataverse-fhir-writeback:row"
MOVED = "urn:dataverse-fhir-writeback:moved-away"


@immutable
class Version:
    """A Dataverse row version: `versionnumber` when the message has it, else `modifiedon`."""

    number: int | None = None
    modified: datetime | None = None

    @property
    def known(self) -> bool:
        return self.number is not None or self.modified is not None

    def text(self) -> str:
        if self.number is not None:
            return str(self.number)
        return "@" + self.modified.isoformat() if self.modified is not None else ""

    def stored(self) -> str:
        """As kept where both parts must come back (the row state): `<versionnumber>@<modifiedon>` when it has
        both (`text` keeps the number alone), read back by `parse`."""
        if self.number is not None and self.modified is not None:
            return f"{self.number}@{self.modified.isoformat()}"
        return self.text()

    @classmethod
    def parse(cls, text: str) -> Version:
        number, at, when = text.partition("@")
        if at:
            try:
                modified = datetime.fromisoformat(when)
            except ValueError:
                return cls(number=int(number)) if number.isdigit() else cls()
            return cls(int(number) if number.isdigit() else None, modified)
        return cls(number=int(text)) if text.isdigit() else cls()

    def compare(self, other: Version) -> int | None:
        """-1, 0, 1 as self is older, the same, newer than `other`; None when they cannot be compared. By
        `versionnumber` when both have it, else by `modifiedon`; the same `modifiedon` with a `versionnumber` on
        one side only cannot tell two saves of one second apart: not compared."""
        if self.number is not None and other.number is not None:
            return (self.number > other.number) - (self.number < other.number)
        if self.modified is not None and other.modified is not None:
            order = (self.modified > other.modified) - (self.modified < other.modified)
            return None if order == 0 and (self.number is None) != (other.number is None) else order
        return None

    def parts(self) -> list[dict[str, str]]:
        """As a mark's sub-extensions: the text, and `modifiedon` beside a `versionnumber` (a message that holds
        no `versionnumber`, such as a Target without it, is still ordered against it). None when unknown (FHIR
        strings are never empty)."""
        out = [{"url": "version", "valueString": self.text()}] if self.known else []
        if self.number is not None and self.modified is not None:
            out.append({"url": "modified", "valueString": self.modified.isoformat()})
        return out

    @classmethod
    def of_parts(cls, parts: dict[str, str]) -> Version:
        version = cls.parse(parts.get("version", ""))
        if version.number is not None and parts.get("modified"):
            try:
                return cls(version.number, datetime.fromisoformat(parts["modified"]))
            except ValueError:
                pass
        return version


@immutable
class Mark:
    table: str
    row_id: str
    version: Version  # of the row's whole state written (unknown: only changes without images were)
    # Per column, the version of the newest change without images that wrote it, when newer than `version`
    columns: tuple[tuple[str, Version], ...] = ()
    # Per list whose leading positions the map owns (`name[use?=official].given`), how many leading items the row's
    # whole state put there: the items after them are other systems' (`paths._owned_counts`).
    items: tuple[tuple[str, int], ...] = ()

    def extension(self, url: str = ROW) -> dict[str, Any]:
        parts: list[dict[str, Any]] = [{"url": "table", "valueString": self.table},
                                       {"url": "id", "valueString": self.row_id}, *self.version.parts()]
        parts += [{"url": "column", "extension": [{"url": "name", "valueString": name}, *version.parts()]}
                  for name, version in self.columns]
        parts += [{"url": "items", "extension": [{"url": "list", "valueString": path},
                                                 {"url": "count", "valueInteger": count}]}
                  for path, count in self.items]
        return {"url": url, "extension": parts}

    def column(self, name: str) -> Version | None:
        """The version of the change without images that last wrote column `name`, when newer than the whole
        state's (None: the whole state holds the column)."""
        for column, version in self.columns:
            if column == name:
                return version
        return None

    def written(self, version: Version, columns: Iterable[str], lists: Iterable[str] = ()) -> Mark:
        """This mark after a change without images of `version` wrote `columns`, at positions of `lists` among
        them (their `items` go: how many leading items are the row's is not known after such a change)."""
        named, touched = set(columns), set(lists)
        kept = [(c, v) for c, v in self.columns if c not in named]
        return Mark(self.table, self.row_id, self.version,
                    tuple(sorted([*kept, *((c, version) for c in named)])) if version.known else tuple(kept),
                    tuple((path, count) for path, count in self.items if path not in touched))

    def whole(self, version: Version) -> Mark:
        """A whole state of `version` written over this mark: the columns a newer change wrote stay theirs."""
        return Mark(self.table, self.row_id, version, self.newer_than(version))

    def newer_than(self, version: Version) -> tuple[tuple[str, Version], ...]:
        """The column entries newer than `version` (one that cannot be compared with it goes: the whole state
        written after it, in the order given, has the last word, as it had before entries were kept)."""
        return tuple((c, v) for c, v in self.columns if (order := v.compare(version)) is not None and order > 0)


def _parts(extension: dict[str, Any]) -> dict[str, str]:
    return {str(e.get("url")): str(e.get("valueString", "")) for e in extension.get("extension") or []
            if isinstance(e, dict) and e.get("url") not in ("column", "items")}


def _items(extension: dict[str, Any]) -> tuple[tuple[str, int], ...]:
    out = []
    for e in extension.get("extension") or []:
        if isinstance(e, dict) and e.get("url") == "items":
            parts = {str(p.get("url")): p for p in e.get("extension") or [] if isinstance(p, dict)}
            path, count = parts.get("list", {}).get("valueString"), parts.get("count", {}).get("valueInteger")
            if isinstance(path, str) and isinstance(count, int) and not isinstance(count, bool) and count >= 0:
                out.append((path, count))
    return tuple(sorted(out))


def _columns(extension: dict[str, Any]) -> tuple[tuple[str, Version], ...]:
    out = []
    for e in extension.get("extension") or []:
        if isinstance(e, dict) and e.get("url") == "column":
            parts = _parts(e)
            version = Version.of_parts(parts)
            if parts.get("name") and version.known:
                out.append((parts["name"], version))
    return tuple(out)


def marks_in(node: dict[str, Any], url: str = ROW) -> list[Mark]:
    """The marks (or tombstones) directly on `node` (a resource or a list item)."""
    found = []
    for extension in node.get("extension") or []:
        if isinstance(extension, dict) and extension.get("url") == url:
            parts = _parts(extension)
            found.append(Mark(parts.get("table", ""), parts.get("id", ""), Version.of_parts(parts),
                              _columns(extension), _items(extension)))
    return found


def mark_of(node: dict[str, Any], table: str, row_id: str, url: str = ROW) -> Mark | None:
    return next((m for m in marks_in(node, url) if (m.table, m.row_id) == (table, row_id)), None)


def with_mark(node: dict[str, Any], mark: Mark | None, table: str, row_id: str, url: str = ROW) -> dict[str, Any]:
    """`node` (changed in place and returned) with its mark for the row replaced by `mark` (None: removed)."""
    kept = [e for e in node.get("extension") or [] if not _is_for(e, url, table, row_id)]
    if mark is not None:
        kept.append(mark.extension(url))
    if kept:
        node["extension"] = kept
    else:
        node.pop("extension", None)
    return node


def _is_for(extension: object, url: str, table: str, row_id: str) -> bool:
    if not isinstance(extension, dict) or extension.get("url") != url:
        return False
    parts = _parts(extension)
    return (parts.get("table"), parts.get("id")) == (table, row_id)


def item_of(items: Iterable[Any], table: str, row_id: str) -> dict[str, Any] | None:
    """The list item a child row put there (found by its mark, never by its content)."""
    return next((item for item in items if isinstance(item, dict) and mark_of(item, table, row_id)), None)


def strip_marks(node: Any) -> Any:
    """A copy without this product's marks and tombstones (to compare what the row's state says)."""
    if isinstance(node, dict):
        out = {k: strip_marks(v) for k, v in node.items() if k != "extension"}
        kept = [strip_marks(e) for e in node.get("extension") or []
                if not (isinstance(e, dict) and e.get("url") in (ROW, MOVED))]
        if kept:
            out["extension"] = kept
        return out
    if isinstance(node, list):
        return [strip_marks(v) for v in node]
    return node
