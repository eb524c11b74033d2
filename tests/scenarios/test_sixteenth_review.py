"""Hospital sequences found by a sixteenth review, of the fifteenth review's fixes (7e738e3): the wait for a contact
briefly made a Practitioner, a lookup to a row whose Create the batch refuses, the duplicate key of a message
without a row version. Each asserts the contract (README, docs/convergence.md) and fails today."""

from __future__ import annotations

import copy
from typing import Any

from devtools.messages import Choice
from tests.scenarios.checks import ENCOUNTER_SYSTEM, OBSERVATION_SYSTEM, resources_of, the_resource
from tests.scenarios.conftest import World, until_settled
from tests.scenarios.dataverse import PATIENT, PRACTITIONER, Sent
from tests.scenarios.test_fifteenth_review import a_vital_created_in_one_request, assert_encounter_exists_if_named
from tests.scenarios.test_items import states, target_only, without_versionnumber

CONSENT = "msemr_azurefhirsyncenabled"


def _target_attribute(sent: Sent, column: str) -> Any:
    [target] = [p for p in sent.body["InputParameters"] if p["key"] == "Target"]
    return next(a["value"] for a in target["value"]["Attributes"] if a["key"] == column)


def _with_target_value(sent: Sent, column: str, value: Any) -> Sent:
    """The same message with the Target's `column` holding `value`."""
    body = copy.deepcopy(sent.body)
    for param in body["InputParameters"]:
        if param["key"] == "Target":
            for attribute in param["value"]["Attributes"]:
                if attribute["key"] == column:
                    attribute["value"] = value
    return Sent(body, sent.table, sent.row_id, sent.version, sent.state)


def _unreadable_in_every_image(sent: Sent, column: str, value: Any) -> Sent:
    """The message with `column` holding a value the parser refuses, in its Target and its images."""
    body = copy.deepcopy(sent.body)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("key") == column and "value" in node:
                node["value"] = value
            for child in node.values():
                walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk({k: v for k, v in body.items() if k != "ParentContext"})
    return Sent(body, sent.table, sent.row_id, sent.version, sent.state)


async def test_y2_two_changes_of_one_column_without_images_under_one_request_id_both_reach_fhir(world: World):
    """test_x4's sequence with the same column twice: a synchronous plug-in sets an observation's value inside the
    request that created it, then corrects it (72.5, then 73, then 74) in the same second. A step without images
    posts both Updates under the RequestId of that request, each Target holding the value, `modifiedon` (Dataverse
    keeps it to the second: the same in both) and no `versionnumber`. Dataverse: 74. Today the second Update is
    skipped `duplicate` ("already processed"): `pipeline.message_key` told the two apart by `modifiedon` and the
    names of the columns the Target sets, which are the same; FHIR keeps 73 for good, no retry, no dead-letter."""
    dv = world.dataverse
    request, vital, observed = await a_vital_created_in_one_request(world, Choice(935000002))
    first = without_versionnumber(target_only(dv.update(
        "msemr_observation", vital, {"msemr_valuetypequantityvalue": 73}, request_id=request)))
    second = without_versionnumber(target_only(dv.update(
        "msemr_observation", vital, {"msemr_valuetypequantityvalue": 74}, request_id=request)))
    second = _with_target_value(second, "modifiedon", _target_attribute(first, "modifiedon"))  # the same second
    results = await world.send_each(observed, first, second)
    written = the_resource(world.fhir, "Observation", OBSERVATION_SYSTEM, vital)
    assert written["valueQuantity"]["value"] == 74, states(results)


async def test_y3_an_observation_in_the_batch_of_its_encounters_unreadable_create_names_no_missing_encounter(
        world: World):
    """test_x3 with the visit's Create refused because a value in it cannot be read (`malformed-message`, here its
    class choice without a value), delivered in one batch with its first vital. The observation is written with
    `encounter.reference` `Encounter/<the id the visit's Create would have made>`, which does not exist (404).
    The fix (`batch.created.discard`) drops a refused Create's row only when planning parsed its message
    (`decision.message`); `_rows_of` named the row from the body's head, which this body has."""
    dv = world.dataverse
    contact, created = dv.patient()
    assert states(await world.send(created)) == [("written", None)]
    visit, admitted = dv.encounter(contact)
    admitted = _unreadable_in_every_image(admitted, "msemr_encounterclass",
                                          {"__type": "OptionSetValue:http://schemas.microsoft.com/xrm/2011/Contracts",
                                           "Value": None})
    vital, observed = dv.observation(contact, visit)
    await world.send(admitted, observed)
    await until_settled(world, observed)
    assert states([world.last[id(admitted)][2]]) == [("dead-lettered", "malformed-message")]
    assert resources_of(world.fhir, "Encounter", ENCOUNTER_SYSTEM, visit) == []
    assert_encounter_exists_if_named(world, vital)


async def test_y4_a_visit_of_a_patient_without_consent_stays_out_of_fhir_when_the_mistaken_type_outlasts_the_wait(
        world: World):
    """test_x2 with the mistake noticed the next morning: a patient (written) withdraws consent; someone sets the
    contact type to Practitioner by mistake; a visit is admitted meanwhile. The visit now waits (`target-pending`)
    for WRITEBACK_CONSENT_WAIT_MINUTES, then is written: the contact's facts still say Practitioner, so
    `facts.resolve` skips the consent gate (no consent asked) and writes the patient's visit by identifier. The type
    is set back to Patient later (consent still No): the visit stays in FHIR. Dataverse: a Patient who has not
    consented, with an encounter; FHIR must hold no encounter of that patient (the patient's identifier row, in the
    same situation, is never written: `no-entity-map`)."""
    dv = world.dataverse
    contact, created = dv.patient()
    withdrawn = dv.update("contact", contact, {CONSENT: False})
    to_practitioner = dv.update("contact", contact, {"msemr_contacttype": PRACTITIONER})
    visit, admitted = dv.encounter(contact)
    await world.send_each(created, withdrawn, to_practitioner)
    await world.send(admitted)
    await until_settled(world, admitted)
    back = dv.update("contact", contact, {"msemr_contacttype": PATIENT})
    await world.send(back)
    assert not dv.row("contact", contact)[CONSENT]
    found = resources_of(world.fhir, "Encounter", ENCOUNTER_SYSTEM, visit)
    tries = [(r.state, r.reason.value if r.reason else None) for s, r in world.results if s is admitted]
    assert found == [], (tries, found[0]["subject"])


async def test_y5_a_vital_saved_while_its_patient_was_briefly_a_practitioner_refers_to_its_visit(world: World):
    """The patient (consenting, written) is set to Practitioner by mistake; meanwhile a visit is admitted and, ten
    minutes later, a heart rate recorded in it; each waits (`target-pending`, the fix of test_x1) on its own retry
    schedule. The type is set back to Patient; the vital's third retry comes before the visit's. Dataverse: the
    observation belongs to the encounter. FHIR: `Observation.encounter` must refer to the Encounter
    (`Encounter/<id>`), as it does after the same wait for a consent (docs/convergence.md section 5: a lookup waits
    two retries "counted past the consent gate", then twice WRITEBACK_RETRY_MAX_DELAY_SECONDS from when it got past
    it: "the rows it refers to waited for the same consent on retry schedules of their own"). Today the vital's
    tries spent waiting for the contact to be a Patient again count as its lookup's two retries (`retry.next_step`
    counts only `consent-unknown` as a gate wait; `facts.resolve` returns `target-pending` for this one): it is
    written at once with an identifier-only `encounter`, and the visit, written a minute later, is never named."""
    dv = world.dataverse
    contact, created = dv.patient()
    to_practitioner = dv.update("contact", contact, {"msemr_contacttype": PRACTITIONER})
    assert states(await world.send_each(created, to_practitioner)) == [("written", None)] * 2
    visit, admitted = dv.encounter(contact)
    vital, observed = dv.observation(contact, visit)
    for delivery in (1, 2, 3):
        assert states(await world.send(admitted, delivery_count=delivery)) == [("retry", "target-pending")]
        assert states(await world.send(observed, delivery_count=delivery)) == [("retry", "target-pending")]
    back = dv.update("contact", contact, {"msemr_contacttype": PATIENT})
    assert states(await world.send(back)) == [("written", None)]
    await world.send(observed, delivery_count=4)
    await world.send(admitted, delivery_count=4)
    await until_settled(world, observed, admitted)
    encounter = the_resource(world.fhir, "Encounter", ENCOUNTER_SYSTEM, visit)
    observation = the_resource(world.fhir, "Observation", OBSERVATION_SYSTEM, vital)
    tries = [(r.state, r.reason.value if r.reason else None) for s, r in world.results if s is observed]
    assert observation["encounter"].get("reference") == f"Encounter/{encounter['id']}", (
        tries, observation["encounter"])

