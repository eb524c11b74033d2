"""host.json, local.settings.sample.json and function_app.py: what `func start` and Azure read."""

from __future__ import annotations

import ast
import json
from pathlib import Path

from writeback.settings import SETTINGS, Settings

REPO = Path(__file__).resolve().parents[2]
HOST_OWN = {"FUNCTIONS_WORKER_RUNTIME", "ServiceBusConnection"}  # read by the Functions host, not by writeback


def test_sample_lists_exactly_the_settings() -> None:
    values = json.loads((REPO / "local.settings.sample.json").read_text(encoding="utf-8"))["Values"]
    assert set(values) == {spec.name for spec in SETTINGS} | HOST_OWN
    assert values["FUNCTIONS_WORKER_RUNTIME"] == "python"
    assert values["AzureWebJobsStorage"] == "UseDevelopmentStorage=true"
    assert values["WRITEBACK_QUEUE_NAME"]
    # no secret is shipped: the one secret-typed value is Azurite's documented development account on loopback
    shipped = [spec.name for spec in SETTINGS if spec.secret and values[spec.name]]
    assert shipped == ["OUTCOMES_CONNECTION_STRING"]
    assert "AccountName=devstoreaccount1;" in values["OUTCOMES_CONNECTION_STRING"]
    assert "TableEndpoint=http://127.0.0.1:10002/" in values["OUTCOMES_CONNECTION_STRING"]
    # what the sample says is valid as it stands (func start works once the FHIR URL is the real one)
    settings = Settings.from_env(values, need_outcomes=True)
    assert settings.outcomes_connection_string and settings.target == "fhir"


def test_host_json_tunes_explicit_settlement() -> None:
    host = json.loads((REPO / "host.json").read_text(encoding="utf-8"))
    assert host["version"] == "2.0"
    assert host["extensionBundle"]["id"] == "Microsoft.Azure.Functions.ExtensionBundle"
    service_bus = host["extensions"]["serviceBus"]
    assert service_bus["autoCompleteMessages"] is False
    assert isinstance(service_bus["maxConcurrentCalls"], int) and service_bus["maxConcurrentCalls"] >= 1
    assert service_bus["maxAutoLockRenewalDuration"]
    # messages per invocation of the batch trigger (cardinality many); the Bicep default matches (tests/infra)
    assert isinstance(service_bus["maxMessageBatchSize"], int) and 1 <= service_bus["maxMessageBatchSize"] <= 1000
    assert "logLevel" in host["logging"]


def test_function_app_stays_small() -> None:
    source = (REPO / "function_app.py").read_text(encoding="utf-8")
    tree = ast.parse(source)
    code = [node for node in tree.body if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))]
    assert len(code) <= 6
    assert "from azurefunctions.extensions.bindings import servicebus" in source
