"""The StructureDefinitions of the product's two extensions (docs/fhir/, `devtools.structure_definitions`): they are
what the generator writes, valid StructureDefinitions, and every mark the product writes conforms to them."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from fhir.resources.R4B.structuredefinition import StructureDefinition

from devtools import structure_definitions
from writeback.marks import MOVED, ROW, Mark, Version

_VALUE_KEYS = {"string": "valueString", "integer": "valueInteger"}


def _conforms(extension: dict[str, Any], elements: dict[str, dict[str, Any]], path: str = "Extension") -> list[str]:
    """What in `extension` its StructureDefinition's differential does not allow (closed slicing by url)."""
    problems: list[str] = []
    slices = {e["sliceName"]: e for i, e in elements.items() if i.startswith(f"{path}.extension:")
              and i.count(":") == path.count(":") + 1 and "." not in i[len(f"{path}.extension:"):]}
    counts = dict.fromkeys(slices, 0)
    for part in extension.get("extension", []):
        name = part.get("url")
        if name not in slices:
            problems.append(f"{path}: part {name!r} not defined")
            continue
        counts[name] += 1
        sliced = f"{path}.extension:{name}"
        value = elements[f"{sliced}.value[x]"]
        if value.get("max") == "0":
            problems += [f"{sliced}: a value" for key in part if key.startswith("value")]
            problems += _conforms(part, elements, sliced)
        else:
            [kind] = [t["code"] for t in value["type"]]
            if set(part) != {"url", _VALUE_KEYS[kind]}:
                problems.append(f"{sliced}: {sorted(part)} is not a url and a {kind}")
    for name, element in slices.items():
        if counts[name] < element["min"] or (element["max"] != "*" and counts[name] > int(element["max"])):
            problems.append(f"{path}.extension:{name}: {counts[name]} of {element['min']}..{element['max']}")
    return problems


def test_the_files_are_what_the_generator_writes() -> None:
    for file, definition in structure_definitions.definitions().items():
        path = structure_definitions.FOLDER / file
        assert path.read_text(encoding="utf-8") == structure_definitions.text(definition), (
            f"docs/fhir/{file} is stale: run python -m devtools.structure_definitions")


@pytest.mark.parametrize("url", [ROW, MOVED])
def test_every_mark_the_product_writes_conforms_to_its_definition(url: str) -> None:
    [definition] = [d for d in structure_definitions.definitions().values() if d["url"] == url]
    StructureDefinition.model_validate(json.loads(json.dumps(definition)))
    elements = {e["id"]: e for e in definition["differential"]["element"]}
    when = datetime(2026, 11, 30, 8, 0, tzinfo=UTC)
    marks = [
        Mark("contact", "0c9a1e52-7b1d-4f6e-9a3c-5d2e8f4b6a10", Version(1234, when)),
        Mark("contact", "0c9a1e52-7b1d-4f6e-9a3c-5d2e8f4b6a10", Version(modified=when)),
        Mark("msemr_medicalidentifier", "9e7d5c3b-0000-0000-0000-000000000000", Version(),
             columns=(("telephone1", Version(1300, when)), ("lastname", Version(modified=when))),
             items=(("name[use?=official].given", 2),)),
    ]
    for mark in marks:
        extension = mark.extension(url)
        assert extension["url"] == elements["Extension.url"]["fixedUri"]
        assert _conforms(extension, elements) == [], extension
    # The check can fail: a part the definition does not name, and a required one missing.
    assert _conforms({"url": url, "extension": [{"url": "table", "valueString": "contact"},
                                                {"url": "row", "valueString": "x"}]}, elements) == [
        "Extension: part 'row' not defined", "Extension.extension:id: 0 of 1..1"]
