"""`check-config --dataverse-metadata`: the maps' tables and columns against an environment's Web API CSDL document.

`tests/data/dataverse-metadata.xml` is shaped as Dataverse's `$metadata` answer is (lookups as `_x_value` with a
navigation property per table they may name) and holds the Healthcare data model's columns as Microsoft's Common
Data Model documents them (its header names the sources), not the columns our maps happen to use.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.core.test_maps import edit, maps_dir
from writeback.dataverse_metadata import MetadataError, problems, read_metadata, warnings_for
from writeback.maps import load_maps
from writeback.settings import DEFAULT_MAPS_DIR

METADATA = Path(__file__).parent.parent / "data" / "dataverse-metadata.xml"
CONSENT = "msemr_azurefhirsyncenabled"


def test_the_document_reads_as_dataverse_shapes_it() -> None:
    tables = read_metadata(METADATA)
    contact = tables["contact"]
    assert "firstname" in contact.columns and "_parentcustomerid_value" not in contact.columns
    # a customer lookup names two tables, each by its own navigation property
    assert contact.lookups["parentcustomerid"] == {"account", "contact"}
    assert tables["msemr_encounter"].lookups["msemr_subjectpatient"] == {"contact"}
    # an activity table's columns are declared on the type it derives from (BaseType activitypointer)
    assert "activityid" in tables["msemr_appointmentemr"].columns


def test_the_shipped_maps_name_only_what_the_healthcare_data_model_has() -> None:
    assert problems(load_maps(DEFAULT_MAPS_DIR), read_metadata(METADATA), CONSENT) == []


@pytest.mark.parametrize(("file", "old", "new", "expected"), [
    # a misspelt column is a valid logical name: at run time it reads as empty, and clears its element everywhere
    ("contact.yaml", "column: firstname", "column: firstnme",
     "entity map contact.yaml: field `attributes[0].column` names 'firstnme', which contact does not have (did you "
     "mean `firstname`?): it would read as empty in every message"),
    ("msemr_encounter.yaml", "column: msemr_encounterstartdate", "column: msemr_encounterstartdat",
     "names 'msemr_encounterstartdat', which msemr_encounter does not have (did you mean "
     "`msemr_encounterstartdate`?)"),
    ("contact.yaml", "fhir_id_column: msemr_azurefhirid", "fhir_id_column: msemr_fhirid",
     "field `identity.fhir_id_column` names 'msemr_fhirid', which contact does not have"),
    ("contact.yaml", "column: msemr_contacttype", "column: msemr_contactype",
     "field `resource.column` names 'msemr_contactype'"),
    # a lookup to a table it cannot name
    ("msemr_encounter.yaml", "column: msemr_subjectpatient, target: subject",
     "column: msemr_appointmentemr, target: subject",
     "field `attributes[3].column` names 'msemr_appointmentemr', a lookup to msemr_appointmentemr, not to contact"),
    # a plain column where a lookup belongs
    ("msemr_medicalidentifier.yaml", "parent_link: msemr_assignee ", "parent_link: msemr_value ",
     "field `expansion.parent_link` names 'msemr_value', which is not a lookup of msemr_medicalidentifier"),
    # a lookup copied as text: every message would be refused
    ("msemr_observation.yaml", "column: msemr_comment,", "column: msemr_subjecttypepatient,",
     "names 'msemr_subjecttypepatient', a lookup of msemr_observation: map it with `action: lookup`"),
])
def test_a_map_naming_what_the_environment_lacks_is_named(tmp_path: Path, file: str, old: str, new: str,
                                                         expected: str) -> None:
    found = problems(load_maps(maps_dir(tmp_path, {file: edit(file, old, new)})), read_metadata(METADATA), CONSENT)
    assert len(found) == 1 and expected in found[0], found


@pytest.mark.parametrize(("file", "old", "new", "expected"), [
    # a date-only column as an instant: FHIR's instant needs a time, so every patient would be refused
    ("contact.yaml", "{column: birthdate, target: birthDate, type: date}",
     "{column: birthdate, target: meta.lastUpdated, type: instant}",
     "field `attributes[3]` writes 'birthdate' with `type: instant`, but contact.birthdate is Edm.Date: every value "
     "of it would be refused"),
    # a choice table's value map on a date and time column
    ("msemr_encounter.yaml", "  - column: msemr_encounterstatus\n", "  - column: msemr_encounterstartdate\n",
     "writes 'msemr_encounterstartdate' with `action: value_map`, but msemr_encounter.msemr_encounterstartdate is "
     "Edm.DateTimeOffset"),
])
def test_a_column_of_a_type_the_map_cannot_write_is_named(tmp_path: Path, file: str, old: str, new: str,
                                                         expected: str) -> None:
    found = problems(load_maps(maps_dir(tmp_path, {file: edit(file, old, new)})), read_metadata(METADATA), CONSENT)
    assert len(found) == 1 and expected in found[0], found


def test_the_shipped_maps_draw_no_warning() -> None:
    """contact.birthdate is Date Only (Edm.Date) and the identifier's period, User Local, is written as dateTime."""
    assert warnings_for(load_maps(DEFAULT_MAPS_DIR), read_metadata(METADATA)) == []


@pytest.mark.parametrize(("file", "old", "new", "expected"), [
    # the identifier's period as the shipped map wrote it before 1275ce9: User Local columns (Edm.DateTimeOffset), so
    # a period entered at local midnight in Amsterdam ended a day early
    ("msemr_medicalidentifier.yaml", "{column: msemr_periodend, target: period.end, type: dateTime}",
     "{column: msemr_periodend, target: period.end, type: date}",
     "entity map msemr_medicalidentifier.yaml: field `attributes[5]` writes 'msemr_periodend' with `type: date`, but "
     "msemr_medicalidentifier.msemr_periodend is Edm.DateTimeOffset, not Edm.Date (Date Only): if its behavior is "
     "User Local, the date written is that of the UTC instant, a day off from the one entered for users away from "
     "Greenwich (a day early east of it). Change the column's behavior to Date Only (and convert the values it "
     "holds), or map it with `type: dateTime` where the FHIR element takes one; a Time-Zone Independent column is "
     "right as it is"),
    ("msemr_encounter.yaml", "{column: msemr_encounterstartdate, target: period.start, type: dateTime}",
     "{column: msemr_encounterstartdate, target: period.start, type: date}",
     "field `attributes[4]` writes 'msemr_encounterstartdate' with `type: date`, but "
     "msemr_encounter.msemr_encounterstartdate is Edm.DateTimeOffset"),
])
def test_a_date_from_a_date_and_time_column_is_a_warning_not_a_fault(tmp_path: Path, file: str, old: str, new: str,
                                                                     expected: str) -> None:
    """A Date Only column is Edm.Date in the Web API, a User Local or Time-Zone Independent one Edm.DateTimeOffset
    (learn.microsoft.com, behavior-format-date-time-attribute). `type: date` writes the date of a User Local
    column's UTC instant, a day early for a user east of Greenwich; a Time-Zone Independent column's date is right,
    and the document does not tell the two apart: the map is not refused, but the column is named."""
    maps = load_maps(maps_dir(tmp_path, {file: edit(file, old, new)}))
    tables = read_metadata(METADATA)
    assert problems(maps, tables, CONSENT) == []
    found = warnings_for(maps, tables)
    assert len(found) == 1 and expected in found[0], found


def test_a_table_the_environment_lacks_and_the_consent_setting_are_checked(tmp_path: Path) -> None:
    text = edit("msemr_encounter.yaml", "table: msemr_encounter", "table: msemr_encounters")
    folder = maps_dir(tmp_path, {"msemr_encounter.yaml": None, "msemr_encounters.yaml": text})
    assert problems(load_maps(folder), read_metadata(METADATA), CONSENT) == [
        "entity map msemr_encounters.yaml: field `table` names 'msemr_encounters', which is not a table of this "
        "environment (did you mean `msemr_encounter`?)",
        # and the observation's lookup, which names rows of msemr_encounter, cannot name that table's rows
        "entity map msemr_observation.yaml: field `attributes[3].column` names 'msemr_conexttypeencounter', a "
        "lookup to msemr_encounter, not to msemr_encounters"]
    found = problems(load_maps(DEFAULT_MAPS_DIR), read_metadata(METADATA), "msemr_syncenabled")
    assert found == ["entity map contact.yaml: field `WRITEBACK_CONSENT_COLUMN (setting)` names 'msemr_syncenabled', "
                     "which contact does not have (did you mean `msemr_azurefhirsyncenabled`?): it would read as "
                     "empty in every message"]


@pytest.mark.parametrize(("content", "words"), [
    ("", "is not XML"),
    ("{\"value\": []}", "is not XML"),
    ("<edmx:Edmx xmlns:edmx=\"http://docs.oasis-open.org/odata/ns/edmx\"/>", "holds no table"),
    ("<?xml version=\"1.0\"?><!DOCTYPE x [<!ENTITY a \"aaaa\">]><x>&a;</x>", "declares entities or a DTD"),
])
def test_a_file_that_is_no_metadata_document_is_said_so(tmp_path: Path, content: str, words: str) -> None:
    path = tmp_path / "metadata.xml"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(MetadataError, match=words):
        read_metadata(path)
    with pytest.raises(MetadataError, match="cannot read"):
        read_metadata(tmp_path / "missing.xml")
