"""Codes the shipped maps emit belong to their FHIR R4 value sets.

fhir.resources checks structure, not bindings (a Patient with gender "xyz" validates), so a wrong code in a
value map would reach the FHIR server. The R4 (4.0.1) code lists are hard-coded here, each citing its value set.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from itertools import pairwise
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class

from devtools.messages import Choice, Lookup, context
from devtools.samples import ENCOUNTER, IDENTIFIER, OBSERVATION, PATIENT, PATIENT_TYPE, T0
from writeback.decide import plan_message
from writeback.maps import RESOURCE_TYPES, AttributeMap, _model_in, load_maps
from writeback.marks import marks_in
from writeback.paths import Field, Index, Own, Path, Select
from writeback.settings import DEFAULT_MAPS_DIR, Settings
from writeback.validation import closed_codes

# http://hl7.org/fhir/R4/valueset-administrative-gender.html
ADMINISTRATIVE_GENDER = {"male", "female", "other", "unknown"}
# http://hl7.org/fhir/R4/valueset-encounter-status.html
ENCOUNTER_STATUS = {"planned", "arrived", "triaged", "in-progress", "onleave", "finished", "cancelled",
                    "entered-in-error", "unknown"}
# http://terminology.hl7.org/ValueSet/v3-ActEncounterCode (Encounter.class, R4: extensible), codes from
# http://terminology.hl7.org/CodeSystem/v3-ActCode
ACT_ENCOUNTER_CODE = {"AMB", "EMER", "FLD", "HH", "IMP", "ACUTE", "NONAC", "OBSENC", "PRENC", "SS", "VR"}
ACT_CODE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
# http://hl7.org/fhir/R4/valueset-observation-status.html
OBSERVATION_STATUS = {"registered", "preliminary", "final", "amended", "corrected", "cancelled", "entered-in-error",
                      "unknown"}
# http://hl7.org/fhir/R4/valueset-identifier-use.html
IDENTIFIER_USE = {"usual", "official", "temp", "secondary", "old"}
# http://hl7.org/fhir/R4/valueset-identifier-type.html (codes from http://terminology.hl7.org/CodeSystem/v2-0203)
IDENTIFIER_TYPE = {"DL", "PPN", "BRN", "MR", "MCN", "EN", "TAX", "NIIP", "PRN", "MD", "DR", "ACSN", "UDI", "SNO",
                   "SB", "PLAC", "FILL", "JHN"}
V2_0203_SYSTEM = "http://terminology.hl7.org/CodeSystem/v2-0203"
# http://hl7.org/fhir/R4/valueset-contact-point-system.html
CONTACT_POINT_SYSTEM = {"phone", "fax", "email", "pager", "url", "sms", "other"}
# http://hl7.org/fhir/R4/valueset-contact-point-use.html
CONTACT_POINT_USE = {"home", "work", "temp", "old", "mobile"}
# http://hl7.org/fhir/R4/valueset-name-use.html
NAME_USE = {"usual", "official", "temp", "nickname", "anonymous", "old", "maiden"}
# http://hl7.org/fhir/R4/valueset-address-use.html
ADDRESS_USE = {"home", "work", "temp", "old", "billing"}

MAPS = load_maps(DEFAULT_MAPS_DIR)

# Every value map of the shipped maps, by (table, target): a new value map must be added here.
VALUE_MAP_BINDINGS: dict[tuple[str, str], set[str]] = {
    ("contact", "gender"): ADMINISTRATIVE_GENDER,
    ("msemr_encounter", "status"): ENCOUNTER_STATUS,
    ("msemr_encounter", "class.code"): ACT_ENCOUNTER_CODE,
    ("msemr_observation", "status"): OBSERVATION_STATUS,
    ("msemr_medicalidentifier", "use"): IDENTIFIER_USE,
    ("msemr_medicalidentifier", f"type.coding[system={V2_0203_SYSTEM}].code"): IDENTIFIER_TYPE,
}

# Selector fields are written into new list items, so they are emitted codes too.
SELECTOR_BINDINGS: dict[tuple[str, str], set[str]] = {
    ("telecom", "system"): CONTACT_POINT_SYSTEM,
    ("telecom", "use"): CONTACT_POINT_USE,
    ("name", "use"): NAME_USE,
    ("address", "use"): ADDRESS_USE,
    ("identifier", "use"): IDENTIFIER_USE,
}


def value_maps() -> list[tuple[str, AttributeMap]]:
    return [(table, a) for table, m in sorted(MAPS.maps.items()) for a in m.attributes if a.action == "value_map"]


def test_every_value_map_has_a_binding_here():
    assert {(t, a.target) for t, a in value_maps()} == set(VALUE_MAP_BINDINGS)


@pytest.mark.parametrize(("table", "attr"), value_maps(), ids=lambda x: x if isinstance(x, str) else x.target)
def test_value_map_codes_are_in_their_value_set(table, attr):
    allowed = VALUE_MAP_BINDINGS[(table, attr.target)]
    emitted = set(attr.values.values())
    assert emitted <= allowed, f"{table} {attr.target}: {sorted(map(str, emitted - allowed))} not in the value set"


def test_gender_maps_both_dataverse_genders():
    gender = next(a for t, a in value_maps() if t == "contact")
    assert (gender.values["1"], gender.values["2"]) == ("male", "female")


def test_encounter_class_codes_come_with_the_act_code_system():
    encounter = MAPS.maps["msemr_encounter"]
    system = next(a for a in encounter.attributes if a.target == "class.system")
    assert (system.action, system.default) == ("default", ACT_CODE_SYSTEM)


def test_identifier_type_codes_are_written_under_v2_0203():
    attr = next(a for t, a in value_maps() if t == "msemr_medicalidentifier" and "coding" in a.target)
    selector = attr.path[2]
    assert isinstance(selector, Select) and selector.match == (("system", V2_0203_SYSTEM),)


def test_selector_codes_are_in_their_value_sets():
    checked = 0
    for table, entity_map in MAPS.maps.items():
        prefix = (Field(entity_map.expansion.element),) if entity_map.expansion else ()
        for attr in entity_map.attributes:
            path = prefix + attr.path
            for before, segment in pairwise(path):
                if not (isinstance(before, Field) and isinstance(segment, Select)):
                    continue
                for key, value in segment.match:
                    allowed = SELECTOR_BINDINGS.get((before.name, key))
                    if allowed is not None:
                        assert value in allowed, f"{table} {attr.target}: {before.name}.{key}={value}"
                        checked += 1
    assert checked >= 10  # telecom, name, address and identifier selectors of the shipped maps


# ---- the codes a message actually produces ------------------------------------------------------


def read(node: Any, path: Path) -> Any:
    for segment in path:
        if isinstance(segment, Field):
            node = node[segment.name]
        elif isinstance(segment, Index):
            node = node[segment.position]
        elif isinstance(segment, Own):
            node = next(item for item in node if marks_in(item))  # the row's item
        else:
            node = next(item for item in node if all(str(item.get(k)) == v for k, v in segment.match))
    return node


ROWS: dict[str, Callable[[str, object], dict[str, Any]]] = {
    "contact": lambda column, value: context("Create", "contact", PATIENT, {
        "msemr_contacttype": PATIENT_TYPE, "msemr_azurefhirsyncenabled": True, "lastname": "Quintero",
        column: value}),
    "msemr_encounter": lambda column, value: context("Create", "msemr_encounter", ENCOUNTER, {
        "msemr_encounterstatus": Choice(935000005), "msemr_encounterclass": Choice(935000001),
        "msemr_encounterstartdate": T0, column: value}),
    "msemr_observation": lambda column, value: context("Create", "msemr_observation", OBSERVATION, {
        "msemr_status": Choice(935000002), "msemr_code": Lookup("msemr_codeableconcept", OBSERVATION),
        column: value}),
    "msemr_medicalidentifier": lambda column, value: context("Create", "msemr_medicalidentifier", IDENTIFIER, {
        "msemr_assignee": Lookup("contact", PATIENT), "msemr_identifiersystem": "http://hospital.example.org/mrn",
        "msemr_value": "MRN-1", column: value}),
}


@pytest.mark.parametrize(("table", "attr"), value_maps(), ids=lambda x: x if isinstance(x, str) else x.target)
def test_every_dataverse_choice_plans_a_valid_code(table, attr):
    allowed = VALUE_MAP_BINDINGS[(table, attr.target)]
    entity_map = MAPS.maps[table]
    for key, code in attr.values.items():
        body = ROWS[table](attr.column, Choice(int(key)))
        decision = plan_message(json.dumps(body), None, MAPS, Settings())
        assert decision.decision == "write" and decision.plan is not None, (key, decision.detail)
        resource = decision.plan.resource
        if entity_map.expansion is not None:
            resource = resource[entity_map.expansion.element][0]
        emitted = read(resource, attr.path)
        assert emitted == code and emitted in allowed


def _code_elements(model: Any, where: str, seen: set[str]) -> list[tuple[str, Any]]:
    """Every (path, field) of a `code` element that lists codes, in `model` and the datatypes it holds."""
    out = []
    for name, info in model.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if extra.get("enum_values"):
            out.append((f"{where}.{info.alias or name}", extra))
        inner = _model_in(info.annotation)
        if inner is not None and inner.__name__ not in seen:
            seen.add(inner.__name__)
            out.extend(_code_elements(inner, f"{where}.{info.alias or name}", seen))
    return out


def test_every_code_list_the_supported_resources_reach_is_closed_and_complete():
    """fhir.resources ends a code list with "+" when FHIR's short text shows only the first codes of the value set
    (Observation.status, Encounter.status): each such list a map can reach is completed from R4, or a map could
    neither refuse a misspelt status nor write the codes the short leaves out."""
    truncated, open_lists = {}, set()
    for kind in RESOURCE_TYPES:
        for where, extra in _code_elements(get_fhir_model_class(kind), kind, set()):
            codes = closed_codes(extra)
            if "etc." in extra["enum_values"]:  # examples of an extensible binding, not a value set
                assert codes is None, where
                open_lists.add(where.rsplit(".", 2)[-2:][0] + "." + where.rsplit(".", 1)[-1])
                continue
            assert codes is not None, f"{where}: no R4 value set completes {extra['enum_values']}"
            if extra["enum_values"][-1] == "+":
                truncated[where] = codes
    assert truncated == {"Observation.status": OBSERVATION_STATUS, "Encounter.status": ENCOUNTER_STATUS,
                         "Encounter.statusHistory.status": ENCOUNTER_STATUS}
    assert open_lists == {"valueExpression.language"}  # Expression.language (extensible), wherever reached
