"""Hospital sequences found by a seventeenth review, of this release's changes (59bbf69, 7e738e3, aceaec2, 4a044ef,
9a143e1). Each asserts the contract (README, docs/convergence.md, docs/reliability.md) and fails today."""

from __future__ import annotations

from tests.scenarios.checks import ENCOUNTER_SYSTEM, resources_of
from tests.scenarios.conftest import World, until_settled
from tests.scenarios.dataverse import PATIENT, PRACTITIONER

CONSENT = "msemr_azurefhirsyncenabled"


async def test_z1_a_visit_of_a_patient_who_never_consented_stays_out_of_fhir_when_the_practitioner_is_synced(
        world: World):
    """test_y4 where the mistaken Practitioner is also set to sync (its `msemr_azurefhirsyncenabled` Yes: a
    practitioner's record goes to FHIR). The patient had withdrawn consent; a visit is admitted while the contact is
    a Practitioner; the mistake is undone the next morning (Patient again, sync No). docs/reliability.md item 50 and
    aceaec2: "a contact that was last a Patient without consent keeps its rows out (`consent-withheld`), whatever
    its type says since". Dataverse: a Patient who has not consented, with an encounter; FHIR must hold no encounter
    of that patient. Today `facts.resolve` asks the contact's newest consent (`fact.consent`, told by the
    Practitioner's save), not the consent it had when it was last a Patient: past the wait the visit is written."""
    dv = world.dataverse
    contact, created = dv.patient()
    withdrawn = dv.update("contact", contact, {CONSENT: False})
    to_practitioner = dv.update("contact", contact, {"msemr_contacttype": PRACTITIONER, CONSENT: True})
    visit, admitted = dv.encounter(contact)
    await world.send_each(created, withdrawn, to_practitioner)
    await world.send(admitted)
    await until_settled(world, admitted)
    back = dv.update("contact", contact, {"msemr_contacttype": PATIENT, CONSENT: False})
    await world.send(back)
    assert not dv.row("contact", contact)[CONSENT]
    found = resources_of(world.fhir, "Encounter", ENCOUNTER_SYSTEM, visit)
    tries = [(r.state, r.reason.value if r.reason else None) for s, r in world.results if s is admitted]
    assert found == [], (tries, found[0]["subject"])
