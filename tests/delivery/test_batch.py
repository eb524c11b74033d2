"""The batch path against the real FHIR dev server: `Pipeline.process_many` + `BatchDelivery` (FHIR batch
bundles). Each message keeps its own Result; bundle entries map back to their messages. No speed is asserted."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

import writeback.pipeline as pipeline_module
from devtools.faults import EntryFault, Fault
from devtools.messages import Choice, Lookup, context, inside
from tests.delivery.conftest import (
    Fhir,
    Rig,
    create_message,
    encounter_message,
    identifier_message,
    new_patient,
    update_message,
)
from writeback.bundles import BatchDelivery, waves
from writeback.decide import resource_id
from writeback.errors import WritebackError
from writeback.leases import LocalLeases
from writeback.pipeline import Envelope, Pipeline, Result
from writeback.reasons import Reason


def _batch_rig(rig_factory: Callable[..., Rig], **overrides: str) -> tuple[Rig, Pipeline]:
    rig = rig_factory(**overrides)
    return rig, Pipeline(rig.pipeline.maps, rig.settings, BatchDelivery(rig.client))


async def _send_many(pipeline: Pipeline, bodies: list[dict[str, Any] | str]) -> list[Result]:
    envelopes = [Envelope(b if isinstance(b, str) else json.dumps(b).encode()) for b in bodies]
    return await pipeline.process_many(envelopes)


def _check_provenance(fhir: Fhir, result: Result) -> None:
    assert result.resource is not None and result.provenance is not None
    assert "/_history/" in result.resource
    provenance = fhir.get(result.provenance.split("/_history")[0])
    assert provenance["target"] == [{"reference": result.resource}]


async def test_a_mixed_batch_gives_each_message_its_own_result(rig_factory, fhir: Fhir):
    rig, pipeline = _batch_rig(rig_factory)
    existing_id, existing = new_patient()
    first = await rig.send(create_message(existing_id, existing))
    assert first.state == "written"

    new_id, new_row = new_patient(lastname="Batchford")
    bumped = {**existing, "telephone1": "+1 555 0201", "versionnumber": 11}
    bodies: list[dict[str, Any] | str] = [
        create_message(new_id, new_row),
        update_message(existing_id, existing, {"telephone1": "+1 555 0201", "versionnumber": 11}),
        context("Update", "contact", existing_id, {"address1_city": "Salem", "versionnumber": 12},
                pre=bumped, post={**bumped, "address1_city": "Salem", "versionnumber": 12}),
        '{"MessageName": "Update", "PrimaryEntityName": "contact"',  # broken body: reject
        create_message(*new_patient(msemr_azurefhirsyncenabled=False)),  # consent withheld: skip
    ]
    results = await _send_many(pipeline, bodies)

    assert [r.state for r in results] == ["written", "skipped", "written", "dead-lettered", "skipped"]
    assert results[1].reason is Reason.STALE  # the newer change of that row in the batch holds its change
    assert results[3].reason is Reason.MALFORMED_MESSAGE
    assert results[4].reason is Reason.CONSENT_WITHHELD
    assert results[0].decision.record_id == new_id and results[1].decision.record_id == existing_id

    created = fhir.search(f"Patient?identifier=urn:dataverse:contact|{new_id}")
    assert len(created) == 1 and created[0]["name"][0]["family"] == "Batchford"
    patients = fhir.search(f"Patient?identifier=urn:dataverse:contact|{existing_id}")
    assert len(patients) == 1
    patient = patients[0]
    # One write, of the newest state: it holds both changes.
    assert {"system": "phone", "use": "work", "value": "+1 555 0201"} in patient["telecom"]
    assert patient["address"][0]["city"] == "Salem"
    assert results[2].resource is not None and results[2].resource.endswith(patient["meta"]["versionId"])
    for result in (results[0], results[2]):
        _check_provenance(fhir, result)


def test_waves_keep_one_resource_per_bundle_and_row_order(maps):
    from writeback.settings import Settings

    planner = Pipeline(maps, Settings.for_planning({}), None)
    a_id, a = new_patient()
    b_id, b = new_patient()
    bodies = [create_message(a_id, a), update_message(a_id, a, {"telephone1": "1"}),
              create_message(b_id, b), update_message(a_id, a, {"telephone1": "2"})]
    plans = [planner.plan(Envelope(json.dumps(x))).plan for x in bodies]
    assert all(p is not None for p in plans)
    assert waves([p.target for p in plans if p is not None]) == [[0, 2], [1], [3]]


async def test_a_failing_entry_maps_back_to_just_its_message(rig_factory, fhir: Fhir):
    rig, pipeline = _batch_rig(rig_factory)
    ok_id, ok_row = new_patient(lastname="Fineman")
    bad_id, bad_row = new_patient(lastname="Refusedottir")

    def refuse_one(request: httpx.Request, response: httpx.Response) -> httpx.Response:
        sent = json.loads(request.content)
        body = response.json()
        for entry, answer in zip(sent.get("entry", []), body.get("entry", []), strict=True):
            if "Refusedottir" in json.dumps(entry.get("resource", {})):
                answer.clear()
                answer["response"] = {"status": "422 Unprocessable Entity", "outcome": {
                    "resourceType": "OperationOutcome",
                    "issue": [{"severity": "error", "code": "invariant", "expression": ["Patient.name"],
                               "diagnostics": "Refusedottir"}]}}
        return httpx.Response(response.status_code, headers={"Content-Type": "application/fhir+json"},
                              content=json.dumps(body).encode(), request=request)

    rig.transport.add(Fault(method="POST", url_contains="/fhir/R4", rewrite=refuse_one, times=-1))
    results = await _send_many(pipeline, [create_message(ok_id, ok_row), create_message(bad_id, bad_row)])

    assert results[0].state == "written"
    _check_provenance(fhir, results[0])
    assert results[1].state == "dead-lettered"
    assert results[1].reason is Reason.FHIR_REJECTED
    assert results[1].detail == "the FHIR server refused the create (HTTP 422): error/invariant at Patient.name"
    assert "Refusedottir" not in results[1].detail


async def test_a_concurrent_change_is_re_read_and_retried_per_entry(rig_factory, fhir: Fhir):
    rig, pipeline = _batch_rig(rig_factory)
    row_id, row = new_patient()
    created = await rig.send(create_message(row_id, row))
    assert created.resource is not None
    _, resource_id, _, _ = created.resource.split("/")

    async def someone_else_writes(request: httpx.Request) -> None:
        if b'"ifMatch"' in request.content:
            current = fhir.get(f"Patient/{resource_id}")
            current["active"] = True
            fhir.put(current)

    rig.transport.add(Fault(method="POST", url_contains="/fhir/R4", before=someone_else_writes, times=3))
    (result,) = await _send_many(pipeline, [update_message(row_id, row, {"telephone1": "+1 555 0999",
                                                                         "versionnumber": 11})])

    assert result.state == "written", result.detail
    patient = fhir.get(f"Patient/{resource_id}")
    assert patient["active"] is True  # the other writer's change survived
    assert {"system": "phone", "use": "work", "value": "+1 555 0999"} in patient["telecom"]
    _check_provenance(fhir, result)


async def test_a_conflict_that_never_ends_is_a_conflict(rig_factory, fhir: Fhir):
    rig, pipeline = _batch_rig(rig_factory, FHIR_CONFLICT_RETRIES="1")
    row_id, row = new_patient()
    created = await rig.send(create_message(row_id, row))
    assert created.resource is not None
    _, resource_id, _, _ = created.resource.split("/")
    writes = iter(range(1900, 2000))

    async def someone_else_always_writes(request: httpx.Request) -> None:
        if b'"ifMatch"' in request.content:  # a real 412 for every PUT we send
            current = fhir.get(f"Patient/{resource_id}")
            current["birthDate"] = f"{next(writes)}-01-01"
            fhir.put(current)

    rig.transport.add(Fault(method="POST", url_contains="/fhir/R4", before=someone_else_always_writes, times=-1))
    (result,) = await _send_many(pipeline, [update_message(row_id, row, {"telephone1": "+1 555 0412",
                                                                         "versionnumber": 11})])
    assert result.state == "retry"
    assert result.reason is Reason.CONFLICT
    assert "through 2 attempts" in result.detail


async def test_same_message_twice_in_one_batch_writes_one_resource(rig_factory, fhir: Fhir):
    _, pipeline = _batch_rig(rig_factory)
    row_id, row = new_patient(gendercode=Choice(1))
    message = create_message(row_id, row)
    results = await _send_many(pipeline, [message, message])
    assert [(r.state, r.reason) for r in results] == [("written", None), ("skipped", Reason.DUPLICATE)]
    assert len(fhir.search(f"Patient?identifier=urn:dataverse:contact|{row_id}")) == 1


def _entries(transport_requests: list[httpx.Request]) -> list[dict[str, Any]]:
    """Every batch entry the pipeline sent, in order."""
    sent = [json.loads(r.content) for r in transport_requests if r.method == "POST" and r.content]
    return [e for body in sent if body.get("resourceType") == "Bundle" for e in body.get("entry", [])]


async def test_a_child_row_after_its_parents_create_in_one_batch_starts_from_the_written_copy(
        rig_factory, fhir: Fhir):
    rig, pipeline = _batch_rig(rig_factory)
    row_id, row = new_patient(lastname="Oncewright")
    results = await _send_many(pipeline, [create_message(row_id, row), identifier_message(row_id, "123-45-6789")])

    assert [r.state for r in results] == ["written", "written"], [r.detail for r in results]
    (patient,) = fhir.search(f"Patient?identifier=urn:dataverse:contact|{row_id}")
    assert patient["name"][0]["family"] == "Oncewright"
    assert "123-45-6789" in [i.get("value") for i in patient["identifier"]]
    assert results[1].resource is not None
    assert results[1].resource.endswith(f"/_history/{patient['meta']['versionId']}")
    for result in results:
        _check_provenance(fhir, result)
    # No read before the identifier: it was applied to the copy the create answered with, guarded by If-Match.
    sent = [e["request"] for e in rig.transport.entries if not e["request"]["url"].startswith("Provenance")]
    assert [(w["method"], "ifMatch" in w) for w in sent] == [("GET", False), ("PUT", False), ("PUT", True)]
    assert results[0].resource is not None
    assert sent[2]["ifMatch"] == f'W/"{results[0].resource.rsplit("/", 1)[1]}"'


def _after_the_create(change: Callable[[], None]) -> Fault:
    """Another system changes the resource right after the server answered our create (the answer we keep
    is then already out of date)."""
    def rewrite(request: httpx.Request, response: httpx.Response) -> httpx.Response:
        if b'"ifMatch"' not in request.content and b'"PUT"' in request.content:
            change()
        return response

    return Fault(method="POST", url_contains="/fhir/R4", rewrite=rewrite, times=-1)


async def test_a_change_made_elsewhere_between_two_writes_of_a_batch_is_kept(rig_factory, fhir: Fhir):
    """The written copy is only a starting point: another system's change in between is a 412, then a read."""
    rig, pipeline = _batch_rig(rig_factory)
    row_id, row = new_patient()
    changed: list[bool] = []

    def someone_else_writes() -> None:
        if changed:
            return
        changed.append(True)
        (current,) = fhir.search(f"Patient?identifier=urn:dataverse:contact|{row_id}")
        current["active"] = True
        fhir.put(current)

    rig.transport.add(_after_the_create(someone_else_writes))
    results = await _send_many(pipeline, [create_message(row_id, row), identifier_message(row_id, "555-01-0312")])

    assert [r.state for r in results] == ["written", "written"], results[1].detail
    (patient,) = fhir.search(f"Patient?identifier=urn:dataverse:contact|{row_id}")
    assert patient["active"] is True
    assert "555-01-0312" in [i.get("value") for i in patient["identifier"]]
    _check_provenance(fhir, results[1])


async def test_a_rows_changes_in_any_order_within_a_batch_end_at_its_newest_state(rig_factory, fhir: Fhir):
    """Service Bus does not keep a row's messages in order: the newest whole-row state is written once, the
    older ones are stale, whatever order they came in."""
    _, pipeline = _batch_rig(rig_factory, WRITEBACK_BUNDLE_SIZE="2")
    a_id, a = new_patient(lastname="Ordway")
    others = [new_patient() for _ in range(5)]
    v11 = {**a, "telephone1": "+1 555 0411", "versionnumber": 11}
    bodies: list[dict[str, Any] | str] = [
        context("Update", "contact", a_id, {"address1_city": "Eugene", "versionnumber": 12},
                pre=v11, post={**v11, "address1_city": "Eugene", "versionnumber": 12}),
        *[create_message(i, row) for i, row in others[:3]],
        create_message(a_id, a),
        *[create_message(i, row) for i, row in others[3:]],
        update_message(a_id, a, {"telephone1": "+1 555 0411", "versionnumber": 11}),
    ]
    results = await _send_many(pipeline, bodies)

    assert [(r.state, r.reason) for r in results] == [("written", None)] * 4 + [("skipped", Reason.STALE)] + [
        ("written", None)] * 2 + [("skipped", Reason.STALE)]
    (patient,) = fhir.search(f"Patient?identifier=urn:dataverse:contact|{a_id}")
    assert patient["address"][0]["city"] == "Eugene"
    assert {"system": "phone", "use": "work", "value": "+1 555 0411"} in patient["telecom"]
    history = fhir.get(f"Patient/{patient['id']}/_history")["entry"]
    assert len(history) == 1  # one version: the newest state
    for result in results:
        if result.state == "written":
            _check_provenance(fhir, result)


async def test_later_writes_do_not_wait_for_the_earlier_waves_provenance(rig_factory, fhir: Fhir):
    """A Provenance changes no resource: it goes out alongside the next wave, so a child row's write into a
    Patient created in the same batch goes out while that create's Provenance is still on its way."""
    rig, pipeline = _batch_rig(rig_factory)
    events: list[str] = []

    async def watch(request: httpx.Request) -> None:
        entries = json.loads(request.content).get("entry", [])
        urls = {e["request"]["method"] + " " + e["request"]["url"].split("/")[0] for e in entries}
        if urls == {"PUT Provenance"} and "provenance held" not in events:
            events.append("provenance held")
            await asyncio.sleep(0.5)  # a slow answer to the first Provenance bundle
            events.append("provenance released")
        elif "PUT Patient" in urls and any("ifMatch" in e["request"] for e in entries):
            events.append("child row sent")

    rig.transport.add(Fault(method="POST", url_contains="/fhir/R4", before=watch, times=-1))
    row_id, row = new_patient()
    results = await _send_many(pipeline, [create_message(row_id, row), identifier_message(row_id, "555-01-0414")])

    assert [r.state for r in results] == ["written"] * 2, [r.detail for r in results]
    assert sorted(events) == ["child row sent", "provenance held", "provenance released"]
    assert events.index("child row sent") < events.index("provenance released")
    for result in results:
        _check_provenance(fhir, result)


async def test_writes_start_while_the_batch_is_planned_and_a_later_child_row_waits_for_its_parents_create(
        rig_factory, fhir: Fhir):
    """A row's write goes out once every message of it (and of the rows it depends on) is planned, not after the
    whole batch; a child row planned much later writes into the Patient its parent's Create made, after that
    create (one resource, the item in it, its write ordered on the created version)."""
    rig, pipeline = _batch_rig(rig_factory)
    events: list[str] = []

    class Watched(Pipeline):
        def plan(self, envelope: Envelope) -> Any:
            events.append("planned")
            return super().plan(envelope)

    watched = Watched(pipeline.maps, pipeline.settings, pipeline.delivery)

    async def watch(request: httpx.Request) -> None:
        entries = json.loads(request.content).get("entry", [])
        if any(e["request"]["method"] == "PUT" and not e["request"]["url"].startswith("Provenance") for e in entries):
            events.append("write sent")

    rig.transport.add(Fault(method="POST", url_contains="/fhir/R4", before=watch, times=-1))
    parent_id, parent = new_patient(lastname="Earlywright")
    others = [create_message(*new_patient()) for _ in range(300)]
    bodies: list[dict[str, Any] | str] = [create_message(parent_id, parent), *others,
                                          identifier_message(parent_id, "555-01-0777")]
    results = await _send_many(watched, bodies)

    assert {r.state for r in results} == {"written"}, {r.detail for r in results if r.state != "written"}
    planned_before_the_first_write = events[:events.index("write sent")].count("planned")
    assert planned_before_the_first_write < len(bodies) - 1, "the first write waited for the whole batch"
    (patient,) = fhir.search(f"Patient?identifier=urn:dataverse:contact|{parent_id}")
    assert patient["name"][0]["family"] == "Earlywright"
    assert "555-01-0777" in [i.get("value") for i in patient["identifier"]]
    assert patient["meta"]["versionId"] == results[-1].resource.rsplit("/", 1)[1]  # type: ignore[union-attr]
    history = fhir.get(f"Patient/{patient['id']}/_history")["entry"]
    assert len(history) == 2  # the create, then the identifier written on it: no conflict, no third version
    for result in (results[0], results[-1]):
        _check_provenance(fhir, result)


# Columns every contact has beside the mapped ones: a step registered with images of all columns sends them, so
# a real body's images are long and its top-level PrimaryEntityId comes thousands of bytes in.
_SYSTEM_COLUMNS: dict[str, Any] = {
    "createdon": "/Date(1764489600000)/", "modifiedon": "/Date(1764489600000)/", "statecode": Choice(0),
    "statuscode": Choice(1), "ownerid": Lookup("systemuser", "a0bde583-0537-eb11-bf68-0022489b563d"),
    "owningbusinessunit": Lookup("businessunit", "c3ec0cc2-d836-eb11-bf68-0022489b563d"),
    "createdby": Lookup("systemuser", "a0bde583-0537-eb11-bf68-0022489b563d"),
    "modifiedby": Lookup("systemuser", "a0bde583-0537-eb11-bf68-0022489b563d"),
    "transactioncurrencyid": Lookup("transactioncurrency", "3e1a2b4c-5d6e-4f70-8192-a3b4c5d6e7f8"),
    "preferredcontactmethodcode": Choice(1), "donotemail": False, "donotphone": False, "donotpostalmail": False,
    "donotbulkemail": False, "donotfax": False, "donotsendmm": False, "isprivate": False, "merged": False,
    "participatesinworkflow": False, "creditonhold": False, "isbackofficecustomer": False,
    "address1_addresstypecode": Choice(1), "address1_shippingmethodcode": Choice(1),
    "address2_addresstypecode": Choice(1), "address2_shippingmethodcode": Choice(1),
    "address1_freighttermscode": Choice(1), "address2_freighttermscode": Choice(1),
    "customertypecode": Choice(1), "customersizecode": Choice(1), "shippingmethodcode": Choice(1),
    "leadsourcecode": Choice(1), "paymenttermscode": Choice(1), "territorycode": Choice(1),
    "educationcode": Choice(1), "familystatuscode": Choice(1), "haschildrencode": Choice(1),
    "exchangerate": 1.0, "timezoneruleversionnumber": 4, "utcconversiontimezonecode": 85,
    "address1_addressid": "5a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d",
    "address2_addressid": "6b2c3d4e-5f6a-4b7c-9d8e-0f1a2b3c4d5e",
    "address3_addressid": "7c3d4e5f-6a7b-4c8d-8e9f-1a2b3c4d5e6f",
}


async def test_real_shaped_bodies_are_grouped_by_their_own_row(rig_factory, fhir: Fhir):
    """Bodies shaped as Dataverse posts them: images of every column (the top-level PrimaryEntityId thousands of
    bytes in, as in the public samples) and a ParentContext naming the operation the save ran inside (here the
    patient's Create, whose plug-in created the identifier row; the Update's own row again, at stage 30). Each
    message counts for its own row: the patient's Create and Update are written as one version, the identifier
    into the Patient the Create made, all in one batch."""
    rig, pipeline = _batch_rig(rig_factory)
    row_id, row = new_patient(lastname="Longbody", **_SYSTEM_COLUMNS)
    created = create_message(row_id, row, parent=inside("Create", "contact", row_id))
    identifier = identifier_message(row_id, "555-01-0888")
    identifier["ParentContext"] = inside("Create", "contact", row_id)
    changes = {"telephone1": "+1 555 0199", "versionnumber": 11}
    updated = update_message(row_id, row, changes, parent=inside("Update", "contact", row_id))
    bodies: list[dict[str, Any] | str] = [created, identifier, updated]
    assert all(json.dumps(b).rfind('"PrimaryEntityId"') > 4096 for b in (created, updated))
    results = await _send_many(pipeline, bodies)

    assert [(r.state, r.reason) for r in results] == [("skipped", Reason.STALE), ("written", None),
                                                      ("written", None)], [r.detail for r in results]
    (patient,) = fhir.search(f"Patient?identifier=urn:dataverse:contact|{row_id}")
    assert patient["name"][0]["family"] == "Longbody"
    assert {"system": "phone", "use": "work", "value": "+1 555 0199"} in patient["telecom"]
    assert "555-01-0888" in [i.get("value") for i in patient["identifier"]]
    history = fhir.get(f"Patient/{patient['id']}/_history")["entry"]
    assert len(history) == 2  # the row's newest state, then the identifier written into it
    for result in results[1:]:
        _check_provenance(fhir, result)
    puts = [e for e in rig.transport.entries if e["request"]["method"] == "PUT"
            and e["request"]["url"].startswith("Patient")]
    assert len(puts) == 2


async def test_a_rows_changes_that_cannot_be_ordered_by_version_are_written_in_the_order_given(
        rig_factory, fhir: Fhir):
    """A Target-only update (a step without images: no version) and then a whole-row update of the same row in
    one batch: nothing says which is newer, so they go in the order they came, the whole row last."""
    rig, pipeline = _batch_rig(rig_factory)
    row_id, row = new_patient(lastname="Before")
    assert (await rig.send(create_message(row_id, row))).state == "written"
    target_only = context("Update", "contact", row_id, {"lastname": "Older", "msemr_contacttype": Choice(935000000),
                                                        "msemr_azurefhirsyncenabled": True})
    newer = update_message(row_id, row, {"lastname": "Newer", "versionnumber": 12})
    results = await _send_many(pipeline, [target_only, newer])

    assert [r.state for r in results] == ["written", "written"], [r.detail for r in results]
    (patient,) = fhir.search(f"Patient?identifier=urn:dataverse:contact|{row_id}")
    assert patient["name"][0]["family"] == "Newer"


def _puts(request: httpx.Request) -> set[str]:
    """The resources a batch bundle writes (`Type/id`)."""
    entries = json.loads(request.content).get("entry", [])
    return {e["request"]["url"] for e in entries if e["request"]["method"] == "PUT"}


def _slow_write_of(url: str, seconds: float = 1.0) -> Callable[[httpx.Request], Awaitable[None]]:
    """Holds the bundle that writes `url` at the server's door for `seconds`."""

    async def hold(request: httpx.Request) -> None:
        if url in _puts(request):
            await asyncio.sleep(seconds)

    return hold


async def test_a_slice_holds_back_only_the_messages_that_share_a_resource_with_a_flight_still_writing(
        rig_factory: Callable[..., Rig], fhir: Fhir, monkeypatch: Any):
    """A batch is written in flights, one per planned slice. The MRN of a patient whose Create an earlier flight is
    still writing waits for that flight; a patient of the same slice that shares nothing with it does not. Before,
    the whole slice waited: a patient's messages straddle two slices in almost every batch, so once a batch was
    planned its flights went one after the other, a server round trip each. The first flight's write is held at the
    server's door until the unrelated patient's write has arrived there: with the whole slice waiting, it never
    would (the hold gives up after 10 s, and says so)."""
    monkeypatch.setattr(pipeline_module, "PLAN_SLICE", 2)
    rig, pipeline = _batch_rig(rig_factory)
    first_id, first = new_patient(lastname="Firstflight")
    other_id, other = new_patient()
    unrelated_id, unrelated = new_patient(lastname="Unrelated")
    mrn = identifier_message(first_id, "MRN-31415")
    bodies: list[dict[str, Any] | str] = [create_message(first_id, first), create_message(other_id, other), mrn,
                                          create_message(unrelated_id, unrelated)]
    first_url = f"Patient/{resource_id('contact', first_id)}"
    unrelated_url = f"Patient/{resource_id('contact', unrelated_id)}"
    unrelated_sent = asyncio.Event()
    held: list[str] = []

    async def hold(request: httpx.Request) -> None:
        puts = _puts(request)
        if unrelated_url in puts:
            unrelated_sent.set()
        if first_url in puts and not held:
            try:
                await asyncio.wait_for(unrelated_sent.wait(), 10)
                held.append("released by the unrelated patient's write")
            except TimeoutError:
                held.append("timed out: the unrelated patient waited for the first flight")

    rig.transport.add(Fault(method="POST", path_endswith="/R4", times=-1, before=hold))
    results = await _send_many(pipeline, bodies)

    assert held == ["released by the unrelated patient's write"]
    assert [r.state for r in results] == ["written"] * 4
    # The held message still came after the write it waited for: the MRN is on the patient, beside nothing else.
    patient = fhir.get(first_url)
    assert [i["value"] for i in patient.get("identifier", []) if i.get("value") == "MRN-31415"] == ["MRN-31415"]
    assert fhir.get(unrelated_url)["name"][0]["family"] == "Unrelated"


async def test_a_visit_to_a_patient_whose_first_write_an_earlier_flight_makes_as_an_update_waits_for_it(
        rig_factory: Callable[..., Rig], fhir: Fhir, monkeypatch: Any):
    """A patient row never written before (its consent given only now, say) is first made by an Update; a visit of
    that patient in the next slice refers to it. The visit waits for the flight writing the patient, whatever
    message makes it (found by review: keyed on the batch's Creates alone, it went at once, found no patient, and
    was retried for nothing, or on its last try referred by identifier only). The patient's write is held for up to
    a second at the server's door for the visit's search to overtake it: it never may."""
    monkeypatch.setattr(pipeline_module, "PLAN_SLICE", 2)
    rig, pipeline = _batch_rig(rig_factory)
    patient_id, patient = new_patient(versionnumber=10)
    filler_id, filler = new_patient()
    encounter_id, encounter = encounter_message(patient_id)
    bodies: list[dict[str, Any] | str] = [
        update_message(patient_id, patient, {"telephone1": "+1 555 0188", "versionnumber": 11}),
        create_message(filler_id, filler), encounter, create_message(*new_patient())]
    patient_url = f"Patient/{resource_id('contact', patient_id)}"

    rig.transport.add(Fault(method="POST", path_endswith="/R4", times=-1, before=_slow_write_of(patient_url)))
    results = await _send_many(pipeline, bodies)

    assert [(r.state, r.reason) for r in results] == [("written", None)] * 4, [r.detail for r in results]
    (visit,) = fhir.search(f"Encounter?identifier=urn:dataverse:msemr_encounter|{encounter_id}")
    assert visit["subject"]["reference"] == patient_url


async def test_a_child_rows_saves_stay_in_one_flight_in_order_when_one_cannot_name_its_parent_yet(
        rig_factory: Callable[..., Rig], fhir: Fhir, monkeypatch: Any):
    """An MRN's Create names its patient, whose Create an earlier flight is still writing; its next save, a step
    without images and without the patient column, names it only once its facts are read. The two go in one
    flight, in their order (found by review: keyed by what their plans knew, the save went at once, before the
    Create it changes, and was retried for nothing; a run with no retries ended with the older value)."""
    monkeypatch.setattr(pipeline_module, "PLAN_SLICE", 2)
    rig, pipeline = _batch_rig(rig_factory)
    patient_id, patient = new_patient()
    filler_id, filler = new_patient()
    mrn_id = new_patient()[0]
    row = {"msemr_medicalidentifierid": mrn_id, "msemr_assignee": Lookup("contact", patient_id),
           "msemr_identifiersystem": "urn:oid:2.16.840.1.113883.4.1", "msemr_value": "MRN-1", "versionnumber": 1}
    changed = {"msemr_value": "MRN-2", "versionnumber": 2}
    bodies: list[dict[str, Any] | str] = [
        create_message(patient_id, patient), create_message(filler_id, filler),
        context("Create", "msemr_medicalidentifier", mrn_id, row, post=row),
        context("Update", "msemr_medicalidentifier", mrn_id, changed)]
    patient_url = f"Patient/{resource_id('contact', patient_id)}"

    rig.transport.add(Fault(method="POST", path_endswith="/R4", times=-1, before=_slow_write_of(patient_url)))
    results = await _send_many(pipeline, bodies)

    assert all(r.state in ("written", "skipped") for r in results), [(r.state, r.reason) for r in results]
    values = [i["value"] for i in fhir.get(patient_url).get("identifier", [])
              if i.get("system") == "urn:oid:2.16.840.1.113883.4.1"]
    assert values == ["MRN-2"]


def _refuse_the_create_of(rig: Rig, patient_id: str, *, holding: str) -> str:
    """The server refuses every write of the patient (422), and the bundle writing the patient `holding` is held
    for half a second at its door, so that the next slice is planned while that flight is still writing. Returns
    the patient's `Type/id`."""
    patient_url = f"Patient/{resource_id('contact', patient_id)}"
    refusal = {"resourceType": "OperationOutcome",
               "issue": [{"severity": "error", "code": "invariant", "expression": ["Patient.name"]}]}
    rig.transport.add_entry(EntryFault(method="PUT", url_contains=patient_url, status=422, outcome=refusal, times=-1))
    held = f"Patient/{resource_id('contact', holding)}"
    rig.transport.add(Fault(method="POST", path_endswith="/R4", times=-1, before=_slow_write_of(held, 0.5)))
    return patient_url


async def test_a_visit_to_a_patient_whose_create_an_earlier_flight_fails_never_names_the_id_it_would_have_had(
        rig_factory: Callable[..., Rig], fhir: Fhir, monkeypatch: Any):
    """A patient's Create in one slice, refused by the server; a visit of that patient in the next slice waits for
    the flight writing the patient. It must then know the Create made nothing: before, the flight was done as soon
    as its resources were answered, and the visit, resolved before the failed Create was taken off the batch's
    list of rows it creates, referred to `Patient/<the id the Create would have made>`, a resource that is not
    there (docs/reliability.md listed it under "What remains"). The other patient's bundle is held for half a
    second at the server's door, so the visit's slice is planned while that flight is still writing."""
    monkeypatch.setattr(pipeline_module, "PLAN_SLICE", 2)
    rig, pipeline = _batch_rig(rig_factory)
    patient_id, patient = new_patient()
    filler_id, filler = new_patient()
    encounter_id, encounter = encounter_message(patient_id)
    bodies: list[dict[str, Any] | str] = [create_message(patient_id, patient), create_message(filler_id, filler),
                                          encounter, create_message(*new_patient())]
    _refuse_the_create_of(rig, patient_id, holding=filler_id)
    results = await _send_many(pipeline, bodies)

    assert (results[0].state, results[0].reason) == ("dead-lettered", Reason.FHIR_REJECTED)
    assert (results[2].reason, results[2].state) == (Reason.TARGET_PENDING, "retry"), results[2].detail
    assert fhir.search(f"Encounter?identifier=urn:dataverse:msemr_encounter|{encounter_id}") == []
    assert [r.state for r in (results[1], results[3])] == ["written", "written"]


async def test_a_visit_to_a_patient_whose_create_and_newer_update_an_earlier_flight_fails_never_names_its_id(
        rig_factory: Callable[..., Rig], fhir: Fhir, monkeypatch: Any):
    """As above, with the patient's Create followed by an Update (with images) of it in the same slice: the Update
    is the newest whole-row change, the Create is set aside `stale`, and the Update's write is the one that would
    create the resource. Refused, it is not the message that is a Create (`batch.creates`), so the row stays on
    the batch's list of rows it creates: the visit in the next flight must still not name the id."""
    monkeypatch.setattr(pipeline_module, "PLAN_SLICE", 3)
    rig, pipeline = _batch_rig(rig_factory)
    patient_id, patient = new_patient()
    filler_id, filler = new_patient()
    encounter_id, encounter = encounter_message(patient_id)
    bodies: list[dict[str, Any] | str] = [
        create_message(patient_id, patient),
        update_message(patient_id, patient, {"telephone1": "+1 555 0999", "versionnumber": 11}),
        create_message(filler_id, filler), encounter, create_message(*new_patient())]
    patient_url = _refuse_the_create_of(rig, patient_id, holding=filler_id)
    results = await _send_many(pipeline, bodies)

    assert (results[0].state, results[0].reason) == ("skipped", Reason.STALE), results[0].detail
    assert (results[1].state, results[1].reason) == ("dead-lettered", Reason.FHIR_REJECTED), results[1].detail
    assert fhir.search(f"Encounter?identifier=urn:dataverse:msemr_encounter|{encounter_id}") == [], \
        f"the visit ended {results[3].state} {results[3].reason}, referring to {patient_url}, which is not there"
    assert (results[3].reason, results[3].state) == (Reason.TARGET_PENDING, "retry"), results[3].detail


class _FactsDownFor:
    """A stand-in for the Table Storage ledger (`OutcomeStore`), kept in memory, whose row-state read fails for one
    row: that row's partition busy (`OutcomeStore.facts` reads row by row, and one failure fails the read), a fault
    of one partition that Azurite cannot be told to make."""

    def __init__(self, row: tuple[str, str]) -> None:
        self.row, self.leases = row, LocalLeases()
        self.kept: dict[Any, Any] = {}

    async def seen(self, message_key: str) -> None:
        return None

    async def claim(self, plan: Any) -> frozenset[str]:
        return frozenset()

    async def facts(self, rows: Any) -> dict[Any, Any]:
        rows = set(rows)
        await asyncio.sleep(0.05)
        if self.row in rows:
            raise WritebackError(Reason.OUTCOME_STORE_UNAVAILABLE, "read the row state: busy (injected)")
        return {row: self.kept[row] for row in rows if row in self.kept}

    async def learn(self, facts: Any) -> dict[Any, Any]:
        for fact in facts:
            self.kept[fact.key] = fact
        return {}

    async def acquire(self, key: str, seconds: float, holder: str = "", version: str = "") -> bool:
        return await self.leases.acquire(key, seconds, holder, version)

    async def release(self, key: str, holder: str = "") -> None:
        await self.leases.release(key, holder)

    async def record(self, envelope: Any, result: Any) -> None:
        return None


async def _visit_after_a_create_the_ledger_fails(rig_factory: Callable[..., Rig], fhir: Fhir, monkeypatch: Any,
                                                 ledger_for: Callable[[str, str], _FactsDownFor]) -> None:
    """A patient's Create and a filler in one flight, the patient's visit in the next; `ledger_for(patient row,
    filler row)` fails the Create's flight. The Create is tried again, and the visit names no resource that is not
    there."""
    monkeypatch.setattr(pipeline_module, "PLAN_SLICE", 2)
    rig = rig_factory()
    patient_id, patient = new_patient()
    filler_id, filler = new_patient()
    pipeline = Pipeline(rig.pipeline.maps, rig.settings, BatchDelivery(rig.client),
                        ledger=ledger_for(patient_id, filler_id))
    encounter_id, encounter = encounter_message(patient_id)
    bodies: list[dict[str, Any] | str] = [create_message(patient_id, patient), create_message(filler_id, filler),
                                          encounter, create_message(*new_patient())]
    results = await _send_many(pipeline, bodies)

    assert (results[0].state, results[0].reason) == ("retry", Reason.OUTCOME_STORE_UNAVAILABLE), results[0].detail
    patient_url = f"Patient/{resource_id('contact', patient_id)}"
    assert fhir.search(f"Encounter?identifier=urn:dataverse:msemr_encounter|{encounter_id}") == [], \
        f"the visit ended {results[2].state} {results[2].reason}, referring to {patient_url}, which is not there"


async def test_a_visit_to_a_patient_whose_flight_could_not_read_its_row_facts_never_names_its_id(
        rig_factory: Callable[..., Rig], fhir: Fhir, monkeypatch: Any):
    """The patient's Create is in a flight whose row-state read fails (another row of it, busy): the flight makes
    nothing and its messages are tried again, but the Create's row stayed on the batch's list of rows it creates;
    the visit, in the next flight, named `Patient/<the id the Create would have made>`, which is not there."""
    await _visit_after_a_create_the_ledger_fails(rig_factory, fhir, monkeypatch,
                                                 lambda patient, filler: _FactsDownFor(("contact", filler)))


class _SeenDownFor(_FactsDownFor):
    """The stand-in above, whose duplicate check fails for the messages of one row (its partition busy); its row
    state reads work."""

    async def facts(self, rows: Any) -> dict[Any, Any]:
        rows = set(rows)
        return {row: self.kept[row] for row in rows if row in self.kept}

    async def seen(self, message_key: str) -> None:
        if self.row[1] in message_key:
            raise WritebackError(Reason.OUTCOME_STORE_UNAVAILABLE, "read the processed marker: busy (injected)")
        return None


async def test_a_visit_to_a_patient_whose_create_failed_its_duplicate_check_never_names_its_id(
        rig_factory: Callable[..., Rig], fhir: Fhir, monkeypatch: Any):
    """The patient's Create fails the ledger's duplicate check (`_admit`): never sent, it made nothing, and is tried
    again; its row stayed on the batch's list of rows it creates, and the visit in the next flight named the id."""
    await _visit_after_a_create_the_ledger_fails(rig_factory, fhir, monkeypatch,
                                                 lambda patient, filler: _SeenDownFor(("contact", patient)))
