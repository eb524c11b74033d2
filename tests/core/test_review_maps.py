"""Review by an integration engineer extending the shipped entity maps (pure: maps and `plan_message`, no I/O
beyond a temporary folder of maps).

Each test is one defect found by adding a column to a shipped map, running the load `check-config` runs, and
planning a message shaped as Dataverse sends it. Each fails on the code it was written against.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from devtools.messages import Choice, Lookup, context
from devtools.samples import ENCOUNTER, OBSERVATION, PATIENT, PATIENT_TYPE, PRACTITIONER
from writeback.decide import plan_message
from writeback.errors import MapError
from writeback.maps import MapSet, load_maps
from writeback.reasons import Reason
from writeback.settings import DEFAULT_MAPS_DIR, Settings

SHIPPED = {p.name: p.read_text(encoding="utf-8") for p in DEFAULT_MAPS_DIR.glob("*.yaml")}


def with_attribute(tmp_path: Path, file: str, attribute: str) -> Path:
    """A copy of the shipped maps with one attribute (a YAML flow mapping) appended to `file`'s attributes."""
    folder = tmp_path / "maps"
    folder.mkdir()
    for name, text in SHIPPED.items():
        extended = text.rstrip("\n") + f"\n  - {attribute}\n" if name == file else text
        (folder / name).write_text(extended, encoding="utf-8")
    return folder


def with_map(tmp_path: Path, file: str, text: str) -> Path:
    """A copy of the shipped maps with one more map file."""
    folder = tmp_path / "maps"
    folder.mkdir()
    for name, shipped in {**SHIPPED, file: text}.items():
        (folder / name).write_text(shipped, encoding="utf-8")
    return folder


def attribute_count(file: str) -> int:
    return len(load_maps(DEFAULT_MAPS_DIR).maps[file.removesuffix(".yaml")].attributes)


def patient_body(extra: dict[str, object]) -> str:
    row: dict[str, object] = {"contactid": PATIENT, "msemr_contacttype": Choice(PATIENT_TYPE),
                              "msemr_azurefhirsyncenabled": True, "firstname": "Rosalind", "lastname": "Quintero",
                              "versionnumber": 1001, **extra}
    return json.dumps(context("Create", "contact", PATIENT, row))


def load_or_error(folder: Path) -> MapSet | MapError:
    try:
        return load_maps(folder)
    except MapError as exc:
        return exc


def test_a_lookup_into_an_element_that_is_not_a_reference_is_refused_at_load(tmp_path: Path) -> None:
    """The engineer added the contact's primary care provider (a lookup to another contact) to the contact map,
    writing the target the way FHIR names the reference's text, `generalPractitioner[0].reference`:

        - {column: msemr_primarycareprovider, target: "generalPractitioner[0].reference", action: lookup,
           resource: Practitioner, only_for: [Patient]}

    Expected: refused at load, naming the file and the field, as the README promises for a bad map ("They are
    validated at load; a bad map stops start-up with the file and the field named") and as a `type` the element
    cannot take, or a lookup to a type the element may not refer to, already is. A lookup writes a whole FHIR
    Reference (`{"reference": ..., "type": ..., "identifier": ...}`, README "Entity maps"), and
    `Reference.reference` is a FHIR string.

    What happened: `load_maps` (so `check-config`) accepts the map, and every patient whose provider is filled is
    then dead-lettered `invalid-resource` ("Patient.generalPractitioner[0].reference is invalid (not a JSON
    string)"), whose documented action tells the administrator to correct the row's data in Dataverse. The same
    holds for a lookup into any primitive element (`birthDate`, `name[0].family`) or into a Reference's
    `display` or `identifier`."""
    file = "contact.yaml"
    folder = with_attribute(tmp_path, file, "{column: msemr_primarycareprovider, target: "
                            '"generalPractitioner[0].reference", action: lookup, resource: Practitioner, '
                            "only_for: [Patient]}")
    loaded = load_or_error(folder)
    if isinstance(loaded, MapSet):  # what a user then sees for every patient with a provider
        decision = plan_message(patient_body({"msemr_primarycareprovider": Lookup("contact", PRACTITIONER)}),
                                None, loaded, Settings(), None)
        pytest.fail(f"the map loaded; a patient with a provider then ends {decision.decision} "
                    f"{decision.reason} ({decision.detail})")
    assert loaded.file == file and loaded.field.startswith(f"attributes[{attribute_count(file)}]"), loaded


@pytest.mark.parametrize(("attribute", "row"), [
    # Contact's Marital Status choice (familystatuscode: 1 Single, 2 Married) mapped to the element's name: a code
    # string where FHIR has a CodeableConcept.
    ("{column: familystatuscode, target: maritalStatus, action: value_map, values: {1: S, 2: M}, "
     "only_for: [Patient]}", {"familystatuscode": Choice(2)}),
    # A work-address country choice mapped to ISO 3166 codes: YAML 1.1 reads the unquoted code of Norway, NO, as
    # the boolean false (and ON, Ontario, as true), so the map writes `false` into a FHIR string.
    ('{column: new_workcountry, target: "address[use?=work].country", action: value_map, '
     "values: {100000000: SE, 100000001: NO}}", {"new_workcountry": Choice(100000001)}),
    # The same slip in a default, the country a Norwegian hospital's work addresses fall back to: `type: string`
    # is checked against the element, the constant itself is not.
    ('{column: address2_country, target: "address[use?=work].country", type: string, value: NO}', {}),
], ids=["value_map-code-into-a-CodeableConcept", "value_map-yaml-NO-into-a-string", "default-yaml-NO-into-a-string"])
def test_constants_of_a_map_that_the_target_element_cannot_take_are_refused_at_load(
        tmp_path: Path, attribute: str, row: dict[str, object]) -> None:
    """The engineer added a column to the contact map whose FHIR value comes from the map itself: a choice column
    with `action: value_map`, or a column with a `value:` to fall back on when it is empty.

    Expected: a value map code or a default that the target element can never take is refused at load with the
    file and the field named, as README "Entity maps" does for `type` ("a `type` the target element cannot take, a
    number into a date or text into a decimal, is refused at load") and for codes outside a required value set ("is
    refused at load"): these values are all in the file, so nothing about the row is needed to tell. FHIR R4:
    Patient.maritalStatus is a CodeableConcept (a JSON object), Address.country a string (a JSON string).

    What happened: `load_maps` (so `check-config`) accepts the map (`maps._compile` checks the JSON type only of a
    `type:`, never of the map's own values), and every contact with that choice set (or that column empty) is
    dead-lettered `invalid-resource` ("Patient.maritalStatus is invalid (not a JSON object)",
    "Patient.address[0].country is invalid (not a JSON string)"), whose documented action sends the administrator
    to correct the row's data in Dataverse."""
    file = "contact.yaml"
    loaded = load_or_error(with_attribute(tmp_path, file, attribute))
    if isinstance(loaded, MapSet):
        decision = plan_message(patient_body(row), None, loaded, Settings(), None)
        pytest.fail(f"the map loaded; such a contact then ends {decision.decision} {decision.reason} "
                    f"({decision.detail})")
    assert loaded.file == file and loaded.field.startswith(f"attributes[{attribute_count(file)}]"), loaded


def test_a_multi_select_choice_whose_values_are_all_mapped_is_not_said_to_hold_an_untranslated_value(
        tmp_path: Path) -> None:
    """The engineer mapped a multi-select choice (Dataverse sends it as a list of OptionSetValue, public sample 02,
    `albxrm_multiselectoptionset`) to an Observation's category with a value map holding every one of its values:

        - {column: msemr_category, target: "category[0].coding[0].code", action: value_map,
           values: {935000000: vital-signs, 935000001: laboratory}}

    and saved an observation with one category chosen (`[OptionSetValue 935000000]`).

    Expected: either the code written, or a clear detail: README, reason `invalid-resource`: "the detail names the
    element or the column"; README "Entity maps": "an unmapped value is `invalid-resource`" (the value here is
    mapped).

    What happened: dead-lettered `invalid-resource` with the detail "column msemr_category holds a choice value
    that the map does not translate": the administrator finds 935000000 in the map and has nothing to fix; the
    detail should say the column holds several choices (a multi-select) that a value map cannot write."""
    maps = load_maps(with_attribute(tmp_path, "msemr_observation.yaml", '{column: msemr_category, target: '
                                    '"category[0].coding[0].code", action: value_map, values: {935000000: '
                                    "vital-signs, 935000001: laboratory}}"))
    row: dict[str, object] = {
        "msemr_observationid": OBSERVATION, "msemr_status": Choice(935000002),
        "msemr_code": Lookup("msemr_codeableconcept", "7a0c2b9e-0000-4000-8000-000000000002"),
        "msemr_subjecttypepatient": Lookup("contact", PATIENT), "msemr_category": [Choice(935000000)],
        "versionnumber": 2001,
    }
    decision = plan_message(json.dumps(context("Create", "msemr_observation", OBSERVATION, row)), None, maps,
                            Settings(), None)
    if decision.decision == "write":
        return  # (a fix that writes the mapped code is as good)
    assert decision.reason is Reason.INVALID_RESOURCE
    assert "does not translate" not in decision.detail, decision.detail



def test_an_expansion_into_an_element_that_is_not_a_list_is_refused_at_load(tmp_path: Path) -> None:
    """The engineer added a child table of the encounter holding its admission details, as an expansion map onto
    Encounter.hospitalization (FHIR R4: `Encounter.hospitalization` 0..1, a single BackboneElement):

        table: new_admission
        resource: Encounter
        expansion: {parent_table: msemr_encounter, parent_link: new_encounter, element: hospitalization}
        attributes:
          - {column: new_preadmissionnumber, target: preAdmissionIdentifier.value, type: string}

    Expected: refused at load naming the file and `expansion.element`: README "Entity maps": expansion maps put each
    child row in "items of `Patient.identifier`", "each item marked with its Dataverse row", so the element must be
    a list; and "a bad map stops start-up with the file and the field named".

    What happened: `load_maps` accepts the map (`maps._check_elements` takes the first element of a child row's path
    as an item, `item_of_first`, without checking that it repeats), and every admission row is dead-lettered
    `invalid-resource` ("Encounter.hospitalization is invalid (not a JSON object)"): the item is written as a
    one-item list where FHIR has a single object."""
    folder = with_map(tmp_path, "new_admission.yaml",
                      "table: new_admission\nresource: Encounter\n"
                      "expansion: {parent_table: msemr_encounter, parent_link: new_encounter, "
                      "element: hospitalization}\n"
                      "attributes:\n"
                      "  - {column: new_preadmissionnumber, target: preAdmissionIdentifier.value, type: string}\n")
    loaded = load_or_error(folder)
    if isinstance(loaded, MapSet):
        row = {"new_encounter": Lookup("msemr_encounter", ENCOUNTER), "new_preadmissionnumber": "PA-20261130-7"}
        body = json.dumps(context("Create", "new_admission", "2c9a1e52-7b1d-4f6e-9a3c-5d2e8f4b6a12", row))
        decision = plan_message(body, None, loaded, Settings(), None)
        pytest.fail(f"the map loaded; an admission row then ends {decision.decision} {decision.reason} "
                    f"({decision.detail})")
    assert loaded.file == "new_admission.yaml" and loaded.field == "expansion.element", loaded


def test_a_lookup_to_the_second_table_mapped_to_a_resource_type_names_that_tables_rows(tmp_path: Path) -> None:
    """The engineer's organisation records attending physicians as Dataverse users: they added a map of `systemuser`
    to Practitioner (beside `contact`, which makes Practitioners of practitioner contacts) and, on the encounter map,
    the attending physician, a lookup to systemuser:

        systemuser.yaml: table: systemuser, resource: Practitioner,
                         identity: {identifier_system: "urn:dataverse:systemuser"}, attributes: [names]
        msemr_encounter.yaml: - {column: msemr_attendinguser, target: "participant[0].individual",
                                 action: lookup, resource: Practitioner}

    Expected (README "Entity maps"): a lookup is "a reference to the referenced row's resource" (the user's
    Practitioner, identified under `urn:dataverse:systemuser`); or, if the product cannot tell which table's rows a
    lookup names, the map refused at load naming the file and the field.

    What happened: `load_maps` binds the lookup to the first map (by file name) that makes a Practitioner,
    `contact` (`maps._compile`: `referenced = next(...)`), with no way in the map to say otherwise, and every
    encounter with an attending physician is dead-lettered `invalid-resource` ("column msemr_attendinguser names a
    row of table systemuser, and a Practitioner reference needs a row of contact")."""
    folder = with_attribute(tmp_path, "msemr_encounter.yaml", '{column: msemr_attendinguser, target: '
                            '"participant[0].individual", action: lookup, resource: Practitioner}')
    (folder / "systemuser.yaml").write_text(
        "table: systemuser\nresource: Practitioner\n"
        'identity: {identifier_system: "urn:dataverse:systemuser"}\n'
        "attributes:\n"
        '  - {column: firstname, target: "name[use?=official].given[0]", type: string}\n'
        '  - {column: lastname, target: "name[use?=official].family", type: string}\n', encoding="utf-8")
    loaded = load_or_error(folder)
    if isinstance(loaded, MapError):
        assert loaded.file == "msemr_encounter.yaml" and loaded.field.startswith(
            f"attributes[{attribute_count('msemr_encounter.yaml')}]"), loaded
        return
    user = "2c9a1e52-7b1d-4f6e-9a3c-5d2e8f4b6a12"
    row: dict[str, object] = {"msemr_encounterstatus": Choice(935000003), "msemr_encounterclass": Choice(935000001),
                              "msemr_subjectpatient": Lookup("contact", PATIENT),
                              "msemr_attendinguser": Lookup("systemuser", user), "versionnumber": 3001}
    decision = plan_message(json.dumps(context("Create", "msemr_encounter", ENCOUNTER, row)), None, loaded,
                            Settings(), None)
    assert decision.decision == "write", (decision.reason, decision.detail)
    assert decision.plan is not None
    [participant] = decision.plan.resource["participant"]
    assert participant["individual"]["identifier"] == {"system": "urn:dataverse:systemuser", "value": user}


def test_an_expansion_element_with_a_selector_is_refused_at_load_or_planned_without_a_traceback(
        tmp_path: Path) -> None:
    """The engineer added the patient's insurance cards (a child table of contact: payer system and member id) as
    identifiers of the Patient, marked as secondary ones, by naming the item in the expansion's element:

        table: new_insurancemember
        resource: Patient
        expansion: {parent_table: contact, parent_link: new_member, element: "identifier[use=secondary]"}
        attributes:
          - {column: new_payersystem, target: system, type: string}
          - {column: new_memberid, target: value, type: string}

    Expected: either the map refused at load naming the file and `expansion.element` (README: "a bad map stops
    start-up with the file and the field named"), or each card written as an item of Patient.identifier; in no
    case an exception: README "What happens to a message": "Every message ends in exactly one state".

    What happened: `load_maps` (so `check-config`) accepts it, and planning a card's Create raises AttributeError
    ('list' object has no attribute 'items', in `decide._item_fields`): the element's selector is left at the head
    of every attribute's path (`maps._compile` drops only the element's name). Through `Pipeline.process_many` the
    exception aborts the whole batch (tried against the FHIR dev server: a patient's Create in the same batch got
    no result), and the Functions adapter abandons every unsettled message of it, redelivered until Service Bus
    dead-letters them `MaxDeliveryCountExceeded`. `element: "identifier[0]"` does the same."""
    folder = with_map(tmp_path, "new_insurancemember.yaml",
                      "table: new_insurancemember\nresource: Patient\n"
                      "expansion: {parent_table: contact, parent_link: new_member, "
                      'element: "identifier[use=secondary]"}\n'
                      "attributes:\n"
                      "  - {column: new_payersystem, target: system, type: string}\n"
                      "  - {column: new_memberid, target: value, type: string}\n")
    loaded = load_or_error(folder)
    if isinstance(loaded, MapError):
        assert loaded.file == "new_insurancemember.yaml" and loaded.field == "expansion.element", loaded
        return
    card = "2c9a1e52-7b1d-4f6e-9a3c-5d2e8f4b6a12"
    row: dict[str, object] = {"new_insurancememberid": card, "new_member": Lookup("contact", PATIENT),
                              "new_payersystem": "urn:oid:2.16.840.1.113883.3.7", "new_memberid": "XQJ-88412",
                              "versionnumber": 4001}
    body = json.dumps(context("Create", "new_insurancemember", card, row))
    try:
        decision = plan_message(body, None, loaded, Settings(), None)
    except Exception as exc:
        pytest.fail(f"the map loaded, and planning a card's Create raised {type(exc).__name__}: {exc}")
    assert decision.decision == "write", (decision.reason, decision.detail)
