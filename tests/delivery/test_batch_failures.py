"""How the batch path fails, against the real FHIR dev server behind a fault-injecting transport: one unreachable
dependency holds back only what needs it, an answer that does not rule out a write is treated as a possible
write, and the invocation's deadline stops all of a call's work. No speed is asserted."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from devtools.faults import EntryFault, Fault
from devtools.messages import Choice, Lookup, context
from tests.delivery.conftest import Fhir, Rig, create_message, identifier_message, new_patient, update_message
from writeback.bundles import BatchDelivery
from writeback.decide import resource_id
from writeback.errors import WritebackError
from writeback.leases import LocalLeases
from writeback.pipeline import Envelope, Pipeline, Result
from writeback.reasons import Reason


def _batch_rig(rig_factory: Callable[..., Rig], leases: LocalLeases | None = None,
               **overrides: str) -> tuple[Rig, Pipeline]:
    rig = rig_factory(**overrides)
    return rig, Pipeline(rig.pipeline.maps, rig.settings, BatchDelivery(rig.client, leases))


async def _send_many(pipeline: Pipeline, bodies: list[dict[str, Any]]) -> list[Result]:
    return await pipeline.process_many([Envelope(json.dumps(b).encode()) for b in bodies])


def _provenances_of(fhir: Fhir, resource: dict[str, Any]) -> dict[str, str]:
    """Each version of `resource` that a Provenance names → that Provenance's activity (at most one each, or the
    test fails)."""
    kind, rid = resource["resourceType"], resource["id"]
    named: dict[str, str] = {}
    for entry in fhir.get(f"{kind}/{rid}/_history?_count=50")["entry"]:
        version = entry["resource"]["meta"]["versionId"]
        provenances = fhir.search(f"Provenance?target={kind}/{rid}/_history/{version}")
        assert len(provenances) <= 1, f"{len(provenances)} Provenance records name version {version}"
        if provenances:
            named[version] = provenances[0]["activity"]["coding"][0]["code"]
    return named


class LeaseStoreDown(LocalLeases):
    """Stands in for the ledger's create leases while Table Storage is out of reach: `OutcomeStore.acquire`
    raises `outcome-store-unavailable` then."""

    async def acquire(self, key: str, seconds: float, holder: str = "", version: str = "") -> bool:
        raise WritebackError(Reason.OUTCOME_STORE_UNAVAILABLE, "Table Storage is unreachable (take the create lease)")


async def test_a_lease_store_out_of_reach_holds_back_the_creates_only(rig_factory, fhir: Fhir):
    """A create needs its lease; an update of a resource that exists does not: it is written, the create waits."""
    _, pipeline = _batch_rig(rig_factory)
    old_id, old = new_patient(lastname="Alreadyhere")
    assert (await _send_many(pipeline, [create_message(old_id, old)]))[0].state == "written"
    _, down = _batch_rig(rig_factory, LeaseStoreDown())
    new_id, new = new_patient(lastname="Notyet")
    results = await _send_many(down, [create_message(new_id, new),
                                      update_message(old_id, old, {"lastname": "Stillhere", "versionnumber": 11})])

    assert [(r.state, r.reason) for r in results] == [("retry", Reason.OUTCOME_STORE_UNAVAILABLE),
                                                      ("written", None)]
    assert fhir.search(f"Patient?identifier=urn:dataverse:contact|{new_id}") == []
    (patient,) = fhir.search(f"Patient?identifier=urn:dataverse:contact|{old_id}")
    assert patient["name"][0]["family"] == "Stillhere"


def _observation(patient: str, encounter: str) -> tuple[str, dict[str, Any]]:
    row_id = new_patient()[0]
    row = {"msemr_observationid": row_id, "msemr_status": Choice(935000002),
           "msemr_code": Lookup("msemr_codeableconcept", new_patient()[0]),
           "msemr_subjecttypepatient": Lookup("contact", patient),
           "msemr_conexttypeencounter": Lookup("msemr_encounter", encounter), "versionnumber": 30}
    return row_id, context("Create", "msemr_observation", row_id, row, post=row)


async def test_a_lookup_whose_search_fails_waits_rather_than_writing_an_identifier_only_reference(
        rig_factory, fhir: Fhir):
    """Another process wrote the Encounter; this one does not know its id and searches for it. A failed search
    is not "no such Encounter": the Observation waits, then refers to `Encounter/<id>` once the search answers."""
    _, writer = _batch_rig(rig_factory)
    patient_id, patient = new_patient()
    encounter_id = new_patient()[0]
    encounter = {"msemr_encounterid": encounter_id, "msemr_encounterstatus": Choice(935000003),
                 "msemr_encounterclass": Choice(935000001),
                 "msemr_subjectpatient": Lookup("contact", patient_id), "versionnumber": 20}
    written = await _send_many(writer, [create_message(patient_id, patient),
                                        context("Create", "msemr_encounter", encounter_id, encounter, post=encounter)])
    assert [r.state for r in written] == ["written"] * 2, [r.detail for r in written]

    rig, reader = _batch_rig(rig_factory, FHIR_MAX_RETRIES="1")
    rig.transport.add_entry(EntryFault(method="GET", url_contains="Encounter?identifier", status=503, times=-1))
    observation_id, observation = _observation(patient_id, encounter_id)
    consent = update_message(patient_id, patient, {"telephone1": "+1 555 0177", "versionnumber": 11})
    results = await _send_many(reader, [consent, observation])

    assert [(r.state, r.reason) for r in results] == [("written", None), ("retry", Reason.FHIR_UNAVAILABLE)]
    assert fhir.search(f"Observation?identifier=urn:dataverse:msemr_observation|{observation_id}") == []

    rig.transport.entry_faults.clear()
    (again,) = await _send_many(reader, [observation])
    assert again.state == "written", again.detail
    (written_observation,) = fhir.search(f"Observation?identifier=urn:dataverse:msemr_observation|{observation_id}")
    (stored_encounter,) = fhir.search(f"Encounter?identifier=urn:dataverse:msemr_encounter|{encounter_id}")
    assert written_observation["encounter"]["reference"] == f"Encounter/{stored_encounter['id']}"


def _applied_then(status: int) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """The server applies the entry, and its answer is replaced by `status` (a gateway timing out, a 500 after
    the commit): the entry was written, though the answer says otherwise."""
    def rewrite(answer: dict[str, Any]) -> dict[str, Any]:
        return {"response": {"status": str(status)}}
    return rewrite


async def test_a_create_answered_500_after_it_was_applied_keeps_its_lease_and_its_provenance(
        rig_factory, fhir: Fhir):
    """A 500 does not say the create was not applied: it keeps its lease (no other writer may create over it),
    and the try that finds it written gives the version it made its one CREATE Provenance."""
    leases = LocalLeases()
    rig, pipeline = _batch_rig(rig_factory, leases, FHIR_MAX_RETRIES="1")
    row_id, row = new_patient(lastname="Twicesent")
    key = f"Patient/{resource_id('contact', row_id)}"
    transport = rig.transport
    transport.add_entry(EntryFault(method="PUT", url_contains="Patient/", rewrite=_applied_then(500), times=-1))
    (first,) = await _send_many(pipeline, [create_message(row_id, row)])

    assert (first.state, first.reason) == ("retry", Reason.FHIR_UNAVAILABLE)
    assert not await leases.acquire(key, 1), "the lease of a create that may have been applied was released"
    (patient,) = fhir.search(f"Patient?identifier=urn:dataverse:contact|{row_id}")  # it was applied

    transport.entry_faults.clear()
    await leases.release(key)  # as if it had expired
    (again,) = await _send_many(pipeline, [create_message(row_id, row)])
    assert again.state == "written", again.detail
    versions = [e["resource"]["meta"]["versionId"] for e in fhir.get(f"Patient/{patient['id']}/_history")["entry"]]
    # Each try made a version (newest first in the history): each gets one Provenance, the first a CREATE.
    assert _provenances_of(fhir, patient) == {versions[-1]: "CREATE", **dict.fromkeys(versions[:-1], "UPDATE")}


async def test_a_create_answered_503_is_known_not_applied_and_frees_its_lease(rig_factory, fhir: Fhir):
    leases = LocalLeases()
    rig, pipeline = _batch_rig(rig_factory, leases, FHIR_MAX_RETRIES="1")
    row_id, row = new_patient()
    rig.transport.add_entry(EntryFault(method="PUT", url_contains="Patient/", status=503, times=-1))
    (result,) = await _send_many(pipeline, [create_message(row_id, row)])

    assert (result.state, result.reason) == ("retry", Reason.FHIR_UNAVAILABLE)
    assert await leases.acquire(f"Patient/{resource_id('contact', row_id)}", 1)
    assert fhir.search(f"Patient?identifier=urn:dataverse:contact|{row_id}") == []


async def test_a_resent_create_answered_without_a_body_still_gets_its_provenance(rig_factory, fhir: Fhir):
    """The first try is applied and answered 502; the resend is answered 201 with no resource (a server that
    returns minimal answers). The version it made still gets its one CREATE Provenance."""
    rig, pipeline = _batch_rig(rig_factory)
    row_id, row = new_patient(lastname="Minimal")
    tries: list[int] = []

    def applied_then_502_then_minimal(answer: dict[str, Any]) -> dict[str, Any]:
        tries.append(1)
        return _applied_then(502)(answer) if len(tries) == 1 else {"response": answer["response"]}

    rig.transport.add_entry(EntryFault(method="PUT", url_contains="Patient/", times=2,
                                       rewrite=applied_then_502_then_minimal))
    (result,) = await _send_many(pipeline, [create_message(row_id, row)])

    assert result.state == "written", result.detail
    (patient,) = fhir.search(f"Patient?identifier=urn:dataverse:contact|{row_id}")
    versions = [e["resource"]["meta"]["versionId"] for e in fhir.get(f"Patient/{patient['id']}/_history")["entry"]]
    provenances = _provenances_of(fhir, patient)
    assert provenances[versions[-1]] == "CREATE"
    assert set(provenances) <= set(versions)


async def test_the_deadline_stops_the_calls_work_including_provenance_still_on_its_way(rig_factory, fhir: Fhir):
    """Past the invocation's deadline nothing of its call goes on (it would outlive the messages' lock): the
    call stops then, not when the slow answers come. Here the deadline comes while the identifier is being
    written into the Patient the batch created, whose Provenance is still on its way."""
    rig, pipeline = _batch_rig(rig_factory)
    answered: list[str] = []

    def slow(what: str) -> Callable[[httpx.Request], Awaitable[None]]:
        async def wait(request: httpx.Request) -> None:
            await asyncio.sleep(3)
            answered.append(what)
        return wait

    rig.transport.add(Fault(method="POST", path_endswith="/R4", body_contains=b"Provenance/",
                            before=slow("provenance"), times=-1))
    rig.transport.add(Fault(method="POST", path_endswith="/R4", body_contains=b'"ifMatch"',
                            before=slow("identifier"), times=-1))
    row_id, row = new_patient()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(1.0):
            await _send_many(pipeline, [create_message(row_id, row), identifier_message(row_id, "555-01-0999")])
    assert answered == [], "the call went on past its deadline until the slow answers came"
    assert len(fhir.search(f"Patient?identifier=urn:dataverse:contact|{row_id}")) == 1


async def test_a_create_only_ever_throttled_frees_its_lease(rig_factory, fhir: Fhir):
    """A whole bundle answered 429, then the create entry answered 429 on every try: never applied, so its lease
    is freed at once (the next try may create) rather than held as if it might have been."""
    leases = LocalLeases()
    rig, pipeline = _batch_rig(rig_factory, leases, FHIR_MAX_RETRIES="2")

    async def then_throttle_the_entry(request: httpx.Request) -> None:
        rig.transport.add_entry(EntryFault(method="PUT", url_contains="Patient/", status=429, times=-1))

    rig.transport.add(Fault(method="POST", path_endswith="/R4", body_contains=b'"PUT"', status=429, times=1,
                            before=then_throttle_the_entry))
    row_id, row = new_patient()
    (result,) = await _send_many(pipeline, [create_message(row_id, row)])

    assert (result.state, result.reason) == ("retry", Reason.FHIR_UNAVAILABLE)
    assert fhir.search(f"Patient?identifier=urn:dataverse:contact|{row_id}") == []
    assert await leases.acquire(f"Patient/{resource_id('contact', row_id)}", 1)


async def test_a_lookup_search_the_server_refuses_falls_back_to_an_identifier_reference(rig_factory, fhir: Fhir):
    """A server that answers the search with a refusal (it cannot search that type by identifier) has answered:
    the reference is written identifier-only, the documented last resort, instead of the message failing."""
    _, writer = _batch_rig(rig_factory)
    patient_id, patient = new_patient()
    assert (await _send_many(writer, [create_message(patient_id, patient)]))[0].state == "written"
    rig, reader = _batch_rig(rig_factory)
    rig.transport.add_entry(EntryFault(method="GET", url_contains="Encounter?identifier", status=400, times=-1))
    encounter_id = new_patient()[0]
    observation_id, observation = _observation(patient_id, encounter_id)
    consent = update_message(patient_id, patient, {"telephone1": "+1 555 0178", "versionnumber": 11})
    results = await _send_many(reader, [consent, observation])

    assert [r.state for r in results] == ["written", "written"], [r.detail for r in results]
    (written,) = fhir.search(f"Observation?identifier=urn:dataverse:msemr_observation|{observation_id}")
    assert "reference" not in written["encounter"]
    assert written["encounter"]["identifier"] == {"system": "urn:dataverse:msemr_encounter", "value": encounter_id}
