"""Hospital sequences found by an eleventh review, of this release's own fixes (a genuine Practitioner's identifier
rows, a save retried while an older one arrives, the bound of the wait past a consent): each failed before its fix,
or holds what a fix must not break."""

from __future__ import annotations

import httpx

from devtools.faults import EntryFault, Fault
from devtools.messages import Lookup
from tests.scenarios.checks import (
    ROW_SYSTEM,
    check_contact,
    check_identifier,
    check_provenance,
    identifier_items,
    resources_of,
    the_resource,
)
from tests.scenarios.conftest import World
from tests.scenarios.dataverse import MRN, PRACTITIONER, Sent
from tests.scenarios.test_items import states

NPI = "http://hl7.org/fhir/sid/us-npi"


# ---- item 3: a genuine Practitioner's identifier rows -------------------------------------------------------------


async def test_r2_genuine_practitioner_identifier_received_after_an_unrelated_edit_is_skipped_at_once(world: World):
    """A practitioner (always one) gets an NPI row; then their phone is edited. The NPI row's message comes after
    the phone edit's (Service Bus does not order rows). The contact was a Practitioner when the row was saved: the
    row is skipped `no-entity-map` at once, as before; it must not wait an hour as `target-pending`."""
    dv = world.dataverse
    doc, created = dv.patient(msemr_contacttype=PRACTITIONER, firstname="Ines", lastname="Duarte")
    _, npi_created = dv.identifier(doc, NPI, "1234567893")
    phone = dv.update("contact", doc, {"telephone1": "+1 555 0199"})
    assert states(await world.send_each(created, phone)) == [("written", None)] * 2
    assert states(await world.send(npi_created)) == [("skipped", "no-entity-map")]


async def test_r2_genuine_practitioner_identifier_in_one_batch_with_a_later_edit_is_skipped_at_once(world: World):
    """As above, the NPI row's Create and the phone edit received in one batch."""
    dv = world.dataverse
    doc, created = dv.patient(msemr_contacttype=PRACTITIONER, firstname="Ines", lastname="Duarte")
    assert states(await world.send(created)) == [("written", None)]
    _, npi_created = dv.identifier(doc, NPI, "1234567893")
    phone = dv.update("contact", doc, {"telephone1": "+1 555 0199"})
    assert states(await world.send(npi_created, phone)) == [("skipped", "no-entity-map"), ("written", None)]


async def test_r2_identifier_row_moved_from_a_genuine_practitioner_to_a_patient(world: World):
    """An MRN row entered on a practitioner's contact by mistake (skipped: not a Patient), then moved to the
    patient it belongs to. Dataverse: the MRN on the patient. FHIR: the MRN on the patient's Patient, no Patient
    made or touched for the practitioner, nothing dead-lettered."""
    dv = world.dataverse
    doc, doc_created = dv.patient(msemr_contacttype=PRACTITIONER, firstname="Ines", lastname="Duarte")
    pat, pat_created = dv.patient(firstname="Bo", lastname="Lindqvist")
    mrn, mrn_created = dv.identifier(doc, MRN, "MRN-9101")
    moved = dv.update("msemr_medicalidentifier", mrn, {"msemr_assignee": Lookup("contact", pat)})
    await world.deliver([doc_created, pat_created, mrn_created, moved], mode="in-order")
    outcomes = [(s.table, r.state, r.reason.value if r.reason else None) for s, r in world.results]
    assert not [o for o in outcomes if o[1] == "dead-lettered"], outcomes
    assert resources_of(world.fhir, "Patient", ROW_SYSTEM, doc) == []
    patient = the_resource(world.fhir, "Patient", ROW_SYSTEM, pat)
    check_identifier({pat: patient}, mrn, dv.row("msemr_medicalidentifier", mrn))
    practitioner = the_resource(world.fhir, "Practitioner", ROW_SYSTEM, doc)
    assert identifier_items(practitioner, mrn) == []


# ---- item 2: versions of retried messages no longer seen, with transient failures -------------------------------


async def _two_saves(world: World, column: str, older: str, newer: str) -> tuple[str, Sent, Sent]:
    """A patient written, then `column` saved twice: (the contact, the older save v2, the newer v3)."""
    dv = world.dataverse
    contact, created = dv.patient()
    assert states(await world.send(created)) == [("written", None)]
    return contact, dv.update("contact", contact, {column: older}), dv.update("contact", contact, {column: newer})


async def test_r2_newer_save_failing_transiently_then_an_older_one_received(world: World):
    """A patient's phone is corrected twice (v2, then v3). v3 is received first and FHIR is down for it; v2 comes
    while v3 waits for its retry; then v3's retry. FHIR: v3's phone, one Provenance per version written."""
    dv = world.dataverse
    contact, v2, v3 = await _two_saves(world, "telephone1", "+1 555 0102", "+1 555 0103")
    world.x.transport.add(Fault(path_endswith="/R4", status=503, times=-1))
    assert states(await world.send(v3)) == [("retry", "fhir-unavailable")]
    world.x.transport.faults.clear()
    await world.send(v2)
    await world.send(v3, delivery_count=2)
    resource = check_contact(world.fhir, contact, dv.row("contact", contact))
    check_provenance(world.fhir, resource)


async def test_r2_newer_save_whose_provenance_failed_then_an_older_one_received(world: World):
    """v3 is written but its Provenance is not (retried, `provenance-failed`); v2, older, is received before v3's
    retry. v2 must not be written over v3 (FHIR already holds v3, newer), or if it is, v3's retry must put v3
    back: FHIR ends with v3's phone, every version of ours with one Provenance."""
    dv = world.dataverse
    contact, v2, v3 = await _two_saves(world, "telephone1", "+1 555 0102", "+1 555 0103")
    world.x.transport.add_entry(EntryFault(url_contains="Provenance", status=500, times=-1))
    world.x.transport.add(Fault(url_contains="Provenance", status=500, times=-1))
    first = states(await world.send(v3))
    world.x.transport.entry_faults.clear()
    world.x.transport.faults.clear()
    second = states(await world.send(v2))
    third = states(await world.send(v3, delivery_count=2))
    resource = check_contact(world.fhir, contact, dv.row("contact", contact))
    check_provenance(world.fhir, resource)
    assert (first, second) == ([("retry", "provenance-failed")], [("skipped", "stale")]), (first, second, third)


async def test_r2_older_save_written_while_newer_one_waits_for_outage_in_two_instances(world: World):
    """The same as the first, v3 failing on instance X with a connection error, v2 then processed on Y."""
    dv = world.dataverse
    contact, v2, v3 = await _two_saves(world, "lastname", "Okafor-Reyes", "Reyes")
    world.x.transport.add(Fault(path_endswith="/R4", error=httpx.ConnectError, times=-1))
    assert states(await world.send(v3))[0][0] == "retry"
    world.x.transport.faults.clear()
    await world.send(v2, instance=1)
    await world.send(v3, delivery_count=2)
    resource = check_contact(world.fhir, contact, dv.row("contact", contact))
    check_provenance(world.fhir, resource)


# ---- item 1: the wait for a referenced row after a consent wait is bounded -------------------------------------


async def test_r2_observation_past_its_gate_by_more_than_twice_the_max_delay_stops_waiting_for_its_encounter(
        world: World):
    """O waited for the patient's consent (3 tries), got past it 31 minutes ago and has waited since for its
    Encounter, which was never written (its message dead-lettered). Past 2 x WRITEBACK_RETRY_MAX_DELAY_SECONDS
    (30 min) it is written, the encounter referred to by identifier only."""
    import uuid
    from datetime import UTC, datetime, timedelta

    from tests.scenarios.checks import OBSERVATION_SYSTEM
    from writeback.pipeline import Envelope
    from writeback.retry import CONSENT_WAITS, FIRST_TRIED, GATE_OPENED

    dv = world.dataverse
    contact, created = dv.patient()
    visit, _ = dv.encounter(contact)  # never received
    obs, observed = dv.observation(contact, visit)
    assert states(await world.send(created)) == [("written", None)]
    opened = (datetime.now(UTC) - timedelta(minutes=31)).isoformat()
    envelope = Envelope(observed.bytes(), message_id=uuid.uuid4().hex, delivery_count=7,
                        properties={CONSENT_WAITS: 3, GATE_OPENED: opened,
                                    FIRST_TRIED: (datetime.now(UTC) - timedelta(hours=1)).isoformat()})
    [result] = await world.x.pipeline.process_many([envelope])
    assert (result.state, result.reason) == ("written", None), (result.state, result.reason, result.detail)
    observation = the_resource(world.fhir, "Observation", OBSERVATION_SYSTEM, obs)
    assert "reference" not in observation["encounter"], observation["encounter"]
