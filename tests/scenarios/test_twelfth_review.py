"""Hospital sequences found by a twelfth review: list positions after a change without images, selectors with
optional keys (`use?=`) taking items that are not the row's, a FHIR id the sync sets after the row's resource was
made, two saves without images in one second. Each asserts the contract (docs/convergence.md) and fails today."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from tests.scenarios.checks import ENCOUNTER_SYSTEM, ROW_SYSTEM, resources_of, strip_marks, the_resource
from tests.scenarios.conftest import World
from tests.scenarios.dataverse import SYNC_USER, Sent
from tests.scenarios.test_items import _ingested_contact, ingested_patient, states, target_only

THREE = [{"family": "Okafor", "given": ["Imani", "Grace", "Adaeze"]}]


def _names(world: World, resource_id: str) -> list[dict[str, Any]]:
    return [strip_marks(n) for n in world.fhir.get(f"Patient/{resource_id}")["name"]]


async def test_t1_a_third_given_name_survives_a_whole_save_after_a_change_without_images(world: World):
    """A record from FHIR with three given names (the third another system's). The middle name is cleared (V2,
    written: given [Imani, Adaeze]); the phone is changed by a step without images (V3, Target only); the last name
    is changed by a step with images (V4). Dataverse: first name Imani, no middle name; FHIR must keep Adaeze."""
    seeded = ingested_patient(world, name=THREE)
    contact, ingested = _ingested_contact(world, seeded)
    assert states(await world.send(ingested)) == [("skipped", "echo")]
    dv = world.dataverse
    cleared = dv.update("contact", contact, {"middlename": None})
    assert states(await world.send(cleared)) == [("written", None)]
    assert _names(world, seeded["id"]) == [{"family": "Okafor", "given": ["Imani", "Adaeze"], "use": "official"}]
    phoned = target_only(dv.update("contact", contact, {"telephone1": "+1 555 0171"}))
    assert states(await world.send(phoned)) == [("written", None)]
    renamed = dv.update("contact", contact, {"lastname": "Okafor-Reyes"})
    assert states(await world.send(renamed)) == [("written", None)]
    assert _names(world, seeded["id"]) == [
        {"family": "Okafor-Reyes", "given": ["Imani", "Adaeze"], "use": "official"}]


@pytest.mark.parametrize("step", ["images", "no-images"])
async def test_t2_a_visit_number_entered_after_admission_is_written_beside_the_row_identifier(world: World,
                                                                                              step: str):
    """Admitted without a visit number (the Encounter written with the row identifier only, which has no `use`);
    the registrar enters the visit number later (a step with images, or without). Dataverse: the visit number.
    FHIR must hold one identifier with `use` usual holding it, and the row identifier unchanged."""
    dv = world.dataverse
    contact, created = dv.patient()
    visit, admitted = dv.encounter(contact)
    assert states(await world.send_each(created, admitted)) == [("written", None)] * 2
    numbered = dv.update("msemr_encounter", visit, {"msemr_encounteridentifier": "V-2001"})
    if step == "no-images":
        numbered = target_only(numbered)
    assert states(await world.send(numbered)) == [("written", None)]
    encounter = the_resource(world.fhir, "Encounter", ENCOUNTER_SYSTEM, visit)
    identifiers = [strip_marks(i) for i in encounter["identifier"]]
    assert sorted(identifiers, key=_text) == sorted([{"system": ENCOUNTER_SYSTEM, "value": visit},
                                                     {"use": "usual", "value": "V-2001"}], key=_text), identifiers


async def linked_to_the_labs_patient(world: World) -> tuple[str, dict[str, Any]]:
    """A contact registered in Dataverse (its Patient made under the row's own id), then linked by the sync (an
    echo setting msemr_azurefhirid) to the lab's Patient, seeded on the server. Returns the contact and that
    Patient."""
    seeded = ingested_patient(world)
    contact, created = world.dataverse.patient(firstname="Imani", middlename="Grace", lastname="Okafor")
    assert states(await world.send(created)) == [("written", None)]
    linked = world.dataverse.update("contact", contact, {"msemr_azurefhirid": seeded["id"]}, user=SYNC_USER)
    assert states(await world.send(linked)) == [("skipped", "echo")]
    return contact, seeded


async def test_t3_a_contact_linked_later_to_its_fhir_record_keeps_one_resource(world: World):
    """Registered in Dataverse (its Patient made under the row's own id); the patient's record from the lab's FHIR
    feed is then matched to the contact, and the sync links them (msemr_azurefhirid set, as its own user). The
    clerk then corrects the phone. Dataverse: one contact, linked to the lab's Patient. FHIR: the row must have one
    resource (the one its FHIR id names), not two Patients each carrying the row identifier."""
    dv = world.dataverse
    contact, seeded = await linked_to_the_labs_patient(world)
    phoned = dv.update("contact", contact, {"telephone1": "+1 555 0171"})
    assert states(await world.send(phoned)) == [("written", None)]
    found = resources_of(world.fhir, "Patient", ROW_SYSTEM, contact)
    assert [p["id"] for p in found] == [seeded["id"]], [p["id"] for p in found]


async def test_t4_a_mobile_entered_on_a_record_from_fhir_never_takes_another_systems_phone(world: World):
    """A Patient from FHIR with two phones without `use`; the ingest copied the second into telephone1 (as in
    test_04b), the first (a relative's number another system keeps) into no column. The clerk enters a mobile
    number: the pre image says the row had none. Dataverse: telephone1 0170, mobile 0199. FHIR must keep 0001 as
    it was and add the mobile (before: 0001 was overwritten with the mobile number)."""
    dv = world.dataverse
    seeded = ingested_patient(world, telecom=[{"system": "phone", "value": "+1 555 0001"},
                                              {"system": "phone", "value": "+1 555 0170"}])
    contact, ingested = _ingested_contact(world, seeded)
    mobile = dv.update("contact", contact, {"mobilephone": "+1 555 0199"})
    assert states(await world.send_each(ingested, mobile)) == [("skipped", "echo"), ("written", None)]
    patient = world.fhir.get(f"Patient/{seeded['id']}")
    assert sorted(patient["telecom"], key=_text) == sorted([
        {"system": "phone", "value": "+1 555 0001"}, {"system": "phone", "value": "+1 555 0170", "use": "work"},
        {"system": "phone", "value": "+1 555 0199", "use": "mobile"}], key=_text), patient["telecom"]


def _text(item: dict[str, Any]) -> str:
    return json.dumps(item, sort_keys=True)

def _same_second(sent: Sent, like: Sent) -> Sent:
    """`sent` as Dataverse posts it through a step without images: a Target without `versionnumber` (as the public
    samples' Targets are), its `modifiedon` that of `like`, saved within the same second (Dataverse keeps
    `modifiedon` to the second)."""
    modified = next(a["value"] for p in like.body["InputParameters"] if p["key"] == "Target"
                    for a in p["value"]["Attributes"] if a["key"] == "modifiedon")
    params = []
    for param in sent.body["InputParameters"]:
        if param.get("key") == "Target":
            value = dict(param["value"])
            value["Attributes"] = [{**a, "value": modified} if a["key"] == "modifiedon" else a
                                   for a in value["Attributes"] if a.get("key") != "versionnumber"]
            param = {**param, "value": value}  # noqa: PLW2901
        params.append(param)
    return replace(sent, body={**sent.body, "InputParameters": params}, raw=None)


async def typed_then_reformatted(world: World) -> tuple[str, Sent, Sent]:
    """A patient written, and two saves of its phone through a step without images in one second: as the clerk
    typed it, then as a plug-in reformatted it (a second Update of the row, its own request), neither with a
    `versionnumber`, both with the same `modifiedon`. Returns the contact and the two messages, not sent."""
    dv = world.dataverse
    contact, created = dv.patient()
    assert states(await world.send(created)) == [("written", None)]
    typed = target_only(dv.update("contact", contact, {"telephone1": "5550177"}))
    typed = _same_second(typed, typed)
    formatted = _same_second(target_only(dv.update("contact", contact, {"telephone1": "+1 555 0177"})), typed)
    return contact, typed, formatted


async def test_t5_two_saves_of_a_phone_in_one_second_without_images_end_with_the_second(world: World):
    """A step without images. The clerk saves a phone as typed; a plug-in on the contact reformats it in the same
    second (a second Update of the row, its own request). Both Targets hold `modifiedon` (the same second) and no
    `versionnumber`, as Dataverse's Targets do. Received in Dataverse's order. Dataverse: the reformatted phone.
    FHIR must hold it too (before: the second was taken for the first's own version, `same`, and skipped)."""
    contact, typed, formatted = await typed_then_reformatted(world)
    assert states(await world.send(typed)) == [("written", None)]
    await world.send(formatted)  # (skipped `no-change` today: "already holds this version of the row")
    patient = the_resource(world.fhir, "Patient", ROW_SYSTEM, contact)
    assert [t["value"] for t in patient["telecom"] if t.get("use") == "work"] == ["+1 555 0177"], patient["telecom"]
