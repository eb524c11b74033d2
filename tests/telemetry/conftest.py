"""Fixtures for the telemetry tests: the function tests' app (fake FHIR delivery, real outcome log in Azurite,
recording scheduler) and an in-process OpenTelemetry logging pipeline."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from opentelemetry.instrumentation.logging.handler import LoggingHandler
from opentelemetry.sdk._logs import LoggerProvider, ReadableLogRecord
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor

# The function tests' fixtures (fake_app, user_function, actions, and what they depend on), kept in one place.
from tests.function.conftest import *  # noqa: F403


class OtelLogs:
    """What the OpenTelemetry log pipeline received: the SDK records the exporter would be handed."""

    def __init__(self, exporter: InMemoryLogRecordExporter) -> None:
        self._exporter = exporter

    def records(self, logger: str = "writeback.function") -> list[ReadableLogRecord]:
        return [r for r in self._exporter.get_finished_logs()
                if r.instrumentation_scope is not None and r.instrumentation_scope.name == logger]


@pytest.fixture
def otel_logs() -> Iterator[OtelLogs]:
    """The handler azure-monitor-opentelemetry attaches (opentelemetry-instrumentation-logging's LoggingHandler)
    on the `writeback` logger, feeding an SDK LoggerProvider with an in-memory exporter: no network, and no
    global provider is replaced."""
    provider = LoggerProvider()
    exporter = InMemoryLogRecordExporter()  # type: ignore[no-untyped-call]
    provider.add_log_record_processor(SimpleLogRecordProcessor(exporter))
    handler = LoggingHandler(logger_provider=provider)
    logger = logging.getLogger("writeback")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield OtelLogs(exporter)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        provider.shutdown()
