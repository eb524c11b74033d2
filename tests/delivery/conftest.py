"""Fixtures for delivery tests: a pipeline wired to the real FHIR dev server through a fault-injecting transport."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from devtools.faults import FaultyTransport
from devtools.messages import Choice, Lookup, context
from devtools.services import FhirDevServer
from writeback.auth import fhir_tokens
from writeback.bundles import BatchDelivery
from writeback.fhir_client import FhirClient
from writeback.maps import MapSet, load_maps
from writeback.pipeline import Envelope, Pipeline, Result
from writeback.settings import DEFAULT_MAPS_DIR, Settings


@dataclass
class Rig:
    server: FhirDevServer
    settings: Settings
    transport: FaultyTransport
    client: FhirClient
    pipeline: Pipeline
    sleeps: list[float] = field(default_factory=list)

    async def send(self, body: dict[str, Any], **envelope: Any) -> Result:
        return await self.pipeline.process(Envelope(json.dumps(body).encode(), **envelope))


def env_for(server: FhirDevServer, **overrides: str) -> dict[str, str]:
    env = {
        "FHIR_URL": server.base_url, "FHIR_TOKEN_URL": server.token_url,
        "FHIR_CLIENT_ID": server.client_id, "FHIR_CLIENT_SECRET": server.client_secret,
        "FHIR_MAX_RETRIES": "3", "FHIR_RETRY_MAX_SECONDS": "30", "FHIR_CONFLICT_RETRIES": "3",
        "WRITEBACK_META_SOURCE": "urn:test:writeback",
    }
    env.update(overrides)
    return env


@pytest.fixture(scope="session")
def maps() -> MapSet:
    return load_maps(DEFAULT_MAPS_DIR)


@pytest.fixture
async def rig_factory(fhir_server: FhirDevServer, maps: MapSet) -> AsyncIterator[Callable[..., Rig]]:
    opened: list[tuple[httpx.AsyncClient, Any]] = []

    def make(server: FhirDevServer | None = None, **overrides: str) -> Rig:
        server = server or fhir_server
        settings = Settings.from_env(env_for(server, **overrides))
        transport = FaultyTransport()
        http = httpx.AsyncClient(transport=transport)
        tokens = fhir_tokens(settings)
        sleeps: list[float] = []

        async def record_sleep(seconds: float) -> None:  # retries are checked by their delays, not waited out
            sleeps.append(seconds)

        client = FhirClient(settings.fhir_url, http, tokens, settings, sleep=record_sleep)
        opened.append((http, tokens))
        return Rig(server, settings, transport, client, Pipeline(maps, settings, BatchDelivery(client)), sleeps)

    yield make
    for http, tokens in opened:
        await tokens.aclose()
        await http.aclose()


@pytest.fixture
async def rig(rig_factory: Callable[..., Rig]) -> Rig:
    return rig_factory()


class Fhir:
    """Direct access to the dev server, as another FHIR client would have it."""

    def __init__(self, server: FhirDevServer) -> None:
        self.server = server
        token = httpx.post(server.token_url, data={"grant_type": "client_credentials"},
                           auth=(server.client_id, server.client_secret)).json()["access_token"]
        self.headers = {"Authorization": f"Bearer {token}", "Accept": "application/fhir+json"}

    def get(self, path: str) -> dict[str, Any]:
        response = httpx.get(f"{self.server.base_url}/{path}", headers=self.headers)
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data

    def put(self, resource: dict[str, Any]) -> dict[str, Any]:
        response = httpx.put(f"{self.server.base_url}/{resource['resourceType']}/{resource['id']}",
                             json=resource, headers=self.headers)
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data

    def search(self, path: str) -> list[dict[str, Any]]:
        return [e["resource"] for e in self.get(path).get("entry", [])]


@pytest.fixture(scope="session")
def fhir(fhir_server: FhirDevServer) -> Fhir:
    return Fhir(fhir_server)


def new_patient(**columns: Any) -> tuple[str, dict[str, Any]]:
    """A fresh patient row (unique id, so tests sharing the server never collide)."""
    row_id = str(uuid.uuid4())
    row: dict[str, Any] = {
        "contactid": row_id, "msemr_contacttype": Choice(935000000), "msemr_azurefhirsyncenabled": True,
        "firstname": "Wren", "lastname": "Castellanos", "telephone1": "+1 555 0100",
        "mobilephone": "+1 555 0111", "address1_line1": "4 Elm Row", "address1_city": "Portland",
        "versionnumber": 10,
    }
    row.update(columns)
    return row_id, row


def create_message(row_id: str, row: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return context("Create", "contact", row_id, row, post=row, **kw)


def update_message(row_id: str, before: dict[str, Any], changes: dict[str, Any], **kw: Any) -> dict[str, Any]:
    after = {**before, **changes}
    return context("Update", "contact", row_id, changes, pre=before, post=after, **kw)


def identifier_message(parent: str, value: str, version: int = 1) -> dict[str, Any]:
    row_id = new_patient()[0]
    row = {"msemr_medicalidentifierid": row_id, "msemr_assignee": Lookup("contact", parent),
           "msemr_identifiersystem": "urn:oid:2.16.840.1.113883.4.1", "msemr_value": value, "versionnumber": version}
    return context("Create", "msemr_medicalidentifier", row_id, row, post=row)


def encounter_message(patient_id: str) -> tuple[str, dict[str, Any]]:
    """A visit's Create, its subject the patient row `patient_id`."""
    encounter_id = new_patient()[0]
    row = {"msemr_encounterid": encounter_id, "msemr_encounterstatus": Choice(935000003),
           "msemr_encounterclass": Choice(935000001), "msemr_subjectpatient": Lookup("contact", patient_id),
           "versionnumber": 20}
    return encounter_id, context("Create", "msemr_encounter", encounter_id, row, post=row)
