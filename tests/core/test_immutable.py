"""`evolve` is `dataclasses.replace` made faster: the same copies; a field it cannot take is refused too (a
`TypeError`, where `replace` raises a `ValueError` for a field outside `__init__`)."""

from __future__ import annotations

import dataclasses

import pytest

from writeback.immutable import evolve
from writeback.maps import load_maps
from writeback.marks import Mark, Version
from writeback.settings import DEFAULT_MAPS_DIR


def test_evolve_copies_as_replace_does() -> None:
    mark = Mark("contact", "0f8fad5b-d9cb-469f-a165-70867728950e", Version(3, None))
    for changes in ({}, {"row_id": "7c9e6679-7425-40de-944b-e07fc1f90ae7"}, {"table": "x", "version": Version()}):
        copy = evolve(mark, **changes)
        assert copy == dataclasses.replace(mark, **changes)
        assert copy is not mark


def test_evolve_leaves_what_init_makes_to_init() -> None:
    """A field outside `__init__` (what planning derives from a map, kept beside it) is made anew, not copied: the
    copy of a map with other attributes must not plan with the old one's."""
    entity_map = load_maps(DEFAULT_MAPS_DIR).maps["contact"]
    entity_map.attributes_for("Patient")
    copy = evolve(entity_map, attributes=entity_map.attributes[:1])
    assert copy.by_type == {}
    assert copy.attributes_for("Patient") == entity_map.attributes[:1]
    with pytest.raises(TypeError):
        evolve(entity_map, tabel="contact")  # type: ignore[call-arg]
