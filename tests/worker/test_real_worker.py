"""The real Python worker library loads function_app.py and runs it, driven the way the Functions host drives it.

For each installed Python 3.11 to 3.13 a worker process (tests/worker/worker.py around the `azure-functions-runtime`
library, with the grpcio/protobuf the production worker bundles) connects to the emulated host (tests/worker/
host.py). The host sends WorkerInitRequest (the worker indexes function_app.py and applies its load checks: the
check that once rejected `list[ServiceBusReceivedMessage]` runs here), FunctionsMetadataRequest,
FunctionLoadRequest and an InvocationRequest whose trigger input is a CollectionModelBindingData of Service Bus
messages in the host's format. The app settles each message through the Service Bus extension's gRPC client, whose
calls arrive at the host's Settlement service: that is what is asserted, message by message.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from devtools.messages import Choice, context
from devtools.services import Azurite, FhirDevServer
from tests.function.sb import host_content
from tests.worker import toolchain
from tests.worker.host import EmulatedHost, Settlement, worker_environment
from writeback.settings import SETTINGS

PATIENT = Choice(935000000)
ROW_SYSTEM = "urn:dataverse:contact"  # the identifier system of the shipped contact map
APP_SETTINGS = [spec.name for spec in SETTINGS]
ISOLATE = {"PYTHON_ISOLATE_WORKER_DEPENDENCIES": "1"}  # as the Bicep and local.settings.sample.json set it


@dataclass(frozen=True)
class Message:
    body: bytes
    content_type: str
    message_id: str
    lock_token: uuid.UUID

    def content(self) -> bytes:
        return host_content(self.body, message_id=self.message_id, content_type=self.content_type,
                            lock_token=self.lock_token)


def message(body: bytes, content_type: str = "application/json") -> Message:
    return Message(body, content_type, f"worker-{uuid.uuid4().hex[:12]}", uuid.uuid4())


def contact_create(record_id: str, contact_type: Choice | None) -> bytes:
    """A Dataverse Create of a contact that consented to the sync (fictional person); None: images without its
    Contact Type (`invalid-contact-type`, dead-lettered)."""
    row: dict[str, object] = {"contactid": record_id, "msemr_contacttype": contact_type,
                              "msemr_azurefhirsyncenabled": True, "firstname": "Ottilie",
                              "lastname": "Vandersloot", "gendercode": Choice(2), "versionnumber": 1}
    if contact_type is None:
        del row["msemr_contacttype"]
    return json.dumps(context("Create", "contact", record_id, row, post=row)).encode()


def assert_success(host: EmulatedHost, result: Any, what: str) -> None:
    if result.status != host.rpc.StatusResult.Success:
        raise host.failure(f"{what} failed: {result.exception.message}\n{result.exception.stack_trace}")


def boot(host: EmulatedHost, chain: toolchain.Toolchain, settings: Mapping[str, str]) -> Any:
    """Start the worker, index the app, check what it reports, load the function; its metadata."""
    host.start_worker(chain, worker_environment(settings, drop=APP_SETTINGS))
    init = host.initialize(toolchain.REPO_ROOT, chain.bundle)
    assert_success(host, init.result, "WorkerInitRequest (indexing function_app.py)")
    assert init.worker_metadata.runtime_version == toolchain.label(chain.version)
    response = host.functions_metadata(toolchain.REPO_ROOT)
    assert_success(host, response.result, "FunctionsMetadataRequest")
    [function] = response.function_metadata_results
    assert function.name == "writeback"
    assert not function.HasField("status") or function.status.status == host.rpc.StatusResult.Success
    assert set(function.bindings) == {"messages"}  # message_actions is the settlement client, not a binding
    binding = function.bindings["messages"]
    assert (binding.type, binding.direction) == ("serviceBusTrigger", host.rpc.BindingInfo.Direction.Value("in"))
    [raw] = [b for b in map(json.loads, function.raw_bindings) if b["name"] == "messages"]
    assert raw["type"] == "serviceBusTrigger" and raw["direction"].lower() == "in"
    assert raw["cardinality"].lower() == "many"
    assert raw["autoCompleteMessages"] is False
    assert (raw["queueName"], raw["connection"]) == ("%WRITEBACK_QUEUE_NAME%", "ServiceBusConnection")
    assert_success(host, host.load(function).result, "FunctionLoadRequest")
    if chain.version >= (3, 13):  # runtime version control: the app's pinned library, not the bundle's
        assert any(f"from {chain.site_packages}" in line for line in host.logs), host.logs
    # Isolation at work: the worker talks to the host on the grpcio it bundles, the app runs on its own copies.
    [versions] = [m.groupdict() for m in map(VERSIONS.search, host.logs) if m]
    assert versions["worker_grpcio"].startswith("1.70.")
    assert release(versions["app_grpcio"]) >= (1, 74) and release(versions["app_protobuf"]) >= (6, 31, 1)
    return function


VERSIONS = re.compile(r"versions: worker grpcio=(?P<worker_grpcio>\S+); app grpcio=(?P<app_grpcio>\S+) "
                      r"protobuf=(?P<app_protobuf>\S+)")


def release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".")[:3] if part.isdigit())


def invoke(host: EmulatedHost, function: Any, batch: list[Message]) -> dict[str, Settlement]:
    """One invocation with `batch`; each message's single settlement call, by message id."""
    response = host.invoke_service_bus_batch(function.function_id, "messages", [m.content() for m in batch],
                                             [m.message_id for m in batch])
    assert_success(host, response.result, "InvocationRequest")
    calls = host.settlements_snapshot()
    by_token = {str(m.lock_token): m.message_id for m in batch}
    assert sorted(c.lock_token for c in calls) == sorted(by_token), f"one settlement per message: {calls}"
    return {by_token[c.lock_token]: c for c in calls}


@pytest.fixture
def live_settings(fhir_server: FhirDevServer, azurite_tables: Azurite) -> dict[str, str]:
    """The app settings for the dev servers (as tests/function's live_env), fresh outcome tables."""
    return {"FHIR_URL": fhir_server.base_url, "FHIR_TOKEN_URL": fhir_server.token_url,
            "FHIR_CLIENT_ID": fhir_server.client_id, "FHIR_CLIENT_SECRET": fhir_server.client_secret,
            "OUTCOMES_CONNECTION_STRING": azurite_tables.connection_string,
            "OUTCOMES_TABLE_PREFIX": "w" + uuid.uuid4().hex[:12]}


def patients_with(fhir_server: FhirDevServer, record_id: str) -> list[dict[str, Any]]:
    token = httpx.post(fhir_server.token_url, data={"grant_type": "client_credentials"},
                       auth=(fhir_server.client_id, fhir_server.client_secret), timeout=30).json()["access_token"]
    bundle = httpx.get(f"{fhir_server.base_url}/Patient", params={"identifier": f"{ROW_SYSTEM}|{record_id}"},
                       headers={"Authorization": f"Bearer {token}"}, timeout=30).json()
    return [entry["resource"] for entry in bundle.get("entry", [])]


def test_some_python_runs_the_worker(interpreters: dict[toolchain.Version, Path]) -> None:
    """The per-version tests skip a version that is not installed; they must never all skip."""
    assert interpreters, f"no Python 3.11 to 3.13 found on {toolchain.search_places()}"


def test_worker_indexes_invokes_and_settles_each_message(chain: toolchain.Toolchain, emulated_host: EmulatedHost,
                                                         live_settings: dict[str, str],
                                                         fhir_server: FhirDevServer) -> None:
    function = boot(emulated_host, chain, live_settings | ISOLATE)
    record, related = str(uuid.uuid4()), str(uuid.uuid4())
    written = message(contact_create(record, PATIENT))
    rejected = message(contact_create(related, None))
    not_json = message(b"<Entity><Name>contact</Name></Entity>", content_type="application/xml")
    settled = invoke(emulated_host, function, [written, rejected, not_json])

    # What ran is the core compiled by the app's own install (requirements.txt's `.`, as the remote build makes
    # it), imported from the app's packages ahead of the sources in the app directory.
    started = [line for line in emulated_host.logs if "writeback started: core" in line]
    assert len(started) == 1, emulated_host.logs
    build = "interpreted" if os.environ.get("WRITEBACK_COMPILE") == "0" else "compiled"  # (setup.py)
    assert f"core {build} ({chain.site_packages / 'writeback'})" in started[0], started
    assert settled[written.message_id] == Settlement("complete", str(written.lock_token))
    contact_type = settled[rejected.message_id]
    assert (contact_type.kind, contact_type.reason) == ("deadletter", "invalid-contact-type")
    assert contact_type.description
    unreadable = settled[not_json.message_id]
    assert unreadable.kind == "deadletter"
    assert unreadable.reason in {"unsupported-format", "malformed-message"}
    assert unreadable.description
    [patient] = patients_with(fhir_server, record)
    assert patient["name"][0]["family"] == "Vandersloot"
    assert patients_with(fhir_server, related) == []


def test_configuration_fault_abandons_every_message(chain: toolchain.Toolchain,
                                                    emulated_host: EmulatedHost) -> None:
    """FHIR_URL unset: nothing can be written, and no Service Bus connection to schedule a retry on is configured,
    so every message of the batch goes back to the queue."""
    function = boot(emulated_host, chain, ISOLATE)
    batch = [message(contact_create(str(uuid.uuid4()), PATIENT)) for _ in range(3)]
    settled = invoke(emulated_host, function, batch)
    assert [settled[m.message_id].kind for m in batch] == ["abandon"] * 3


def test_without_dependency_isolation_the_app_cannot_load(chain: toolchain.Toolchain,
                                                          emulated_host: EmulatedHost) -> None:
    """Why PYTHON_ISOLATE_WORKER_DEPENDENCIES=1 is set: without it the 3.11/3.12 worker keeps the protobuf it
    bundles loaded, and the Service Bus extension's generated code refuses it when function_app.py imports it."""
    if chain.version >= (3, 13):
        pytest.skip("from Python 3.13 the worker always isolates its dependencies")
    emulated_host.start_worker(chain, worker_environment({}, drop=[*APP_SETTINGS, *ISOLATE]))
    init = emulated_host.initialize(toolchain.REPO_ROOT, chain.bundle)
    assert init.result.status == emulated_host.rpc.StatusResult.Failure
    assert "gencode 6.31.1 runtime 5.29." in init.result.exception.message, init.result.exception.message
