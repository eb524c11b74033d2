"""The StructureDefinitions of the two extensions this product writes (`writeback.marks`): FHIR asks that an
extension's url be "a URI for the Structure Definition defining the extension" (Extension.url), so a receiving
system, or the HL7 validator loaded with them, can tell what they mean.

`python -m devtools.structure_definitions` writes them to `docs/fhir/`; tests/core/test_structure_definitions.py
checks the files are what this writes and that every mark the product makes conforms to them. Load them into the
FHIR service with a `PUT StructureDefinition/<id>` each, where the service should know them (docs/deploy.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from writeback.marks import MOVED, ROW

FOLDER = Path(__file__).resolve().parents[1] / "docs" / "fhir"

# (name, value type or None for a complex part, min, max, what it holds, its own parts)
_Part = tuple[str, str | None, int, str, str, tuple[Any, ...]]
_VERSION: tuple[_Part, ...] = (
    ("version", "string", 0, "1", "The row version whose state this holds: Dataverse `versionnumber` as text (a "
     "64-bit number), or `@<modifiedon, ISO 8601>` for a row without it. Absent: only changes without images "
     "wrote here.", ()),
    ("modified", "string", 0, "1", "The row's `modifiedon` (ISO 8601) beside a `versionnumber`, to order a "
     "message without one.", ()),
)
_PARTS: tuple[_Part, ...] = (
    ("table", "string", 1, "1", "The Dataverse table's logical name (`contact`).", ()),
    ("id", "string", 1, "1", "The Dataverse row's id (a GUID).", ()),
    *_VERSION,
    ("column", None, 0, "*", "A column a change without images (Target only) wrote, newer than `version`, with "
     "the version of that change.", (("name", "string", 1, "1", "The column's logical name.", ()), *_VERSION)),
    ("items", None, 0, "*", "A list whose leading items the row's whole state put there, and how many: the items "
     "after them are another system's.", (
         ("list", "string", 1, "1", "The list's path in the map (`name[use?=official].given`).", ()),
         ("count", "integer", 1, "1", "How many leading items are the row's.", ()))),
)

_DEFINITIONS = (
    ("dataverse-row", ROW, "DataverseRow", "Dataverse row",
     "Which Dataverse row, at which version, produced what this resource (or this item of a list) holds: written "
     "by the Dataverse FHIR writeback on every resource it writes for a row, and on each item a child row puts "
     "into its parent (a medical identifier in Patient.identifier). The writeback compares a change's version "
     "with it inside its If-Match write, so an older state never overwrites a newer one. Not patient data."),
    ("dataverse-moved-away", MOVED, "DataverseMovedAway", "Dataverse row moved away",
     "Left by the Dataverse FHIR writeback where a row's item or resource was, once the row moved to another "
     "parent or became another resource type: the version that moved it, so that an older change of the row "
     "cannot put it back here. Same parts as the row extension."),
)


def _elements(path: str, parts: tuple[_Part, ...], url: str | None) -> list[dict[str, Any]]:
    """The differential of a complex extension at `path` (`Extension`, `Extension.extension:column`)."""
    out: list[dict[str, Any]] = [{"id": f"{path}.extension", "path": _base(f"{path}.extension"), "slicing": {
        "discriminator": [{"type": "value", "path": "url"}], "rules": "closed"}}]
    for name, kind, low, high, short, inner in parts:
        sliced = f"{path}.extension:{name}"
        base = _base(sliced)
        out.append({"id": sliced, "path": base, "sliceName": name, "short": short, "min": low, "max": high})
        # (in the order of the elements of Extension, as a differential must be: extension, url, value[x])
        if kind is None:
            out += _elements(sliced, inner, None)
        else:
            out.append({"id": f"{sliced}.extension", "path": f"{base}.extension", "max": "0"})
        out.append({"id": f"{sliced}.url", "path": f"{base}.url", "fixedUri": name})
        out.append({"id": f"{sliced}.value[x]", "path": f"{base}.value[x]", "max": "0"} if kind is None else
                   {"id": f"{sliced}.value[x]", "path": f"{base}.value[x]", "min": 1, "type": [{"code": kind}]})
    if url is not None:
        out.append({"id": f"{path}.url", "path": f"{path}.url", "fixedUri": url})
        out.append({"id": f"{path}.value[x]", "path": f"{path}.value[x]", "max": "0"})
    return out


def _base(element_id: str) -> str:
    """An element id's path: the slice names dropped (`Extension.extension:column.url` → `Extension.extension.url`)."""
    return ".".join(part.split(":")[0] for part in element_id.split("."))


def definitions() -> dict[str, dict[str, Any]]:
    """File name → StructureDefinition."""
    out: dict[str, dict[str, Any]] = {}
    for sd_id, url, name, title, description in _DEFINITIONS:
        elements = _elements("Extension", _PARTS, url)
        out[f"StructureDefinition-{sd_id}.json"] = {
            "resourceType": "StructureDefinition", "id": sd_id, "url": url, "name": name, "title": title,
            "status": "active", "description": description, "fhirVersion": "4.0.1", "kind": "complex-type",
            "abstract": False, "context": [{"type": "element", "expression": "Element"}], "type": "Extension",
            "baseDefinition": "http://hl7.org/fhir/StructureDefinition/Extension", "derivation": "constraint",
            "differential": {"element": [{"id": "Extension", "path": "Extension", "short": title, "min": 0,
                                          "max": "*"}, *elements]},
        }
    return out


def text(definition: dict[str, Any]) -> str:
    return json.dumps(definition, indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    FOLDER.mkdir(exist_ok=True)
    for file, definition in definitions().items():
        (FOLDER / file).write_text(text(definition), encoding="utf-8")
        print(f"wrote docs/fhir/{file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
