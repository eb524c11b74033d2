"""Review for conformance to FHIR R4 (4.0.1): pure reproducers. Each test fails on the code it was written
against, for a reason tied to the sentence of the specification quoted in its docstring."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from devtools.messages import Choice, Lookup, context
from devtools.samples import ENCOUNTER, PATIENT, T0
from writeback.converge import converge
from writeback.decide import Decision, Source, Target, WritePlan, plan_message
from writeback.fhir_client import read_path
from writeback.maps import load_maps
from writeback.marks import MOVED, ROW
from writeback.provenance import build_provenance
from writeback.settings import DEFAULT_MAPS_DIR, Settings

MAPS = load_maps(DEFAULT_MAPS_DIR)
SETTINGS = Settings()
REPO = Path(__file__).resolve().parents[2]


def _plan(body: dict[str, Any]) -> WritePlan:
    decision: Decision = plan_message(json.dumps(body), None, MAPS, SETTINGS, None)
    assert decision.decision == "write", (decision.reason, decision.detail)
    assert decision.plan is not None
    return decision.plan


def _encounter(**changes: object) -> dict[str, Any]:
    row: dict[str, object] = {
        "msemr_encounterid": ENCOUNTER, "msemr_encounterstatus": Choice(935000005),
        "msemr_encounterclass": Choice(935000001), "msemr_subjectpatient": Lookup("contact", PATIENT),
        "msemr_encounterstartdate": T0, "msemr_encounterenddate": T0.replace(hour=10), "versionnumber": 7,
    }
    row.update(changes)
    return context("Create", "msemr_encounter", ENCOUNTER, row, post=row)


def test_encounter_length_is_a_duration_with_a_ucum_time_code():
    """FHIR R4 datatypes, Duration (https://hl7.org/fhir/R4/datatypes.html#Duration), rule drt-1: "There SHALL be
    a code if there is a value and it SHALL be an expression of time. If system is present, it SHALL be UCUM."
    Encounter.length is a Duration. The shipped encounter map writes `length.value` alone (msemr_encounterlength),
    so every visit length reaches FHIR as a bare number: 45 of what? A reader cannot tell minutes from hours."""
    p = _plan(_encounter(msemr_encounterlength=45))
    length = p.resource["length"]
    assert length["value"] == 45
    assert length.get("system") == "http://unitsofmeasure.org" and length.get("code") in (
        "s", "min", "h", "d", "wk", "mo", "a"), length


def test_provenance_update_activity_display_is_the_code_systems_display():
    """FHIR R4 Coding.display (https://hl7.org/fhir/R4/datatypes-definitions.html#Coding.display): "A
    representation of the meaning of the code in the system, following the rules of the system." In
    http://terminology.hl7.org/CodeSystem/v3-DataOperation the display of UPDATE is "revise" (CREATE's is
    "create"). Every update's Provenance says `UPDATE` / "update", which the HL7 validator reports as a wrong
    display for the code."""
    source = Source("contact", PATIENT, "urn:dataverse:contact", "Update", None, None, None, None, 5, None)
    provenance = build_provenance(source, "Patient/x/_history/2", created=False, agent="", meta_source="urn:x")
    [coding] = provenance["activity"]["coding"]
    assert coding["code"] == "UPDATE"
    assert coding.get("display", "revise") == "revise", coding


def test_row_identifier_search_escapes_token_separators_in_the_system(tmp_path: Path):
    """FHIR R4 search, Escaping Search Parameters (https://hl7.org/fhir/R4/search.html#escaping): "When any of these
    characters [$ , |] appear in an actual parameter value, they must be prepended by the character \\, which also
    must be used to prepend itself." A map's `identifier_system` is accepted when it is an absolute URI, and ","
    and "$" are legal in one (RFC 3986 sub-delims). The read by row identifier sends it unescaped:
    `identifier=urn:example:ids,contact|<row>` is, to the server, "code urn:example:ids OR contact|<row>": the
    row's resource is not found, and the write creates it again with a PUT without If-Match over whatever the
    server holds under the row's id."""
    system = "urn:example:ids,contact"
    folder = tmp_path / "maps"
    folder.mkdir()
    for source in DEFAULT_MAPS_DIR.glob("*.yaml"):
        text = source.read_text(encoding="utf-8").replace("identifier_system: urn:dataverse:contact",
                                                          f"identifier_system: {system}")
        (folder / source.name).write_text(text, encoding="utf-8")
    assert load_maps(folder).maps["contact"].identifier_system == system  # accepted at load
    target = Target("Patient", None, system, "0c9a1e52-7b1d-4f6e-9a3c-5d2e8f4b6a10")
    path = read_path(target)
    assert "urn:example:ids\\,contact|" in path, path


def test_every_extension_url_the_product_writes_has_a_structure_definition():
    """FHIR R4 Extension.url (https://hl7.org/fhir/R4/extensibility-definitions.html#Extension.url): "The definition
    SHALL be a URI for the Structure Definition defining the extension." Every resource and child-row item this
    product writes carries `urn:dataverse-fhir-writeback:row` (and a moved row leaves
    `urn:dataverse-fhir-writeback:moved-away`); no StructureDefinition with either url exists in the product or
    its docs (the shape is only described in prose in docs/convergence.md), so a receiving system or the HL7
    validator cannot resolve what the extension means: it reports it as an unknown extension."""
    defined = set()
    for path in REPO.rglob("*.json"):
        if any(part in (".venv", "node_modules", ".git", "build") for part in path.parts):
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(data, dict) and data.get("resourceType") == "StructureDefinition":
            defined.add(data.get("url"))
    assert {ROW, MOVED} <= defined, sorted(u for u in defined if u)


def test_a_generated_narrative_does_not_outlive_the_data_it_was_generated_from():
    """FHIR R4 Narrative (https://hl7.org/fhir/R4/narrative.html): "If narrative is present with a status other than
    'empty', it SHALL reflect all content needed for a human to understand the essential clinical and business
    information for the resource"; NarrativeStatus `generated`: "The contents of the narrative are entirely
    generated from the core elements in the content." A whole-row update changes the patient's work phone and
    family name and keeps `text` as the server had it: the narrative a viewer shows still gives the old name and
    number, labelled as generated from the data. (The product already drops a HumanName's `text` when a part of
    the name changes, for this reason: paths._TEXT_PARTS; the resource's own narrative is left.)"""
    row = {"contactid": PATIENT, "msemr_contacttype": Choice(935000000), "msemr_azurefhirsyncenabled": True,
           "firstname": "Rosalind", "lastname": "Quintero", "telephone1": "+1 206 555 0142", "versionnumber": 5}
    after = {**row, "lastname": "Quintero-Vance", "telephone1": "+1 206 555 0177", "versionnumber": 6}
    p = _plan(context("Update", "contact", PATIENT, {"lastname": "Quintero-Vance", "telephone1": "+1 206 555 0177",
                                                     "versionnumber": 6}, pre=row, post=after))
    old = "<div xmlns=\"http://www.w3.org/1999/xhtml\">Rosalind Quintero, work phone +1 206 555 0142</div>"
    server = {"resourceType": "Patient", "id": "pat-1", "meta": {"versionId": "3"},
              "text": {"status": "generated", "div": old},
              "identifier": [{"system": "urn:dataverse:contact", "value": PATIENT}],
              "name": [{"use": "official", "family": "Quintero", "given": ["Rosalind"]}],
              "telecom": [{"system": "phone", "use": "work", "value": "+1 206 555 0142"}]}
    write = p.writes[0]
    decided = converge(server, write.edit, write.target.resource_type, write.target.new_id)
    assert decided.kind == "write" and decided.resource is not None
    written = decided.resource
    assert written["name"][0]["family"] == "Quintero-Vance"
    narrative = written.get("text") or {}
    assert narrative.get("div") != old, "the generated narrative still states the old name and phone"
