"""Review by an integration engineer extending the shipped entity maps, through the real pipeline (the FHIR dev
server, Azurite, messages shaped as Dataverse sends them: tests/scenarios/dataverse.py).

Each test is one defect found by adding a map for another Microsoft Cloud for Healthcare table; each fails on the
code it was written against.
"""

from __future__ import annotations

import pytest

from tests.scenarios.checks import ENCOUNTER_SYSTEM, the_resource
from tests.scenarios.conftest import World
from tests.scenarios.dataverse import new_id
from tests.scenarios.participants import attend, scenario_maps, ward
from tests.scenarios.test_items import states

__all__ = ["scenario_maps"]  # (the fixture giving `world` the participant map, tests/scenarios/participants.py)


async def test_a_child_row_of_an_encounter_obeys_the_patients_consent(world: World,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The engineer added the Encounter Participant table (tests/scenarios/participants.py) as an expansion map of
    msemr_encounter, ran `check-config` (it passes), and replayed a ward's day: a practitioner, a consenting
    patient, her visit (all written); then the patient withdraws her consent (Azure FHIR Sync Enabled set to No),
    the clerk corrects the visit number, and the attending physician is added to the visit as a participant row.

    Expected (docs/convergence.md section 5, "Consent gates": "A child row (parent lookup) and a clinical row (a
    lookup to a table whose map asks for consent ...) are written only while that patient consents"; README,
    `consent-withheld`: "for a row that belongs to a patient (an identifier, an encounter), that patient's"): the
    participant row, which belongs to the patient through her encounter, waits for her consent as the encounter's
    own change does (`consent-unknown`, then `consent-withheld`), and nothing of it reaches FHIR meanwhile.

    What happened: the encounter's own change waits (`consent-unknown`), but the participant row is `written` at
    once: the patient's Encounter on the FHIR server gains the participant after she withdrew her consent. The
    consent gate is set only from lookups to a table whose map asks for consent, and from the parent of a child
    row only when the parent's own map does (contact); a child of a clinical table (msemr_encounter, which gets its
    patient's consent through its subject lookup) is gated by nothing."""
    dv, at = world.dataverse, ward(world, monkeypatch)
    doctor, patient, visit = at.doctor, at.patient, at.visit
    assert states(await world.send_each(*at.sent)) == [("written", None)] * 3

    withdrawn = dv.update("contact", patient, {"msemr_azurefhirsyncenabled": False})
    renumbered = dv.update("msemr_encounter", visit, {"msemr_encounteridentifier": "V-20261130-0042"})
    attending = attend(world, visit, doctor, msemr_participantname="Dr Okafor")
    results = await world.send_each(withdrawn, renumbered, attending)
    assert states(results)[:2] == [("skipped", "consent-withheld"), ("retry", "consent-unknown")], states(results)

    encounter = the_resource(world.fhir, "Encounter", ENCOUNTER_SYSTEM, visit)
    assert "participant" not in encounter, (
        f"the participant row ended {states(results)[2]} and is on the Encounter of a patient who withdrew her "
        f"consent: {encounter['participant']}")
    assert states(results)[2] in (("retry", "consent-unknown"), ("skipped", "consent-withheld")), states(results)


async def test_a_child_row_of_an_encounter_of_a_consenting_patient_is_written_and_one_of_an_unseen_visit_waits(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The other side of the gate above: the attending physician added to the visit of a patient who consents is
    written as an item of her Encounter; one added to a visit no message has told of yet (so whose patient is not
    known) waits for it (`consent-unknown`), and nothing of it reaches FHIR meanwhile."""
    at = ward(world, monkeypatch)
    doctor, visit = at.doctor, at.visit
    assert states(await world.send_each(*at.sent)) == [("written", None)] * 3
    attending = attend(world, visit, doctor)
    assert states(await world.send(attending)) == [("written", None)]
    [participant] = the_resource(world.fhir, "Encounter", ENCOUNTER_SYSTEM, visit)["participant"]
    assert participant["individual"]["identifier"]["value"] == doctor
    unseen = attend(world, new_id(), doctor)
    assert states(await world.send(unseen)) == [("retry", "consent-unknown")]
