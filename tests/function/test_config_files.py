"""host.json, local.settings.sample.json and function_app.py: what `func start` and Azure read."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

import pytest

from writeback.errors import ConfigError
from writeback.settings import DEADLINE_MARGIN_SECONDS, SETTINGS, SPEC_BY_NAME, Settings

REPO = Path(__file__).resolve().parents[2]
HOST_OWN = {"FUNCTIONS_WORKER_RUNTIME", "ServiceBusConnection"}  # read by the Functions host, not by writeback


def test_sample_lists_exactly_the_settings() -> None:
    values = json.loads((REPO / "local.settings.sample.json").read_text(encoding="utf-8"))["Values"]
    assert set(values) == {spec.name for spec in SETTINGS} | HOST_OWN
    assert values["FUNCTIONS_WORKER_RUNTIME"] == "python"
    assert values["AzureWebJobsStorage"] == "UseDevelopmentStorage=true"
    assert values["WRITEBACK_QUEUE_NAME"]
    # no secret is shipped: the secret-typed values are Azurite's documented development account on loopback
    shipped = [spec.name for spec in SETTINGS if spec.secret and values[spec.name]]
    assert shipped == ["AzureWebJobsStorage", "OUTCOMES_CONNECTION_STRING"]
    assert "AccountName=devstoreaccount1;" in values["OUTCOMES_CONNECTION_STRING"]
    assert "TableEndpoint=http://127.0.0.1:10002/" in values["OUTCOMES_CONNECTION_STRING"]
    # what the sample says is valid once the FHIR URL is the real one (its placeholder is refused: a new user's
    # `check-config` passed with it, and every write failed)
    with pytest.raises(ConfigError) as placeholder:
        Settings.from_env(values, need_outcomes=True)
    assert placeholder.value.setting == "FHIR_URL"
    settings = Settings.from_env({**values, "FHIR_URL": "https://ws-fhir.fhir.azurehealthcareapis.com"},
                                 need_outcomes=True)
    assert settings.outcomes_connection_string and settings.target == "fhir"


def _seconds(timespan: str) -> float:
    """host.json's `[d.]hh:mm:ss[.fff]` as seconds."""
    match = re.fullmatch(r"(?:(\d+)\.)?(\d+):(\d+):(\d+(?:\.\d+)?)", timespan)
    assert match, f"not a timespan: {timespan!r}"
    days, hours, minutes, seconds = match.groups()
    return int(days or 0) * 86400 + int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def _host() -> dict[str, Any]:
    host: dict[str, Any] = json.loads((REPO / "host.json").read_text(encoding="utf-8"))
    return host


def test_host_json_tunes_explicit_settlement() -> None:
    host = _host()
    assert host["version"] == "2.0"
    assert host["extensionBundle"]["id"] == "Microsoft.Azure.Functions.ExtensionBundle"
    service_bus = host["extensions"]["serviceBus"]
    assert service_bus["autoCompleteMessages"] is False
    # messages per invocation of the batch trigger (cardinality many); the Bicep default matches (tests/infra)
    assert isinstance(service_bus["maxMessageBatchSize"], int) and 1 <= service_bus["maxMessageBatchSize"] <= 1000
    # a prefetched message is locked while it waits in the buffer: its lock would run before the invocation starts
    assert service_bus["prefetchCount"] == 0
    assert "logLevel" in host["logging"]


def test_host_json_has_no_setting_a_batch_trigger_ignores() -> None:
    """The Service Bus extension applies these to single-message functions only (its ServiceBusOptions say so):
    set here they would suggest a lock renewal or a concurrency limit that a batch trigger does not have."""
    service_bus = _host()["extensions"]["serviceBus"]
    for single_only in ("maxConcurrentCalls", "maxAutoLockRenewalDuration", "maxConcurrentSessions",
                        "maxConcurrentCallsPerSession", "sessionIdleTimeout"):
        assert single_only not in service_bus, f"{single_only} does nothing for a batch trigger"
    # Filling batches by waiting (minMessageBatchSize/maxBatchWaitTime) holds the messages' locks meanwhile, and
    # the host refuses a minimum above maxMessageBatchSize, a deployment parameter: not used (docs/operations.md).
    assert "minMessageBatchSize" not in service_bus and "maxBatchWaitTime" not in service_bus


def test_function_timeout_outlasts_the_lock() -> None:
    """The host must never kill an invocation before its own deadline inside the lock (docs/operations.md,
    Timing): functionTimeout is a backstop for a hung invocation, not the limit the app works to."""
    lock_seconds = float(SPEC_BY_NAME["WRITEBACK_LOCK_DURATION_SECONDS"].default or 0)
    assert lock_seconds == 300
    assert _seconds(_host()["functionTimeout"]) >= lock_seconds


def test_the_shortest_lock_the_bicep_allows_leaves_an_invocation_time_to_work() -> None:
    """A lock the deployment accepts must not make every message a configuration fault: the app refuses one
    that leaves no room after FHIR_TIMEOUT_SECONDS and the settlement margin."""
    bicep = (REPO / "infra" / "main.bicep").read_text(encoding="utf-8")
    found = re.search(r"@minValue\((\d+)\)\s*@maxValue\(\d+\)\s*param lockDurationSeconds int", bicep)
    assert found, "main.bicep must bound lockDurationSeconds"
    shortest = int(found.group(1))
    timeout = float(SPEC_BY_NAME["FHIR_TIMEOUT_SECONDS"].default or 0)
    assert shortest - timeout - DEADLINE_MARGIN_SECONDS >= 30
    Settings.from_env({"FHIR_URL": "https://fhir.example.org", "WRITEBACK_META_SOURCE": "urn:test:writeback",
                       "WRITEBACK_LOCK_DURATION_SECONDS": str(shortest)})  # accepted


def test_host_exports_opentelemetry() -> None:
    """The worker streams the app's log records as OpenTelemetry (customDimensions from `extra`); the Application
    Insights SDK's sampling settings are not read in that mode, so none are kept."""
    host = _host()
    assert host["telemetryMode"] == "OpenTelemetry"
    assert "applicationInsights" not in host["logging"]


def test_function_app_stays_small() -> None:
    source = (REPO / "function_app.py").read_text(encoding="utf-8")
    tree = ast.parse(source)
    code = [node for node in tree.body if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))]
    assert len(code) <= 8
    assert "from azurefunctions.extensions.bindings import servicebus" in source


def test_function_app_configures_telemetry_when_it_starts() -> None:
    """`writeback.telemetry.configure()` runs at import, when the worker indexes function_app.py: libraries
    quieted and, in Azure, Application Insights set up before the first message (docs/operations.md, section 6)."""
    tree = ast.parse((REPO / "function_app.py").read_text(encoding="utf-8"))
    calls = [node.value for node in tree.body if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)]
    assert any(ast.unparse(call.func) == "telemetry.configure" for call in calls), (
        "function_app.py must call telemetry.configure() at module level"
    )


def test_the_consent_wait_must_end_inside_the_retry_window() -> None:
    """Past the retry window a row waiting for its patient's consent would be dead-lettered `retries-exhausted`
    instead of skipped as `consent-withheld`: refused, naming both settings."""
    values = {**json.loads((REPO / "local.settings.sample.json").read_text(encoding="utf-8"))["Values"],
              "FHIR_URL": "https://ws-fhir.fhir.azurehealthcareapis.com"}
    assert Settings.from_env(values).consent_wait_minutes == 60
    with pytest.raises(ConfigError) as info:
        Settings.from_env({**values, "WRITEBACK_CONSENT_WAIT_MINUTES": "120", "WRITEBACK_RETRY_WINDOW_HOURS": "2"})
    assert info.value.setting == "WRITEBACK_CONSENT_WAIT_MINUTES" and "WRITEBACK_RETRY_WINDOW_HOURS" in str(info.value)
    assert Settings.from_env({**values, "WRITEBACK_CONSENT_WAIT_MINUTES": "0"}).consent_wait_minutes == 0


@pytest.mark.parametrize("value", ["Azure FHIR Sync Enabled", "msemr_AzureFhirSyncEnabled"])
def test_the_consent_column_setting_must_be_a_logical_name(value: str) -> None:
    """A display name matched no body's column: every patient was skipped `consent-withheld`, with nothing to
    alert on (found trying the product)."""
    with pytest.raises(ConfigError) as info:
        Settings.for_planning({"WRITEBACK_CONSENT_COLUMN": value})
    assert info.value.setting == "WRITEBACK_CONSENT_COLUMN" and "logical name" in info.value.detail
    assert value not in info.value.detail  # (a setting's value is not echoed: it may be a secret elsewhere)
