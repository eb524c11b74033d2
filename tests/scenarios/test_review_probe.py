"""Hospital sequences found by a probe with realistic hospital data (observation value types and status
corrections, an encounter walked through its statuses and period, negative / tiny / long decimals, times near
midnight, a birth date before 1970, unicode names, a 50,000-character comment, deactivation, UpdateMultiple and
Merge messages). Only what fails today is kept here; each asserts the contract (README, docs/convergence.md)."""

from __future__ import annotations

from tests.scenarios.checks import ENCOUNTER_SYSTEM, check_provenance, resources_of
from tests.scenarios.conftest import World
from tests.scenarios.test_items import states

UCUM = "http://unitsofmeasure.org"
UCUM_TIME_CODES = {"ms", "s", "min", "h", "d", "wk", "mo", "a"}


async def test_p10_an_encounters_length_is_written_as_a_valid_fhir_duration(world: World):
    """The clerk closes a 45-minute outpatient visit and fills its Duration (`msemr_encounterlength`, a decimal
    column: "Quantity of time the encounter lasted") with 45. Dataverse holds 45 (the hospital's unit of time).

    FHIR must hold an Encounter.length that is a valid R4 Duration: invariant drt-1 says "There SHALL be a code if
    there is a value and it SHALL be an expression of time. If system is present, it SHALL be UCUM". Else the
    message must end `invalid-resource` (README: maps write resources "with their value sets and invariants
    checked before a write"). Today it is written as `"length": {"value": 45}`: a duration with no unit at all
    (45 minutes? hours? days?), which the FHIR server stores and every consumer must guess."""
    dv = world.dataverse
    contact, created = dv.patient()
    visit, admitted = dv.encounter(contact, msemr_encounterlength=45)
    results = await world.send_each(created, admitted)
    found = resources_of(world.fhir, "Encounter", ENCOUNTER_SYSTEM, visit)
    if states(results)[1] == ("dead-lettered", "invalid-resource"):
        assert found == [] and "45" not in (results[1].detail or "")
        return
    assert states(results) == [("written", None)] * 2, [r.detail for r in results]
    [encounter] = found
    length = encounter["length"]
    assert length.get("value") == 45
    assert length.get("system") == UCUM and length.get("code") in UCUM_TIME_CODES, (
        f"Encounter.length violates drt-1 (no UCUM time code): {length}")
    check_provenance(world.fhir, encounter)
