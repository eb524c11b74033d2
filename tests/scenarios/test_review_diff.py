"""Review of fa5c231..HEAD (bundles `_wave`: a write referring to a resource its wave creates waits for that
create): a reference that still names a resource the server does not have. The test fails on the code it was
written against; its docstring says what the user sees and what they should see."""

from __future__ import annotations

import httpx

from devtools.messages import Choice
from tests.scenarios.checks import ENCOUNTER_SYSTEM, OBSERVATION_SYSTEM, resources_of, the_resource
from tests.scenarios.conftest import World
from tests.scenarios.test_items import states


def _status_of(world: World, reference: str) -> int:
    return httpx.get(f"{world.fhir.server.base_url}/{reference}", headers=world.fhir.headers).status_code


async def test_a_vital_does_not_name_a_visit_its_wave_held_back_for_a_missing_patient(world: World) -> None:
    """A patient's Create is dead-lettered (`invalid-resource`: a Gender option the map does not translate), so
    its consent is known but no Patient exists. The patient is admitted, and a heart rate is recorded in that
    visit, the vital's subject being another patient already written; the visit's Create and the vital's come in
    one Service Bus batch. The visit passes its consent gate and waits in the write (`target-pending`: its subject
    is not in FHIR, docs/convergence.md section 5); the vital names the visit by the id its Create would have made
    (`facts.resolve`: the visit's Create is in the batch) and, since 72d69da, is held back only when the visit's
    job fails after the vital's wave began: `_wave` collects `making` from the jobs still to write, and the visit
    got its `target-pending` before that, so it is no maker and the vital goes out. FHIR: the Observation is
    `written`, completed, with `encounter.reference` = `Encounter/<id>`, a resource the server does not have (404);
    on a server enforcing referential integrity the vital is refused (`fhir-rejected`) and dead-lettered. The
    commit's own promise: "a Create held back by its own gates, or failed, lends its id to no lookup". What the user
    should see: the vital waits (`target-pending`) for its visit, as it would had the visit's write been refused."""
    dv = world.dataverse
    stranger, refused = dv.patient(gendercode=Choice(100000000))
    assert states(await world.send(refused)) == [("dead-lettered", "invalid-resource")]
    patient, created = dv.patient()
    assert states(await world.send(created)) == [("written", None)]
    visit, admitted = dv.encounter(stranger)
    vital, observed = dv.observation(patient, visit)
    results = await world.send(admitted, observed)
    seen = [(r.state, r.reason.value if r.reason else None) for r in results]
    assert seen[0] == ("retry", "target-pending"), seen
    assert resources_of(world.fhir, "Encounter", ENCOUNTER_SYSTEM, visit) == []
    if seen[1][0] == "written":
        observation = the_resource(world.fhir, "Observation", OBSERVATION_SYSTEM, vital)
        reference = observation["encounter"].get("reference")
        assert reference is None or _status_of(world, reference) == 200, (
            f"the vital was written naming {reference} ({_status_of(world, reference)}), its visit not made: {seen}")
    else:
        assert seen[1] == ("retry", "target-pending"), seen
