"""Review of docs/operations.md against what the code and azure-monitor-opentelemetry 1.8.11 really do.

Each test states a promise of the operations guide and fails on the current code where it is not kept.
No network, no Azurite: a fake scheduler, no outcome store (a fault in `OUTCOMES_*`), and the exporter's own
conversion of a log record to its envelope.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import pytest
from azure.monitor.opentelemetry.exporter._generated.exporter._utils.model_base import SdkJSONEncoder
from azure.monitor.opentelemetry.exporter.export._base import _get_authentication_credential
from azure.monitor.opentelemetry.exporter.export.logs._exporter import _convert_log_to_envelope

from tests.telemetry.conftest import OtelLogs
from writeback import functions, telemetry
from writeback.decide import Decision
from writeback.errors import WritebackError
from writeback.pipeline import Envelope, Result
from writeback.reasons import Reason
from writeback.scheduler import Copy

CLIENT_ID = "11111111-2222-3333-4444-555555555555"
CONNECTION = ("InstrumentationKey=00000000-0000-0000-0000-000000000000;"
              "IngestionEndpoint=https://westeurope-5.in.applicationinsights.azure.com/")


class _Actions:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def complete(self, message: Any) -> None:
        self.calls.append("complete")

    def abandon(self, message: Any) -> None:
        self.calls.append("abandon")

    def deadletter(self, message: Any, deadletter_reason: str | None = None,
                   deadletter_error_description: str | None = None) -> None:
        self.calls.append("deadletter")


class _FailingScheduler:
    async def schedule(self, copies: Sequence[Copy]) -> None:
        raise ConnectionError("injected: the Service Bus namespace cannot be reached")

    async def aclose(self) -> None:
        return None


def _message(message_id: str) -> Any:
    return SimpleNamespace(body=b"{}", application_properties={}, delivery_count=1, content_type="application/json",
                           message_id=message_id, correlation_id=None, locked_until_utc=None)


def _outcome_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if r.name == "writeback.function" and r.getMessage().startswith("writeback outcome=")]


@pytest.mark.parametrize("authentication", [
    f"ClientId={CLIENT_ID};Authorization=aad",
    f"ClientId={CLIENT_ID};Authorization=AAD;",
    f"ClientId={CLIENT_ID}; Authorization=AAD",
])
def test_check_config_passes_only_what_the_exporter_authenticates_with(
        authentication: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/operations.md §4: check-config's `telemetry` check FAILs "for settings that would turn telemetry, and
    so the alerts, off". In Azure the worker configures the distro (telemetry.configure then does nothing), and
    the exporter reads APPLICATIONINSIGHTS_AUTHENTICATION_STRING itself (exporter/export/_base.py
    `_get_authentication_credential`): case-sensitive `AAD`, no stripping, an empty `;` item is a format error.
    Such a string gives no Entra credential, and with DisableLocalAuth no telemetry is ingested; yet
    `telemetry.settings_problem` (and `credential_from`) accept it. Failed: settings_problem returned None."""
    monkeypatch.setenv("APPLICATIONINSIGHTS_AUTHENTICATION_STRING", authentication)
    exporter_credential = _get_authentication_credential()
    problem = telemetry.settings_problem({"APPLICATIONINSIGHTS_CONNECTION_STRING": CONNECTION,
                                          "APPLICATIONINSIGHTS_AUTHENTICATION_STRING": authentication})
    assert exporter_credential is not None or problem is not None, (
        f"check-config says {authentication!r} is well formed, but the exporter the worker configures "
        "authenticates with no Entra credential from it")


async def test_config_fault_record_says_abandon_when_the_batch_is_abandoned(
        caplog: pytest.LogCaptureFixture) -> None:
    """docs/operations.md §1: "for a message then abandoned ... its log record says `abandon`". A configuration
    fault found before the batch runs logs its one record (the only trace of a fault in `OUTCOMES_*`) before the
    copies are scheduled (functions.py `_log_config_fault`, then `_reschedule`, which logs nothing more for these
    messages): when scheduling then fails and the messages are abandoned, the record still says `reschedule`
    and "retried with a growing delay". Failed: the settlement was `reschedule`."""
    caplog.set_level(logging.INFO, "writeback.function")
    app = functions.FunctionApp(env={}, scheduler_factory=lambda settings: _FailingScheduler())
    actions = _Actions()
    try:
        await app.handle_batch([_message("sb-config-1")], actions)
    finally:
        await app.aclose()
    assert actions.calls == ["abandon"]
    (record,) = _outcome_records(caplog)
    assert record.__dict__["outcome"] == "config-error"
    assert record.__dict__["settlement"] == "abandon", (
        f"the message was abandoned, its record says {record.__dict__['settlement']!r}: {record.getMessage()}")


def test_a_rescheduled_message_whose_completion_failed_says_reschedule_failed(
        caplog: pytest.LogCaptureFixture) -> None:
    """docs/operations.md §1: a record's settlement is `complete`, `deadletter`, `reschedule` or `abandon`, and
    "a log record adds `-failed` when the settlement call itself failed". A message whose delayed copy was
    scheduled is `reschedule` (functions.py `_logger`), but only when its complete call succeeded: when it
    fails the record says `complete-failed`, as if a written or skipped message had lost its lock.
    Failed: the settlement was `complete-failed`."""
    caplog.set_level(logging.INFO, "writeback.function")
    reason = Reason.FHIR_UNAVAILABLE
    result = Result("retry", reason, "GET Patient/1 kept failing (HTTP 503)", Decision("reject", reason, ""))
    functions._logger(Envelope(b"{}", message_id="sb-retry-1"), result, result.detail, rescheduled=True,
                      retry_attempt=1, retry_at="2026-01-01T00:00:15+00:00")("complete-failed")
    (record,) = _outcome_records(caplog)
    assert record.__dict__["settlement"] == "reschedule-failed", record.__dict__["settlement"]


async def test_a_large_batchs_message_ids_reach_application_insights_whole(otel_logs: OtelLogs) -> None:
    """docs/operations.md §6: the batch's config-error record carries `message_ids` (comma-separated) among its
    customDimensions. The exporter cuts every property value to 8,192 characters (exporter/_utils.py
    `_filter_custom_properties`); Bicep `maxMessageBatchSize` allows 1,000 messages an invocation, and 300
    Dataverse MessageIds (GUIDs) already exceed it. Failed: the ids after the cut were missing."""
    ids = [str(uuid.uuid4()) for _ in range(300)]
    app = functions.FunctionApp(env={}, scheduler_factory=lambda settings: _FailingScheduler())
    try:
        app._log_config_fault([Envelope(b"{}", message_id=i) for i in ids],
                              WritebackError(Reason.CONFIG_ERROR, "setting FHIR_URL is not set"),
                              Reason.CONFIG_ERROR, time.perf_counter(), "reschedule")
    finally:
        await app.aclose()
    sent = [json.loads(json.dumps(_convert_log_to_envelope(r), cls=SdkJSONEncoder))["data"]["baseData"]["properties"]
            for r in otel_logs.records()]
    # (as many records as the ids need, each whole: `messages` of all of them adds up to the batch)
    assert sum(int(properties["messages"]) for properties in sent) == 300
    arrived = [i for properties in sent for i in properties["message_ids"].split(",")]
    assert arrived == ids, f"{[len(p['message_ids']) for p in sent]} characters arrived: {len(arrived)} of 300 ids"

