"""The row's mark in a resource: the whole state's version, and the per-column versions of changes without images
(writeback.marks), and how `converge` orders a change by them. Pure: no server."""

from __future__ import annotations

from typing import Any

from writeback.converge import ItemEdit, RowEdit, converge
from writeback.marks import Mark, Version, mark_of, with_mark
from writeback.paths import Assignment, parse_path

ROW = ("contact", "c-1")


def mark(version: int | None, **columns: int) -> Mark:
    return Mark(*ROW, Version(version), tuple(sorted((c, Version(v)) for c, v in columns.items())))


def patient(held: Mark, **elements: Any) -> dict[str, Any]:
    return with_mark({"resourceType": "Patient", "id": "p-1", **elements}, held, *ROW)


def phone(value: str | None) -> Assignment:
    return Assignment(parse_path("telecom[system=phone,use=work].value"), value, "telephone1")


def family(value: str | None) -> Assignment:
    return Assignment(parse_path("name[use=official].family"), value, "lastname")


IDENTITY = Assignment(parse_path("identifier[system=urn:dataverse:contact].value"), "c-1")


def target_only(version: int, *owned: Assignment) -> RowEdit:
    return RowEdit(Mark(*ROW, Version(version)), owned, IDENTITY, full=False)


def whole(version: int, *owned: Assignment) -> RowEdit:
    return RowEdit(Mark(*ROW, Version(version)), owned, IDENTITY, full=True)


def test_a_mark_with_column_versions_round_trips_through_its_extension():
    held = mark(10, telephone1=12, lastname=11)
    assert mark_of(patient(held), *ROW) == held


def test_a_mark_keeps_how_many_leading_items_of_each_owned_list_the_row_put_there():
    """The count of the row's leading items (a given name cleared: one left) comes back from the resource, and a
    later whole state written over it takes only those, whatever saves wrote nothing in between (test_r2d)."""
    mark = Mark("contact", "c-1", Version(7), items=(("name[use?=official].given", 1),))
    node = with_mark({"resourceType": "Patient"}, mark, "contact", "c-1")
    assert mark_of(node, "contact", "c-1") == mark
    given = parse_path("name[use?=official].given[0]"), parse_path("name[use?=official].given[1]")
    current = {**node, "name": [{"use": "official", "given": ["Imani", "Adaeze"]}]}
    edit = RowEdit(Mark("contact", "c-1", Version(9)), (Assignment(given[0], "Imani", "firstname"),
                                                       Assignment(given[1], None, "middlename")),
                   Assignment(parse_path("identifier[system=urn:dataverse:contact].value"), "c-1"), full=True)
    decided = converge(current, edit, "Patient", "c-1")
    assert decided.resource is not None and decided.resource["name"][0]["given"] == ["Imani", "Adaeze"]
    assert mark_of(decided.resource, "contact", "c-1") == Mark("contact", "c-1", Version(9),
                                                               items=(("name[use?=official].given", 1),))


def test_a_mark_without_a_whole_version_writes_no_empty_string():
    node = patient(mark(None, telephone1=12))
    [extension] = node["extension"]
    assert [e["url"] for e in extension["extension"]] == ["table", "id", "column"]
    held = mark_of(node, *ROW)
    assert held is not None and not held.version.known and held.column("telephone1") == Version(12)


def test_a_whole_state_drops_the_column_versions_it_holds_and_keeps_newer_ones():
    assert mark(10, telephone1=12, lastname=11).whole(Version(11)) == mark(11, telephone1=12)
    assert mark(10, telephone1=12).whole(Version(12)) == mark(12)


def test_a_change_without_images_records_its_columns_and_keeps_the_whole_version():
    assert mark(10, lastname=11).written(Version(12), ["telephone1"]) == mark(10, lastname=11, telephone1=12)
    assert mark(10, telephone1=11).written(Version(12), ["telephone1"]) == mark(10, telephone1=12)


def test_a_change_without_images_older_than_its_columns_entry_is_stale_and_the_same_is_same():
    current = patient(mark(10, telephone1=12), telecom=[{"system": "phone", "use": "work", "value": "+1 555 0112"}])
    assert converge(current, target_only(11, phone("+1 555 0111"))).kind == "stale"
    assert converge(current, target_only(12, phone("+1 555 0112"))).kind == "same"


def test_a_change_without_images_writes_only_the_columns_no_newer_change_wrote():
    current = patient(mark(10, telephone1=12), telecom=[{"system": "phone", "use": "work", "value": "+1 555 0112"}],
                      name=[{"use": "official", "family": "Castellanos"}])
    out = converge(current, target_only(11, phone("+1 555 0111"), family("Ruiz")))
    assert out.kind == "write" and out.resource is not None
    assert out.resource["telecom"][0]["value"] == "+1 555 0112"
    assert out.resource["name"][0]["family"] == "Ruiz"
    assert mark_of(out.resource, *ROW) == mark(10, lastname=11, telephone1=12)


def test_an_older_whole_state_keeps_a_column_a_newer_change_without_images_wrote():
    current = patient(mark(10, telephone1=12), telecom=[{"system": "phone", "use": "work", "value": "+1 555 0112"}],
                      name=[{"use": "official", "family": "Castellanos"}])
    out = converge(current, whole(11, phone("+1 555 0100"), family("Ruiz")))
    assert out.kind == "write" and out.resource is not None
    assert out.resource["telecom"] == [{"system": "phone", "use": "work", "value": "+1 555 0112"}]
    assert out.resource["name"][0]["family"] == "Ruiz"
    assert mark_of(out.resource, *ROW) == mark(11, telephone1=12)
    newer = converge(out.resource, whole(13, phone("+1 555 0113"), family("Ruiz")))
    assert newer.resource is not None and newer.resource["telecom"][0]["value"] == "+1 555 0113"
    assert mark_of(newer.resource, *ROW) == mark(13)


def test_child_row_items_are_ordered_per_column_too():
    item_mark = Mark("msemr_medicalidentifier", "i-1", Version(10))
    current = {"resourceType": "Patient", "id": "p-1",
               "identifier": [with_mark({"system": "urn:mrn", "value": "M-1"}, item_mark, "msemr_medicalidentifier",
                                        "i-1")]}
    value = Assignment(parse_path("value"), "M-2", "msemr_value")
    system = Assignment(parse_path("system"), "urn:mrn2", "msemr_identifiersystem")
    newer = converge(current, ItemEdit(Mark("msemr_medicalidentifier", "i-1", Version(12)), "identifier", (value,),
                                       full=False))
    assert newer.resource is not None
    older = converge(newer.resource, ItemEdit(Mark("msemr_medicalidentifier", "i-1", Version(11)), "identifier",
                                              (system,), full=False))
    assert older.kind == "write" and older.resource is not None
    [item] = older.resource["identifier"]
    assert (item["system"], item["value"]) == ("urn:mrn2", "M-2")
    again = converge(older.resource, ItemEdit(Mark("msemr_medicalidentifier", "i-1", Version(11)), "identifier",
                                              (value,), full=False))
    assert again.kind == "stale"


def test_a_version_kept_in_the_row_state_comes_back_with_both_its_parts():
    from datetime import UTC, datetime

    when = datetime(2026, 11, 30, 8, 0, 4, tzinfo=UTC)
    for version in (Version(5003, when), Version(5003), Version(None, when), Version()):
        assert Version.parse(version.stored()) == version
    assert Version.parse("5003@not a time") == Version(5003)
    # a message without versionnumber is ordered against it by modifiedon
    assert Version(None, datetime(2026, 11, 30, 8, 0, 3, tzinfo=UTC)).compare(Version.parse(
        Version(5003, when).stored())) == -1
