"""The loopback FHIR server behaves like the FHIR R4 server the product writes to.

Real server (Medplum's engine behind fhirdev/server.mjs), real HTTP, no mocks.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from azure.data.tables import TableServiceClient

from devtools.services import Azurite, FhirDevServer, fhir_dev_server

FHIR_JSON = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}


def get_token(server: FhirDevServer) -> str:
    response = httpx.post(
        server.token_url,
        data={"grant_type": "client_credentials"},
        auth=(server.client_id, server.client_secret),
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == server.token_ttl
    token: str = body["access_token"]
    return token


@pytest.fixture(scope="module")
def fhir(fhir_server: FhirDevServer) -> Iterator[httpx.Client]:
    """An authenticated client on the FHIR base URL."""
    token = get_token(fhir_server)
    with httpx.Client(
        base_url=fhir_server.base_url,
        headers={"Authorization": f"Bearer {token}", **FHIR_JSON},
        timeout=30.0,
    ) as client:
        yield client


def unique_identifier() -> dict[str, str]:
    return {"system": "urn:test:mrn", "value": str(uuid.uuid4())}


def version_from_etag(etag: str) -> str:
    assert etag.startswith('W/"') and etag.endswith('"'), etag
    return etag[3:-1]


def create_patient(fhir: httpx.Client, **fields: Any) -> httpx.Response:
    response = fhir.post("/Patient", json={"resourceType": "Patient", **fields})
    assert response.status_code == 201, response.text
    return response


# ---- OAuth ---------------------------------------------------------------------------------------


def test_fhir_request_without_token_is_rejected(fhir_server: FhirDevServer) -> None:
    response = httpx.get(f"{fhir_server.base_url}/Patient", headers=FHIR_JSON)

    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.json()["resourceType"] == "OperationOutcome"


def test_metadata_also_requires_a_token(fhir_server: FhirDevServer) -> None:
    assert httpx.get(f"{fhir_server.base_url}/metadata").status_code == 401

    token = get_token(fhir_server)
    response = httpx.get(f"{fhir_server.base_url}/metadata", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200
    assert response.json()["fhirVersion"] == "4.0.1"


def test_unknown_token_is_rejected(fhir_server: FhirDevServer) -> None:
    response = httpx.get(f"{fhir_server.base_url}/Patient", headers={"Authorization": "Bearer not-a-token"})

    assert response.status_code == 401
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]


def test_token_endpoint_rejects_a_wrong_secret(fhir_server: FhirDevServer) -> None:
    basic = httpx.post(
        fhir_server.token_url,
        data={"grant_type": "client_credentials"},
        auth=(fhir_server.client_id, "wrong-secret"),
    )
    form = httpx.post(
        fhir_server.token_url,
        data={
            "grant_type": "client_credentials",
            "client_id": fhir_server.client_id,
            "client_secret": "wrong-secret",
        },
    )

    for response in (basic, form):
        assert response.status_code == 401
        assert response.json()["error"] == "invalid_client"
        assert "access_token" not in response.json()


def test_token_endpoint_rejects_other_grants(fhir_server: FhirDevServer) -> None:
    response = httpx.post(
        fhir_server.token_url,
        data={"grant_type": "password", "username": "u", "password": "p"},
        auth=(fhir_server.client_id, fhir_server.client_secret),
    )

    assert response.status_code == 400
    assert response.json()["error"] == "unsupported_grant_type"


def test_token_from_form_credentials_works_and_is_counted(fhir_server: FhirDevServer) -> None:
    before = fhir_server.stats()
    response = httpx.post(
        fhir_server.token_url,
        data={
            "grant_type": "client_credentials",
            "client_id": fhir_server.client_id,
            "client_secret": fhir_server.client_secret,
            "scope": f"{fhir_server.base_url}/.default",
        },
    )
    assert response.status_code == 200
    token = response.json()["access_token"]

    headers = {"Authorization": f"Bearer {token}"}
    for _ in range(3):
        assert httpx.get(f"{fhir_server.base_url}/Patient?_count=1", headers=headers).status_code == 200

    after = fhir_server.stats()
    assert after["tokens_issued"] == before["tokens_issued"] + 1
    assert after["requests"] == before["requests"] + 3


def test_expired_token_is_rejected() -> None:
    with fhir_dev_server(token_ttl=1) as server:
        token = get_token(server)
        headers = {"Authorization": f"Bearer {token}"}
        assert httpx.get(f"{server.base_url}/Patient", headers=headers).status_code == 200

        time.sleep(1.2)
        response = httpx.get(f"{server.base_url}/Patient", headers=headers)

        assert response.status_code == 401
        assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
        assert (
            httpx.get(
                f"{server.base_url}/Patient", headers={"Authorization": f"Bearer {get_token(server)}"}
            ).status_code
            == 200
        )


# ---- FHIR interactions ------------------------------------------------------------------------------


def test_create_returns_201_with_etag_and_versioned_location(fhir: httpx.Client, fhir_server: FhirDevServer) -> None:
    response = create_patient(fhir, name=[{"family": "Quintero", "given": ["Rosalind"]}])

    patient = response.json()
    version = patient["meta"]["versionId"]
    assert response.headers["Content-Type"].startswith("application/fhir+json")
    assert version_from_etag(response.headers["ETag"]) == version
    assert response.headers["Location"] == f"{fhir_server.base_url}/Patient/{patient['id']}/_history/{version}"
    assert response.headers["Last-Modified"].endswith("GMT")
    assert patient["name"][0]["family"] == "Quintero"

    read = fhir.get(f"/Patient/{patient['id']}")
    assert read.status_code == 200
    assert read.json()["name"] == patient["name"]
    assert read.headers["ETag"] == response.headers["ETag"]


def test_create_ignores_a_client_supplied_id(fhir: httpx.Client) -> None:
    patient = create_patient(fhir, id="chosen-by-client").json()

    assert patient["id"] != "chosen-by-client"


def test_invalid_resource_is_rejected_with_operation_outcome(fhir: httpx.Client) -> None:
    response = fhir.post("/Patient", json={"resourceType": "Patient", "notAnElement": True})

    assert response.status_code == 400
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["severity"] == "error"


def test_conditional_create_twice_yields_one_resource(fhir: httpx.Client) -> None:
    identifier = unique_identifier()
    condition = {"If-None-Exist": f"identifier={identifier['system']}|{identifier['value']}"}
    body = {"resourceType": "Patient", "identifier": [identifier], "gender": "female"}

    first = fhir.post("/Patient", json=body, headers=condition)
    second = fhir.post("/Patient", json={**body, "gender": "male"}, headers=condition)

    assert first.status_code == 201
    assert second.status_code == 200
    assert second.json()["id"] == first.json()["id"]
    assert second.json()["gender"] == "female"  # the existing resource, untouched
    search = fhir.get("/Patient", params={"identifier": f"{identifier['system']}|{identifier['value']}"})
    assert search.status_code == 200
    assert search.json()["total"] == 1


def test_identifier_search_follows_the_current_version_like_a_full_scan(fhir: httpx.Client) -> None:
    """Identifier searches are answered from the server's index; the answers must be those of a full scan
    (an OR list, which the index does not take, is the scan), also after the identifier changes."""

    def ids(query: str) -> list[str]:
        response = fhir.get(f"Patient?{query}")
        assert response.status_code == 200, response.text
        return sorted(e["resource"]["id"] for e in response.json().get("entry", []))

    old, new, other = unique_identifier(), unique_identifier(), unique_identifier()
    created = fhir.post("Patient", json={"resourceType": "Patient", "identifier": [old, other]}).json()
    twin = fhir.post("Patient", json={"resourceType": "Patient", "identifier": [other]}).json()
    token = f"identifier={old['system']}|{old['value']}"
    assert ids(token) == ids(f"{token},urn:none|none") == [created["id"]]
    assert ids(f"identifier={other['system']}|{other['value']}") == sorted([created["id"], twin["id"]])

    moved = {**created, "identifier": [new]}
    assert fhir.put(f"Patient/{created['id']}", json=moved).status_code == 200
    assert ids(token) == ids(f"{token},urn:none|none") == []
    assert ids(f"identifier={new['system']}|{new['value']}") == [created["id"]]
    assert ids(f"identifier={other['system']}|{other['value']}") == [twin["id"]]
    assert fhir.delete(f"Patient/{twin['id']}").status_code in (200, 204)
    assert ids(f"identifier={other['system']}|{other['value']}") == []


def test_update_with_stale_if_match_fails_with_412(fhir: httpx.Client) -> None:
    created = create_patient(fhir, active=True)
    patient = created.json()
    stale_etag = created.headers["ETag"]

    updated = fhir.put(f"/Patient/{patient['id']}", json={**patient, "active": False}, headers={"If-Match": stale_etag})
    assert updated.status_code == 200
    assert updated.headers["ETag"] != stale_etag

    conflicting = fhir.put(
        f"/Patient/{patient['id']}", json={**patient, "gender": "other"}, headers={"If-Match": stale_etag}
    )

    assert conflicting.status_code == 412
    assert conflicting.json()["resourceType"] == "OperationOutcome"
    current = fhir.get(f"/Patient/{patient['id']}").json()
    assert current["active"] is False
    assert "gender" not in current


def test_json_patch_applies_and_bumps_version(fhir: httpx.Client) -> None:
    created = create_patient(fhir, active=False)
    patient_id = created.json()["id"]

    patched = fhir.patch(
        f"/Patient/{patient_id}",
        json=[{"op": "replace", "path": "/active", "value": True}, {"op": "add", "path": "/gender", "value": "female"}],
        headers={"Content-Type": "application/json-patch+json", "If-Match": created.headers["ETag"]},
    )

    assert patched.status_code == 200, patched.text
    assert patched.json()["active"] is True
    assert patched.json()["gender"] == "female"
    assert patched.headers["ETag"] != created.headers["ETag"]
    assert version_from_etag(patched.headers["ETag"]) == patched.json()["meta"]["versionId"]

    stale = fhir.patch(
        f"/Patient/{patient_id}",
        json=[{"op": "replace", "path": "/active", "value": False}],
        headers={"Content-Type": "application/json-patch+json", "If-Match": created.headers["ETag"]},
    )
    assert stale.status_code == 412


def test_fhirpath_patch_applies(fhir: httpx.Client) -> None:
    patient_id = create_patient(fhir).json()["id"]
    parameters = {
        "resourceType": "Parameters",
        "parameter": [
            {
                "name": "operation",
                "part": [
                    {"name": "type", "valueCode": "add"},
                    {"name": "path", "valueString": "Patient"},
                    {"name": "name", "valueString": "birthDate"},
                    {"name": "value", "valueDate": "1987-07-25"},
                ],
            }
        ],
    }

    patched = fhir.patch(f"/Patient/{patient_id}", json=parameters, headers={"Content-Type": "application/fhir+json"})

    assert patched.status_code == 200, patched.text
    assert patched.json()["birthDate"] == "1987-07-25"


def test_vread_returns_an_old_version(fhir: httpx.Client) -> None:
    created = create_patient(fhir, active=False)
    patient = created.json()
    old_version = patient["meta"]["versionId"]
    fhir.put(f"/Patient/{patient['id']}", json={**patient, "active": True}).raise_for_status()

    old = fhir.get(f"/Patient/{patient['id']}/_history/{old_version}")
    history = fhir.get(f"/Patient/{patient['id']}/_history")

    assert old.status_code == 200
    assert old.json()["active"] is False
    assert old.json()["meta"]["versionId"] == old_version
    assert [e["resource"]["active"] for e in history.json()["entry"]] == [True, False]  # newest first


def test_batch_of_two_creates_answers_per_entry(fhir: httpx.Client, fhir_server: FhirDevServer) -> None:
    identifier = unique_identifier()
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {
                "resource": {"resourceType": "Patient", "identifier": [identifier]},
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                "resource": {"resourceType": "Practitioner", "name": [{"family": "Okafor"}]},
                "request": {"method": "POST", "url": "Practitioner"},
            },
        ],
    }

    response = fhir.post("", json=bundle)

    assert response.status_code == 200, response.text
    result = response.json()
    assert result["type"] == "batch-response"
    assert [entry["response"]["status"] for entry in result["entry"]] == ["201", "201"]
    for entry in result["entry"]:
        resource = entry["resource"]
        version = resource["meta"]["versionId"]
        assert entry["response"]["etag"] == f'W/"{version}"'
        assert entry["response"]["location"].endswith(
            f"/{resource['resourceType']}/{resource['id']}/_history/{version}"
        )
        assert fhir.get(f"/{resource['resourceType']}/{resource['id']}").status_code == 200


def test_transaction_resolves_urn_uuid_references(fhir: httpx.Client) -> None:
    patient_urn = f"urn:uuid:{uuid.uuid4()}"
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": patient_urn,
                "resource": {"resourceType": "Patient"},
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                "resource": {
                    "resourceType": "Observation",
                    "status": "final",
                    "code": {"text": "Heart rate"},
                    "subject": {"reference": patient_urn},
                },
                "request": {"method": "POST", "url": "Observation"},
            },
        ],
    }

    response = fhir.post("", json=bundle)

    assert response.status_code == 200, response.text
    patient, observation = (entry["resource"] for entry in response.json()["entry"])
    assert observation["subject"]["reference"] == f"Patient/{patient['id']}"


def test_prefer_return_minimal_sends_no_body(fhir: httpx.Client) -> None:
    response = fhir.post("/Patient", json={"resourceType": "Patient"}, headers={"Prefer": "return=minimal"})

    assert response.status_code == 201
    assert response.content == b""
    assert "/_history/" in response.headers["Location"]


# ---- Azurite -------------------------------------------------------------------------------------


def test_azurite_keeps_data_across_stop_and_start(azurite_tables: Azurite) -> None:
    table_name = f"t{uuid.uuid4().hex[:12]}"
    service = TableServiceClient.from_connection_string(azurite_tables.connection_string)
    service.create_table(table_name).upsert_entity({"PartitionKey": "p", "RowKey": "r", "value": 42})
    port = azurite_tables.port

    azurite_tables.stop()
    try:
        with pytest.raises(httpx.ConnectError):
            httpx.get(azurite_tables.table_endpoint, timeout=2.0)
    finally:
        azurite_tables.start()

    assert azurite_tables.port == port
    assert azurite_tables.table_endpoint == f"http://127.0.0.1:{port}/devstoreaccount1"
    assert service.get_table_client(table_name).get_entity("p", "r")["value"] == 42
