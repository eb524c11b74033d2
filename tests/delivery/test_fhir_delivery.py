"""Delivery against the real FHIR dev server (Medplum's engine): creates under the row's own id, whole-row
updates under optimistic concurrency that keep what no map owns, Provenance, auth and retries. Faults are
injected by an httpx transport in front of it, on whole bundles or on single entries of a bundle."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx

from devtools.faults import EntryFault, Fault
from devtools.messages import Choice, context
from devtools.services import fhir_dev_server
from tests.delivery.conftest import Fhir, Rig, create_message, new_patient, update_message
from writeback.fhir_client import build_delivery
from writeback.pipeline import Envelope, Pipeline
from writeback.reasons import Reason
from writeback.settings import Settings

CANARY = "Zebediah-Canary-7731"


def _id_and_version(reference: str) -> tuple[str, str, str]:
    resource_type, resource_id, _, version = reference.split("/")
    return resource_type, resource_id, version


async def test_create_writes_the_mapped_resource_with_identifier_and_meta_source(rig: Rig, fhir: Fhir):
    row_id, row = new_patient()
    result = await rig.send(create_message(row_id, row))
    assert result.state == "written", result.detail
    assert result.resource is not None
    resource_type, resource_id, version = _id_and_version(result.resource)
    patient = fhir.get(f"Patient/{resource_id}/_history/{version}")
    assert resource_type == "Patient"
    assert {"system": "urn:dataverse:contact", "value": row_id} in patient["identifier"]
    assert patient["meta"]["source"] == "urn:test:writeback"
    assert patient["name"][0]["family"] == "Castellanos"
    assert {"system": "phone", "use": "work", "value": "+1 555 0100"} in patient["telecom"]


async def test_provenance_names_the_exact_version_written(rig: Rig, fhir: Fhir):
    row_id, row = new_patient()
    message = create_message(row_id, row)
    result = await rig.send(message)
    assert result.provenance is not None and result.resource is not None
    provenance = fhir.get(result.provenance.split("/_history")[0])
    assert provenance["target"] == [{"reference": result.resource}]
    assert "/_history/" in provenance["target"][0]["reference"]
    assert provenance["activity"]["coding"][0] == {
        "system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation", "code": "CREATE", "display": "create"}
    roles = {a["type"]["coding"][0]["code"]: a["who"] for a in provenance["agent"]}
    assert roles["author"]["identifier"]["value"] == message["InitiatingUserId"]
    assert "assembler" in roles
    entity = provenance["entity"][0]
    assert entity["role"] == "source"
    assert entity["what"]["identifier"] == {"system": "urn:dataverse:contact", "value": row_id}
    assert "versionnumber 10" in entity["what"]["display"]
    assert provenance["recorded"]
    assert provenance["meta"]["source"] == "urn:test:writeback"


async def test_the_same_create_delivered_twice_makes_one_resource_and_one_version(rig: Rig, fhir: Fhir):
    row_id, row = new_patient()
    message = create_message(row_id, row)
    first = await rig.send(message)
    second = await rig.send(message)
    assert first.state == "written"
    assert (second.state, second.reason) == ("skipped", Reason.NO_CHANGE)  # that version is already there
    [found] = fhir.search(f"Patient?identifier=urn:dataverse:contact|{row_id}")
    assert first.resource == f"Patient/{found['id']}/_history/{found['meta']['versionId']}"


async def test_update_changes_only_its_elements_and_server_data_survives(rig: Rig, fhir: Fhir):
    row_id, row = new_patient()
    created = await rig.send(create_message(row_id, row))
    assert created.resource is not None
    _, resource_id, _ = _id_and_version(created.resource)
    # Another system adds data no map owns.
    current = fhir.get(f"Patient/{resource_id}")
    theirs = {"url": "http://example.org/favourite-colour", "valueString": "teal"}
    current["extension"].append(theirs)
    current["name"].append({"use": "nickname", "given": ["Birdie"]})
    current["communication"] = [{"language": {"text": "Welsh"}}]
    current["telecom"].append({"system": "fax", "value": "+1 555 0199"})
    fhir.put(current)

    result = await rig.send(update_message(row_id, row, {"telephone1": "+1 555 0123", "address1_city": None,
                                                         "versionnumber": 11}))
    assert result.state == "written", result.detail
    assert result.resource is not None
    patient = fhir.get(result.resource)
    assert theirs in patient["extension"]
    assert {"use": "nickname", "given": ["Birdie"]} in patient["name"]
    assert patient["communication"] == current["communication"]
    telecom = patient["telecom"]
    assert {"system": "phone", "use": "work", "value": "+1 555 0123"} in telecom
    assert {"system": "phone", "use": "mobile", "value": "+1 555 0111"} in telecom
    assert {"system": "fax", "value": "+1 555 0199"} in telecom
    assert "city" not in patient["address"][0]  # cleared in Dataverse, cleared in FHIR
    assert patient["address"][0]["line"] == ["4 Elm Row"]
    provenance = fhir.get(result.provenance.split("/_history")[0]) if result.provenance else {}
    assert provenance["activity"]["coding"][0]["code"] == "UPDATE"
    assert provenance["target"] == [{"reference": result.resource}]


async def test_update_finds_its_target_by_the_fhir_id_column(rig: Rig, fhir: Fhir):
    row_id, row = new_patient()
    created = await rig.send(create_message(row_id, row))
    assert created.resource is not None
    _, resource_id, _ = _id_and_version(created.resource)
    synced = {**row, "msemr_azurefhirid": resource_id}
    result = await rig.send(update_message(row_id, synced, {"lastname": "Castellanos-Reyes", "versionnumber": 11}))
    assert result.state == "written"
    assert fhir.get(f"Patient/{resource_id}")["name"][0]["family"] == "Castellanos-Reyes"
    assert {"method": "GET", "url": f"Patient/{resource_id}"} in [e["request"] for e in rig.transport.entries]


async def test_an_update_before_its_create_writes_the_whole_row_a_target_only_one_waits(rig: Rig, fhir: Fhir):
    row_id, row = new_patient()
    # With its post-image an update knows the whole row: it creates the resource the Create would have.
    early = await rig.send(update_message(row_id, row, {"lastname": "Early", "versionnumber": 11}))
    assert early.state == "written", early.detail
    [patient] = fhir.search(f"Patient?identifier=urn:dataverse:contact|{row_id}")
    assert patient["name"][0]["family"] == "Early"
    late = await rig.send(create_message(row_id, row))  # version 10 comes after 11: nothing older overwrites
    assert (late.state, late.reason) == ("skipped", Reason.STALE)
    assert fhir.get(f"Patient/{patient['id']}")["name"][0]["family"] == "Early"
    # Without images (Target only), nothing but the changed columns is known: it waits for the Create.
    other_id, _ = new_patient()
    target_only = context("Update", "contact", other_id, {"lastname": "Nobody", "msemr_contacttype": Choice(935000000),
                                                           "msemr_azurefhirsyncenabled": True})
    pending = await rig.send(target_only)
    assert (pending.state, pending.reason, pending.settlement) == ("retry", Reason.TARGET_PENDING, "reschedule")
    # A FHIR id the server does not have is a real miss: nothing will come to fix it.
    by_id = await rig.send(update_message(row_id, {**row, "msemr_azurefhirid": "does-not-exist"},
                                          {"lastname": "Nobody", "versionnumber": 12}))
    assert (by_id.state, by_id.reason) == ("dead-lettered", Reason.TARGET_MISSING)


async def test_a_concurrent_change_between_read_and_write_is_detected_and_reapplied(rig: Rig, fhir: Fhir):
    row_id, row = new_patient()
    created = await rig.send(create_message(row_id, row))
    assert created.resource is not None
    _, resource_id, _ = _id_and_version(created.resource)

    async def someone_else_writes(_: httpx.Request) -> None:
        other = fhir.get(f"Patient/{resource_id}")
        other["active"] = True
        await asyncio.to_thread(fhir.put, other)

    fault = rig.transport.add(Fault(method="POST", path_endswith="/R4", body_contains=b'"ifMatch"',
                                    before=someone_else_writes))
    result = await rig.send(update_message(row_id, row, {"mobilephone": "+1 555 0142", "versionnumber": 11}))
    assert fault.fired == 1
    assert result.state == "written", result.detail
    puts = [e for e in rig.transport.entries if e["request"] == {
        "method": "PUT", "url": f"Patient/{resource_id}", "ifMatch": e["request"].get("ifMatch")}]
    assert len(puts) == 2  # the first was refused (412), the change re-applied on the new version
    patient = fhir.get(f"Patient/{resource_id}")
    assert patient["active"] is True  # the concurrent change (of an element no map owns) survived
    assert {"system": "phone", "use": "mobile", "value": "+1 555 0142"} in patient["telecom"]


async def test_a_resource_that_keeps_changing_ends_in_conflict(rig: Rig):
    row_id, row = new_patient()
    await rig.send(create_message(row_id, row))
    rig.transport.add_entry(EntryFault(method="PUT", url_contains="Patient/", status=412, times=-1,
                                       outcome={"resourceType": "OperationOutcome",
                                                "issue": [{"severity": "error", "code": "conflict"}]}))
    result = await rig.send(update_message(row_id, row, {"lastname": "Again", "versionnumber": 11}))
    assert (result.state, result.reason) == ("retry", Reason.CONFLICT)


async def test_operation_outcome_warnings_are_kept_with_the_result(rig: Rig):
    def with_warnings(entry: dict[str, Any]) -> dict[str, Any]:
        outcome: dict[str, Any] = {"resourceType": "OperationOutcome", "issue": [
            {"severity": "warning", "code": "business-rule", "diagnostics": CANARY,
             "expression": ["Patient.telecom[0]"]},
            {"severity": "information", "code": "informational", "details": {"coding": [{"code": "MSG_UPDATED"}]}},
        ]}
        return {**entry, "response": {**entry["response"], "outcome": outcome}}

    rig.transport.add_entry(EntryFault(method="PUT", url_contains="Patient/", rewrite=with_warnings))
    row_id, row = new_patient()
    result = await rig.send(create_message(row_id, row))
    assert result.state == "written", result.detail
    assert [(i.severity, i.code) for i in result.issues] == [("warning", "business-rule"),
                                                             ("information", "informational")]
    assert result.issues[0].expression == "Patient.telecom[0]"
    assert result.issues[1].details == "MSG_UPDATED"
    assert all(CANARY not in repr(i) for i in result.issues)  # diagnostics may echo values: never kept


async def test_429_and_503_with_retry_after_are_retried_then_succeed(rig: Rig, fhir: Fhir):
    rig.transport.add(Fault(method="POST", path_endswith="/R4", status=429, headers={"Retry-After": "2"}))
    rig.transport.add(Fault(method="POST", path_endswith="/R4", status=503, headers={"Retry-After": "1"}))
    row_id, row = new_patient()
    result = await rig.send(create_message(row_id, row))
    assert result.state == "written", result.detail
    assert rig.sleeps == [2.0, 1.0]  # Retry-After honoured
    assert len(fhir.search(f"Patient?identifier=urn:dataverse:contact|{row_id}")) == 1


async def test_connection_errors_and_timeouts_are_retried_with_backoff(rig: Rig):
    rig.transport.add(Fault(method="POST", path_endswith="/R4", error=httpx.ConnectError))
    rig.transport.add(Fault(method="POST", path_endswith="/R4", error=httpx.ReadTimeout))
    row_id, row = new_patient()
    result = await rig.send(create_message(row_id, row))
    assert result.state == "written"
    assert len(rig.sleeps) == 2 and 0.25 <= rig.sleeps[0] <= 0.5 and 0.5 <= rig.sleeps[1] <= 1.0  # jittered, doubling


async def test_a_persistent_503_ends_as_fhir_unavailable(rig: Rig):
    rig.transport.add(Fault(method="POST", path_endswith="/R4", status=503, times=-1))
    row_id, row = new_patient()
    result = await rig.send(create_message(row_id, row))
    assert (result.state, result.reason) == ("retry", Reason.FHIR_UNAVAILABLE)
    assert len(rig.sleeps) == 3  # FHIR_MAX_RETRIES


async def test_retrying_stops_at_the_total_time_bound(rig_factory):
    rig = rig_factory(FHIR_MAX_RETRIES="10", FHIR_RETRY_MAX_SECONDS="5")
    rig.transport.add(Fault(method="POST", path_endswith="/R4", status=429, headers={"Retry-After": "3"}, times=-1))
    row_id, row = new_patient()
    result = await rig.send(create_message(row_id, row))
    assert result.reason == Reason.FHIR_UNAVAILABLE
    assert sum(rig.sleeps) <= 5


async def test_a_refused_resource_is_fhir_rejected_without_the_servers_diagnostics(rig: Rig):
    rig.transport.add_entry(EntryFault(method="PUT", url_contains="Patient/", status=422, outcome={
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "invariant", "diagnostics": CANARY, "expression": ["Patient.name"]}]}))
    row_id, row = new_patient()
    result = await rig.send(create_message(row_id, row))
    assert (result.state, result.reason) == ("dead-lettered", Reason.FHIR_REJECTED)
    assert "invariant" in result.detail and "Patient.name" in result.detail
    assert CANARY not in result.detail


async def test_a_failed_provenance_is_its_own_outcome_and_the_retry_writes_it(rig: Rig, fhir: Fhir):
    fault = rig.transport.add_entry(EntryFault(method="PUT", url_contains="Provenance/", status=500, times=4))
    row_id, row = new_patient()
    message = create_message(row_id, row)
    failed = await rig.send(message)
    assert (failed.state, failed.reason) == ("retry", Reason.PROVENANCE_FAILED)
    assert fault.fired == 4
    [patient] = fhir.search(f"Patient?identifier=urn:dataverse:contact|{row_id}")
    versioned = f"Patient/{patient['id']}/_history/{patient['meta']['versionId']}"
    assert not fhir.search(f"Provenance?target={versioned}")
    again = await rig.send(message, delivery_count=2)  # the retry finds its version in place ...
    assert (again.state, again.reason, again.resource) == ("written", None, versioned)
    [provenance] = fhir.search(f"Provenance?target={versioned}")  # ... and writes the Provenance it owes
    assert provenance["activity"]["coding"][0]["code"] == "CREATE"
    assert len(fhir.search(f"Patient?identifier=urn:dataverse:contact|{row_id}")) == 1


async def test_the_token_is_fetched_once_cached_and_refreshed_before_expiry(rig_factory):
    with fhir_dev_server(token_ttl=2) as short_lived:
        rig = rig_factory(short_lived)
        for _ in range(3):
            row_id, row = new_patient()
            assert (await rig.send(create_message(row_id, row))).state == "written"
        assert short_lived.stats()["tokens_issued"] == 1  # cached across messages and requests
        await asyncio.sleep(2.1)
        row_id, row = new_patient()
        assert (await rig.send(create_message(row_id, row))).state == "written"
        assert short_lived.stats()["tokens_issued"] == 2  # refreshed, no 401 on the way
        assert not any(r.headers.get("authorization", "").endswith("None") for r in rig.transport.requests)


async def test_a_bad_client_secret_is_unauthorized_a_configuration_fault(rig_factory, fhir_server):
    rig = rig_factory(FHIR_CLIENT_SECRET="not-the-secret")
    row_id, row = new_patient()
    result = await rig.send(create_message(row_id, row))
    assert (result.state, result.reason) == ("config-error", Reason.UNAUTHORIZED)
    assert result.settlement == "reschedule"  # never dead-lettered: the message waits for the fix
    assert "not-the-secret" not in result.detail
    assert "check FHIR_CLIENT_ID and FHIR_CLIENT_SECRET" in result.detail


async def test_a_wrong_token_url_says_what_the_endpoint_answered_and_names_the_setting(rig_factory, fhir_server):
    """A token URL that is no token endpoint (the dev server answers 404 there) was reported as an answer without
    an access_token, naming no setting (found trying the product as a new user)."""
    rig = rig_factory(FHIR_TOKEN_URL=fhir_server.token_url.rsplit("/", 1)[0] + "/no-such-endpoint")
    row_id, row = new_patient()
    result = await rig.send(create_message(row_id, row))
    assert (result.state, result.reason, result.settlement) == ("config-error", Reason.UNAUTHORIZED, "reschedule")
    assert "answered HTTP 404, not a token: check that FHIR_TOKEN_URL is the OAuth token endpoint" in result.detail


async def test_a_403_from_the_fhir_server_is_unauthorized(rig: Rig):
    rig.transport.add(Fault(method="POST", path_endswith="/R4", status=403, times=-1))
    row_id, row = new_patient()
    result = await rig.send(create_message(row_id, row))
    assert (result.state, result.reason) == ("config-error", Reason.UNAUTHORIZED)


async def test_alternate_endpoint_receives_the_resource_and_its_provenance(fhir_server, maps, fhir: Fhir):
    """The dev server stands in for the user's endpoint: it accepts the transaction bundle we post."""
    settings = Settings.from_env({
        "WRITEBACK_TARGET": "alternate", "ALTERNATE_ENDPOINT_URL": fhir_server.base_url,
        "ALTERNATE_TOKEN_URL": fhir_server.token_url, "ALTERNATE_CLIENT_ID": fhir_server.client_id,
        "ALTERNATE_CLIENT_SECRET": fhir_server.client_secret, "WRITEBACK_META_SOURCE": "urn:test:alternate"})
    delivery, aclose = build_delivery(settings)
    try:
        row_id, row = new_patient()
        result = await Pipeline(maps, settings, delivery).process(Envelope(json.dumps(create_message(row_id, row))))
    finally:
        await aclose()
    assert result.state == "written", result.detail
    [patient] = fhir.search(f"Patient?identifier=urn:dataverse:contact|{row_id}")
    assert patient["meta"]["source"] == "urn:test:alternate"
    provenances = fhir.search(f"Provenance?target=Patient/{patient['id']}")
    assert len(provenances) == 1
    assert provenances[0]["target"][0]["reference"].startswith(f"Patient/{patient['id']}")
