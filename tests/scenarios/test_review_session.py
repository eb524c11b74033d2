"""A senior integration engineer's review of the changes since e2aed5c (the `gone` row fact, the consent gate of a
child row of a clinical row), through the real pipeline: the FHIR dev server, Azurite, messages shaped as
Dataverse sends them (tests/scenarios/dataverse.py). Each test is one defect and fails on the code it was written
against."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from devtools.messages import Choice, Lookup
from tests.scenarios import dataverse
from tests.scenarios.checks import ENCOUNTER_SYSTEM, OBSERVATION_SYSTEM, ROW_SYSTEM, identifier_items, the_resource
from tests.scenarios.conftest import World, until_settled
from tests.scenarios.dataverse import MRN, PRACTITIONER, Sent, new_id
from tests.scenarios.participants import attend, scenario_maps, status_of, tries, ward
from tests.scenarios.test_items import ingest, ingested_patient, states, target_only

__all__ = ["scenario_maps"]  # (the fixture giving `world` the participant map, tests/scenarios/participants.py)


async def saved_then_deleted(world: World) -> tuple[str, dict[str, Any]]:
    """A patient the sync ingested from FHIR (Patient/<ext>), her first name corrected in Dataverse (written into
    Patient/<ext>), then her record deleted on the FHIR side: the contact's id and the ingested record."""
    dv = world.dataverse
    seeded = ingested_patient(world)
    contact, ingested = ingest(world, seeded)
    assert states(await world.send(ingested)) == [("skipped", "echo")]
    renamed = dv.update("contact", contact, {"firstname": "Imany"})
    assert states(await world.send(renamed)) == [("written", None)]
    deleted = httpx.delete(f"{world.fhir.server.base_url}/Patient/{seeded['id']}", headers=world.fhir.headers)
    assert deleted.status_code in (200, 204)
    return contact, seeded


async def test_a_patient_found_gone_by_a_save_received_after_a_newer_one_is_not_named_by_a_later_visit(
        world: World) -> None:
    """A patient came from FHIR (the sync ingested Patient/<ext>; the contact's FHIR id column holds <ext>) and the
    clerk corrected her first name in Dataverse: written into Patient/<ext>. The record is then deleted on the FHIR
    side (an erasure, or the loser of an MPI merge). The clerk changes her phone number and, a moment later, a
    column no map writes (the contact's description); Service Bus delivers the second save first (it keeps no
    order): `no-change`. The phone change comes next and is dead-lettered `target-missing`, as the README says.
    The patient is then admitted.

    Expected (docs/convergence.md section 5, "References": "An id a write of this product found missing on the
    server (`target-missing`) is named by no lookup after that (the facts keep it as `Gone`), until the row is
    written under it again"): the visit's `Encounter.subject` names no resource the server does not have (it is
    found by the row identifier, or identifier-only).

    What happened: `Encounter.subject.reference` is `Patient/<ext>`, the deleted record (the server answers 404).
    The `gone` fact was learned and dropped at once: `RowFacts.merge` clears `gone` when the newer facts' `written`
    equals it, and `written` is carried from the row's first write into every later version's facts, so the newer
    (skipped) save's facts "found it again" although nothing was written."""
    dv = world.dataverse
    contact, _ = await saved_then_deleted(world)
    phoned = dv.update("contact", contact, {"telephone1": "+1 555 0199"})
    described = dv.update("contact", contact, {"description": "Prefers morning appointments"})
    assert states(await world.send(described)) == [("skipped", "no-change")]
    assert states(await world.send(phoned)) == [("dead-lettered", "target-missing")]
    visit, admitted = dv.encounter(contact)
    await world.send(admitted)
    await until_settled(world, admitted)
    encounter = the_resource(world.fhir, "Encounter", ENCOUNTER_SYSTEM, visit)
    reference = encounter["subject"].get("reference")
    assert reference is None or status_of(world, reference) == 200, (
        f"the visit names {reference} (HTTP {status_of(world, reference)} on the server) after the contact's "
        f"write found it missing; the visit's tries: {tries(world, admitted)}")


async def test_a_participant_moved_to_a_visit_of_a_patient_without_consent_leaves_the_visit_it_was_moved_from(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two patients, each with a visit, all written; the attending physician is added to the first patient's visit
    as an Encounter Participant row (written: an item of that Encounter's `participant`). The second patient then
    withdraws her consent, and the clerk, who had put the physician on the wrong visit, moves the participant row to
    the second patient's visit (its lookup `msemr_encounterparticipantdetailsid` changed).

    Expected (docs/convergence.md section 5, "Consent gates": a child row of a clinical row "belongs to the patient
    its parent belongs to" and obeys that consent as a child row does; for a child row "A move to a patient without
    consent waits only two retries, then leaves the old patient", test_02e; README `consent-withheld`): nothing is
    added to the second patient's Encounter, and the participant leaves the first patient's Encounter, where
    Dataverse no longer has it.

    What happened: the move waits, then is skipped `consent-withheld` whole: the first patient's Encounter keeps
    the physician for good (a participant of a visit he did not attend, on another patient's chart). `facts.resolve`
    drops the removal only where the patient who has not consented is the child row's parent itself
    (`first.target.row == (table, row_id)`); for a gate inherited from the parent's patient
    (`facts.inherited_gates`) the parent is the Encounter, so the whole move is skipped."""
    dv, at = world.dataverse, ward(world, monkeypatch)
    visit = at.visit
    second, also_registered = dv.patient(firstname="Imani")
    other_visit, also_admitted = dv.encounter(second)
    assert states(await world.send(*at.sent, also_registered, also_admitted)) == [("written", None)] * 5
    participant = new_id()
    attending = attend(world, visit, at.doctor, participant)
    assert states(await world.send(attending)) == [("written", None)]
    assert the_resource(world.fhir, "Encounter", ENCOUNTER_SYSTEM, visit).get("participant")
    withdrawn = dv.update("contact", second, {"msemr_azurefhirsyncenabled": False})
    assert states(await world.send(withdrawn)) == [("skipped", "consent-withheld")]
    moved = dv.update("msemr_encounterparticipant", participant,
                      {"msemr_encounterparticipantdetailsid": Lookup("msemr_encounter", other_visit)})
    await world.send(moved)
    await until_settled(world, moved)
    other = the_resource(world.fhir, "Encounter", ENCOUNTER_SYSTEM, other_visit)
    assert "participant" not in other, other["participant"]
    left = the_resource(world.fhir, "Encounter", ENCOUNTER_SYSTEM, visit)
    assert "participant" not in left, (
        f"the participant moved away is still on the first patient's Encounter: {left['participant']}; the move's "
        f"tries: {tries(world, moved)}")


async def test_a_participant_planned_in_a_batchs_first_slice_obeys_a_withdrawal_later_in_the_same_batch(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ward's busy minute in one invocation of 301 messages (the batch size is `maxMessageBatchSize` in host.json,
    a Bicep parameter: README "What happens to a message"): the attending physician is added to a consenting
    patient's visit (an Encounter Participant row); then 99 saves of a table no map writes (accounts: skipped
    `no-entity-map`) and 200 practitioners registered; the patient's withdrawal of her consent comes last in the
    batch (Service Bus keeps no order across rows).

    Expected (docs/convergence.md section 5: a batch's writes go "as soon as every message of that row, and of each
    row it depends on (its parent, the patient whose consent it needs, its lookups), has been planned, since from
    then on what the batch says about those rows is whole"; a child row of a clinical row obeys the consent of the
    patient its parent belongs to): the participant is decided with the batch's withdrawal, as a medical identifier
    of the same patient at the same place is (its patient is its parent), and nothing of it reaches her Encounter.

    What happened: the participant is `written` into the Encounter of the patient whose withdrawal is in the same
    batch. `WritePlan.needs` names the row, its parent (the visit) and its lookups, not the visit's patient, which
    `facts.consent_rows` finds only once the flight has read the visit's facts; the flight leaves at the end of the
    first planning slice (`pipeline.PLAN_SLICE`, 100) and is decided with the stored consent, before the
    withdrawal is planned."""
    dv, at = world.dataverse, ward(world, monkeypatch)
    doctor, patient, visit = at.doctor, at.patient, at.visit
    assert states(await world.send(*at.sent)) == [("written", None)] * 3
    attending = attend(world, visit, doctor)
    withdrawn = dv.update("contact", patient, {"msemr_azurefhirsyncenabled": False})
    results = await world.send(attending, *busy_minute(world, monkeypatch), withdrawn)
    assert states(results)[-1] == ("skipped", "consent-withheld"), states(results)[-1]
    encounter = the_resource(world.fhir, "Encounter", ENCOUNTER_SYSTEM, visit)
    assert "participant" not in encounter, (
        f"the participant ended {states(results)[0]} and is on the Encounter of the patient whose withdrawal was "
        f"in the same batch: {encounter['participant']}")


def busy_minute(world: World, monkeypatch: pytest.MonkeyPatch) -> list[Sent]:
    """A ward's busy minute between two saves of one batch: 99 saves of accounts (no map: `no-entity-map`) and 200
    practitioners registered, so that the saves around it fall in different planning slices
    (`pipeline.PLAN_SLICE`)."""
    monkeypatch.setitem(dataverse._KEYS, "account", "accountid")
    dv = world.dataverse
    accounts = [dv.create("account", new_id(), {"name": f"Payer {n}"}) for n in range(99)]
    return accounts + [dv.create("contact", new_id(), {"msemr_contacttype": PRACTITIONER, "firstname": f"Staff{n}",
                                                       "lastname": "Nakamura"}) for n in range(200)]


async def test_a_visit_saved_without_images_early_in_a_batch_obeys_a_withdrawal_later_in_the_same_batch(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The case above for a clinical row whose save does not name its patient: a step without images sends a
    visit's status change (the Target only, no subject lookup); then a busy minute; the patient's withdrawal comes
    last in the batch.

    Expected: the change is decided with the batch's withdrawal and not written, as when the withdrawal came in an
    earlier batch (`test_02b`: `consent-unknown` on its first tries, then `consent-withheld`): the visit's FHIR
    status stays the one written before.

    What happened (docs/reliability.md listed it under "What remains"): its patient is known only from the row
    facts, read in its flight, so `WritePlan.needs` did not name it; the flight left at the end of the first planning
    slice and was decided with the stored consent, before the withdrawal was planned, and the status was written."""
    dv = world.dataverse
    patient, registered = dv.patient()
    visit, admitted = dv.encounter(patient)
    assert states(await world.send(registered, admitted)) == [("written", None)] * 2
    before = the_resource(world.fhir, "Encounter", ENCOUNTER_SYSTEM, visit)["status"]
    finished = target_only(dv.update("msemr_encounter", visit, {"msemr_encounterstatus": Choice(935000004)}))
    withdrawn = dv.update("contact", patient, {"msemr_azurefhirsyncenabled": False})
    results = await world.send(finished, *busy_minute(world, monkeypatch), withdrawn)
    assert states(results)[-1] == ("skipped", "consent-withheld"), states(results)[-1]
    assert states(results)[0] == ("retry", "consent-unknown"), states(results)[0]
    after = the_resource(world.fhir, "Encounter", ENCOUNTER_SYSTEM, visit)["status"]
    assert after == before, f"the visit's status became {after!r} after its patient withdrew in the same batch"


async def test_an_identifier_saved_without_images_early_in_a_batch_obeys_a_withdrawal_later_in_the_same_batch(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same for a child row whose patient only its row facts name (an MRN corrected by a step without images,
    no assignee column): nothing of it reaches the Patient of the withdrawal (found by the fix's review)."""
    dv = world.dataverse
    patient, registered = dv.patient()
    mrn, mrn_created = dv.identifier(patient, MRN, "MRN-1001")
    assert states(await world.send(registered, mrn_created)) == [("written", None)] * 2
    fix = target_only(dv.update("msemr_medicalidentifier", mrn, {"msemr_value": "MRN-1001X"}))
    withdrawn = dv.update("contact", patient, {"msemr_azurefhirsyncenabled": False})
    results = await world.send(fix, *busy_minute(world, monkeypatch), withdrawn)
    assert states(results)[-1] == ("skipped", "consent-withheld")
    assert states(results)[0][0] != "written", states(results)[0]
    found = the_resource(world.fhir, "Patient", ROW_SYSTEM, patient)
    assert [i["value"] for i in identifier_items(found, mrn)] == ["MRN-1001"]


async def test_an_observation_saved_without_images_early_in_a_batch_obeys_a_withdrawal_later_in_the_same_batch(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same for a reading's comment, its patient named by no column of the save (found by the fix's review)."""
    dv = world.dataverse
    patient, registered = dv.patient()
    observation, observed = dv.observation(patient)
    assert states(await world.send(registered, observed)) == [("written", None)] * 2
    note = target_only(dv.update("msemr_observation", observation, {"msemr_comment": "oral"}))
    withdrawn = dv.update("contact", patient, {"msemr_azurefhirsyncenabled": False})
    results = await world.send(note, *busy_minute(world, monkeypatch), withdrawn)
    assert states(results)[-1] == ("skipped", "consent-withheld")
    assert states(results)[0][0] != "written", states(results)[0]
    found = the_resource(world.fhir, "Observation", OBSERVATION_SYSTEM, observation)
    assert "note" not in found, found.get("note")
