"""The per-message outcome record arrives in Application Insights as customDimensions, not as text to parse.

A real message goes through the real function (fake FHIR delivery, real outcome log in Azurite); its outcome
record goes through the OpenTelemetry logging handler that azure-monitor-opentelemetry installs, and each
resulting SDK log record through the Azure Monitor exporter's own conversion to an envelope, serialized as the
exporter sends it. A `MessageData` envelope becomes a row of `traces` (AppTraces), and its `properties` become
`customDimensions` (Properties): those are asserted field by field. No network: the envelope is never sent.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from azure.monitor.opentelemetry.exporter._generated.exporter._utils.model_base import SdkJSONEncoder
from azure.monitor.opentelemetry.exporter.export.logs._exporter import _convert_log_to_envelope
from opentelemetry.sdk._logs import ReadableLogRecord

from tests.function.conftest import MockMessageActions, UserFunction
from tests.function.helpers import FIRST, LAST, create_body, new_id, reject_body
from tests.function.sb import received_message
from tests.telemetry.conftest import OtelLogs
from writeback import functions

# Application Insights severityLevel of a MessageData envelope.
INFORMATION, ERROR = 1, 3


def wire(record: ReadableLogRecord) -> dict[str, Any]:
    """The envelope of one log record, as the exporter serializes it into the ingestion request body."""
    envelope = _convert_log_to_envelope(record)
    sent: dict[str, Any] = json.loads(json.dumps(envelope, cls=SdkJSONEncoder))
    return sent


def only_outcome(otel_logs: OtelLogs) -> dict[str, Any]:
    records = otel_logs.records()
    assert len(records) == 1, f"expected one outcome record, got {len(records)}"
    sent = wire(records[0])
    assert sent["name"] == "Microsoft.ApplicationInsights.Message" and sent["data"]["baseType"] == "MessageData"
    return sent


def assert_no_patient_data(sent: dict[str, Any]) -> None:
    """The canary names are in the Dataverse row of the message; nothing of the envelope may carry them."""
    body = json.dumps(sent)
    assert FIRST not in body and LAST not in body


def assert_fields_are_not_the_message_text(properties: dict[str, str]) -> None:
    assert not any("writeback outcome=" in value for value in properties.values())


async def test_written_outcome_fields_are_custom_dimensions(
        fake_app: functions.FunctionApp, user_function: UserFunction, actions: MockMessageActions,
        otel_logs: OtelLogs) -> None:
    record = new_id()
    message = received_message(create_body(record, version=4), message_id="sb-otel-written",
                               correlation_id="sb-correlation")
    await user_function(messages=[message], message_actions=actions)
    assert actions.only.kind == "complete"

    sent = only_outcome(otel_logs)
    data = sent["data"]["baseData"]
    properties: dict[str, str] = data["properties"]
    assert data["severityLevel"] == INFORMATION
    assert properties["outcome"] == "written"
    assert properties["reason"] == ""
    assert properties["table"] == "contact"
    assert properties["record_id"] == record
    assert properties["resource"].startswith("Patient/") and "/_history/" in properties["resource"]
    assert properties["provenance"].startswith("Provenance/")
    assert properties["message_id"] == "sb-otel-written"
    assert properties["message_name"] == "Create"
    assert properties["settlement"] == "complete"
    assert float(properties["duration_ms"]) >= 0
    assert int(properties["issues"]) == 0
    assert properties["correlation_id"], "the Dataverse CorrelationId of the message"
    assert properties["logger_name"] == "writeback.function"
    # The text is still there for a human reading the trace, but nothing needs to parse it.
    assert data["message"].startswith("writeback outcome=written ")
    assert_fields_are_not_the_message_text(properties)
    assert_no_patient_data(sent)


async def test_dead_lettered_outcome_is_an_error_with_its_reason(
        fake_app: functions.FunctionApp, user_function: UserFunction, actions: MockMessageActions,
        otel_logs: OtelLogs) -> None:
    record = new_id()
    message = received_message(reject_body(record), message_id="sb-otel-rejected")
    await user_function(messages=[message], message_actions=actions)
    assert actions.only.kind == "deadletter"

    sent = only_outcome(otel_logs)
    data = sent["data"]["baseData"]
    properties: dict[str, str] = data["properties"]
    assert data["severityLevel"] == ERROR
    assert properties["outcome"] == "dead-lettered"
    assert properties["reason"] == "invalid-contact-type"
    assert properties["settlement"] == "deadletter"
    assert properties["record_id"] == record and properties["table"] == "contact"
    assert properties["message_id"] == "sb-otel-rejected"
    assert_fields_are_not_the_message_text(properties)
    assert_no_patient_data(sent)


async def test_configuration_fault_is_an_error_naming_the_setting(
        fake_app: functions.FunctionApp, user_function: UserFunction, actions: MockMessageActions,
        otel_logs: OtelLogs, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FHIR_TIMEOUT_SECONDS", "soon")
    message = received_message(create_body(new_id(), version=1), message_id="sb-otel-config")
    await user_function(messages=[message], message_actions=actions)

    sent = only_outcome(otel_logs)
    data = sent["data"]["baseData"]
    properties: dict[str, str] = data["properties"]
    assert data["severityLevel"] == ERROR
    assert properties["outcome"] == "config-error"
    assert properties["reason"] == "config-error"
    assert properties["message_id"] == "sb-otel-config"
    assert "FHIR_TIMEOUT_SECONDS" in data["message"], "the log line names the setting to fix"
    assert_fields_are_not_the_message_text(properties)
    assert_no_patient_data(sent)
