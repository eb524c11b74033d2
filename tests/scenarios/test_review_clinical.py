"""Clinical rows (visits and vital signs) as a clinician's edits in Dataverse produce them, through the real pipeline
(FHIR dev server, Azurite), checked against FHIR R4. Found by a review of encounters and observations; each test
fails on the code it was written against, for the reason its docstring gives.

Tried and found right (not kept here): a visit walked planned → in-progress → finished → entered-in-error, its class
changed, its start or end cleared, its length set, changed and cleared with images; a vital recorded, its value
made negative, tiny (1E-7) or long, its unit changed, its status amended, corrected and entered-in-error, its
effective time changed and cleared, its value cleared; a Target-only value string and effective time replacing a
record's valueCodeableConcept and effectivePeriod. Each version written had its one Provenance.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from devtools.messages import Choice
from tests.scenarios.checks import ENCOUNTER_SYSTEM, check_provenance, strip_marks, the_resource
from tests.scenarios.conftest import World
from tests.scenarios.dataverse import SYNC_USER
from tests.scenarios.test_items import ingest, ingested_observation, ingested_patient, states, target_only

ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
UCUM = "http://unitsofmeasure.org"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
DATA_ABSENT = "http://terminology.hl7.org/CodeSystem/data-absent-reason"


async def test_a_heart_rate_entered_on_a_vital_from_fhir_marked_not_performed_drops_its_data_absent_reason(
        world: World) -> None:
    """The clinician: a heart rate came from FHIR without a value, `dataAbsentReason` not-performed (the monitor
    was off). The nurse takes the pulse and enters 88 beats/minute on the row in Dataverse.

    FHIR R4 (https://hl7.org/fhir/R4/observation.html#invs): obs-6, "dataAbsentReason SHALL only be present if
    Observation.value[x] is not present" (`dataAbsentReason.empty() or value.empty()`). The value replaces the
    reason it was missing, as the product already makes a written value[x] replace the other types of value[x]
    (docs/convergence.md §1, `converge._one_choice`).

    Should: be written, the Observation holding valueQuantity 88 and no dataAbsentReason, with its Provenance.
    Does: the write keeps the not-performed reason beside the new value; the dev server refuses the resource (HTTP
    400, invariant) and the nurse's reading is dead-lettered `fhir-rejected`, never reaching FHIR. (A server that
    does not check invariants on write, as Azure's, stores an Observation that breaks obs-6.)"""
    dv = world.dataverse
    seeded_patient = ingested_patient(world)
    contact, ingested = ingest(world, seeded_patient)
    seeded = ingested_observation(world, seeded_patient["id"], "8867-4", dataAbsentReason={
        "coding": [{"system": DATA_ABSENT, "code": "not-performed"}]})
    observation, echo = dv.observation(contact, user=SYNC_USER, msemr_azurefhirid=seeded["id"],
                                       msemr_valuetypequantityvalue=None, msemr_valuequantityunit=None)
    entered = dv.update("msemr_observation", observation, {"msemr_valuetypequantityvalue": Decimal("88"),
                                                           "msemr_valuequantityunit": "beats/minute"})
    results = await world.send_each(ingested, echo, entered)
    assert states(results) == [("skipped", "echo")] * 2 + [("written", None)], results[-1].detail
    written = world.fhir.get(f"Observation/{seeded['id']}")
    assert written["valueQuantity"]["value"] == 88
    assert "dataAbsentReason" not in written, "obs-6: a value beside the reason it is missing"
    check_provenance(world.fhir, written)


async def test_a_corrected_heart_rate_from_fhir_loses_the_high_flag_said_of_its_old_value(world: World) -> None:
    """The clinician: a heart rate of 180 came from FHIR flagged High (`interpretation` H, reference range 60-100):
    a monitor artefact. The nurse corrects it in Dataverse to 72 and sets its status to Corrected.

    FHIR R4 (https://hl7.org/fhir/R4/observation-definitions.html#Observation.interpretation): interpretation is
    "A categorical assessment of an observation value. For example, high, low, normal." It was said of 180; beside
    72 it misstates the result. The product's own rule (docs/convergence.md §1, `paths._DESCRIBED_BY`): what
    describes a value goes with it when the value changes and the map does not own it, "leaving it would misstate
    the value" (a Quantity's comparator, test_14j3).

    Should: be written with value 72, status corrected, and no interpretation left from the old value.
    Does: FHIR holds a corrected heart rate of 72 beats/minute flagged High."""
    dv = world.dataverse
    seeded_patient = ingested_patient(world)
    contact, ingested = ingest(world, seeded_patient)
    seeded = ingested_observation(
        world, seeded_patient["id"], "8867-4", valueQuantity={"value": 180, "unit": "beats/minute"},
        interpretation=[{"coding": [{"system": INTERPRETATION, "code": "H"}]}],
        referenceRange=[{"low": {"value": 60, "unit": "beats/minute"}, "high": {"value": 100, "unit": "beats/minute"}}])
    observation, echo = dv.observation(contact, user=SYNC_USER, msemr_azurefhirid=seeded["id"],
                                       msemr_valuetypequantityvalue=Decimal("180"))
    corrected = dv.update("msemr_observation", observation, {"msemr_valuetypequantityvalue": Decimal("72"),
                                                             "msemr_status": Choice(935000004)})
    results = await world.send_each(ingested, echo, corrected)
    assert states(results) == [("skipped", "echo")] * 2 + [("written", None)], results[-1].detail
    written = world.fhir.get(f"Observation/{seeded['id']}")
    assert (written["status"], written["valueQuantity"]["value"]) == ("corrected", 72)
    assert "interpretation" not in written, f"72 beats/minute still flagged: {written['interpretation']}"


CLEARS: list[Any] = [
    pytest.param("msemr_encounterclass", "class", ("dead-lettered", "invalid-resource"),
                 {"code": "AMB", "system": ACT_CODE}, id="class"),
    pytest.param("msemr_encounterlength", "length", ("written", None), None, id="length"),
]


@pytest.mark.parametrize(("column", "element", "outcome", "after"), CLEARS)
async def test_a_target_only_clear_of_a_visit_column_leaves_no_constant_without_its_value(
        world: World, column: str, element: str, outcome: tuple[str, str | None], after: dict[str, Any] | None
) -> None:
    """The clinician: on a visit (class Outpatient, length 45), the clerk empties the Class, or the Duration, and
    saves. The step is registered without images (README: "Without images a step still works, Target-only"), so
    the message holds only the emptied column.

    FHIR R4: Encounter.class is 1..1 (https://hl7.org/fhir/R4/encounter.html); a Coding of it with a system and no
    code names no class. Encounter.length is a Duration, whose drt-1 in R4 is `code.exists() implies ((system =
    %ucum) and value.exists())` (https://hl7.org/fhir/R4/datatypes.html#Duration; FHIR-28415): a code with no
    value breaks it. The product's contract (docs/convergence.md §1): "A constant is written only inside an element
    that holds a value of the row: a cleared class leaves no `class` with a system and no code ... A required
    element the row leaves empty (Encounter.class ...) makes the change `invalid-resource`" (test_14b, with
    images).

    Should: the class clear refused `invalid-resource`, FHIR keeping its class; the length clear written, no
    `length` left. Does: both are `written`; FHIR holds `class: {system}` without a code, or `length: {system,
    code: min, unit: min}` without a value: the map's constants, kept by the Target-only write after their value
    went."""
    dv = world.dataverse
    contact, created = dv.patient()
    visit, admitted = dv.encounter(contact, msemr_encounterlength=Decimal("45"))
    assert states(await world.send_each(created, admitted)) == [("written", None)] * 2
    cleared = target_only(dv.update("msemr_encounter", visit, {column: None}))
    [result] = await world.send(cleared)
    encounter = strip_marks(the_resource(world.fhir, "Encounter", ENCOUNTER_SYSTEM, visit))
    assert states([result]) == [outcome], (result.detail, encounter.get(element))
    assert encounter.get(element) == after, f"Encounter.{element} left as {encounter.get(element)}"
