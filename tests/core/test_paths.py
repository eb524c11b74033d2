"""Element paths: parsing, and `apply()` on a server copy, which must change exactly what the paths name."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from writeback.marks import Mark, Version, mark_of, with_mark
from writeback.paths import (
    Assignment,
    Field,
    Index,
    Own,
    PathError,
    Select,
    apply,
    apply_changes,
    apply_state,
    format_path,
    parse_path,
)


def a(path: str, value: Any) -> Assignment:
    return Assignment(parse_path(path), value)


def server_patient() -> dict[str, Any]:
    """A Patient as the FHIR server holds it, with elements no contact map names."""
    return {
        "resourceType": "Patient",
        "id": "pat-1",
        "meta": {"versionId": "7", "lastUpdated": "2026-01-01T00:00:00Z"},
        "extension": [{"url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex", "valueCode": "F"}],
        "name": [
            {"use": "official", "family": "Quintero", "given": ["Rosalind", "Elsie"]},
            {"use": "nickname", "given": ["Roz"]},
        ],
        "telecom": [
            {"system": "phone", "use": "work", "value": "+1 206 555 0142", "rank": 1},
            {"system": "email", "value": "r.quintero@example.org"},
        ],
        "communication": [{"language": {"coding": [{"system": "urn:ietf:bcp:47", "code": "es"}]}}],
    }


# ---- parsing -----------------------------------------------------------------------------------


def test_parse_fields_selectors_and_indexes():
    path = parse_path("telecom[system=phone,use=work].value")
    assert path == (Field("telecom"), Select((("system", "phone"), ("use", "work"))), Field("value"))
    assert parse_path("name[use=official].given[1]") == (
        Field("name"), Select((("use", "official"),)), Field("given"), Index(1))


def test_selector_values_may_be_uris_with_dots_and_slashes():
    path = parse_path("type.coding[system=http://terminology.hl7.org/CodeSystem/v2-0203].code")
    assert path[2] == Select((("system", "http://terminology.hl7.org/CodeSystem/v2-0203"),))
    assert path[-1] == Field("code")


@pytest.mark.parametrize("text", [
    "telecom[system=phone,use=work].value",
    "name[use=official].given[0]",
    "note[0].text",
    "note[row].text",
    "code.coding[system=urn:dataverse:msemr_codeableconcept].code",
])
def test_format_path_round_trips(text):
    assert format_path(parse_path(text)) == text


@pytest.mark.parametrize("text", [
    "", " gender", "gender ", "name[use=official", "name]use=official[", "name..family", "name.",
    "9name", "name[use]", "name[=x]", "name[use=]", "tele com", "name[a=b][",
])
def test_bad_paths_are_refused(text):
    with pytest.raises(PathError):
        parse_path(text)


# ---- apply: selectors --------------------------------------------------------------------------


def test_selector_finds_the_matching_item_and_keeps_its_other_fields():
    out = apply(server_patient(), [a("telecom[system=phone,use=work].value", "+1 206 555 0177")])
    phone = out["telecom"][0]
    assert phone == {"system": "phone", "use": "work", "value": "+1 206 555 0177", "rank": 1}
    assert len(out["telecom"]) == 2


def test_selector_creates_the_item_with_its_selector_fields_when_none_matches():
    out = apply(server_patient(), [a("telecom[system=phone,use=home].value", "+1 206 555 0100")])
    assert out["telecom"][-1] == {"system": "phone", "use": "home", "value": "+1 206 555 0100"}
    assert len(out["telecom"]) == 3


def test_selector_needs_every_field_to_match():
    # The work phone exists; a mobile phone is another item, not the work phone overwritten.
    out = apply(server_patient(), [a("telecom[system=phone,use=mobile].value", "+1 206 555 0199")])
    assert [t.get("use") for t in out["telecom"]] == ["work", None, "mobile"]
    assert out["telecom"][0]["value"] == "+1 206 555 0142"


def test_create_on_an_empty_resource_builds_every_container():
    out = apply({"resourceType": "Patient"}, [
        a("name[use=official].family", "Okafor"),
        a("name[use=official].given[0]", "Imani"),
        a("address[use=home].line[0]", "1 Main St"),
        a("maritalStatus.coding[system=http://terminology.hl7.org/CodeSystem/v3-MaritalStatus].code", "M"),
    ])
    assert out == {
        "resourceType": "Patient",
        "name": [{"use": "official", "family": "Okafor", "given": ["Imani"]}],
        "address": [{"use": "home", "line": ["1 Main St"]}],
        "maritalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus",
                                      "code": "M"}]},
    }


# ---- apply: indexes ----------------------------------------------------------------------------


def test_index_replaces_the_item_at_its_position():
    out = apply(server_patient(), [a("name[use=official].given[1]", "Ella")])
    assert out["name"][0]["given"] == ["Rosalind", "Ella"]


def test_index_past_the_end_appends_without_holes():
    out = apply({"resourceType": "Patient"}, [a("name[use=official].given[1]", "Elsie")])
    assert out["name"][0]["given"] == ["Elsie"]  # never [None, "Elsie"]: FHIR lists have no nulls
    out = apply(out, [a("name[use=official].given[5]", "Third")])
    assert out["name"][0]["given"] == ["Elsie", "Third"]


def test_clearing_an_index_past_the_end_changes_nothing():
    before = server_patient()
    assert apply(before, [a("name[use=official].given[4]", None)]) == before


# ---- apply: clearing ---------------------------------------------------------------------------


def test_none_removes_the_element():
    out = apply(server_patient(), [a("name[use=official].family", None)])
    assert "family" not in out["name"][0]
    assert out["name"][0]["given"] == ["Rosalind", "Elsie"]


def test_clearing_the_only_value_of_a_selected_item_removes_the_item():
    out = apply(server_patient(), [a("telecom[system=email].value", None)])
    assert out["telecom"] == [{"system": "phone", "use": "work", "value": "+1 206 555 0142", "rank": 1}]


def test_item_with_fields_beyond_its_selector_survives_a_cleared_value():
    out = apply(server_patient(), [a("telecom[system=phone,use=work].value", None)])
    assert out["telecom"][0] == {"system": "phone", "use": "work", "rank": 1}


def test_clearing_prunes_empty_containers_up_the_path():
    resource = {"resourceType": "Encounter", "status": "finished", "period": {"start": "2026-11-02T09:30:00Z"}}
    out = apply(resource, [a("period.start", None)])
    assert out == {"resourceType": "Encounter", "status": "finished"}

    patient = {"resourceType": "Patient", "telecom": [{"system": "email", "value": "x@example.org"}]}
    assert apply(patient, [a("telecom[system=email].value", None)]) == {"resourceType": "Patient"}


def test_clearing_what_is_not_there_changes_nothing():
    before = server_patient()
    out = apply(before, [a("telecom[system=phone,use=home].value", None), a("birthDate", None),
                         a("address[use=home].city", None)])
    assert out == before
    assert "address" not in out  # no empty container was created on the way


def test_none_on_a_create_writes_nothing():
    assert apply({"resourceType": "Patient"}, [a("name[use=official].given[0]", None)]) == {"resourceType": "Patient"}


# ---- apply: what no path names -----------------------------------------------------------------


def test_elements_no_path_names_survive():
    before = server_patient()
    out = apply(before, [
        a("name[use=official].family", "Quintero-Hale"),
        a("telecom[system=phone,use=work].value", None),
        a("gender", "female"),
        a("birthDate", "1987-07-25"),
    ])
    assert out["id"] == before["id"] and out["meta"] == before["meta"]
    assert out["extension"] == before["extension"]
    assert out["communication"] == before["communication"]
    assert out["name"][1] == {"use": "nickname", "given": ["Roz"]}
    assert out["telecom"][1] == before["telecom"][1]
    assert out["name"][0] == {"use": "official", "family": "Quintero-Hale", "given": ["Rosalind", "Elsie"]}


def test_input_is_not_mutated():
    before = server_patient()
    snapshot = copy.deepcopy(before)
    out = apply(before, [
        a("name[use=official].given[0]", "Rosa"),
        a("telecom[system=email].value", None),
        a("telecom[system=phone,use=home].value", "+1 206 555 0100"),
        a("extension[url=http://example.org/x].valueString", "x"),
    ])
    assert before == snapshot
    assert out != before
    out["name"][1]["given"].append("changed")
    assert before == snapshot  # the result shares no container with the input


def test_assigned_values_are_not_shared_with_the_result():
    """A map's constant (a whole CodeableConcept, say) lands in every Create: an assignment beneath it, or a
    change to one resource, must not reach the map's value or the next resource."""
    constant = {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]}
    plan = [a("code", constant), a("code.text", "Heart rate")]
    first = apply({"resourceType": "Observation"}, plan)
    first["code"]["coding"][0]["code"] = "changed"
    second = apply({"resourceType": "Observation"}, plan)
    assert constant == {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]}
    assert second["code"] == {"coding": [{"system": "http://loinc.org", "code": "8867-4"}], "text": "Heart rate"}


def test_assignments_apply_in_order():
    out = apply({"resourceType": "Patient"}, [a("gender", "male"), a("gender", "female")])
    assert out["gender"] == "female"
    out = apply({"resourceType": "Patient"}, [a("gender", "male"), a("gender", None)])
    assert "gender" not in out


def test_assignment_element_is_the_top_level_element():
    assert a("telecom[system=phone,use=work].value", "x").element == "telecom"
    assert a("birthDate", "x").element == "birthDate"


# ---- apply_state: the item a selector takes when the ingest left several -------------------------------------

EMAIL = parse_path("telecom[system=email].value")


def test_of_several_items_a_selector_matches_it_takes_the_one_holding_the_rows_value_before():
    from writeback.paths import apply_state

    home, work = {"system": "email", "value": "a@home.example"}, {"system": "email", "value": "b@work.example"}
    resource = {"resourceType": "Patient", "telecom": [home, work]}
    out = apply_state(resource, [Assignment(EMAIL, "c@work.example", "emailaddress1")],
                      before=[Assignment(EMAIL, "b@work.example", "emailaddress1")])
    assert out["telecom"] == [home, {"system": "email", "value": "c@work.example"}]  # no marker left behind
    assert resource["telecom"] == [home, work]  # the input is not changed
    cleared = apply_state(resource, [Assignment(EMAIL, None, "emailaddress1")],
                          before=[Assignment(EMAIL, "b@work.example", "emailaddress1")])
    assert cleared["telecom"] == [home]
    # Without a value before that any item holds, the selector keeps taking the first.
    first = apply_state(resource, [Assignment(EMAIL, "c@work.example", "emailaddress1")])
    assert first["telecom"] == [{"system": "email", "value": "c@work.example"}, work]


WORK = parse_path("telecom[system=phone,use?=work].value")
MOBILE = parse_path("telecom[system=phone,use?=mobile].value")


def test_an_ingested_number_moved_to_another_column_is_taken_by_that_column_not_cleared():
    """telephone1's number (an ingested phone with a rank and a period) moves to mobilephone in one save: the
    mobile selector takes it (it holds the new value) before the work selector, which only clears, could."""
    from writeback.paths import apply_state

    phone = {"system": "phone", "value": "+1 555 0170", "rank": 1, "period": {"start": "2020-01-01"}}
    resource = {"resourceType": "Patient", "id": "x", "telecom": [phone]}
    moved = [Assignment(WORK, None, "telephone1"), Assignment(MOBILE, "+1 555 0170", "mobilephone")]
    out = apply_state(resource, moved, before=[Assignment(WORK, "+1 555 0170", "telephone1")])
    assert out["telecom"] == [{**phone, "use": "mobile"}]


def test_a_number_corrected_to_another_ingested_number_takes_that_item_with_no_second_copy():
    from writeback.paths import apply_state

    resource = {"resourceType": "Patient", "id": "x",
                "telecom": [{"system": "phone", "value": "A"}, {"system": "phone", "value": "B"}]}
    out = apply_state(resource, [Assignment(WORK, "B", "telephone1")], before=[Assignment(WORK, "A", "telephone1")])
    assert out["telecom"] == [{"system": "phone", "value": "A"}, {"system": "phone", "value": "B", "use": "work"}]


# ---- what described a changed value goes with it ------------------------------------------------------------------

UCUM = "http://unitsofmeasure.org"
CODES = "urn:dataverse:msemr_codeableconcept"


def col(path: str, value: Any) -> Assignment:
    """A row's column (a value without a column is a map's constant to `apply_state`)."""
    return Assignment(parse_path(path), value, path)


def observation() -> dict[str, Any]:
    return {"resourceType": "Observation",
            "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7", "display": "Body weight"},
                                {"system": CODES, "code": "w"}], "text": "Body weight"},
            "valueQuantity": {"value": 72, "unit": "kg", "system": UCUM, "code": "kg"}}


def observation_state(code: str, unit: str | None) -> list[Assignment]:
    return [col(f"code.coding[system={CODES}].code", code), col("valueQuantity.value", 72),
            col("valueQuantity.unit", unit), col("valueQuantity.system", UCUM)]


@pytest.mark.parametrize("write", [apply_state, apply_changes])
def test_a_changed_unit_takes_the_code_of_the_old_unit_away(write):
    assert write(observation(), observation_state("w", "lb"))["valueQuantity"] == \
        {"value": 72, "unit": "lb", "system": UCUM}


@pytest.mark.parametrize("write", [apply_state, apply_changes])
def test_a_cleared_unit_takes_its_code_away_too(write):
    assert write(observation(), observation_state("w", None))["valueQuantity"] == {"value": 72, "system": UCUM}


@pytest.mark.parametrize("write", [apply_state, apply_changes])
def test_a_changed_code_takes_the_concepts_text_and_other_codings_away(write):
    assert write(observation(), observation_state("h", "kg"))["code"] == {"coding": [{"system": CODES, "code": "h"}]}


@pytest.mark.parametrize("write", [apply_state, apply_changes])
def test_values_written_as_they_were_keep_what_describes_them(write):
    assert write(observation(), observation_state("w", "kg")) == observation()


def test_a_coding_added_beside_the_ingests_keeps_it():
    """No code of ours was there: adding one changes no concept, so the LOINC coding and the text stay."""
    ingested = observation()
    del ingested["code"]["coding"][1]
    written = apply_state(ingested, observation_state("w", "kg"))
    assert written["code"] == {"coding": [{"system": "http://loinc.org", "code": "29463-7", "display": "Body weight"},
                                          {"system": CODES, "code": "w"}], "text": "Body weight"}


def test_what_the_map_owns_is_written_not_dropped():
    """A map that owns the display too writes it: only what no assignment owns goes."""
    state = [col("class.code", "IMP"), col("class.display", "inpatient encounter")]
    resource = {"resourceType": "Encounter", "class": {"system": "s", "code": "AMB", "display": "ambulatory",
                                                       "version": "2"}}
    assert apply_state(resource, state)["class"] == {"system": "s", "code": "IMP", "display": "inpatient encounter"}


# ---- [row]: the item the row marks as its own ---------------------------------------------------------

ROW = Mark("msemr_observation", "row-1", Version(7))
THEIRS = {"authorString": "Dr B", "time": "2026-11-29T09:00:00Z", "text": "repeat in 1h"}


def note(value: Any) -> Assignment:
    return Assignment(parse_path("note[row].text"), value, "msemr_comment")


def ident() -> Assignment:
    """A value of the row before the save other than its comment: a pre image in which the comment was empty."""
    return Assignment(parse_path("status"), "final", "msemr_status")


def texts(resource: dict[str, Any]) -> list[tuple[str, bool]]:
    """Each note's text, and whether it carries the row's mark."""
    return [(n["text"], mark_of(n, ROW.table, ROW.row_id) is not None) for n in resource.get("note", [])]


def test_row_item_parses_and_is_never_applied_by_position():
    assert parse_path("note[row].text") == (Field("note"), Own(), Field("text"))
    # Without the row's mark there is no telling which note is the row's.
    with pytest.raises(ValueError, match=r"\[row\]"):
        apply({"resourceType": "Observation"}, [note("x")])


@pytest.mark.parametrize("assignment", [note(None), Assignment(parse_path("note[row].authorString"), "Nurse K")],
                         ids=["cleared-column", "constant"])
def test_a_whole_state_without_the_rows_mark_refuses_a_row_item_even_where_the_list_is_absent(
        assignment: Assignment) -> None:
    """`[row]` left unresolved (no `own`) stops at `_set`, as `_own_items` says: for a clear and a constant too,
    whether or not the resource holds the list yet (apply_state skips the clears of elements a resource does not
    hold, 40ed15d; that must not skip this refusal: the caller that forgot the mark learns it on every resource)."""
    for resource in ({"resourceType": "Observation"}, {"resourceType": "Observation", "note": [dict(THEIRS)]}):
        with pytest.raises(ValueError, match=r"\[row\]"):
            apply_state(resource, [assignment])


def written(resource: dict[str, Any]) -> dict[str, Any]:
    """A resource the row's whole state was written to: it carries the row's mark (as `converge` leaves it)."""
    return with_mark(copy.deepcopy(resource), ROW, ROW.table, ROW.row_id)


def test_row_item_is_found_by_its_mark_wherever_it_stands():
    first = written(apply_state({"resourceType": "Observation"}, [note("after exercise")], own=ROW))
    assert texts(first) == [("after exercise", True)]
    moved = {**first, "note": [THEIRS, *first["note"]]}  # another system's note now first
    changed = apply_state(moved, [note("at rest")], own=ROW)
    assert changed["note"][0] == THEIRS and texts(changed) == [("repeat in 1h", False), ("at rest", True)]
    cleared = apply_state(changed, [note(None)], own=ROW)
    assert cleared["note"] == [THEIRS]
    # Cleared again (nothing of the row's left): the other system's note is not the row's to empty.
    assert apply_state(cleared, [note(None)], [note("at rest")], own=ROW)["note"] == [THEIRS]
    # Entered again, even with the text of the other system's note: a note of its own.
    for text in ("seated", "repeat in 1h"):
        for again in (apply_state(cleared, [note(text)], [ident()], own=ROW),
                      apply_changes(cleared, [note(text)], own=ROW)):
            assert again["note"][0] == THEIRS and texts(again) == [("repeat in 1h", False), (text, True)]


def test_a_change_without_images_that_changes_nothing_leaves_the_mark_as_it_is():
    state = written(apply_state({"resourceType": "Observation"}, [note("x")], own=ROW))
    later = Mark(ROW.table, ROW.row_id, Version(9))
    assert apply_changes(state, [note("x")], own=later) == state
    assert mark_of(apply_state(state, [note("x")], own=later)["note"][0], ROW.table, ROW.row_id) == later


def test_row_item_takes_over_the_note_an_ingest_put_there():
    """On a record that came from FHIR (no mark of the row on it): the note holding the row's comment before the
    save; else, the row having held a comment, the note its ingest copied (the first), whatever order the saves
    come in; never one when the row held no comment before the save."""
    ingested = {"resourceType": "Observation", "note": [{"authorString": "Nurse K", "text": "axillary"}, THEIRS]}
    taken = apply_state(ingested, [note("oral")], [note("axillary")], own=ROW)
    assert taken["note"][0]["authorString"] == "Nurse K" and texts(taken) == [("oral", True), ("repeat in 1h", False)]
    late = apply_state(ingested, [note("rectal")], [note("oral")], own=ROW)  # the newest save received first
    assert late["note"][0]["authorString"] == "Nurse K" and texts(late) == [("rectal", True), ("repeat in 1h", False)]
    for unknown in (apply_state(ingested, [note("oral")], own=ROW), apply_changes(ingested, [note("oral")], own=ROW)):
        assert texts(unknown) == [("oral", True), ("repeat in 1h", False)]  # no pre image: as the ingest copied it
    fresh = apply_state(ingested, [note("oral")], [ident()], own=ROW)  # the row held no comment before
    assert fresh["note"][:2] == ingested["note"] and texts(fresh)[2] == ("oral", True)
    # A clear takes the note that held the row's value before, and only that one.
    assert apply_state(ingested, [note(None)], [note("axillary")], own=ROW)["note"] == [THEIRS]
    # On a resource the row has written, an unmarked note is taken over only by the value before the save (one an
    # earlier release wrote by position): not by position, nor by a text another system's note happens to share.
    upgraded = written(ingested)
    assert texts(apply_state(upgraded, [note("oral")], [note("axillary")], own=ROW))[0] == ("oral", True)
    assert apply_state(upgraded, [note("oral")], [note("rectal")], own=ROW)["note"][:2] == ingested["note"]


SUBJECT_SYSTEM = "urn:dataverse:contact"


def lookup(fhir_id: str | None, row: str) -> dict[str, Any]:
    """A lookup's Reference as this product writes it (`RowRef.reference`)."""
    identifier = {"system": SUBJECT_SYSTEM, "value": row}
    return {"reference": f"Patient/{fhir_id}", "type": "Patient", "identifier": identifier} if fhir_id \
        else {"type": "Patient", "identifier": identifier}


def subject(fhir_id: str | None, row: str) -> Assignment:
    return Assignment(parse_path("subject"), lookup(fhir_id, row), "msemr_subjectpatient")


@pytest.mark.parametrize("write", [apply_state, apply_changes])
def test_a_reference_naming_what_it_named_keeps_its_display_and_one_naming_another_loses_it(write: Any) -> None:
    """FHIR R4 Reference.display is text identifying the resource beside the reference (what an EHR's lists show,
    an ingest's): a save whose lookup still names the same Patient keeps it; one naming another Patient must not
    leave the first one's name beside it, nor one that could name another (an identifier-only last resort)."""
    encounter = {"resourceType": "Encounter", "id": "e1", "status": "in-progress",
                 "subject": {"reference": "Patient/ext-1", "display": "the ingest's text"}}
    same = write(encounter, [subject("ext-1", "c1")])
    assert same["subject"] == {**lookup("ext-1", "c1"), "display": "the ingest's text"}
    moved = write(encounter, [subject("ext-2", "c2")])
    assert moved["subject"] == lookup("ext-2", "c2")
    unsure = write(encounter, [subject(None, "c1")])
    assert unsure["subject"] == lookup(None, "c1")
    by_identifier = {**encounter, "subject": {**lookup(None, "c1"), "display": "the ingest's text"}}
    assert write(by_identifier, [subject("ext-1", "c1")])["subject"]["display"] == "the ingest's text"
    assert "display" not in write(by_identifier, [subject(None, "c2")])["subject"]
    assert encounter["subject"] == {"reference": "Patient/ext-1", "display": "the ingest's text"}  # not changed
