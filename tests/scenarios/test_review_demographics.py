"""Review of patient demographics and medical identifiers as a registration clerk's edits in Dataverse produce
them, on records that came from FHIR: reproducers through the real pipeline (FHIR dev server, Azurite). Each test
fails on the code it was written against, for the reason its docstring gives."""

from __future__ import annotations

from datetime import date
from typing import Any

from devtools.messages import Choice
from tests.scenarios.checks import strip_marks
from tests.scenarios.conftest import World
from tests.scenarios.dataverse import MRN, SYNC_USER, Sent
from tests.scenarios.test_items import ingested_patient, states

V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"


def _ingested_contact(world: World, seeded: dict[str, Any], **columns: Any) -> tuple[str, Sent]:
    """The FHIR→Dataverse sync's contact of `seeded`, made through the upsert API as its own user (an echo)."""
    return world.dataverse.patient(user=SYNC_USER, fhir_id=seeded["id"], firstname="Imani", middlename="Grace",
                                   lastname="Okafor", telephone1="+1 555 0170", birthdate=date(1979, 3, 14),
                                   gendercode=Choice(2), **columns)


async def test_d1_a_patient_who_moved_to_another_city_keeps_no_district_of_the_old_address(world: World) -> None:
    """The clerk records a move: a patient from FHIR whose address another system gave with a county (`district`
    "Kings", Brooklyn NY) now lives in Boston MA. Street, second line, city, state and postal code are changed in
    Dataverse; the map owns those parts of the home address, not `district`.

    FHIR R4 Address (https://hl7.org/fhir/R4/datatypes.html#Address): `district` is "Name of the administrative area
    (county)" of that same address, one of its parts. The product already drops the address `text` when it changes a
    part (docs/convergence.md section 1, `paths._TEXT_PARTS`, which lists `district` as a part): "leaving it would
    misstate the value". The district is such a statement of the old place, and it is left.

    Should: the address no longer names Kings county once its city, state and postal code are Boston's (the part
    the map does not own goes, as the text does). Did: FHIR holds line "5 Beacon St", city Boston, state MA,
    postal code 02108 and district "Kings": a Boston address in a Brooklyn county, for every reader of the record
    (its `period.start` 2010, when the Brooklyn address came into use, is kept on it too)."""
    old = {"line": ["12 Elm St", "Apt 4"], "city": "Brooklyn", "district": "Kings", "state": "NY",
           "postalCode": "11201", "country": "US"}
    seeded = ingested_patient(world, address=[old])
    contact, ingested = _ingested_contact(world, seeded, address1_line1="12 Elm St", address1_line2="Apt 4",
                                          address1_city="Brooklyn", address1_stateorprovince="NY",
                                          address1_postalcode="11201", address1_country="US")
    moved = world.dataverse.update("contact", contact, {
        "address1_line1": "5 Beacon St", "address1_line2": None, "address1_city": "Boston",
        "address1_stateorprovince": "MA", "address1_postalcode": "02108"})
    assert states(await world.send_each(ingested, moved)) == [("skipped", "echo"), ("written", None)]
    [address] = world.fhir.get(f"Patient/{seeded['id']}")["address"]
    assert (address["line"], address["city"], address["state"], address["postalCode"]) == (
        ["5 Beacon St"], "Boston", "MA", "02108")
    assert address.get("district") != "Kings", address


def _brooklyn_since_2010(world: World, street: str) -> tuple[dict[str, Any], str, Sent]:
    """A patient from FHIR whose home address on `street`, Brooklyn, has been in use since 2010-05-01, and the
    sync's contact of it (an echo)."""
    seeded = ingested_patient(world, address=[{"use": "home", "line": [street], "city": "Brooklyn", "state": "NY",
                                               "postalCode": "11201", "country": "US",
                                               "period": {"start": "2010-05-01"}}])
    contact, ingested = _ingested_contact(world, seeded, address1_line1=street, address1_city="Brooklyn",
                                          address1_stateorprovince="NY", address1_postalcode="11201",
                                          address1_country="US")
    return seeded, contact, ingested


async def test_d1b_a_patient_who_moved_keeps_no_period_of_the_old_address(world: World) -> None:
    """As test_d1, the Brooklyn address from FHIR given with the period it has been in use (since 2010-05-01).

    FHIR R4 Address.period: "Time period when address was/is in use". Said of the Brooklyn place, not of Boston's.
    Should: the Boston address holds no period (the map does not own it: when the patient moved in is not known).
    Did: the Boston address "in use since 2010", which a reader takes for the patient's address of fourteen years."""
    seeded, contact, ingested = _brooklyn_since_2010(world, "12 Elm St")
    moved = world.dataverse.update("contact", contact, {
        "address1_line1": "5 Beacon St", "address1_city": "Boston", "address1_stateorprovince": "MA",
        "address1_postalcode": "02108"})
    assert states(await world.send_each(ingested, moved)) == [("skipped", "echo"), ("written", None)]
    [address] = world.fhir.get(f"Patient/{seeded['id']}")["address"]
    assert (address["line"], address["city"]) == (["5 Beacon St"], "Boston"), address
    assert "period" not in address, address


async def test_d1c_a_corrected_street_keeps_the_period_of_the_address(world: World) -> None:
    """The clerk corrects a typo in the street of the same address ("12 Elm St" for "12 Elm Rd"): the place is the
    same, so when it came into use still holds. Should: the period stays (only a changed city, state, postal code
    or country is a move)."""
    seeded, contact, ingested = _brooklyn_since_2010(world, "12 Elm Rd")
    corrected = world.dataverse.update("contact", contact, {"address1_line1": "12 Elm St"})
    assert states(await world.send_each(ingested, corrected)) == [("skipped", "echo"), ("written", None)]
    [address] = world.fhir.get(f"Patient/{seeded['id']}")["address"]
    assert (address["line"], address.get("period")) == (["12 Elm St"], {"start": "2010-05-01"}), address


async def test_d2_an_mrn_moved_to_another_hospitals_system_keeps_no_assigner_of_the_old_one(world: World) -> None:
    """The clerk corrects an MRN that came from FHIR: the ingest copied it with Hospital A's system, and it is in
    fact Hospital B's record number, so the row's Identifier System is changed to B's namespace (value unchanged).
    FHIR holds the identifier with `assigner` {display "Hospital A"}, which the map does not own.

    FHIR R4 Identifier (https://hl7.org/fhir/R4/datatypes.html#Identifier): `system` "Establishes the namespace for
    the value"; `assigner` is the "Organization that issued/manages the identifier". The assigner is said of the
    namespace the system names: the product's own rule for what it does not own (docs/convergence.md section 1,
    `paths._DESCRIBED_BY`: "What describes a value goes with it when the value changes") drops a Coding's display
    when its system changes, but has no such entry for an Identifier's system.

    Should: once the system is B's, FHIR no longer says Hospital A issued the identifier (the assigner goes with the
    old system). Did: the identifier reads system B, value MRN-7001, assigner "Hospital A": B's number attributed to
    A, the misattribution the correction was made to remove."""
    typed = {"coding": [{"system": V2_0203, "code": "MR"}]}
    seeded = ingested_patient(world, identifier=[{"system": MRN, "value": "MRN-7001", "type": typed,
                                                  "assigner": {"display": "Hospital A"}}])
    contact, ingested = _ingested_contact(world, seeded)
    mrn, mrn_ingested = world.dataverse.identifier(contact, MRN, "MRN-7001", user=SYNC_USER,
                                                   msemr_type=Choice(935000003))
    corrected = world.dataverse.update("msemr_medicalidentifier", mrn,
                                       {"msemr_identifiersystem": "http://hospital-b.example.org/mrn"})
    assert states(await world.send_each(ingested, mrn_ingested, corrected)) == [
        ("skipped", "echo"), ("skipped", "echo"), ("written", None)]
    [item] = [strip_marks(i) for i in world.fhir.get(f"Patient/{seeded['id']}")["identifier"]
              if i.get("value") == "MRN-7001"]
    assert item["system"] == "http://hospital-b.example.org/mrn"
    assert item.get("assigner") != {"display": "Hospital A"}, item
