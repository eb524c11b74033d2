"""Review for conformance to FHIR R4 (4.0.1): reproducers against the FHIR dev server. Each test fails on the code
it was written against, for a reason tied to the sentence of the specification quoted in its docstring."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from devtools.faults import EntryFault
from tests.delivery.conftest import Fhir, Rig, create_message, encounter_message, new_patient, update_message
from writeback.bundles import BatchDelivery
from writeback.maps import load_maps
from writeback.pipeline import Envelope, Pipeline, Result
from writeback.reasons import Reason
from writeback.settings import DEFAULT_MAPS_DIR


async def _send_many(pipeline: Pipeline, bodies: list[dict[str, Any]]) -> list[Result]:
    return await pipeline.process_many([Envelope(json.dumps(b).encode()) for b in bodies])


async def test_requests_declare_their_utf8_charset_in_content_type(rig: Rig):
    """FHIR R4 RESTful API, Content Types and encodings (https://hl7.org/fhir/R4/http.html#mime-type): "FHIR uses
    UTF-8 for all request and response bodies. Since the HTTP specification (section 3.7.1) defines a default
    character encoding of ISO-8859-1, requests and responses SHALL explicitly set the character encoding to UTF-8
    using the charset parameter of the MIME-type in the Content-Type header." Every bundle goes out as
    `Content-Type: application/fhir+json`, no charset: a server or gateway that follows the HTTP default reads
    "Zoë Ní Bhriain" as "ZoÃ« NÃ\xad Bhriain"."""
    row_id, row = new_patient(firstname="Zoë", lastname="Ní Bhriain")
    result = await rig.send(create_message(row_id, row))
    assert result.state == "written", result.detail
    posted = [r for r in rig.transport.requests if r.method == "POST" and r.content]
    assert posted
    for request in posted:
        content_type = request.headers.get("Content-Type", "")
        assert "charset=utf-8" in content_type.replace(" ", "").lower(), content_type


async def test_a_reference_is_not_sent_in_the_batch_that_creates_its_target(rig_factory: Callable[..., Rig],
                                                                          fhir: Fhir):
    """FHIR R4 RESTful API, Batch/Transaction processing rules (https://hl7.org/fhir/R4/http.html#brules): "For a
    batch, there SHALL be no interdependencies between the different entries in the Bundle that cause change on the
    server. The success or failure of one change SHOULD not alter the success or failure or resulting content of
    another change." A patient's Create and their visit's Create in one Service Bus batch: the visit is written
    with `subject.reference` `Patient/<the id the patient's Create makes>` in the same batch bundle as that
    Create (`bundles._wave` resolves the lookup to `resource_id(...)` and `waves` separates only writes of one
    resource). The server answers the Patient entry 422 (here: injected, as a server-side profile or business
    rule would refuse it): the Encounter is still written, its literal reference naming a Patient that does not
    exist (a client following it gets 404), and nothing writes it again. A server that validates references in a
    batch (as the rule asks) refuses the Encounter whenever it processes it before the Patient."""
    rig = rig_factory()
    pipeline = Pipeline(rig.pipeline.maps, rig.settings, BatchDelivery(rig.client))
    patient_id, patient = new_patient(lastname="Refusedbyprofile")
    encounter_id, encounter = encounter_message(patient_id)
    rig.transport.add_entry(EntryFault(method="PUT", url_contains="Patient/", status=422, times=-1, outcome={
        "resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "invariant"}]}))
    results = await _send_many(pipeline, [create_message(patient_id, patient), encounter])

    assert results[0].state == "dead-lettered", results[0].detail  # the server refused the Patient
    assert (results[1].state, results[1].reason) == ("retry", Reason.TARGET_PENDING), results[1].detail
    assert fhir.search(f"Patient?identifier=urn:dataverse:contact|{patient_id}") == []
    written = fhir.search(f"Encounter?identifier=urn:dataverse:msemr_encounter|{encounter_id}")
    for resource in written:
        reference = resource["subject"].get("reference")
        if reference is not None:
            followed = httpx.get(f"{fhir.server.base_url}/{reference}", headers=fhir.headers)
            assert followed.status_code == 200, (
                f"Encounter.subject is {reference}, sent in the batch that created it: {followed.status_code}")


async def test_a_visit_new_with_its_patient_goes_in_a_bundle_after_the_patients_create(rig_factory: Callable[..., Rig],
                                                                                    fhir: Fhir):
    """The same batch, the Patient accepted: both written, the Encounter referring to the Patient the batch made,
    and sent in a bundle after the one that made it (never in the same bundle: the batch rules above)."""
    rig = rig_factory()
    pipeline = Pipeline(rig.pipeline.maps, rig.settings, BatchDelivery(rig.client))
    patient_id, patient = new_patient(lastname="Adeyemi")
    encounter_id, encounter = encounter_message(patient_id)
    results = await _send_many(pipeline, [encounter, create_message(patient_id, patient)])

    assert [r.state for r in results] == ["written", "written"], [r.detail for r in results]
    assert results[1].resource is not None and results[0].resource is not None
    made = results[1].resource.split("/_history")[0]
    (visit,) = fhir.search(f"Encounter?identifier=urn:dataverse:msemr_encounter|{encounter_id}")
    assert visit["subject"]["reference"] == made
    puts = [(n, e["request"]["url"]) for n, r in enumerate(rig.transport.requests) if r.content
            for e in json.loads(r.content).get("entry", []) if e["request"]["method"] == "PUT"
            and not e["request"]["url"].startswith("Provenance/")]
    bundle_of = {url.split("/")[0]: n for n, url in puts}
    assert bundle_of["Patient"] < bundle_of["Encounter"], puts


async def test_a_system_with_a_comma_still_finds_the_rows_resource(rig_factory: Callable[..., Rig], fhir: Fhir,
                                                                    tmp_path: Path):
    """FHIR R4 search, Escaping Search Parameters (https://hl7.org/fhir/R4/search.html#escaping): "When any of these
    characters [$ , |] appear in an actual parameter value, they must be prepended by the character \\, which also
    must be used to prepend itself." A map whose `identifier_system` holds a comma (a legal absolute URI, accepted
    at load) is searched for unescaped: the update's read by row identifier finds nothing, the update is taken for
    a create, and `PUT Patient/<row id>` without If-Match replaces the whole resource: the fax number another
    system added is gone."""
    system = "urn:example:ids,contact"
    folder = tmp_path / "maps"
    folder.mkdir()
    for source in DEFAULT_MAPS_DIR.glob("*.yaml"):
        (folder / source.name).write_text(source.read_text(encoding="utf-8").replace(
            "identifier_system: urn:dataverse:contact", f"identifier_system: {system}"), encoding="utf-8")
    rig = rig_factory()
    pipeline = Pipeline(load_maps(folder), rig.settings, BatchDelivery(rig.client))
    row_id, row = new_patient()
    (created,) = await _send_many(pipeline, [create_message(row_id, row)])
    assert created.state == "written", created.detail
    assert created.resource is not None
    resource_id = created.resource.split("/")[1]
    theirs = fhir.get(f"Patient/{resource_id}")
    theirs["telecom"].append({"system": "fax", "value": "+1 555 0199"})
    fhir.put(theirs)

    # A later invocation (the create's lease has expired by then): a fresh delivery.
    later = Pipeline(load_maps(folder), rig.settings, BatchDelivery(rig.client))
    (updated,) = await _send_many(later, [update_message(row_id, row, {"lastname": "Castellanos-Reyes",
                                                                          "versionnumber": 11})])
    assert updated.state == "written", updated.detail
    patient = fhir.get(f"Patient/{resource_id}")
    assert patient["name"][0]["family"] == "Castellanos-Reyes"
    assert {"system": "fax", "value": "+1 555 0199"} in patient["telecom"], patient["telecom"]
