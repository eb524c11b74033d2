"""`plan_message`: every reason code the core produces, every map action, and update diffs.

Bodies are built with `devtools.messages.context`, the encoder the shipped samples were made with.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devtools.messages import CONTRACTS, Choice, Lookup, context
from devtools.samples import (
    CLINICIAN,
    ENCOUNTER,
    IDENTIFIER,
    OBSERVATION,
    PATIENT,
    PATIENT_TYPE,
    PRACTITIONER,
    PRACTITIONER_TYPE,
    SAMPLES,
    SYNC_USER,
    T0,
)
from writeback.converge import Release, converge
from writeback.decide import RESOURCE_NAMESPACE, Decision, WritePlan, plan_message, resource_id
from writeback.facts import SEEN_KEPT, RowFacts, facts_of, resolve
from writeback.maps import MapSet, load_maps
from writeback.marks import MOVED, Version, mark_of, strip_marks
from writeback.messages import message_of
from writeback.reasons import REASONS, Reason
from writeback.settings import DEFAULT_MAPS_DIR, Settings

PUBLIC = Path(__file__).resolve().parents[3] / "shared" / "samples" / "dataverse-public"
MAPS = load_maps(DEFAULT_MAPS_DIR)
SETTINGS = Settings()
CANARY = "CANARY-7731"

Body = dict[str, Any]


def plan(
    body: Body | str | bytes,
    properties: Mapping[str, Any] | None = None,
    *,
    maps: MapSet = MAPS,
    settings: Settings = SETTINGS,
    content_type: str | None = None,
) -> Decision:
    raw = body if isinstance(body, str | bytes) else json.dumps(body)
    return plan_message(raw, properties, maps, settings, content_type)


def written(decision: Decision) -> WritePlan:
    assert decision.decision == "write", (decision.reason, decision.detail)
    assert decision.reason is None and decision.plan is not None
    return decision.plan


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def patient_row(**changes: object) -> dict[str, object]:
    row: dict[str, object] = {
        "contactid": PATIENT, "msemr_contacttype": PATIENT_TYPE, "msemr_azurefhirsyncenabled": True,
        "firstname": "Rosalind", "middlename": "Elsie", "lastname": "Quintero", "birthdate": date(1987, 7, 25),
        "gendercode": Choice(2), "telephone1": "+1 206 555 0142", "mobilephone": "+1 206 555 0199",
        "emailaddress1": "r.quintero@example.org", "versionnumber": 1001, "modifiedon": T0,
    }
    row.update(changes)
    return {k: v for k, v in row.items() if v is not ...}


def patient_update(target: Mapping[str, object], pre: Mapping[str, object] | None = None, **kw: Any) -> Body:
    """An Update with pre and post images, as a step registered with both images sends it."""
    before = patient_row(**(pre or {}))
    after = {**before, **target}
    post = {k: v for k, v in after.items() if v is not None}  # images leave out empty columns
    return context("Update", "contact", PATIENT, target, pre=before, post=post, **kw)


def encounter_row(**changes: object) -> dict[str, object]:
    row: dict[str, object] = {
        "msemr_encounterid": ENCOUNTER, "msemr_encounterstatus": Choice(935000005),
        "msemr_encounterclass": Choice(935000001), "msemr_subjectpatient": Lookup("contact", PATIENT),
        "msemr_encounterstartdate": T0, "msemr_encounterenddate": T0.replace(hour=10),
    }
    row.update(changes)
    return {k: v for k, v in row.items() if v is not ...}


def server_patient() -> dict[str, Any]:
    """What the FHIR server holds for the sample patient, including elements no map names."""
    return {
        "resourceType": "Patient", "id": "pat-1", "meta": {"versionId": "3"},
        "text": {"status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">Rosalind</div>"},
        "extension": [{"url": "http://example.org/fhir/StructureDefinition/preferred-pharmacy",
                       "valueString": "Harbor Pharmacy"}],
        "identifier": [{"system": "urn:dataverse:contact", "value": PATIENT},
                       {"system": "http://hospital.example.org/mrn", "value": "MRN-0042731", "use": "official"}],
        "name": [{"use": "official", "family": "Quintero", "given": ["Rosalind", "Elsie"]},
                 {"use": "nickname", "given": ["Roz"]}],
        "telecom": [{"system": "phone", "use": "work", "value": "+1 206 555 0142"},
                    {"system": "phone", "use": "mobile", "value": "+1 206 555 0199"},
                    {"system": "email", "value": "r.quintero@example.org"}],
        "gender": "female", "birthDate": "1987-07-25",
        "communication": [{"language": {"text": "Spanish"}, "preferred": True}],
    }


def delete_body(table: str, row_id: str) -> Body:
    body = context("Delete", "contact", row_id, None)
    body["PrimaryEntityName"] = table
    body["InputParameters"] = [{"key": "Target", "value": {
        "__type": f"EntityReference:{CONTRACTS}", "Id": row_id, "LogicalName": table, "Name": None}}]
    return body


def maps_with(tmp_path: Path, files: Mapping[str, str]) -> MapSet:
    folder = tmp_path / "maps"
    folder.mkdir(exist_ok=True)
    for source in DEFAULT_MAPS_DIR.glob("*.yaml"):
        (folder / source.name).write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    return load_maps(folder)


def shipped(name: str) -> str:
    return (DEFAULT_MAPS_DIR / name).read_text(encoding="utf-8")


# ---- every reason code the core produces -------------------------------------------------------

Case = tuple[Callable[[], Body | str | bytes], Mapping[str, Any] | None, Settings, str | None, str, Reason]
ECHO_SETTINGS = Settings(ignore_user_ids=frozenset({SYNC_USER}))
DROPPED = {"MessageMaxSizeExceeded": "true"}

CASES: dict[str, Case] = {
    "table without a map": ((PUBLIC / "01_account_update_sample1.json").read_bytes, None, SETTINGS,
                            None, "skip", Reason.NO_ENTITY_MAP),
    "delete": (lambda: delete_body("contact", PATIENT), None, SETTINGS, None, "skip", Reason.UNSUPPORTED_MESSAGE),
    "assign": (lambda: context("Assign", "contact", PATIENT, patient_row()), None, SETTINGS, None, "skip",
               Reason.UNSUPPORTED_MESSAGE),
    "consent no": (lambda: sample("08_patient_consent_withheld.json"), None, SETTINGS, None, "skip",
                   Reason.CONSENT_WITHHELD),
    "consent absent": (lambda: context("Create", "contact", PATIENT, patient_row(msemr_azurefhirsyncenabled=...)),
                       None, SETTINGS, None, "skip", Reason.CONSENT_WITHHELD),
    "echo": (lambda: sample("07_patient_update_echo.json"), None, ECHO_SETTINGS, None, "skip", Reason.ECHO),
    "no change": (lambda: patient_update({"versionnumber": 1002}), None, SETTINGS, None, "skip", Reason.NO_CHANGE),
    "related person": (lambda: sample("10_relatedperson_create.json"), None, SETTINGS, None, "skip",
                       Reason.NO_ENTITY_MAP),
    "contact type missing": (lambda: context("Create", "contact", PATIENT, patient_row(msemr_contacttype=...)),
                             None, SETTINGS, None, "reject", Reason.INVALID_CONTACT_TYPE),
    "identifier without parent": (lambda: context("Create", "msemr_medicalidentifier", IDENTIFIER, {
        "msemr_identifiersystem": "http://hospital.example.org/mrn", "msemr_value": "MRN-1"}), None, SETTINGS,
        None, "reject", Reason.MISSING_PARENT_LINK),
    "invalid resource": (lambda: context("Create", "contact", PATIENT, patient_row(birthdate=CANARY)), None,
                         SETTINGS, None, "reject", Reason.INVALID_RESOURCE),
    "xml body": (lambda: b'<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"/>', None, SETTINGS,
                 None, "reject", Reason.UNSUPPORTED_FORMAT),
    "binary xml content type": (lambda: sample("01_patient_create.json"), None, SETTINGS, "application/msbin1",
                                "reject", Reason.UNSUPPORTED_FORMAT),
    "broken json": (lambda: sample("09_broken_body.json"), None, SETTINGS, None, "reject",
                    Reason.MALFORMED_MESSAGE),
    "no target": (lambda: context("Update", "contact", PATIENT, None), None, SETTINGS, None, "reject",
                  Reason.MALFORMED_MESSAGE),
    "payload dropped": (lambda: context("Update", "contact", PATIENT, None), DROPPED, SETTINGS, None, "reject",
                        Reason.PAYLOAD_DROPPED),
}

# The codes the pure core can give; duplicate/stale and the FHIR ones come from the pipeline.
CORE_REASONS = {
    Reason.NO_ENTITY_MAP, Reason.UNSUPPORTED_MESSAGE, Reason.CONSENT_WITHHELD, Reason.ECHO, Reason.NO_CHANGE,
    Reason.INVALID_CONTACT_TYPE, Reason.MISSING_PARENT_LINK, Reason.INVALID_RESOURCE, Reason.UNSUPPORTED_FORMAT,
    Reason.MALFORMED_MESSAGE, Reason.PAYLOAD_DROPPED,
}


@pytest.mark.parametrize("name", list(CASES))
def test_reason_codes(name):
    make, properties, settings, content_type, decision, reason = CASES[name]
    d = plan(make(), properties, settings=settings, content_type=content_type)
    assert (d.decision, d.reason) == (decision, reason), d.detail
    assert d.reason is not None and d.reason.kind.value == decision  # the code's class settles the message
    assert d.plan is None and d.detail


def test_every_core_reason_code_has_a_case():
    assert {case[-1] for case in CASES.values()} == CORE_REASONS


# ---- skips -------------------------------------------------------------------------------------


def test_no_entity_map_names_the_table():
    d = plan(context("Create", "account", PATIENT, {"name": "Contoso"}))
    assert d.reason is Reason.NO_ENTITY_MAP and "account" in d.detail
    assert d.table == "account"


def test_writeback_disabled_in_the_map(tmp_path):
    maps = maps_with(tmp_path, {"contact.yaml": shipped("contact.yaml").replace("writeback: true",
                                                                                 "writeback: false")})
    d = plan(sample("01_patient_create.json"), maps=maps)
    assert (d.decision, d.reason) == ("skip", Reason.NO_ENTITY_MAP)
    assert "disabled" in d.detail
    assert written(plan(sample("05_encounter_create.json"), maps=maps))  # other tables are unaffected


def test_message_the_map_does_not_list(tmp_path):
    maps = maps_with(tmp_path, {"contact.yaml": shipped("contact.yaml").replace("messages: [Create, Update]",
                                                                                 "messages: [Create]")})
    d = plan(sample("02_patient_update_phone.json"), maps=maps)
    assert (d.decision, d.reason) == ("skip", Reason.UNSUPPORTED_MESSAGE)
    assert "Update" in d.detail
    assert written(plan(sample("01_patient_create.json"), maps=maps)).operation == "create"


def test_consent_is_required_for_patients_only():
    no = plan(sample("08_patient_consent_withheld.json"))
    assert no.reason is Reason.CONSENT_WITHHELD and "is not Yes" in no.detail
    assert no.resource_type == "Patient"
    absent = plan(context("Create", "contact", PATIENT, patient_row(msemr_azurefhirsyncenabled=...)))
    assert absent.reason is Reason.CONSENT_WITHHELD and "not in the message" in absent.detail
    # A practitioner has no consent column and is written.
    assert written(plan(sample("03_practitioner_create.json"))).resource_type == "Practitioner"


@pytest.mark.parametrize(("value", "consented"), [
    (True, True), (False, False), (None, False), (Choice(1), True), (Choice(0), False), ("true", True),
    ("no", False),
])
def test_consent_values(value, consented):
    d = plan(context("Create", "contact", PATIENT, patient_row(msemr_azurefhirsyncenabled=value)))
    assert (d.decision == "write") is consented
    if not consented:
        assert d.reason is Reason.CONSENT_WITHHELD


def test_consent_column_comes_from_the_setting():
    settings = Settings(consent_column="new_fhirconsent")
    body = context("Create", "contact", PATIENT, patient_row())
    d = plan(body, settings=settings)
    # A typo in the setting skips every patient: the detail says which setting to check (found by a new user).
    assert d.reason is Reason.CONSENT_WITHHELD and "new_fhirconsent is not in the message" in d.detail
    assert "WRITEBACK_CONSENT_COLUMN" in d.detail and "WRITEBACK_CONSENT_COLUMN" in d.reason.info.action
    body = context("Create", "contact", PATIENT, patient_row(new_fhirconsent=True, msemr_azurefhirsyncenabled=False))
    assert written(plan(body, settings=settings))


def test_consent_is_read_from_the_post_image_on_update():
    # The Target of an update holds only the changed column; consent and type come from the images.
    assert written(plan(sample("02_patient_update_phone.json"))).operation == "update"
    body = patient_update({"telephone1": "+1 206 555 0177"}, pre={"msemr_azurefhirsyncenabled": False})
    assert plan(body).reason is Reason.CONSENT_WITHHELD
    withdrawn = patient_update({"msemr_azurefhirsyncenabled": False, "telephone1": "+1 206 555 0177"})
    assert plan(withdrawn).reason is Reason.CONSENT_WITHHELD


def test_echo_by_initiating_user_setting_or_application_property():
    body = sample("07_patient_update_echo.json")
    settings = Settings.for_planning({"WRITEBACK_IGNORE_USER_IDS": f" {SYNC_USER.upper()} , 11111111-2222-"
                                                                   "3333-4444-555555555555"})
    d = plan(body, settings=settings)
    assert (d.decision, d.reason) == ("skip", Reason.ECHO)
    assert "WRITEBACK_IGNORE_USER_IDS" in d.detail
    # Without the setting the same message is no echo (it is refused for lack of a contact type instead).
    assert plan(body).reason is not Reason.ECHO
    # The sync user may be named only by the Service Bus application properties.
    clinician_body = patient_update({"lastname": "Quintero-Hale"}, user_id=CLINICIAN)
    assert written(plan(clinician_body, settings=ECHO_SETTINGS))
    claims = {"http://schemas.microsoft.com/xrm/2011/Claims/InitiatingUser": SYNC_USER.upper()}
    assert plan(clinician_body, claims, settings=ECHO_SETTINGS).reason is Reason.ECHO


def test_echo_wins_over_a_missing_payload():
    body = context("Update", "contact", PATIENT, None, user_id=SYNC_USER)
    assert plan(body, DROPPED, settings=ECHO_SETTINGS).reason is Reason.ECHO


def test_update_changing_no_mapped_column():
    body = patient_update({"versionnumber": 1002, "modifiedon": T0.replace(hour=11), "msemr_azurefhirversion": "4",
                           "description": "internal note"})
    d = plan(body)
    assert (d.decision, d.reason) == ("skip", Reason.NO_CHANGE)
    assert d.resource_type == "Patient"
    # Target-only update: a mapped column must be in the Target.
    target_only = context("Update", "msemr_encounter", ENCOUNTER, {"msemr_name": "Renamed visit"})
    assert plan(target_only).reason is Reason.NO_CHANGE
    # Saving a mapped column with the value it already had is no change either.
    assert plan(patient_update({"lastname": "Quintero"})).reason is Reason.NO_CHANGE


def test_create_with_no_mapped_value_is_no_change():
    body = context("Create", "contact", PATIENT, {"msemr_contacttype": PRACTITIONER_TYPE, "description": "x"})
    d = plan(body)
    assert (d.decision, d.reason) == ("skip", Reason.NO_CHANGE)


# ---- rejects -----------------------------------------------------------------------------------


def test_a_contact_type_missing_is_invalid_and_a_type_not_mapped_is_skipped():
    """A Related Person (next of kin) is a contact of a type the map does not write: skipped, not dead-lettered,
    since every save of one kept the dead-letter queue and its alert from ever being empty (found trying the
    product). A contact whose type cannot be read is dead-lettered."""
    related = plan(sample("10_relatedperson_create.json"))
    assert (related.decision, related.reason) == ("skip", Reason.NO_ENTITY_MAP)
    assert related.detail == ("Column msemr_contacttype is 935000002, a type the contact map does not write; only "
                              "Patient, Practitioner are written back.")
    unknown = plan(context("Create", "contact", PATIENT, patient_row(msemr_contacttype=Choice(935000009))))
    assert (unknown.decision, unknown.reason) == ("skip", Reason.NO_ENTITY_MAP)
    missing = plan(context("Create", "contact", PATIENT, patient_row(msemr_contacttype=...)))
    assert missing.reason is Reason.INVALID_CONTACT_TYPE and "not in the message" in missing.detail
    cleared = plan(context("Create", "contact", PATIENT, patient_row(msemr_contacttype=None)))
    assert cleared.reason is Reason.INVALID_CONTACT_TYPE
    garbled = plan(context("Create", "contact", PATIENT, patient_row(msemr_contacttype="Patient")))
    assert garbled.reason is Reason.INVALID_CONTACT_TYPE and "not a choice's value" in garbled.detail


def test_missing_parent_link_names_the_lookup():
    body = context("Create", "msemr_medicalidentifier", IDENTIFIER, {
        "msemr_assignee": None, "msemr_identifiersystem": "http://hospital.example.org/mrn", "msemr_value": "M1"})
    d = plan(body)
    assert (d.decision, d.reason) == ("reject", Reason.MISSING_PARENT_LINK)
    assert "msemr_assignee" in d.detail and "contact" in d.detail


def test_an_identifier_without_a_system_is_written():
    """FHIR allows an identifier without a system; the item is found by its Dataverse row, not by its system."""
    body = context("Create", "msemr_medicalidentifier", IDENTIFIER, {
        "msemr_assignee": Lookup("contact", PATIENT), "msemr_value": "M1"})
    p = written(plan(body))
    assert p.resource["identifier"] == [{"value": "M1"}]


@pytest.mark.parametrize(("table", "row_id", "row", "named", "secret"), [
    ("contact", PATIENT, patient_row(birthdate=CANARY), "birthdate", CANARY),
    ("contact", PATIENT, patient_row(birthdate="1987-02-30"), "Patient.birthDate", "1987-02-30"),  # by FHIR
    ("contact", PATIENT, patient_row(gendercode=CANARY), "gendercode", CANARY),
    ("contact", PATIENT, patient_row(telephone1=Lookup("contact", PRACTITIONER)), "telephone1", PRACTITIONER),
    ("msemr_encounter", ENCOUNTER, encounter_row(msemr_subjectpatient=CANARY), "msemr_subjectpatient", CANARY),
    ("msemr_encounter", ENCOUNTER, encounter_row(msemr_encounterlength=CANARY), "msemr_encounterlength", CANARY),
    ("msemr_encounter", ENCOUNTER, encounter_row(msemr_encounterstartdate=f"2026-13-45 {CANARY}"),
     "msemr_encounterstartdate", CANARY),
])
def test_invalid_resource_names_the_element_never_the_value(table, row_id, row, named, secret):
    d = plan(context("Create", table, row_id, row))
    assert (d.decision, d.reason) == ("reject", Reason.INVALID_RESOURCE), d.detail
    assert named in d.detail
    assert secret not in json.dumps(d.as_json())


def test_required_element_missing_on_create():
    d = plan(context("Create", "msemr_encounter", ENCOUNTER, encounter_row(msemr_encounterstatus=...)))
    assert d.reason is Reason.INVALID_RESOURCE and "Encounter.status" in d.detail


def test_choice_value_the_map_does_not_translate():
    d = plan(context("Create", "contact", PATIENT, patient_row(gendercode=Choice(935000077))))
    assert d.reason is Reason.INVALID_RESOURCE
    assert "gendercode" in d.detail and "935000077" not in d.detail


def test_unsupported_format_says_how_to_fix_it():
    d = plan(b"\x56\x02\x0b\x01s\x04\x0b\x01a\x06V\x08D\n\x1e\x00\x82\xff\xfe")
    assert d.reason is Reason.UNSUPPORTED_FORMAT and "JSON" in d.detail
    assert plan(b"<Envelope/>").reason is Reason.UNSUPPORTED_FORMAT
    assert plan(sample("01_patient_create.json"), content_type="application/xml").reason is Reason.UNSUPPORTED_FORMAT
    assert written(plan(sample("01_patient_create.json"), content_type="application/json; charset=utf-8"))


@pytest.mark.parametrize("body", [
    b"{}",
    b'{"MessageName": "Create", "PrimaryEntityName": "contact"}',
    json.dumps({**context("Create", "contact", PATIENT, None), "InputParameters": [{"key": "Target",
                                                                                    "value": "contact"}]}),
    json.dumps({**context("Create", "contact", PATIENT, None), "InputParameters": {"Target": {}}}),
    json.dumps(context("Create", "contact", PATIENT, {"firstname": {"__type": "OptionSetValue:x", "Value": "1"}})),
])
def test_malformed_messages(body):
    d = plan(body)
    assert (d.decision, d.reason) == ("reject", Reason.MALFORMED_MESSAGE), d.detail


def test_create_without_target_or_post_image_is_malformed_unless_the_payload_was_dropped():
    body = context("Create", "contact", PATIENT, None)
    assert plan(body).reason is Reason.MALFORMED_MESSAGE
    d = plan(body, {"MessageMaxSizeExceeded": True})
    assert d.reason is Reason.PAYLOAD_DROPPED and "MessageMaxSizeExceeded" in d.detail
    assert plan(body, {"MessageMaxSizeExceeded": "false"}).reason is Reason.MALFORMED_MESSAGE


def test_payload_dropped_even_if_a_body_came_through():
    d = plan(sample("01_patient_create.json"), DROPPED)
    assert (d.decision, d.reason) == ("reject", Reason.PAYLOAD_DROPPED)


@pytest.mark.parametrize("raw", [
    {"__type": "Decimal:#System", "__value": "sNaN"},
    {"__type": "Decimal:#System", "__value": "NaN"},
    {"__type": f"Money:{CONTRACTS}", "Value": "Infinity"},
    {"__type": f"Money:{CONTRACTS}", "Value": "sNaN"},
])
def test_numbers_dataverse_never_sends_are_malformed(raw):
    # Regression: a signalling NaN raised decimal.InvalidOperation out of plan_message.
    body = context("Create", "msemr_encounter", ENCOUNTER, encounter_row())
    body["InputParameters"][0]["value"]["Attributes"].append({"key": "msemr_encounterlength", "value": raw})
    assert plan(body).reason is Reason.MALFORMED_MESSAGE
    update = context("Update", "msemr_encounter", ENCOUNTER, {"msemr_encounterlength": 3}, pre=encounter_row())
    update["PreEntityImages"][0]["value"]["Attributes"].append({"key": "msemr_encounterlength", "value": raw})
    assert plan(update).reason is Reason.MALFORMED_MESSAGE


def test_decimal_beyond_any_fhir_decimal_is_invalid_not_a_crash():
    # Regression: 1E+1000000 raised decimal.Overflow while converting.
    body = context("Create", "msemr_encounter", ENCOUNTER, encounter_row())
    body["InputParameters"][0]["value"]["Attributes"].append(
        {"key": "msemr_encounterlength", "value": {"__type": "Decimal:#System", "__value": "1E+1000000"}})
    d = plan(body)
    assert d.reason is Reason.INVALID_RESOURCE and "msemr_encounterlength" in d.detail


def test_lone_surrogate_is_malformed_so_the_decision_can_be_printed():
    # Regression: a lone \ud800 in the table name made the decision impossible to print as UTF-8 (CLI traceback).
    text = json.dumps(context("Create", "contact", PATIENT, patient_row())).replace('"contact"', '"con\\ud800tact"')
    d = plan(text)
    assert d.reason is Reason.MALFORMED_MESSAGE and "surrogate" in d.detail
    json.dumps(d.as_json(), ensure_ascii=False).encode("utf-8")
    # A proper pair (an emoji escaped the way json.dumps writes it) is fine.
    emoji = json.dumps(context("Create", "contact", PATIENT, patient_row(firstname="Ros\U0001f600")))
    assert "\\ud83d\\ude00" in emoji
    plan_ = written(plan(emoji))
    assert plan_.resource["name"][0]["given"][0] == "Ros\U0001f600"


def test_names_a_sender_chooses_are_never_copied_unless_they_are_logical_names():
    # Regression: a 5000-character table or column name was copied whole into the detail (and so into logs,
    # the dead-letter description and the outcome row); bounded, a shorter one still was.
    d = plan(context("Create", "x" * 5000, PATIENT, {"name": "x"}))
    assert d.reason is Reason.MALFORMED_MESSAGE and "PrimaryEntityName" in d.detail and "xxxx" not in d.detail
    assert d.table is None
    bad = {"__type": f"OptionSetValue:{CONTRACTS}", "Value": "one"}
    d = plan(context("Create", "contact", PATIENT, {**patient_row(), "y" * 5000: bad}))
    assert d.reason is Reason.MALFORMED_MESSAGE and "yyyy" not in d.detail and "not a logical name" in d.detail
    d = plan(context("Create", "contact", PATIENT, {**patient_row(), "msemr_weight": bad}))
    assert d.reason is Reason.MALFORMED_MESSAGE and "Attributes[msemr_weight]" in d.detail


# ---- creates and identity ----------------------------------------------------------------------


def test_patient_create_writes_every_mapped_column_and_the_row_identifier():
    p = written(plan(sample("01_patient_create.json")))
    assert p.operation == "create" and p.resource_type == "Patient"
    assert p.target.fhir_id is None
    assert p.target.search == f"identifier=urn:dataverse:contact|{PATIENT}"
    r = p.resource
    assert r["identifier"] == [{"system": "urn:dataverse:contact", "value": PATIENT}]
    assert r["name"] == [{"use": "official", "given": ["Rosalind", "Elsie"], "family": "Quintero"}]
    assert r["gender"] == "female" and r["birthDate"] == "1987-07-25"
    assert {(t["system"], t.get("use"), t["value"]) for t in r["telecom"]} == {
        ("phone", "work", "+1 206 555 0142"), ("phone", "mobile", "+1 206 555 0199"),
        ("email", None, "r.quintero@example.org")}
    assert r["address"] == [{"use": "home", "line": ["1200 Harbor Way"], "city": "Seattle", "state": "WA",
                             "postalCode": "98101", "country": "US"}]
    assert set(r) == {"resourceType", "identifier", "name", "gender", "birthDate", "telecom", "address"}
    assert p.changes == ("address", "birthDate", "gender", "identifier", "name", "telecom")
    assert p.source.request_id is not None and p.source.row_version == 1001
    assert p.source.initiating_user_id == CLINICIAN and p.source.modified_on == T0


def test_row_with_a_fhir_id_updates_that_resource():
    d = plan(context("Create", "contact", PATIENT, patient_row(msemr_azurefhirid="pat-123")))
    p = written(d)
    assert p.target.fhir_id == "pat-123"  # the record came from FHIR: its resource is that one
    assert "id" not in p.resource  # the server owns the id; the target carries it


@pytest.mark.parametrize("value", ["../../Patient/evil", ".", "..", "not an id!", "pat-1\n", "x" * 65, "", 42])
def test_a_fhir_id_column_holding_no_fhir_id_is_refused_naming_the_column(value: object):
    """Found in a new-user trial: "../../Patient/evil" was ignored, and the row created anew under its own
    identifier (a record that came from FHIR, twice there); "." and ".." passed as ids and ended as target-missing
    "Patient/.. does not exist"."""
    for body in (context("Create", "contact", PATIENT, patient_row(msemr_azurefhirid=value)),
                 patient_update({"msemr_azurefhirid": value, "versionnumber": 1002}),
                 patient_update({"lastname": "Quintero-Hale", "versionnumber": 1002},
                                pre={"msemr_azurefhirid": value})):
        d = plan(body)
        assert (d.decision, d.reason) == ("reject", Reason.INVALID_RESOURCE), d.detail
        assert d.detail.startswith("Column msemr_azurefhirid holds no FHIR id")
        if isinstance(value, str) and len(value) > 2:  # ("." and ".." are in the text saying what an id is)
            assert value.strip() not in json.dumps(d.as_json())


def test_a_save_correcting_a_fhir_id_column_is_written_by_the_new_id():
    body = patient_update({"msemr_azurefhirid": "pat-1", "versionnumber": 1002}, pre={"msemr_azurefhirid": ".."})
    assert written(plan(body)).target.fhir_id == "pat-1"


def test_practitioner_create():
    p = written(plan(sample("03_practitioner_create.json")))
    assert p.resource_type == "Practitioner"
    assert p.resource["identifier"] == [{"system": "urn:dataverse:contact", "value": PRACTITIONER}]


def test_encounter_create_uses_value_maps_default_and_lookup():
    p = written(plan(sample("05_encounter_create.json")))
    r = p.resource
    assert r["status"] == "finished"
    assert r["class"] == {"code": "AMB", "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode"}
    assert r["subject"] == {"type": "Patient", "identifier": {"system": "urn:dataverse:contact", "value": PATIENT}}
    assert r["period"] == {"start": "2026-11-02T09:30:00Z", "end": "2026-11-02T10:30:00Z"}


def test_a_lookup_naming_a_row_of_another_table_is_refused_naming_both_tables():
    """A customer lookup can name an account: its id is no contact's, and written as a Patient reference it would
    name no patient, or the wrong one (found trying the product as a new user: it was written, then waited for
    that "patient's" consent for a day)."""
    body = json.loads(sample("05_encounter_create.json"))
    for pair in body["InputParameters"][0]["value"]["Attributes"]:
        if pair["key"] == "msemr_subjectpatient":
            pair["value"]["LogicalName"] = "account"
    d = plan(json.dumps(body).encode())
    assert (d.decision, d.reason) == ("reject", Reason.INVALID_RESOURCE)
    assert "column msemr_subjectpatient names a row of table account" in (d.detail or "")
    assert "a Patient reference needs a row of contact" in (d.detail or "")


def test_a_choice_element_given_twice_names_the_columns_that_hold_values():
    """A quantity (value and unit, no system) beside a text value: the detail named msemr_valuequantitysystem,
    a column the message does not hold (found trying the product as a new user)."""
    body = json.loads(sample("06_observation_create.json"))
    attributes = body["InputParameters"][0]["value"]["Attributes"]
    attributes[:] = [a for a in attributes if a["key"] != "msemr_valuequantitysystem"]
    attributes.append({"key": "msemr_valuestring", "value": "high"})
    d = plan(json.dumps(body).encode())
    assert (d.decision, d.reason) == ("reject", Reason.INVALID_RESOURCE)
    assert "msemr_valuequantitysystem" not in (d.detail or "") and "msemr_valuestring" in (d.detail or "")


def test_a_created_encounter_without_a_visit_number_is_not_said_to_clear_its_identifier():
    """The row identifier is written into `identifier` beside the visit number the row leaves empty: the detail
    said `identifier` was both written and cleared (found trying the product as a new user)."""
    body = json.loads(sample("05_encounter_create.json"))
    attributes = body["InputParameters"][0]["value"]["Attributes"]
    attributes[:] = [a for a in attributes if a["key"] != "msemr_encounteridentifier"]
    d = plan(json.dumps(body).encode())
    assert d.plan is not None and "identifier" in d.plan.changes and "identifier" not in d.plan.cleared


def test_observation_create():
    r = written(plan(sample("06_observation_create.json"))).resource
    assert r["code"]["coding"] == [{"system": "urn:dataverse:msemr_codeableconcept",
                                    "code": "1d4f7a29-8c3e-4b6a-9f2d-5e0c8b1a7f87"}]
    assert r["encounter"]["identifier"] == {"system": "urn:dataverse:msemr_encounter", "value": ENCOUNTER}
    assert r["valueQuantity"] == {"value": 72, "unit": "beats/minute", "system": "http://unitsofmeasure.org"}
    assert r["issued"] == "2026-11-02T09:45:00Z" and r["effectiveDateTime"] == "2026-11-02T09:30:00Z"


def merged(p: WritePlan, server: dict[str, Any], n: int = 0) -> dict[str, Any]:
    """What the plan's write `n` makes of the server's copy (what the delivery would PUT)."""
    write = p.writes[n]
    decided = converge(server, write.edit, write.target.resource_type, write.target.new_id)
    assert decided.kind == "write" and decided.resource is not None, decided
    return decided.resource


def test_medical_identifier_updates_its_parent_patient():
    p = written(plan(sample("04_medicalidentifier_create.json")))
    assert p.resource_type == "Patient"
    assert (p.target.identifier_system, p.target.identifier_value, p.target.fhir_id) == (
        "urn:dataverse:contact", PATIENT, None)
    assert p.resource["identifier"] == [{
        "system": "http://hospital.example.org/mrn", "value": "MRN-0042731", "use": "official",
        "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]}}]
    after = merged(p, server_patient())
    assert after["identifier"][0] == {"system": "urn:dataverse:contact", "value": PATIENT}
    # The MRN the ingest put there (same system and value) is taken over, not duplicated, and marked as the row's.
    assert len(after["identifier"]) == 2
    assert strip_marks(after["identifier"][1])["type"]["coding"][0]["code"] == "MR"
    assert mark_of(after["identifier"][1], "msemr_medicalidentifier", IDENTIFIER) is not None


def test_medical_identifier_system_change_updates_the_same_item():
    old = {"msemr_assignee": Lookup("contact", PATIENT), "msemr_identifiersystem": "http://hospital.example.org/mrn",
           "msemr_value": "MRN-0042731", "msemr_use": Choice(935000001), "versionnumber": 1}
    new_system = "http://hospital.example.org/mrn-v2"
    body = context("Update", "msemr_medicalidentifier", IDENTIFIER, {"msemr_identifiersystem": new_system},
                   pre=old, post={**old, "msemr_identifiersystem": new_system, "versionnumber": 2})
    p = written(plan(body))
    after = strip_marks(merged(p, server_patient()))
    assert after["identifier"] == [{"system": "urn:dataverse:contact", "value": PATIENT},
                                   {"system": new_system, "value": "MRN-0042731", "use": "official"}]


def test_the_dry_run_names_what_a_child_row_clears_inside_its_item_and_an_unlinked_row_its_whole_item():
    """(Review.) `clearedBy` of a child row: its elements are inside the row's item, not the Patient's own (the dry
    run said `use`, which reads as Patient.use); a row whose parent link is emptied takes its whole item off its
    old parent."""
    old = {"msemr_assignee": Lookup("contact", PATIENT), "msemr_identifiersystem": "http://hospital.example.org/mrn",
           "msemr_value": "MRN-0042731", "msemr_use": Choice(935000001), "versionnumber": 1}
    whole = {k: v for k, v in old.items() if k != "msemr_use"} | {"versionnumber": 2}
    cleared = plan(context("Update", "msemr_medicalidentifier", IDENTIFIER, {"msemr_use": None}, pre=old,
                           post=whole)).as_json()["clearedBy"]
    assert cleared["identifier[this row].use"] == "msemr_use"
    assert all(path.startswith("identifier[this row].") for path in cleared)
    unlinked = {k: v for k, v in old.items() if k != "msemr_assignee"} | {"versionnumber": 2}
    removed = plan(context("Update", "msemr_medicalidentifier", IDENTIFIER, {"msemr_assignee": None}, pre=old,
                           post=unlinked))
    assert removed.decision == "write" and removed.as_json()["clearedBy"] == {"identifier[this row]": "msemr_assignee"}


def test_a_column_a_whole_post_image_lacks_is_empty_one_a_narrow_image_lacks_is_not_known():
    """Dataverse leaves empty columns out of images. `msemr_use` was cleared by an earlier save that FHIR never got
    (it is in neither image now), while FHIR still holds `use`. A post image registered as the README asks (it
    holds versionnumber) holds every column with a value, so `msemr_use` is empty and `use` is cleared; one
    without versionnumber (a narrower registration, as in the public samples) does not tell, so `use` stays and
    the outcome detail says why."""
    old = {"msemr_assignee": Lookup("contact", PATIENT), "msemr_identifiersystem": "http://hospital.example.org/mrn",
           "msemr_value": "MRN-0042731", "versionnumber": 1}
    value = {"msemr_value": "MRN-0042732"}
    whole = old | value | {"versionnumber": 2}
    cleared = plan(context("Update", "msemr_medicalidentifier", IDENTIFIER, value, pre=old, post=whole))
    after = strip_marks(merged(written(cleared), server_patient()))
    assert after["identifier"][1] == {"system": "http://hospital.example.org/mrn", "value": "MRN-0042732"}
    assert "registered narrower" not in cleared.detail
    narrow = {k: v for k, v in whole.items() if k != "versionnumber"}
    kept = plan(context("Update", "msemr_medicalidentifier", IDENTIFIER, value | {"versionnumber": 2}, pre=old,
                        post=narrow))
    after = strip_marks(merged(written(kept), server_patient()))
    assert after["identifier"][1] == {"system": "http://hospital.example.org/mrn", "value": "MRN-0042732",
                                      "use": "official"}
    assert "the post image is registered narrower than the README asks" in kept.detail


# ---- map actions (a test map set with every type) -------------------------------------------

NEW_PERSON = """
table: new_person
resource: Patient
identity: {identifier_system: "urn:test:new_person"}
attributes:
  - {column: new_family, target: "name[use=official].family", type: string}
  - {column: new_language, target: language, type: code}
  - {column: new_birth, target: birthDate, type: date}
  - {column: new_died, target: deceasedDateTime, type: dateTime}
  - {column: new_active, target: active, type: boolean}
  - {column: new_birthorder, target: multipleBirthInteger, type: integer}
  - {column: new_gender, target: gender, action: value_map, values: {1: male, 2: female}}
  - {column: new_doctor, target: "generalPractitioner[0]", action: lookup, resource: Practitioner}
"""
NEW_DOCTOR = """
table: new_doctor
resource: Practitioner
identity: {identifier_system: "urn:test:new_doctor"}
attributes:
  - {column: new_name, target: "name[use=official].text"}
"""
NEW_MEASURE = """
table: new_measure
resource: Observation
identity: {identifier_system: "urn:test:new_measure"}
attributes:
  - {column: new_isfinal, target: status, action: value_map, values: {true: final, false: preliminary}}
  - {column: new_code, target: "code.coding[system=urn:test:codes].code", type: id}
  - {target: code.text, action: default, value: Test measure}
  - {column: new_patient, target: subject, action: lookup, resource: Patient}
  - {column: new_when, target: effectiveDateTime, type: dateTime}
  - {column: new_issued, target: issued, type: instant}
  - {column: new_amount, target: valueQuantity.value, type: decimal}
  - {column: new_unit, target: valueQuantity.unit, type: string, value: "1"}
  - {column: new_comment, target: "note[0].text"}
"""
PERSON, MEASURE, DOCTOR = PATIENT, OBSERVATION, PRACTITIONER


@pytest.fixture(scope="module")
def action_maps(tmp_path_factory: pytest.TempPathFactory) -> MapSet:
    folder = tmp_path_factory.mktemp("maps")
    for name, text in {"new_person.yaml": NEW_PERSON, "new_doctor.yaml": NEW_DOCTOR,
                       "new_measure.yaml": NEW_MEASURE}.items():
        (folder / name).write_text(text, encoding="utf-8")
    return load_maps(folder)


def person(maps: MapSet, **row: object) -> Decision:
    return plan(context("Create", "new_person", PERSON, row), maps=maps)


def measure(maps: MapSet, **row: object) -> Decision:
    base: dict[str, object] = {"new_isfinal": True, "new_code": Lookup("new_codeableconcept", DOCTOR)}
    return plan(context("Create", "new_measure", MEASURE, {**base, **row}), maps=maps)


def element(d: Decision, name: str) -> Any:
    return written(d).resource[name]


@pytest.mark.parametrize(("column", "raw", "name", "expected"), [
    ("new_family", "Okafor", "name", [{"use": "official", "family": "Okafor"}]),
    ("new_family", 1234, "name", [{"use": "official", "family": "1234"}]),
    ("new_language", "  es-MX ", "language", "es-MX"),  # code: trimmed
    ("new_birth", date(1952, 1, 9), "birthDate", "1952-01-09"),
    ("new_birth", "/Date(1709334000000+0100)/", "birthDate", "2024-03-02"),  # the sender's local date
    ("new_birth", "1952-01-09", "birthDate", "1952-01-09"),
    ("new_died", "/Date(1793611800000)/", "deceasedDateTime", "2026-11-02T09:30:00Z"),
    ("new_died", "/Date(1709334000000+0100)/", "deceasedDateTime", "2024-03-02T00:00:00+01:00"),
    ("new_active", True, "active", True),
    ("new_active", False, "active", False),
    ("new_birthorder", 2, "multipleBirthInteger", 2),
    ("new_birthorder", {"__type": "Decimal:#System", "__value": "3"}, "multipleBirthInteger", 3),
    ("new_birthorder", "3", "multipleBirthInteger", 3),  # a number in a text column
    ("new_family", {"__type": "Money:http://schemas.microsoft.com/xrm/2011/Contracts", "Value": 12.5}, "name",
     [{"use": "official", "family": "12.5"}]),  # a Money column (Edm.Decimal) written as text
    ("new_gender", Choice(1), "gender", "male"),
    ("new_gender", Choice(2), "gender", "female"),
    ("new_gender", 2, "gender", "female"),  # a plain integer choice value
    ("new_doctor", Lookup("new_doctor", DOCTOR), "generalPractitioner",
     [{"type": "Practitioner", "identifier": {"system": "urn:test:new_doctor", "value": DOCTOR}}]),
])
def test_copy_value_map_and_lookup_on_a_patient(action_maps, column, raw, name, expected):
    assert element(person(action_maps, **{column: raw}), name) == expected


@pytest.mark.parametrize(("column", "raw", "problem"), [
    ("new_birth", "25/07/1987", "is not a date"),
    ("new_died", "yesterday", "is not a date and time"),
    ("new_active", "yes", "is not a boolean"),
    ("new_active", 1, "is not a boolean"),
    ("new_birthorder", {"__type": "Decimal:#System", "__value": "2.5"}, "is not a integer"),
    ("new_birthorder", "two", "is not a integer"),
    ("new_family", True, "is not text"),
    ("new_gender", Choice(3), "does not translate"),
    ("new_gender", Decimal("1.5"), "does not translate"),
    ("new_doctor", "Dr Okafor", "is not a lookup"),
    ("new_family", {"__type": "Something:http://example.org", "x": 1}, "value kind"),
    ("new_family", [Choice(1), Choice(2)], "value kind"),
])
def test_values_a_column_cannot_take(action_maps, column, raw, problem):
    d = person(action_maps, **{column: raw})
    assert (d.decision, d.reason) == ("reject", Reason.INVALID_RESOURCE)
    assert column in d.detail and problem in d.detail


def test_fhir_validation_failure_names_the_element_never_the_value(action_maps):
    d = person(action_maps, new_language=f"{CANARY}  x")  # a code may not hold two spaces in a row
    assert (d.decision, d.reason) == ("reject", Reason.INVALID_RESOURCE)
    assert "Patient.language" in d.detail
    assert CANARY not in json.dumps(d.as_json())


@pytest.mark.parametrize(("raw", "expected"), [
    (Decimal("72"), Decimal("72.0")),  # Money, as Dataverse sends it (72.0)
    ({"__type": "Decimal:#System", "__value": "72.50"}, Decimal("72.50")),  # precision kept: 72.50, not 72.5
    (36.6, Decimal("36.6")),
    (5, 5),
    (" 72.50 ", Decimal("72.50")),  # a number in a text column (String in the metadata check-config reads)
    ("-1.5e3", Decimal("-1.5e3")),
])
def test_copy_decimal(action_maps, raw, expected):
    quantity = element(measure(action_maps, new_amount=raw), "valueQuantity")
    assert quantity["value"] == expected and type(quantity["value"]) is type(expected)
    assert str(quantity["value"]) == str(expected)


def test_copy_instant_datetime_and_id(action_maps):
    r = written(measure(action_maps, new_when=T0, new_issued=T0.replace(minute=45))).resource
    assert r["effectiveDateTime"] == "2026-11-02T09:30:00Z" and r["issued"] == "2026-11-02T09:45:00Z"
    assert r["code"]["coding"] == [{"system": "urn:test:codes", "code": DOCTOR}]  # the row id is the code
    assert measure(action_maps, new_issued="2026-11-02").reason is Reason.INVALID_RESOURCE  # an instant needs a time


def test_copy_without_type_writes_the_value_as_it_is(action_maps):
    assert element(measure(action_maps, new_comment="Taken at rest"), "note") == [{"text": "Taken at rest"}]


def test_value_map_for_a_yes_no_column(action_maps):
    assert element(measure(action_maps, new_isfinal=True), "status") == "final"
    assert element(measure(action_maps, new_isfinal=False), "status") == "preliminary"


def test_lookup_references_by_the_referenced_maps_identifier(action_maps):
    subject = element(measure(action_maps, new_patient=Lookup("new_person", PERSON)), "subject")
    assert subject == {"type": "Patient", "identifier": {"system": "urn:test:new_person", "value": PERSON}}


def test_default_values(action_maps):
    r = written(measure(action_maps, new_amount=5)).resource
    assert r["code"]["text"] == "Test measure"  # a constant, on create
    assert r["valueQuantity"] == {"value": 5, "unit": "1"}  # the column's fallback when it is empty
    assert element(measure(action_maps, new_amount=5, new_unit="mmol/L"), "valueQuantity")["unit"] == "mmol/L"
    # An update writes the constant no more (the server has it) and a cleared column falls back to its default.
    update = context("Update", "new_measure", MEASURE, {"new_unit": None, "new_amount": 6})
    p = written(plan(update, maps=action_maps))
    assert p.resource == {"resourceType": "Observation", "valueQuantity": {"value": 6, "unit": "1"}}
    assert "code" not in p.changes


# ---- update diffs ------------------------------------------------------------------------------


def test_an_update_with_a_post_image_writes_the_whole_row():
    """With the post-image every element the map owns is written with the row's current value (or cleared), so
    a write heals whatever an earlier message could not write."""
    p = written(plan(sample("02_patient_update_phone.json")))
    assert p.operation == "update" and p.full
    assert {"system": "phone", "use": "work", "value": "+1 206 555 0177"} in p.resource["telecom"]
    assert p.resource["name"] == [{"use": "official", "family": "Quintero", "given": ["Rosalind", "Elsie"]}]
    assert p.changes == ("address", "birthDate", "gender", "identifier", "name", "telecom")
    assert p.source.row_version == 1002


def test_an_update_that_changes_no_mapped_or_gate_column_is_no_change():
    body = patient_update({"description": "Prefers mornings", "versionnumber": 1002})
    assert plan(body).reason is Reason.NO_CHANGE
    # ... but a change of consent, type or FHIR id is a gate: the whole row is written.
    for gate in ({"msemr_azurefhirid": "pat-9"}, {"msemr_contacttype": PRACTITIONER_TYPE}):
        assert plan(patient_update({**gate, "versionnumber": 1002})).decision == "write"
    withdrawn = patient_update({"msemr_azurefhirsyncenabled": True, "versionnumber": 1002},
                               pre={"msemr_azurefhirsyncenabled": False})
    assert written(plan(withdrawn)).full  # consent given: the whole row


def test_target_only_update_plans_the_columns_in_the_target():
    body = context("Update", "msemr_encounter", ENCOUNTER,
                   {"msemr_encounterstatus": Choice(935000006), "msemr_encounteridentifier": "ENC-2026-119",
                    "versionnumber": 4002})
    p = written(plan(body))
    assert p.resource == {"resourceType": "Encounter", "status": "cancelled",
                          "identifier": [{"use": "usual", "value": "ENC-2026-119"}]}
    assert p.changes == ("identifier", "status")
    assert p.operation == "update"


def test_cleared_column_removes_the_element():
    body = context("Update", "msemr_encounter", ENCOUNTER, {"msemr_encounterenddate": None})
    p = written(plan(body))
    assert not p.full and p.cleared == ("period",) and p.resource == {"resourceType": "Encounter"}
    assert plan(body).as_json()["cleared"] == ["period"]  # the dry run says what a clear removes
    server = {"resourceType": "Encounter", "id": "enc-1", "status": "finished",
              "period": {"start": "2026-11-02T09:30:00Z", "end": "2026-11-02T10:30:00Z"}}
    after = merged(p, server)
    assert strip_marks(after) == {"resourceType": "Encounter", "id": "enc-1", "status": "finished",
                                  "period": {"start": "2026-11-02T09:30:00Z"},
                                  "identifier": [{"system": "urn:dataverse:msemr_encounter", "value": ENCOUNTER}]}
    # No whole state was written: the mark records the column's version only (docs/convergence.md section 6)
    mark = mark_of(after, "msemr_encounter", ENCOUNTER)
    assert mark is not None and not mark.version.known
    assert [column for column, _ in mark.columns] == ["msemr_encounterenddate"]


def test_cleared_phone_removes_its_telecom_item_only():
    p = written(plan(patient_update({"telephone1": None, "versionnumber": 1002})))
    assert merged(p, server_patient())["telecom"] == [{"system": "phone", "use": "mobile", "value": "+1 206 555 0199"},
                                                      {"system": "email", "value": "r.quintero@example.org"}]


def test_server_only_elements_are_never_planned():
    body = patient_update({"lastname": "Quintero-Hale", "msemr_azurefhirid": "pat-1", "msemr_azurefhirversion": "4",
                           "msemr_azurefhirlastupdatedon": T0, "versionnumber": 1002, "modifiedon": T0})
    p = written(plan(body))
    assert p.target.fhir_id == "pat-1"
    assert not {"id", "meta", "text", "communication"} & set(p.resource)
    before = server_patient()
    after = strip_marks(merged(p, before))
    for name in ("id", "meta", "extension", "communication", "identifier", "gender", "birthDate", "telecom"):
        assert after[name] == before[name], name
    assert after["name"] == [{"use": "official", "family": "Quintero-Hale", "given": ["Rosalind", "Elsie"]},
                             {"use": "nickname", "given": ["Roz"]}]
    # A narrative generated from the data would name the old family name: it goes (narrative.html, "SHALL reflect
    # all content"); one that holds more than the data (`additional`) is the server's, and stays.
    assert "text" not in after
    additional = {**before, "text": {**before["text"], "status": "additional"}}
    assert strip_marks(merged(p, additional))["text"] == additional["text"]


def test_update_of_an_expansion_row_with_no_mapped_change():
    row = {"msemr_assignee": Lookup("contact", PATIENT), "msemr_identifiersystem": "http://hospital.example.org/mrn",
           "msemr_value": "MRN-0042731", "versionnumber": 3001}
    body = context("Update", "msemr_medicalidentifier", IDENTIFIER, {"versionnumber": 3002}, pre=row,
                   post={**row, "versionnumber": 3002})
    assert plan(body).reason is Reason.NO_CHANGE


def test_decision_as_json_shape():
    d = plan(sample("02_patient_update_phone.json"))
    out = d.as_json()
    assert out["decision"] == "write" and out["reason"] is None
    assert (out["table"], out["recordId"], out["message"], out["resourceType"]) == (
        "contact", PATIENT, "Update", "Patient")
    assert "telecom" in out["changes"] and out["resource"]["resourceType"] == "Patient" and out["wholeRow"]
    skip = plan(sample("08_patient_consent_withheld.json")).as_json()
    assert skip["reason"] == "consent-withheld" and skip["resource"] is None and skip["changes"] is None


def test_readme_reason_table_is_the_reason_catalogue() -> None:
    """Administrators read the reason table in the README: it must say what the code does, code by code."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    rows = re.findall(r"^\| `([a-z-]+)` \| (\w+) \| (.*?) \| (.*?) \|$", readme, re.MULTILINE)
    assert {code: (kind, meaning, action) for code, kind, meaning, action in rows} == {
        reason.value: (info.kind.value, info.meaning, info.action) for reason, info in REASONS.items()}


def test_a_post_image_without_the_consent_column_is_not_read_as_the_whole_row():
    """The consent column is never empty in Dataverse: a post image without it was registered narrower, so the
    consent (and every other column) the pre image holds still counts, for the contact as for its child rows."""
    row = {"msemr_contacttype": Choice(935000000), "msemr_azurefhirsyncenabled": True, "firstname": "Wren",
           "lastname": "Castellanos", "birthdate": date(1981, 4, 12), "versionnumber": 1}
    post = {"lastname": "Castellanos-Hale", "msemr_contacttype": Choice(935000000), "versionnumber": 2}
    decision = plan(context("Update", "contact", PATIENT, {"lastname": "Castellanos-Hale"}, pre=row, post=post))
    assert decision.decision == "write" and "registered narrower" in decision.detail
    resource = decision.as_json()["resource"]
    assert resource["name"][0]["given"] == ["Wren"] and resource["birthDate"] == "1981-04-12"


def test_a_message_holding_neither_versionnumber_nor_modifiedon_is_ordered_by_when_its_operation_was_created():
    """Its mark must still carry a version the server accepts (an empty one was refused as fhir-rejected)."""
    from datetime import UTC, datetime

    row = {"msemr_contacttype": Choice(935000000), "msemr_azurefhirsyncenabled": True, "lastname": "Okafor"}
    when = datetime(2026, 11, 2, 9, 30, tzinfo=UTC)
    decision = plan(context("Create", "contact", PATIENT, row, post=row, created=when))
    assert decision.plan is not None and decision.plan.source.version.text() == "@" + when.isoformat()


def test_a_target_only_contact_change_is_decided_by_the_type_and_consent_the_rows_facts_know():
    """Pure half of test_02d: the message holds neither the contact's type nor its consent."""
    from writeback.facts import RowFacts, resolve

    body = context("Update", "contact", PATIENT, {"telephone1": "+1 555 0199", "versionnumber": 7})
    decision = plan(body)
    assert decision.decision == "write" and set(decision.alternatives) == {"Patient", "Practitioner"}
    key = ("contact", PATIENT)

    def facts(resource_type: str | None, consent: bool | None) -> dict[tuple[str, str], RowFacts]:
        return {key: RowFacts(*key, resource_type=resource_type, consent=consent)}

    doctor = resolve(decision, facts("Practitioner", None), MAPS, SETTINGS)
    assert doctor.decision == "write" and doctor.plan is not None and doctor.plan.resource_type == "Practitioner"
    assert resolve(decision, facts("Patient", True), MAPS, SETTINGS).decision == "write"
    assert resolve(decision, facts("Patient", False), MAPS, SETTINGS).reason is Reason.CONSENT_WITHHELD
    assert resolve(decision, facts(None, None), MAPS, SETTINGS).reason is Reason.TARGET_PENDING
    unknown = resolve(decision, facts("Patient", None), MAPS, SETTINGS)
    assert (unknown.decision, unknown.reason) == ("reject", Reason.CONSENT_UNKNOWN)
    skip = Settings.for_planning({"WRITEBACK_CONSENT_UNKNOWN": "skip"})
    assert resolve(decision, facts("Patient", None), MAPS, skip).decision == "skip"


def test_the_dry_run_says_a_target_only_contact_change_takes_its_type_and_consent_from_earlier_messages():
    """`plan` said `write` as Patient with nothing decided when written, where the function waited as
    `target-pending` for the row's type (found trying the product)."""
    body = context("Update", "contact", PATIENT, {"telephone1": "+1 555 0199", "versionnumber": 7})
    later = plan(body).as_json()["decidedWhenWritten"]
    assert later == [f"type of contact {PATIENT} (not in the message; shown as Patient)",
                     f"consent of contact {PATIENT} (not in the message)"]
    typed = context("Update", "contact", PATIENT, {"telephone1": "+1 555 0199", "versionnumber": 7,
                                                   "msemr_contacttype": Choice(935000000)})
    assert plan(typed).as_json()["decidedWhenWritten"] == [f"consent of contact {PATIENT} (not in the message)"]


# ---- a FHIR id names a resource of the type the row had when it got the id ----------------------------------------


def test_a_fhir_id_from_before_a_type_change_names_the_old_types_resource():
    """A contact ingested as a Patient (the sync's own Create sets msemr_azurefhirid: the Patient's) and then made
    a Practitioner: the change keeps the id but is unsure of it (read by it, and found by the row identifier if it
    names no Practitioner), and the row's facts keep that the id is the Patient's, also through later messages
    that carry it under the new type, merged in any order."""
    ingested = context("Create", "contact", PATIENT, patient_row(msemr_azurefhirid="ext-1", versionnumber=1001),
                       post=patient_row(msemr_azurefhirid="ext-1", versionnumber=1001), user_id=SYNC_USER)
    retyped = patient_update({"msemr_contacttype": PRACTITIONER_TYPE, "versionnumber": 1002},
                             pre={"msemr_azurefhirid": "ext-1"})
    target = written(plan(retyped)).target
    assert (target.resource_type, target.fhir_id, target.fhir_id_unsure) == ("Practitioner", "ext-1", True)
    renamed = patient_update({"lastname": "Adeyemi", "versionnumber": 1003},
                             pre={"msemr_azurefhirid": "ext-1", "msemr_contacttype": PRACTITIONER_TYPE})
    facts = [facts_of(message_of(body, {}), MAPS, SETTINGS) for body in (ingested, retyped, renamed)]
    assert [f.fhir_type if f else "?" for f in facts] == ["Patient", None, "Practitioner"]  # each message alone
    for order in ((0, 1, 2), (2, 1, 0), (1, 2, 0)):
        known = None
        for n in order:
            fact = facts[n]
            assert fact is not None
            known = fact if known is None else known.merge(fact)
        assert known is not None
        assert (known.resource_type, known.fhir_type) == ("Practitioner", "Patient")
        assert known.id_for("Practitioner") is None and known.id_for("Patient") == "ext-1"
        resolved = written(resolve(plan(renamed), {known.key: known}, MAPS, SETTINGS)).target
        assert (resolved.fhir_id, resolved.fhir_id_unsure) == (None, False)


def test_a_fhir_id_given_under_the_rows_type_is_used():
    body = (patient_update({"lastname": "Adeyemi", "versionnumber": 1002}, pre={"msemr_azurefhirid": "ext-2"}))
    assert written(plan(body)).target.fhir_id == "ext-2"


def test_a_type_change_leaves_the_resource_of_the_old_type():
    """The Practitioner is written, and the row's Patient is released: its row identifier and mark go, a tombstone
    with the change's version stays, the rest is kept; a newer state of the row in it is not touched."""
    plan_ = written(plan(patient_update({"msemr_contacttype": PRACTITIONER_TYPE, "versionnumber": 1002})))
    (practitioner, patient) = plan_.writes
    assert (practitioner.target.resource_type, patient.target.resource_type) == ("Practitioner", "Patient")
    assert isinstance(patient.edit, Release)
    held = converge(None, practitioner.edit, "Practitioner", "p1")
    assert held.resource is not None
    old = {**held.resource, "resourceType": "Patient", "id": "p1", "gender": "female"}
    released = converge(old, patient.edit)
    assert released.kind == "write" and released.resource is not None
    assert released.resource["gender"] == "female" and "identifier" not in released.resource
    assert mark_of(released.resource, "contact", PATIENT) is None
    assert getattr(mark_of(released.resource, "contact", PATIENT, MOVED), "version", Version()).number == 1002
    newer = written(plan(patient_update({"lastname": "Adeyemi", "versionnumber": 1003})))
    again = converge(old, newer.writes[0].edit, "Patient", "p1")
    assert again.resource is not None and converge(again.resource, patient.edit).kind == "stale"
    assert converge(None, patient.edit).kind == "same"


def test_two_types_of_one_choice_element_are_refused_naming_them():
    """A row with both a quantity and a string value: FHIR holds one type of value[x]. The detail names the two
    elements and their columns, not "(resource) is invalid"."""
    row = {"msemr_status": Choice(935000002), "msemr_code": Lookup("msemr_codeableconcept", ENCOUNTER),
           "msemr_subjecttypepatient": Lookup("contact", PATIENT), "msemr_valuetypequantityvalue": Decimal("72"),
           "msemr_valuestring": "high", "versionnumber": 5}
    decision = plan(context("Create", "msemr_observation", OBSERVATION, row, post=row))
    assert (decision.decision, decision.reason) == ("reject", Reason.INVALID_RESOURCE)
    assert "valueQuantity and valueString" in decision.detail or "valueString and valueQuantity" in decision.detail
    assert "msemr_valuestring" in decision.detail and "high" not in decision.detail


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["contact", "msemr_encounter", "Contact", ""]), st.one_of(st.uuids().map(str), st.text()))
def test_resource_id_is_the_rows_uuid5(table: str, row_id: str):
    """The id a row's resource is created under never changes (a row written by an earlier release is found
    under it): it is `uuid5(RESOURCE_NAMESPACE, "<table>/<row id, lower case>")`, whatever computes it."""
    resource_id.cache_clear()
    assert resource_id(table, row_id) == str(uuid.uuid5(RESOURCE_NAMESPACE, f"{table}/{row_id.lower()}"))
    assert resource_id(table, row_id) == resource_id(table, row_id.upper() if row_id.isascii() else row_id)


def test_row_facts_keep_the_version_of_the_message_each_value_came_from():
    """A message without the type (a step without images) moves the row's version, not the type's: a type change
    older than it but newer than the type's message is still newer than the type (test_16g)."""
    told = RowFacts("contact", "c-1", Version(10), "Patient", True)
    later = RowFacts("contact", "c-1", Version(12))  # a Target-only phone change
    known = told.merge(later)
    assert (known.version, known.resource_type, known.type_at, known.consent_at) == \
        (Version(12), "Patient", Version(10), Version(10))
    retyped = RowFacts("contact", "c-1", Version(11), "Practitioner", True)
    for facts in (known.merge(retyped), retyped.merge(known)):
        assert (facts.version, facts.resource_type, facts.type_at) == (Version(12), "Practitioner", Version(11))
    assert told.merge(told) == told and later.merge(told).merge(later) == known


def test_a_fhir_id_found_missing_names_nothing_until_the_row_is_written_there_again():
    """A contact ingested as Patient/ext-1, whose record was then deleted on the server: its write found it missing
    (`target-missing`). No lookup names it (a visit admitted meanwhile would name a resource that does not exist),
    whatever message of the row comes next, until this product writes the row there again."""
    told = RowFacts("contact", "c-1", Version(10), "Patient", True, "ext-1", fhir_type="Patient")
    assert told.id_for("Patient") == "ext-1"
    gone = told.merge(RowFacts("contact", "c-1", gone="Patient/ext-1"))
    assert gone.id_for("Patient") is None
    saved = gone.merge(RowFacts("contact", "c-1", Version(11), "Patient", True, "ext-1", fhir_type="Patient"))
    assert saved.id_for("Patient") is None  # (the next save still names it: its write finds it missing again)
    written = RowFacts("contact", "c-1", written="Patient/ext-1", found="Patient/ext-1")  # what a write learns
    assert saved.merge(written).id_for("Patient") == "ext-1"
    # merged into a message's facts before they are kept (as the pipeline does), it still clears it
    assert saved.merge(RowFacts("contact", "c-1", Version(12), "Patient", True, "ext-1").merge(written)) \
        .id_for("Patient") == "ext-1"
    assert saved.merge(RowFacts("contact", "c-1", Version(12), "Patient", True, "ext-2")).id_for("Patient") == "ext-2"


def test_row_facts_keep_the_type_a_row_had_before_its_last_type_change_in_any_order():
    """A contact made a Practitioner: its identifier rows wait for it to be a Patient again (`resolve`), where a
    contact that never was one skips them at once. Every message holding the type moves `type_at`, so the change
    is kept apart: told by two messages of each type, received in any order, or by one message's images."""
    patient = RowFacts("contact", "c-1", Version(10), "Patient", True)
    practitioner = RowFacts("contact", "c-1", Version(11), "Practitioner", True)
    phone = RowFacts("contact", "c-1", Version(12), "Practitioner", True)  # a later save, the type unchanged
    for facts in (patient.merge(practitioner).merge(phone), phone.merge(practitioner).merge(patient),
                  phone.merge(patient)):
        assert (facts.resource_type, facts.type_before) == ("Practitioner", "Patient"), facts
    assert patient.merge(practitioner).retyped == Version(11)
    assert practitioner.merge(phone).type_before is None  # always a Practitioner, as far as known
    back = RowFacts("contact", "c-1", Version(13), "Patient", True)
    assert (phone.merge(patient).merge(back).type_before, phone.merge(patient).merge(back).retyped) == (
        "Practitioner", Version(13))
    message = context("Update", "contact", PATIENT, {"msemr_contacttype": Choice(935000001)},
                      pre=patient_row(msemr_contacttype=Choice(935000000), versionnumber=10),
                      post=patient_row(msemr_contacttype=Choice(935000001), versionnumber=11))
    told = facts_of(message_of(message, {}), MAPS, SETTINGS)
    assert told is not None and (told.resource_type, told.type_before, told.retyped.number) == (
        "Practitioner", "Patient", 11)


def test_row_facts_keep_the_newest_version_the_sync_set_each_column_in():
    """The columns an `echo` set (the FHIR→Dataverse sync's save) are kept per column with the newest version that
    set them, in whatever order the facts are merged; an older save of the row leaves them as FHIR holds them."""
    phone = RowFacts("contact", "c-1", Version(13), echoed=(("telephone1", Version(13)),))
    both = RowFacts("contact", "c-1", Version(11), echoed=(("lastname", Version(11)), ("telephone1", Version(11))))
    for facts in (phone.merge(both), both.merge(phone)):
        assert facts.echoed == (("lastname", Version(11)), ("telephone1", Version(13)))
        assert facts.echoed_after(Version(12)) == {"telephone1"} and facts.echoed_after(Version(10)) == {
            "lastname", "telephone1"} and not facts.echoed_after(Version(13))
    assert phone.merge(RowFacts("contact", "c-1", Version(14))).echoed == phone.echoed  # a later save: still kept


def test_row_facts_tell_a_save_not_seen_by_the_gap_its_pre_image_names():
    """A record from FHIR ingested at 5; a save of other columns at 12 seen; a save whose pre image is 10 (the
    earlier save, 5 → 10, not seen yet) follows none seen, whatever order the facts were merged in. Below the
    oldest version kept, or without a `versionnumber`, nothing tells (as a row state kept before `seen` was)."""
    ingest, other = RowFacts("contact", "c-1", Version(5), seen=(5,)), RowFacts("contact", "c-1", Version(12),
                                                                                  seen=(12,))
    for facts in (ingest.merge(other), other.merge(ingest)):
        assert facts.seen == (5, 12)
        assert facts.follows_seen(Version(5)) and facts.follows_seen(Version(12))
        assert not facts.follows_seen(Version(10)) and not facts.follows_seen(Version(13))
        assert facts.follows_seen(Version(4)) and facts.follows_seen(Version(modified=datetime(2026, 1, 1, tzinfo=UTC)))
    assert RowFacts("contact", "c-1", Version(12)).follows_seen(Version(10))  # (kept before `seen`: as it was)
    many = RowFacts("contact", "c-1", Version(1), seen=(1,))
    for n in range(2, 40, 2):
        many = many.merge(RowFacts("contact", "c-1", Version(n), seen=(n,)))
    assert len(many.seen) == SEEN_KEPT and many.seen[-1] == 38 and not many.follows_seen(Version(37))


def test_an_echo_tells_which_mapped_columns_the_sync_set_and_a_create_none():
    settings = Settings.for_planning({"WRITEBACK_IGNORE_USER_IDS": SYNC_USER})
    body = context("Update", "contact", PATIENT, {"telephone1": "+1 555 0999", "versionnumber": 13,
                                                   "msemr_azurefhirversion": "7"}, user_id=SYNC_USER)
    facts = facts_of(message_of(body, {}), MAPS, settings)
    assert facts is not None and facts.echoed == (("telephone1", facts.version),)  # mapped columns only
    assert facts.version.number == 13
    assert getattr(facts_of(message_of(body, {}), MAPS, SETTINGS), "echoed", None) == ()  # not the sync's user
    created = context("Create", "contact", PATIENT, patient_row(versionnumber=13), user_id=SYNC_USER)
    assert getattr(facts_of(message_of(created, {}), MAPS, settings), "echoed", None) == ()  # no older save


def test_a_contact_of_another_type_says_which_value_it_found():
    """Found trying the product as a new user: a Related Person and a contact without a type read the same, and
    the advice was to set a type that is set. The value (a choice number, never patient data) tells them apart."""
    related = plan(sample("10_relatedperson_create.json"))
    assert related.reason is Reason.NO_ENTITY_MAP
    assert "msemr_contacttype is 935000002, a type the contact map does not write" in related.detail
    untyped = plan(context("Create", "contact", PATIENT, {"lastname": "Okafor"}))
    assert untyped.reason is Reason.INVALID_CONTACT_TYPE and "is not in the message" in untyped.detail


@pytest.mark.parametrize(("table", "row", "element"), [
    ("msemr_medicalidentifier", {"msemr_assignee": Lookup("contact", PATIENT), "msemr_identifiersystem":
                                 "MRN 0042731 Quintero", "msemr_value": "0042731"}, "Patient.identifier[0].system"),
    ("contact", {"msemr_contacttype": Choice(935000000), "msemr_azurefhirsyncenabled": True,
                 "firstname": "Wren\x07", "lastname": "Castellanos"}, "Patient.name[0].given[0]"),
])
def test_a_primitive_fhir_refuses_is_invalid_at_planning(table: str, row: dict[str, Any], element: str):
    """Found trying the product as a new user: a uri holding spaces (an identifier system typed as text) and a
    control character in a name passed validation (the models leave these primitive rules out); the dry run said
    `write` and the server refused it (`fhir-rejected`). Now `invalid-resource`, naming the element, never the
    value."""
    record = IDENTIFIER if table == "msemr_medicalidentifier" else PATIENT
    decision = plan(context("Create", table, record, row, post=row))
    assert (decision.decision, decision.reason) == ("reject", Reason.INVALID_RESOURCE), decision.detail
    assert element in decision.detail and "Quintero" not in decision.detail and "Wren" not in decision.detail


def test_an_item_whose_required_element_is_empty_is_refused_before_the_server(tmp_path):
    """A map writing `component[0]`'s code from a column: a row with a value but no code planned a write, and the
    server refused it (`fhir-rejected`); the whole model refuses it, so the plan does (`invalid-resource`)."""
    text = NEW_MEASURE + ('  - {column: new_band, target: "component[0].code.text"}\n'
                          '  - {column: new_float, target: "component[0].valueQuantity.value", type: decimal}\n')
    for name, body in {"new_person.yaml": NEW_PERSON, "new_doctor.yaml": NEW_DOCTOR, "new_measure.yaml": text}.items():
        (tmp_path / name).write_text(body, encoding="utf-8")
    maps = load_maps(tmp_path)
    refused = measure(maps, new_float=Decimal("2365.12"))
    assert (refused.decision, refused.reason) == ("reject", Reason.INVALID_RESOURCE)
    assert refused.detail is not None and "Observation.component[0].code" in refused.detail
    assert element(measure(maps, new_float=Decimal("2365.12"), new_band="Float"), "component") == [
        {"code": {"text": "Float"}, "valueQuantity": {"value": Decimal("2365.12")}}]


@pytest.mark.parametrize(("attribute", "value", "detail"), [
    # A url the model's validator calls `.startswith` on: it raised AttributeError out of planning.
    ('{column: msemr_photourl, target: "photo[0].url"}', 12345, "Patient.photo[0].url is invalid (not a JSON string)"),
    # A whole number where FHIR's JSON has a boolean: the model coerces it, and the 1 was what would be sent.
    ("{column: msemr_multiplebirth, target: multipleBirthBoolean, only_for: [Patient]}", 1,
     "Patient.multipleBirthBoolean is invalid (not a JSON boolean)"),
    # Text holding JSON on a complex element: the model reads it into a CodeableConcept, and the text was sent.
    ("{column: msemr_maritaltext, target: maritalStatus, only_for: [Patient]}", '{"text": "Married"}',
     "Patient.maritalStatus is invalid (not a JSON object)"),
])
def test_a_column_of_another_json_type_than_its_element_is_an_invalid_resource(tmp_path, attribute, value, detail):
    """A map whose column feeds an element without a `type` that converts it: the row's value goes as it is, and
    one of another JSON type than the element's is refused at planning, naming the element, never the value (it
    was sent, or planning raised)."""
    maps = maps_with(tmp_path, {"contact.yaml": shipped("contact.yaml").replace(
        "attributes:\n", f"attributes:\n  - {attribute}\n", 1)})
    column = attribute.split(",")[0].removeprefix("{column: ")
    d = plan(context("Create", "contact", PATIENT, patient_row(**{column: value})), maps=maps)
    assert (d.decision, d.reason) == ("reject", Reason.INVALID_RESOURCE)
    assert detail in d.detail, d.detail
    assert "Married" not in d.detail and "12345" not in d.detail


def test_a_row_without_its_id_yet_is_refused_not_written_under_the_nil_guid() -> None:
    """A Create's step registered in PreOperation posts the nil GUID as PrimaryEntityId (and Target.Id): written,
    every such message would go to one resource, `urn:dataverse:contact|00000000-…` (found by a new user's trial)."""
    nil = "00000000-0000-0000-0000-000000000000"
    body = json.loads(sample("01_patient_create.json"))
    body["PrimaryEntityId"] = nil
    for parameter in body["InputParameters"]:
        if parameter["key"] == "Target":
            parameter["value"]["Id"] = nil
    decision = plan(body)
    assert (decision.decision, decision.reason) == ("reject", Reason.MALFORMED_MESSAGE)
    assert decision.detail.startswith("PrimaryEntityId is the nil GUID") and "PostOperation" in decision.detail
