"""The scenario suite: each hospital sequence (tests/scenarios/sequences.py) delivered in Dataverse's order, shuffled,
with every message twice, and split across two instances running at once; after each run, for every row, FHIR
equals the row's last state in Dataverse (see tests/scenarios/checks.py)."""

from __future__ import annotations

import zlib
from typing import Any

import pytest

from devtools.messages import Choice, Lookup
from tests.scenarios.checks import (
    ENCOUNTER_CLASS,
    ENCOUNTER_STATUS,
    ENCOUNTER_SYSTEM,
    OBSERVATION_STATUS,
    OBSERVATION_SYSTEM,
    ROW_SYSTEM,
    check_contact,
    check_identifier,
    check_provenance,
    resources_of,
    the_resource,
)
from tests.scenarios.conftest import World
from tests.scenarios.dataverse import PATIENT
from tests.scenarios.sequences import CONSENT, SEQUENCES, Expect

MODES = ("in-order", "shuffled", "duplicated", "two-instances")


def consented_state(world: World, contact: str) -> dict[str, Any] | None:
    """The contact's state at its last save while it consented (what FHIR must hold once consent is withdrawn);
    None if it never did. A practitioner needs no consent: its last state."""
    saves = [s.state for s in world.dataverse.sent if (s.table, s.row_id) == ("contact", contact)]
    last = saves[-1]
    if last.get("msemr_contacttype") != PATIENT:
        return last
    consented = [state for state in saves if state.get(CONSENT) and state.get("msemr_contacttype") == PATIENT]
    return consented[-1] if consented else None


def check_run(world: World, expect: Expect) -> int:
    """The convergence checks; returns the number of versions written (each with its one Provenance)."""
    dv, fhir = world.dataverse, world.fhir
    versions = 0
    patients: dict[str, dict[str, Any]] = {}
    for contact in expect.contacts:
        last = dv.row("contact", contact)
        state = consented_state(world, contact)
        kind = "Patient" if last.get("msemr_contacttype") == PATIENT else "Practitioner"
        if state is None:
            assert resources_of(fhir, "Patient", ROW_SYSTEM, contact) == []
            continue
        seeded = expect.seeded.get(contact)
        if seeded is not None:  # it came from FHIR: that very resource, none beside it
            resource = check_contact(fhir, contact, state, resource_type=kind,
                                     seeded={**seeded, "identifier": [
                                         i for i in seeded["identifier"] if i not in expect.adopted]})
            assert resource["id"] == seeded["id"]
        else:
            resource = check_contact(fhir, contact, state, resource_type=kind)
        if kind == "Patient":
            patients[contact] = resource
        versions += check_provenance(fhir, resource)
    for identifier in expect.identifiers:
        row = dv.row("msemr_medicalidentifier", identifier)
        parent = row["msemr_assignee"]
        assert isinstance(parent, Lookup)
        parent_state = dv.row("contact", parent.row_id)
        consented = bool(parent_state.get(CONSENT))
        check_identifier(patients, identifier, row if consented and parent.row_id in patients else None)
    encounters: dict[str, dict[str, Any]] = {}
    for encounter in expect.encounters:
        row = dv.row("msemr_encounter", encounter)
        resource = encounters[encounter] = the_resource(fhir, "Encounter", ENCOUNTER_SYSTEM, encounter)
        status, klass = row["msemr_encounterstatus"], row["msemr_encounterclass"]
        assert isinstance(status, Choice) and isinstance(klass, Choice)
        assert resource["status"] == ENCOUNTER_STATUS[int(status)]
        assert resource["class"]["code"] == ENCOUNTER_CLASS[int(klass)]
        subject = row["msemr_subjectpatient"]
        assert isinstance(subject, Lookup)
        assert resource["subject"]["reference"] == f"Patient/{patients[subject.row_id]['id']}"
        period = resource.get("period", {})
        assert period.get("start") == instant(row["msemr_encounterstartdate"])
        assert period.get("end") == instant(row.get("msemr_encounterenddate"))
        assert resource.get("length", {}).get("value") == row.get("msemr_encounterlength")
        versions += check_provenance(fhir, resource)
    for observation in expect.observations:
        row = dv.row("msemr_observation", observation)
        resource = the_resource(fhir, "Observation", OBSERVATION_SYSTEM, observation)
        subject, context = row["msemr_subjecttypepatient"], row["msemr_conexttypeencounter"]
        assert isinstance(subject, Lookup) and isinstance(context, Lookup)
        assert resource["status"] == OBSERVATION_STATUS[int(row["msemr_status"])]
        # Literal references, whatever order the rows' messages came in.
        assert resource["subject"]["reference"] == f"Patient/{patients[subject.row_id]['id']}"
        assert resource["encounter"]["reference"] == f"Encounter/{encounters[context.row_id]['id']}"
        quantity = resource.get("valueQuantity", {})
        assert quantity.get("value") == row.get("msemr_valuetypequantityvalue")
        assert quantity.get("unit") == row.get("msemr_valuequantityunit")
        assert resource.get("valueString") == row.get("msemr_valuestring")
        assert resource.get("note") == ([{"text": row["msemr_comment"]}] if row.get("msemr_comment") else None)
        versions += check_provenance(fhir, resource)
    return versions


def instant(value: Any) -> str | None:
    """A Dataverse date and time as FHIR holds it (UTC, `Z`)."""
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(SEQUENCES))
async def test_a_hospital_sequence_converges(world: World, name: str, mode: str):
    expect = SEQUENCES[name](world.dataverse, world.fhir)
    if expect.ordered_only and mode in ("shuffled", "two-instances"):
        pytest.skip("its outcome depends on receiving the consent change before the later saves (documented)")
    await world.deliver(world.dataverse.sent, mode=mode, seed=zlib.crc32(name.encode()))
    versions = check_run(world, expect)
    assert versions >= 1
    written = [r for _, r in world.results if r.state == "written"]
    assert all(r.resource and r.provenance for r in written)
    # No message was lost: each ended written or skipped (a reason), or dead-lettered with one.
    assert all(r.state in ("written", "skipped", "dead-lettered") or r.settlement == "reschedule"
               for _, r in world.results)
    assert not [r for _, r in world.results if r.state == "dead-lettered"], [
        (r.reason, r.detail) for _, r in world.results if r.state == "dead-lettered"]
