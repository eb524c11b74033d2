"""What "FHIR converges on what Dataverse holds" means, checked on the server after a sequence.

Written from the column definitions of the Healthcare data model and FHIR R4, not from the product's maps code:
the expectations below say, column by column, where a contact's, identifier's and encounter's values belong.

- every mapped element of a row's resource equals the row's last state in Dataverse (an empty column: absent);
- nothing else on the resource changed (what another system put there is still there, as it was);
- exactly one resource per row; one item per child row, in its current parent only;
- every version this product wrote has exactly one Provenance naming it (CREATE for the version that made the
  resource), and no version it did not write has one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from devtools.messages import Choice, Lookup
from tests.delivery.conftest import Fhir
from tests.expectations import expected_contact, text
from tests.scenarios.conftest import META_SOURCE

# The extension the writeback documents for the Dataverse row (and version) a resource or an item stands for
# (docs/convergence.md); spelled out here rather than imported, so these checks do not lean on the product.
ROW = "urn:dataverse-fhir-writeback:row"
MOVED = "urn:dataverse-fhir-writeback:moved-away"


def strip_marks(node: Any) -> Any:
    """The resource without the product's marks. Written here from the marks' documented URLs rather than
    imported from `writeback.marks`: the check must not share the product's own reading of them."""
    if isinstance(node, dict):
        out = {k: strip_marks(v) for k, v in node.items() if k != "extension"}
        kept = [strip_marks(e) for e in node.get("extension", []) if e.get("url") not in (ROW, MOVED)]
        if kept:
            out["extension"] = kept
        return out
    if isinstance(node, list):
        return [strip_marks(v) for v in node]
    return node


ROW_SYSTEM = "urn:dataverse:contact"
ENCOUNTER_SYSTEM = "urn:dataverse:msemr_encounter"
OBSERVATION_SYSTEM = "urn:dataverse:msemr_observation"
OBSERVATION_STATUS = {935000002: "final", 935000003: "amended", 935000005: "cancelled"}
ENCOUNTER_STATUS = {935000000: "planned", 935000003: "in-progress", 935000005: "finished", 935000006: "cancelled"}
ENCOUNTER_CLASS = {935000000: "IMP", 935000001: "AMB", 935000003: "EMER"}
IDENTIFIER_USE = {935000000: "usual", 935000001: "official", 935000002: "temp", 935000003: "secondary"}


def actual_contact(resource: Mapping[str, Any]) -> dict[str, Any]:
    names = [n for n in resource.get("name", []) if n.get("use") == "official"]
    assert len(names) <= 1, f"{len(names)} official names: {names}"
    name = names[0] if names else {}
    telecom = [t for t in resource.get("telecom", []) if t.get("system") in ("phone", "email")]
    phones: dict[str, str] = {}
    for t in telecom:
        if t.get("system") == "phone" and t.get("use") in ("work", "home", "mobile"):
            key = f"phone/{t['use']}"
            assert key not in phones, f"two {key} telecoms"
            phones[key] = t.get("value")
    emails = [t.get("value") for t in telecom if t.get("system") == "email"]
    homes = [a for a in resource.get("address", []) if a.get("use") == "home"]
    assert len(homes) <= 1
    address = {k: v for k, v in (homes[0] if homes else {}).items() if k != "use"}
    out = {"family": name.get("family"), "given": name.get("given"), "birthDate": resource.get("birthDate"),
           "gender": resource.get("gender"), **phones, "email": emails[0] if emails else None,
           "address": address or None}
    return {k: v for k, v in out.items() if v is not None}


def unowned(resource: Mapping[str, Any]) -> dict[str, Any]:
    """What no contact map owns: everything but the official name, the mapped telecoms, the home address,
    birthDate, gender, the row identifier and this product's marks. A name, phone, email or address without a
    `use` (as records ingested from FHIR have them) is what the map takes over for its column, so it is owned."""
    marked = [i for i in resource.get("identifier", []) if any(e.get("url") == ROW for e in i.get("extension", []))]
    out = strip_marks({**resource, "identifier": [i for i in resource.get("identifier", []) if i not in marked]})
    for key in ("id", "meta", "birthDate", "gender", "resourceType"):
        out.pop(key, None)
    out["name"] = [n for n in out.get("name", []) if n.get("use") not in ("official", None)]
    out["telecom"] = [t for t in out.get("telecom", []) if not (
        (t.get("system") == "phone" and t.get("use") in ("work", "home", "mobile", None))
        or t.get("system") == "email")]
    out["address"] = [a for a in out.get("address", []) if a.get("use") not in ("home", None)]
    out["identifier"] = [i for i in out.get("identifier", []) if i.get("system") != ROW_SYSTEM]
    return {k: v for k, v in out.items() if v not in ([], {}, None)}


def resources_of(fhir: Fhir, resource_type: str, system: str, row_id: str) -> list[dict[str, Any]]:
    return fhir.search(f"{resource_type}?identifier={system}|{row_id}&_count=10")


def the_resource(fhir: Fhir, resource_type: str, system: str, row_id: str) -> dict[str, Any]:
    found = resources_of(fhir, resource_type, system, row_id)
    assert len(found) == 1, f"{len(found)} {resource_type} resources for row {row_id}"
    return found[0]


def check_contact(fhir: Fhir, row_id: str, row: Mapping[str, Any], resource_type: str = "Patient",
                  seeded: Mapping[str, Any] | None = None) -> dict[str, Any]:
    resource = the_resource(fhir, resource_type, ROW_SYSTEM, row_id)
    assert actual_contact(resource) == expected_contact(row), resource
    if seeded is not None:
        assert unowned(resource) == unowned(seeded), "an element no map owns changed"
    return resource


def identifier_items(patient: Mapping[str, Any], identifier_row: str) -> list[dict[str, Any]]:
    """The items of a Patient that stand for one medical identifier row (marked with that row)."""
    return [i for i in patient.get("identifier", []) if any(
        e.get("url") == ROW and {"url": "id", "valueString": identifier_row} in e.get("extension", [])
        for e in i.get("extension", []))]


def check_identifier(patients: Mapping[str, Mapping[str, Any]], row_id: str, row: Mapping[str, Any] | None) -> None:
    """One item for the row, in the Patient of its current parent, holding its system and value; none elsewhere.
    `patients`: the Patient of each contact row that has one. `row` None: the row must be in no Patient."""
    holders = [(contact, item) for contact, p in patients.items() for item in identifier_items(p, row_id)]
    if row is None:
        assert holders == [], holders
        return
    parent = row["msemr_assignee"]
    assert isinstance(parent, Lookup)
    assert len(holders) == 1, f"identifier row {row_id} is in {len(holders)} places"
    contact, item = holders[0]
    assert contact == parent.row_id, "in the wrong patient"
    assert item.get("system") == text(row.get("msemr_identifiersystem"))
    assert item.get("value") == text(row.get("msemr_value"))
    use = row.get("msemr_use")
    assert item.get("use") == (IDENTIFIER_USE[int(use)] if isinstance(use, Choice) else None)


def check_provenance(fhir: Fhir, resource: Mapping[str, Any]) -> int:
    """Every version this product wrote has exactly one Provenance naming it; others have none. Returns the
    number of versions it wrote."""
    kind, rid = resource["resourceType"], resource["id"]
    history = [e["resource"] for e in fhir.get(f"{kind}/{rid}/_history?_count=100").get("entry", [])]
    ours = 0
    for n, version in enumerate(reversed(history)):  # oldest first
        versioned = f"{kind}/{rid}/_history/{version['meta']['versionId']}"
        provenances = fhir.search(f"Provenance?target={versioned}")
        if (version.get("meta") or {}).get("source") == META_SOURCE:
            ours += 1
            assert len(provenances) == 1, f"{versioned}: {len(provenances)} Provenances"
            [provenance] = provenances
            assert provenance["target"] == [{"reference": versioned}]
            activity = provenance["activity"]["coding"][0]["code"]
            assert activity == ("CREATE" if n == 0 else "UPDATE"), (versioned, activity)
        else:
            assert provenances == [], f"{versioned} was not written by us but has a Provenance"
    return ours
