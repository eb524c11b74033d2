"""Hospital sequences found by a fifteenth review, of encounters and observations: a patient briefly made a
Practitioner by mistake while a visit is recorded, an observation in the batch of its encounter's refused Create,
two changes of an observation posted by a step without images under one RequestId. Each asserts the contract
(README, docs/convergence.md) and fails today."""

from __future__ import annotations

from datetime import timedelta

import httpx

from devtools.messages import Choice, Lookup
from tests.scenarios.checks import (
    ENCOUNTER_SYSTEM,
    OBSERVATION_SYSTEM,
    ROW_SYSTEM,
    check_provenance,
    resources_of,
    the_resource,
)
from tests.scenarios.conftest import World, until_settled
from tests.scenarios.dataverse import PATIENT, PRACTITIONER, T0, Sent, new_id
from tests.scenarios.test_items import states, target_only, without_versionnumber

CONSENT = "msemr_azurefhirsyncenabled"


async def test_x1_a_visit_received_while_its_patient_was_briefly_a_practitioner_refers_to_the_patient(world: World):
    """Registered (written); admitted and a heart rate recorded; someone sets the contact type to Practitioner by
    mistake and back to Patient a minute later. The visit's and the vital's Creates, saved while the contact was a
    Patient, are received after the type change and before the change back (Service Bus does not order rows).
    Dataverse: a Patient (consenting) with its encounter and observation. FHIR: their `subject` must refer to that
    Patient (as test_sequences checks: `Patient/<id>`), as it does in Dataverse's order. Today both are written at
    once with an identifier-only subject (`facts.resolve` takes a gate whose contact is a Practitioner as "no
    patient's id to refer by"), and nothing writes them again when the contact is a Patient again: a search
    `Encounter?subject=Patient/<id>` never finds the visit. The identifier-row version of this was fixed (test_s25c:
    such a row waits for the contact to be a Patient again)."""
    dv = world.dataverse
    contact, created = dv.patient()
    visit, admitted = dv.encounter(contact)
    vital, observed = dv.observation(contact, visit)
    to_practitioner = dv.update("contact", contact, {"msemr_contacttype": PRACTITIONER})
    back = dv.update("contact", contact, {"msemr_contacttype": PATIENT})
    assert states(await world.send_each(created, to_practitioner)) == [("written", None)] * 2
    await world.send(admitted, observed)
    assert states(await world.send(back)) == [("written", None)]
    await until_settled(world, admitted, observed)
    assert [r.state for r in (world.last[id(admitted)][2], world.last[id(observed)][2])] == ["written"] * 2
    patient = the_resource(world.fhir, "Patient", ROW_SYSTEM, contact)
    encounter = the_resource(world.fhir, "Encounter", ENCOUNTER_SYSTEM, visit)
    observation = the_resource(world.fhir, "Observation", OBSERVATION_SYSTEM, vital)
    assert (encounter["subject"].get("reference"), observation["subject"].get("reference")) == (
        f"Patient/{patient['id']}",) * 2, (encounter["subject"], observation["subject"])


async def test_x2_a_visit_saved_while_a_patient_without_consent_was_briefly_a_practitioner_stays_out_of_fhir(
        world: World):
    """A patient (written) withdraws consent; someone then sets the contact type to Practitioner by mistake; a visit
    is admitted meanwhile; the type is set back to Patient a minute later. Delivered in Dataverse's order, with the
    retry schedule. Dataverse: a Patient who has not consented, with an encounter. FHIR must hold no encounter of
    that patient ("only patients whose value is Yes are written back"; a clinical row is written only while its
    patient consents). Today the visit is written at once (`facts.resolve` skips the consent gate of a contact
    whose facts say Practitioner), and stays in FHIR with the patient's contact row id as its subject after the
    contact is a Patient again, still without consent. Identifier rows of such a contact wait for it to be a
    Patient again (test_s25c); clinical rows do not."""
    dv = world.dataverse
    contact, created = dv.patient()
    withdrawn = dv.update("contact", contact, {CONSENT: False})
    to_practitioner = dv.update("contact", contact, {"msemr_contacttype": PRACTITIONER})
    visit, admitted = dv.encounter(contact)
    back = dv.update("contact", contact, {"msemr_contacttype": PATIENT})
    await world.deliver([created, withdrawn, to_practitioner, admitted, back], mode="in-order")
    assert not dv.row("contact", contact)[CONSENT]
    found = resources_of(world.fhir, "Encounter", ENCOUNTER_SYSTEM, visit)
    assert found == [], (states([world.last[id(admitted)][2]]), found[0]["subject"])


async def test_x3_an_observation_in_the_batch_of_its_encounters_refused_create_refers_to_no_missing_encounter(
        world: World):
    """A visit and its first vital saved together (one batch: Service Bus delivers them side by side); the visit is
    refused (`invalid-resource`: its end was typed before its start) and dead-lettered. The observation is written
    with `encounter.reference` `Encounter/<the id the visit's Create would have made>`, a resource that does not
    exist: a FHIR client following it gets 404. Delivered in two batches, the same observation waits for the
    encounter (`target-pending`, twice), then refers to it by identifier only, the documented last resort
    (docs/convergence.md section 5: "the id its own message creates it under" is said of a patient whose consent is
    known). The literal reference must name a resource that exists, or be identifier-only."""
    dv = world.dataverse
    contact, created = dv.patient()
    assert states(await world.send(created)) == [("written", None)]
    visit, admitted = dv.encounter(contact, msemr_encounterenddate=T0 - timedelta(hours=1))
    vital, observed = dv.observation(contact, visit)
    await world.send(admitted, observed)
    await until_settled(world, observed)
    assert states([world.last[id(admitted)][2]]) == [("dead-lettered", "invalid-resource")]
    assert resources_of(world.fhir, "Encounter", ENCOUNTER_SYSTEM, visit) == []
    assert_encounter_exists_if_named(world, vital)


def assert_encounter_exists_if_named(world: World, vital: str) -> None:
    """The vital's `encounter` is identifier-only, or names an Encounter the server has."""
    reference = the_resource(world.fhir, "Observation", OBSERVATION_SYSTEM, vital)["encounter"].get("reference")
    if reference is not None:
        with_it = httpx.get(f"{world.fhir.server.base_url}/{reference}", headers=world.fhir.headers)
        assert with_it.status_code == 200, f"Observation.encounter is {reference}: {with_it.status_code}"


async def test_x4_two_changes_without_images_posted_under_one_request_id_both_reach_fhir(world: World):
    """A step without images (supported: "Target only, as the first release did"). A synchronous plug-in on the
    observation completes the row inside the request that created it: it sets the status, then the value. Dataverse
    posts the Create and both Updates under the RequestId of that request (as test_13b has it for a Create and an
    Update; their Targets hold `modifiedon` and no `versionnumber`, as every public sample's Target). Dataverse: final,
    74. Today the second Update is skipped `duplicate` ("already processed"): `pipeline.message_key` is RequestId,
    table, row and message name, plus a `versionnumber` only when the message holds one, so two Updates of one row
    in one request are one key. FHIR keeps 72.5 for good; no retry, no dead-letter."""
    dv = world.dataverse
    request, vital, observed = await a_vital_created_in_one_request(world, Choice(935000001))
    finalised = without_versionnumber(target_only(dv.update(
        "msemr_observation", vital, {"msemr_status": Choice(935000002)}, request_id=request)))
    valued = without_versionnumber(target_only(dv.update(
        "msemr_observation", vital, {"msemr_valuetypequantityvalue": 74}, request_id=request)))
    results = await world.send_each(observed, finalised, valued)
    written = the_resource(world.fhir, "Observation", OBSERVATION_SYSTEM, vital)
    assert (written["status"], written["valueQuantity"]["value"]) == ("final", 74), states(results)
    check_provenance(world.fhir, written)


async def a_vital_created_in_one_request(world: World, status: Choice) -> tuple[str, str, Sent]:
    """A written patient, and the Create of a heart rate (72.5) of it under a RequestId of its own: the request,
    the observation's row id, its Create (not sent)."""
    dv = world.dataverse
    contact, created = dv.patient()
    assert states(await world.send(created)) == [("written", None)]
    request, vital = new_id(), new_id()
    observed = dv.create("msemr_observation", vital, {
        "msemr_status": status, "msemr_code": Lookup("msemr_codeableconcept", new_id()),
        "msemr_subjecttypepatient": Lookup("contact", contact), "msemr_effectivetypedatetime": T0,
        "msemr_valuetypequantityvalue": 72.5, "msemr_valuequantityunit": "beats/minute"}, request_id=request)
    return request, vital, observed
