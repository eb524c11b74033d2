"""Telemetry: quiet the libraries, and send the app's log records to Application Insights as OpenTelemetry.

`configure()` is called once when the app starts (function_app.py), before the first message:

1. Library loggers that write a line per HTTP request or connection (httpx, azure-core's HTTP logging policy,
   azure-identity, azure-servicebus, uamqp, ...) go to WARNING: 62 such records were measured for 6 messages,
   and their URLs carry query strings. A filter on the root handlers also cuts the query string off any URL a
   warning may still quote.
2. When `APPLICATIONINSIGHTS_CONNECTION_STRING` is set and no OpenTelemetry logger provider is installed yet,
   Azure Monitor is configured here (azure-monitor-opentelemetry). In Azure the Python worker usually did it
   already (app setting PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY=true, host.json telemetryMode
   OpenTelemetry): then nothing more is done, so records are exported once. Either way the `extra` fields of a
   record (the outcome record's outcome, reason, table, record_id, ...) become its customDimensions.

Ingestion authenticates with Microsoft Entra ID when APPLICATIONINSIGHTS_AUTHENTICATION_STRING says
`Authorization=AAD` (the Bicep sets `ClientId=<identity>;Authorization=AAD`; local authentication is disabled
on the component): the exporter gets a ManagedIdentityCredential for that client id. Without a connection
string (locally, in tests) nothing is exported and nothing is imported. A misconfiguration logs one warning
and the app runs on without telemetry: never an exception into the app.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Mapping
from typing import Any

log = logging.getLogger("writeback.telemetry")

CONNECTION_STRING = "APPLICATIONINSIGHTS_CONNECTION_STRING"
AUTHENTICATION_STRING = "APPLICATIONINSIGHTS_AUTHENTICATION_STRING"

# At INFO these say something per request or connection (httpx: "HTTP Request: POST <url>"; azure-core's
# HttpLoggingPolicy: URL, headers; azure-identity: each token; azure-servicebus/uamqp: link state), which is
# noise at the app's volume and puts URLs with query strings into the logs. Their warnings still come through.
QUIET_LOGGERS: tuple[str, ...] = (
    "httpx",
    "httpcore",
    "azure.core.pipeline.policies.http_logging_policy",
    "azure.identity",
    "msal",
    "azure.servicebus",
    "uamqp",
    "urllib3",
    "azure.monitor.opentelemetry",
)

# The distro's instrumentations that would record every HTTP call as a dependency: httpx spans carry FHIR
# search URLs (with Dataverse row ids in the query), and azure_sdk spans one per Table Storage call. The
# outcome record already carries each message's duration; the host records each invocation. The Bicep sets the
# same list as OTEL_PYTHON_DISABLED_INSTRUMENTATIONS for when the worker configures Azure Monitor itself.
DISABLED_INSTRUMENTATIONS: tuple[str, ...] = (
    "azure_sdk", "django", "fastapi", "flask", "httpx", "psycopg2", "requests", "urllib", "urllib3",
)

_URL_QUERY = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s?#'\"<>]*)\?[^\s#'\"<>]*")


def strip_query_strings(text: str) -> str:
    """Every URL in `text` without its query string (the query may carry ids, signatures or tokens)."""
    return _URL_QUERY.sub(r"\1 (query string removed)", text)


class QueryStringFilter(logging.Filter):
    """Rewrites a record whose message quotes a URL with a query string; lets every record through."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is the handler's business, not ours
            return True
        if "?" in message and "://" in message:
            redacted = strip_query_strings(message)
            if redacted != message:
                record.msg, record.args = redacted, None
        return True


_QUERY_FILTER = QueryStringFilter()


def quiet_libraries() -> None:
    """Library request/connection chatter to WARNING; our own records at INFO; query strings off the root
    handlers' records. Idempotent."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    ours = logging.getLogger("writeback")
    if ours.level == logging.NOTSET:
        # The outcome records are INFO; a root logger left at WARNING by a host would drop them.
        ours.setLevel(logging.INFO)
    for handler in logging.getLogger().handlers:
        if _QUERY_FILTER not in handler.filters:
            handler.addFilter(_QUERY_FILTER)


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.exporting: bool | None = None  # None: not decided yet


_STATE = _State()


def configure(env: Mapping[str, str] | None = None) -> bool:
    """Quiet the libraries and, with a connection string, export log records to Application Insights.

    Returns whether this process exports to Application Insights (configured here or by the worker). Safe to
    call more than once and from several threads; never raises."""
    try:
        quiet_libraries()
    except Exception as exc:  # pragma: no cover - setLevel/addFilter do not fail in practice
        log.warning("library log levels could not be set (%s)", type(exc).__name__)
    env = os.environ if env is None else env
    with _STATE.lock:
        if _STATE.exporting is None:
            _STATE.exporting = _configure_azure_monitor(env)
        return _STATE.exporting


def _configure_azure_monitor(env: Mapping[str, str]) -> bool:
    connection_string = (env.get(CONNECTION_STRING) or "").strip()
    if not connection_string:
        return False
    try:
        if sdk_logger_provider_installed():
            return True  # the Functions worker configured the distro: a second set-up would export twice
        credential = credential_from(env.get(AUTHENTICATION_STRING) or "")
        from azure.monitor.opentelemetry import configure_azure_monitor  # noqa: PLC0415 - only with telemetry on

        # The worker names the Functions resource detector the same way (cloud role = the function app).
        os.environ.setdefault("OTEL_EXPERIMENTAL_RESOURCE_DETECTORS", "azure_functions")
        options: dict[str, Any] = {
            "connection_string": connection_string,
            "logger_name": "",  # the root logger, as the worker does: every record at or above its level
            "instrumentation_options": {name: {"enabled": False} for name in DISABLED_INSTRUMENTATIONS},
        }
        if credential is not None:
            options["credential"] = credential
        configure_azure_monitor(**options)
    except Exception as exc:
        # Neither the connection string nor the exception text is logged: either may quote a key.
        log.warning("Application Insights telemetry is off: setting it up failed (%s); check %s and %s",
                    type(exc).__name__, CONNECTION_STRING, AUTHENTICATION_STRING)
        return False
    return True


def sdk_logger_provider_installed() -> bool:
    """Whether an OpenTelemetry SDK logger provider is already the global one (the worker's distro set-up)."""
    from opentelemetry._logs import get_logger_provider  # noqa: PLC0415 - only with telemetry on
    from opentelemetry.sdk._logs import LoggerProvider  # noqa: PLC0415

    return isinstance(get_logger_provider(), LoggerProvider)


def parse_authentication_string(value: str) -> dict[str, str]:
    """`ClientId=<guid>;Authorization=AAD` → {"clientid": "<guid>", "authorization": "AAD"} (keys lower-cased),
    read as the exporter reads it (azure-monitor-opentelemetry-exporter `_get_authentication_credential`, which the
    Functions worker's own set-up uses in Azure): `;`-separated `key=value` items, one `=` each, no empty item, no
    space around; values as they are. A string read more leniently here (`Authorization=aad`, a trailing `;`) passed
    `check-config` and gave the exporter no credential: with local authentication off, nothing was ingested and no
    alert fired (found by review)."""
    parts: dict[str, str] = {}
    for item in value.split(";"):
        key, sep, val = item.partition("=")
        if not sep or "=" in val or not key or key != key.strip() or val != val.strip():
            raise ValueError(f"{AUTHENTICATION_STRING} must be `Key=Value` pairs separated by `;`, with no empty "
                             "item and no spaces (the exporter reads no other form)")
        parts[key.lower()] = val
    return parts


_GUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def settings_problem(env: Mapping[str, str]) -> str | None:
    """What keeps telemetry from starting with these settings (`configure` would turn it off with one warning, and
    no outcome record, so no alert, would reach Application Insights), for `check-config`; None when nothing does.
    Values are never quoted: the connection string holds a key."""
    connection = (env.get(CONNECTION_STRING) or "").strip()
    authentication = env.get(AUTHENTICATION_STRING) or ""
    if connection:
        keys = {part.split("=", 1)[0].strip().lower() for part in connection.split(";") if "=" in part}
        if "instrumentationkey" not in keys:
            return f"{CONNECTION_STRING} holds no InstrumentationKey: copy it from the Application Insights resource"
    if authentication:
        try:
            parts = parse_authentication_string(authentication)
        except ValueError as exc:
            return str(exc)
        if parts.get("authorization") != "AAD" or set(parts) - {"authorization", "clientid"}:
            return f"{AUTHENTICATION_STRING} must be `Authorization=AAD` (so written), with " \
                   "`ClientId=<identity's client id>` for a user-assigned identity"
        if "clientid" in parts and not _GUID.fullmatch(parts["clientid"]):
            return f"{AUTHENTICATION_STRING}: ClientId must be the identity's client id (a GUID)"
    return None


def credential_from(authentication_string: str) -> Any:
    """The Entra ID credential APPLICATIONINSIGHTS_AUTHENTICATION_STRING asks for: a ManagedIdentityCredential
    (of the user-assigned identity in ClientId, else the system-assigned one) for `Authorization=AAD`; None
    otherwise (instrumentation-key ingestion)."""
    parts = parse_authentication_string(authentication_string) if authentication_string else {}
    if parts.get("authorization") != "AAD":
        return None
    from azure.identity import ManagedIdentityCredential  # noqa: PLC0415 - only with telemetry on

    client_id = parts.get("clientid") or None
    return ManagedIdentityCredential(client_id=client_id) if client_id else ManagedIdentityCredential()
