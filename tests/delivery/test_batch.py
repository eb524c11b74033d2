"""The batch path against the real FHIR dev server: `Pipeline.process_many` + `BatchDelivery` (FHIR batch
bundles). Each message keeps its own Result; bundle entries map back to their messages. No speed is asserted."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx

from devtools.faults import Fault
from devtools.messages import Choice, context
from tests.delivery.conftest import Fhir, Rig, create_message, new_patient, update_message
from writeback.bundles import BatchDelivery, waves
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
    bumped = {**existing, "versionnumber": 11}
    bodies: list[dict[str, Any] | str] = [
        create_message(new_id, new_row),
        update_message(existing_id, existing, {"telephone1": "+1 555 0201", "versionnumber": 11}),
        context("Update", "contact", existing_id, {"address1_city": "Salem", "versionnumber": 12},
                pre=bumped, post={**bumped, "address1_city": "Salem", "versionnumber": 12}),
        '{"MessageName": "Update", "PrimaryEntityName": "contact"',  # broken body: reject
        create_message(*new_patient(msemr_azurefhirsyncenabled=False)),  # consent withheld: skip
    ]
    results = await _send_many(pipeline, bodies)

    assert [r.state for r in results] == ["written", "written", "written", "dead-lettered", "skipped"]
    assert results[3].reason is Reason.MALFORMED_MESSAGE
    assert results[4].reason is Reason.CONSENT_WITHHELD
    assert results[0].decision.record_id == new_id and results[1].decision.record_id == existing_id

    created = fhir.search(f"Patient?identifier=urn:dataverse:contact|{new_id}")
    assert len(created) == 1 and created[0]["name"][0]["family"] == "Batchford"
    patients = fhir.search(f"Patient?identifier=urn:dataverse:contact|{existing_id}")
    assert len(patients) == 1
    patient = patients[0]
    # Both updates of the same row are applied, in order: the second on top of the first.
    assert {"system": "phone", "use": "work", "value": "+1 555 0201"} in patient["telecom"]
    assert patient["address"][0]["city"] == "Salem"
    assert results[1].resource != results[2].resource
    assert results[2].resource is not None and results[2].resource.endswith(patient["meta"]["versionId"])
    for result in results[:3]:
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
    assert waves([p for p in plans if p is not None]) == [[0, 2], [1], [3]]


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

    rig.transport.add(Fault(method="POST", url_contains="/fhir/R4", rewrite=refuse_one))
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
            current["birthDate"] = "1970-01-01"
            fhir.put(current)

    rig.transport.add(Fault(method="POST", url_contains="/fhir/R4", before=someone_else_writes, times=3))
    (result,) = await _send_many(pipeline, [update_message(row_id, row, {"telephone1": "+1 555 0999"})])

    assert result.state == "written", result.detail
    patient = fhir.get(f"Patient/{resource_id}")
    assert patient["birthDate"] == "1970-01-01"  # the other writer's change survived
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
    (result,) = await _send_many(pipeline, [update_message(row_id, row, {"telephone1": "+1 555 0412"})])
    assert result.state == "retry"
    assert result.reason is Reason.CONFLICT
    assert "through 2 attempts" in result.detail


async def test_same_message_twice_in_one_batch_writes_one_resource(rig_factory, fhir: Fhir):
    _, pipeline = _batch_rig(rig_factory)
    row_id, row = new_patient(gendercode=Choice(1))
    message = create_message(row_id, row)
    results = await _send_many(pipeline, [message, message])
    assert [r.state for r in results] == ["written", "written"]
    assert results[0].resource == results[1].resource
    assert len(fhir.search(f"Patient?identifier=urn:dataverse:contact|{row_id}")) == 1


def _entries(transport_requests: list[httpx.Request]) -> list[dict[str, Any]]:
    """Every batch entry the pipeline sent, in order."""
    sent = [json.loads(r.content) for r in transport_requests if r.method == "POST" and r.content]
    return [e for body in sent if body.get("resourceType") == "Bundle" for e in body.get("entry", [])]


async def test_an_update_after_its_create_in_one_batch_starts_from_the_written_copy(rig_factory, fhir: Fhir):
    rig, pipeline = _batch_rig(rig_factory)
    row_id, row = new_patient(lastname="Oncewright")
    results = await _send_many(pipeline, [
        create_message(row_id, row),
        update_message(row_id, row, {"telephone1": "+1 555 0311", "versionnumber": 11}),
    ])

    assert [r.state for r in results] == ["written", "written"]
    (patient,) = fhir.search(f"Patient?identifier=urn:dataverse:contact|{row_id}")
    assert patient["name"][0]["family"] == "Oncewright"
    assert {"system": "phone", "use": "work", "value": "+1 555 0311"} in patient["telecom"]
    assert results[1].resource is not None
    assert results[1].resource.endswith(f"/_history/{patient['meta']['versionId']}")
    for result in results:
        _check_provenance(fhir, result)
    # No read went out: the update was applied to the copy the create answered with, guarded by If-Match.
    writes = [e["request"] for e in _entries(rig.transport.requests)
              if not e["request"]["url"].startswith("Provenance")]
    assert [w["method"] for w in writes] == ["POST", "PUT"]
    assert results[0].resource is not None
    assert writes[1]["ifMatch"] == f'W/"{results[0].resource.rsplit("/", 1)[1]}"'


def _after_the_create(change: Callable[[], None]) -> Fault:
    """Another system changes the resource right after the server answered our create (the answer we keep
    is then already out of date)."""
    def rewrite(request: httpx.Request, response: httpx.Response) -> httpx.Response:
        change()
        return response

    return Fault(method="POST", url_contains="/fhir/R4", rewrite=rewrite)


async def test_a_change_made_elsewhere_between_create_and_update_is_kept(rig_factory, fhir: Fhir):
    """The written copy is only a starting point: another system's change in between is a 412, then a read."""
    rig, pipeline = _batch_rig(rig_factory)
    row_id, row = new_patient()

    def someone_else_writes() -> None:
        (current,) = fhir.search(f"Patient?identifier=urn:dataverse:contact|{row_id}")
        current["birthDate"] = "1971-02-03"
        fhir.put(current)

    rig.transport.add(_after_the_create(someone_else_writes))
    results = await _send_many(pipeline, [
        create_message(row_id, row),
        update_message(row_id, row, {"telephone1": "+1 555 0312", "versionnumber": 11}),
    ])

    assert [r.state for r in results] == ["written", "written"], results[1].detail
    (patient,) = fhir.search(f"Patient?identifier=urn:dataverse:contact|{row_id}")
    assert patient["birthDate"] == "1971-02-03"
    assert {"system": "phone", "use": "work", "value": "+1 555 0312"} in patient["telecom"]
    _check_provenance(fhir, results[1])


async def test_an_update_that_changes_nothing_in_the_written_copy_is_still_checked_on_the_server(
        rig_factory, fhir: Fhir):
    """The phone went A → B → A in Dataverse; B reached FHIR another way (another instance) right after our
    create. The last update (B → A) changes nothing in the copy our create was answered with, yet must be
    written: only the server's copy may decide that nothing needs writing."""
    rig, pipeline = _batch_rig(rig_factory)
    row_id, row = new_patient(telephone1="+1 555 0313")

    def someone_else_writes() -> None:
        (current,) = fhir.search(f"Patient?identifier=urn:dataverse:contact|{row_id}")
        for telecom in current["telecom"]:
            if telecom["system"] == "phone" and telecom.get("use") == "work":
                telecom["value"] = "+1 555 9999"
        fhir.put(current)

    rig.transport.add(_after_the_create(someone_else_writes))
    results = await _send_many(pipeline, [
        create_message(row_id, row),
        update_message(row_id, {**row, "telephone1": "+1 555 9999", "versionnumber": 11},
                       {"telephone1": "+1 555 0313", "versionnumber": 12}),
    ])

    assert [r.state for r in results] == ["written", "written"], results[1].detail
    (patient,) = fhir.search(f"Patient?identifier=urn:dataverse:contact|{row_id}")
    assert {"system": "phone", "use": "work", "value": "+1 555 0313"} in patient["telecom"]


async def test_creates_go_out_while_the_batch_is_still_planned_and_rows_keep_their_order(rig_factory, fhir: Fhir):
    """Planning and writing overlap: Creates are written a bundle at a time while later messages are still
    being planned; the rest waits for the whole batch, so a row's update that arrived before its Create, and
    two updates in reverse order, still land in Dataverse order."""
    rig, pipeline = _batch_rig(rig_factory, WRITEBACK_BUNDLE_SIZE="2")
    events: list[str] = []
    plan = pipeline.plan

    def planned(envelope: Envelope) -> Any:
        events.append("plan")
        return plan(envelope)

    async def sent(request: httpx.Request) -> None:
        events.append("send")

    pipeline.plan = planned  # type: ignore[method-assign]
    rig.transport.add(Fault(method="POST", url_contains="/fhir/R4", before=sent, times=-1))
    a_id, a = new_patient(lastname="Ordway")
    others = [new_patient() for _ in range(24)]
    v11 = {**a, "telephone1": "+1 555 0411", "versionnumber": 11}
    bodies: list[dict[str, Any] | str] = [
        context("Update", "contact", a_id, {"address1_city": "Eugene", "versionnumber": 12},
                pre=v11, post={**v11, "address1_city": "Eugene", "versionnumber": 12}),
        *[create_message(i, row) for i, row in others[:3]],
        create_message(a_id, a),
        *[create_message(i, row) for i, row in others[3:]],
        update_message(a_id, a, {"telephone1": "+1 555 0411", "versionnumber": 11}),
    ]
    assert rig.client.tokens is not None
    await rig.client.tokens.token()  # (fetching the first token takes turns of its own)
    results = await _send_many(pipeline, bodies)

    assert [r.state for r in results] == ["written"] * len(bodies), [r.detail for r in results]
    assert events.index("send") < len(events) - 1 - events[::-1].index("plan")  # a write before the last plan
    (patient,) = fhir.search(f"Patient?identifier=urn:dataverse:contact|{a_id}")
    assert patient["address"][0]["city"] == "Eugene"
    assert {"system": "phone", "use": "work", "value": "+1 555 0411"} in patient["telecom"]
    # Dataverse order: the Create, then version 11, then version 12 (each Provenance names its own version).
    history = [e["resource"]["meta"]["versionId"] for e in fhir.get(f"Patient/{patient['id']}/_history")["entry"]]
    written = [str(r.resource).rsplit("/", 1)[1] for r in (results[0], results[-1], results[4])]
    assert history == written  # newest first
    for result in results:
        _check_provenance(fhir, result)


async def test_later_writes_do_not_wait_for_the_early_creates_provenance(rig_factory, fhir: Fhir):
    """The rest of a batch starts once the early Creates are answered: their Provenances change no resource,
    so an update of a created row goes out while those Provenances are still on their way."""
    rig, pipeline = _batch_rig(rig_factory)
    events: list[str] = []

    async def watch(request: httpx.Request) -> None:
        entries = json.loads(request.content).get("entry", [])
        urls = {e["request"]["method"] + " " + e["request"]["url"].split("/")[0] for e in entries}
        if urls == {"PUT Provenance"} and "provenance held" not in events:
            events.append("provenance held")
            await asyncio.sleep(0.5)  # a slow answer to the first Provenance bundle
            events.append("provenance released")
        elif "PUT Patient" in urls:
            events.append("update sent")

    rig.transport.add(Fault(method="POST", url_contains="/fhir/R4", before=watch, times=-1))
    row_id, row = new_patient()
    other_id, other = new_patient()
    results = await _send_many(pipeline, [
        create_message(row_id, row),
        create_message(other_id, other),
        update_message(row_id, row, {"telephone1": "+1 555 0414", "versionnumber": 11}),
    ])

    assert [r.state for r in results] == ["written"] * 3, [r.detail for r in results]
    assert events == ["provenance held", "update sent", "provenance released"]
    for result in results:
        _check_provenance(fhir, result)
