"""writeback.telemetry: Azure Monitor set up once, with the managed identity, never raising; libraries quiet.

`configure_azure_monitor` is replaced by a recorder in these tests: the real one installs global providers
and exporters that would try to reach Azure. What it does with the records is proven in
test_outcome_envelope.py.
"""

from __future__ import annotations

import http.server
import logging
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from azure.core import PipelineClient
from azure.core.pipeline.policies import HttpLoggingPolicy
from azure.core.pipeline.transport import RequestsTransport
from azure.core.rest import HttpRequest
from azure.identity import ManagedIdentityCredential

from writeback import telemetry

CONNECTION = "InstrumentationKey=00000000-0000-0000-0000-000000000000;IngestionEndpoint=https://ingest.invalid/"
CLIENT_ID = "11111111-2222-3333-4444-555555555555"


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """A process where telemetry is not configured yet, no SDK logger provider is installed, and
    configure_azure_monitor records its calls; library logger levels and root handler filters restored after."""
    import azure.monitor.opentelemetry as distro

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(distro, "configure_azure_monitor", lambda **kw: calls.append(kw))
    monkeypatch.setattr(telemetry, "_STATE", telemetry._State())
    monkeypatch.setattr(telemetry, "sdk_logger_provider_installed", lambda: False)
    monkeypatch.setenv("OTEL_EXPERIMENTAL_RESOURCE_DETECTORS", "azure_functions")  # restored by monkeypatch
    names = (*telemetry.QUIET_LOGGERS, "writeback")
    levels = {name: logging.getLogger(name).level for name in names}
    handlers = list(logging.getLogger().handlers)
    try:
        yield calls
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        for handler in handlers:
            handler.removeFilter(telemetry._QUERY_FILTER)


def test_without_a_connection_string_nothing_is_exported(fresh: list[dict[str, Any]]) -> None:
    assert telemetry.configure({}) is False
    assert fresh == []


class RecordingCredential:
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs


def test_with_a_connection_string_azure_monitor_is_configured_once(
        fresh: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    import azure.identity

    monkeypatch.setattr(azure.identity, "ManagedIdentityCredential", RecordingCredential)
    env = {telemetry.CONNECTION_STRING: CONNECTION,
           telemetry.AUTHENTICATION_STRING: f"ClientId={CLIENT_ID};Authorization=AAD"}
    assert telemetry.configure(env) is True
    assert telemetry.configure(env) is True  # idempotent
    (call,) = fresh
    assert call["connection_string"] == CONNECTION
    assert call["logger_name"] == ""
    credential = call["credential"]
    # the user-assigned identity named by APPLICATIONINSIGHTS_AUTHENTICATION_STRING (the Bicep's)
    assert isinstance(credential, RecordingCredential) and credential.kwargs == {"client_id": CLIENT_ID}
    options = call["instrumentation_options"]
    assert set(options) == set(telemetry.DISABLED_INSTRUMENTATIONS)
    assert all(option == {"enabled": False} for option in options.values())
    assert {"httpx", "azure_sdk", "requests", "urllib3"} <= set(options)


def test_configuring_from_several_threads_configures_once(fresh: list[dict[str, Any]]) -> None:
    env = {telemetry.CONNECTION_STRING: CONNECTION}
    threads = [threading.Thread(target=telemetry.configure, args=(env,)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(fresh) == 1


def test_instrumentation_key_ingestion_without_an_entra_authentication_string(fresh: list[dict[str, Any]]) -> None:
    assert telemetry.configure({telemetry.CONNECTION_STRING: CONNECTION}) is True
    (call,) = fresh
    assert "credential" not in call


def test_entra_authentication_strings_give_managed_identity_credentials() -> None:
    assert isinstance(telemetry.credential_from(f"ClientId={CLIENT_ID};Authorization=AAD"), ManagedIdentityCredential)
    assert isinstance(telemetry.credential_from("Authorization=AAD"), ManagedIdentityCredential)  # system-assigned
    assert isinstance(telemetry.credential_from("authorization=AAD;clientid=" + CLIENT_ID), ManagedIdentityCredential)
    # What the exporter the worker sets up reads no credential from either (test_review_ops_docs)
    assert telemetry.credential_from("authorization=aad;clientid=" + CLIENT_ID) is None
    with pytest.raises(ValueError, match="no spaces"):
        telemetry.credential_from(f"ClientId={CLIENT_ID}; Authorization=AAD")
    assert telemetry.credential_from("") is None
    assert telemetry.credential_from("Authorization=ikey") is None


def test_the_workers_set_up_is_not_repeated(fresh: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    """With PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY the worker configured the distro before indexing
    function_app.py; a second set-up would export every record twice."""
    monkeypatch.setattr(telemetry, "sdk_logger_provider_installed", lambda: True)
    assert telemetry.configure({telemetry.CONNECTION_STRING: CONNECTION}) is True
    assert fresh == []


def test_a_misconfiguration_logs_one_warning_and_never_raises(
        fresh: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import azure.monitor.opentelemetry as distro

    def refuse(**_: Any) -> None:
        raise ValueError(f"Invalid instrumentation key in {CONNECTION}")

    monkeypatch.setattr(distro, "configure_azure_monitor", refuse)
    caplog.set_level(logging.WARNING, "writeback.telemetry")
    env = {telemetry.CONNECTION_STRING: CONNECTION}
    assert telemetry.configure(env) is False
    assert telemetry.configure(env) is False
    warnings = [r for r in caplog.records if r.name == "writeback.telemetry"]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    text = warnings[0].getMessage()
    assert "ValueError" in text and telemetry.CONNECTION_STRING in text
    assert "InstrumentationKey" not in text, "neither the connection string nor the exception text is logged"


def test_a_malformed_authentication_string_is_a_warning_too(
        fresh: list[dict[str, Any]], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "writeback.telemetry")
    env = {telemetry.CONNECTION_STRING: CONNECTION, telemetry.AUTHENTICATION_STRING: "ClientId"}
    assert telemetry.configure(env) is False
    assert fresh == []
    assert [r.levelno for r in caplog.records if r.name == "writeback.telemetry"] == [logging.WARNING]


# ---- quiet libraries -------------------------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b'{"resourceType": "Bundle"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:  # the server's own access log is not under test
        pass


@pytest.fixture
def loopback() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


QUERY = "/fhir/R4/Patient?identifier=urn:dataverse:contact%7C0c9a1e52-7b1d-4f6e-9a3c-5d2e8f4b6a10&_count=2"


def _logged(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if not r.name.startswith("writeback")]


def test_httpx_requests_are_not_logged(fresh: list[dict[str, Any]], loopback: str,
                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # everything the root logger would pass on
    logging.getLogger("httpx").setLevel(logging.NOTSET)
    with httpx.Client() as client:
        assert client.get(loopback + QUERY).status_code == 200
    assert any(r.name == "httpx" and r.levelno == logging.INFO and "?" in r.getMessage()
               for r in _logged(caplog)), "the control: left alone, httpx logs each request and its query at INFO"
    caplog.clear()
    telemetry.configure({})
    with httpx.Client() as client:
        assert client.get(loopback + QUERY).status_code == 200
    records = _logged(caplog)
    assert not [r for r in records if r.name.startswith(("httpx", "httpcore")) and r.levelno < logging.WARNING]
    assert not [r.getMessage() for r in records if "?" in r.getMessage()]


def test_azure_core_http_logging_policy_is_quiet(fresh: list[dict[str, Any]], loopback: str,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """azure-data-tables, azure-servicebus's management client and azure-identity send through this policy; at
    INFO it logs every request's URL and headers."""
    caplog.set_level(logging.DEBUG)
    policy_logger = logging.getLogger("azure.core.pipeline.policies.http_logging_policy")
    policy_logger.setLevel(logging.NOTSET)

    def get() -> None:
        client: PipelineClient[HttpRequest, Any] = PipelineClient(
            base_url=loopback, policies=[HttpLoggingPolicy()], transport=RequestsTransport())
        with client:
            assert client.send_request(HttpRequest("GET", loopback + QUERY)).status_code == 200

    get()
    assert any(r.name == policy_logger.name and r.levelno == logging.INFO for r in _logged(caplog)), (
        "the control: left alone, the policy logs the request's URL at INFO"
    )
    caplog.clear()
    telemetry.configure({})
    get()
    records = _logged(caplog)
    assert not [r for r in records if r.name.startswith("azure.core") and r.levelno < logging.WARNING]
    assert not [r.getMessage() for r in records if "?" in r.getMessage()]


def test_library_loggers_are_at_warning_and_ours_at_info(fresh: list[dict[str, Any]]) -> None:
    logging.getLogger("writeback").setLevel(logging.NOTSET)
    telemetry.configure({})
    for name in telemetry.QUIET_LOGGERS:
        assert logging.getLogger(name).level == logging.WARNING, name
    assert logging.getLogger("writeback").getEffectiveLevel() == logging.INFO


def test_a_warning_that_quotes_a_url_loses_its_query_string(fresh: list[dict[str, Any]]) -> None:
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    root = logging.getLogger()
    handler = Collect()
    root.addHandler(handler)
    try:
        telemetry.configure({})
        logging.getLogger("azure.identity.test").warning(
            "token request to %s failed", "http://169.254.169.254/metadata/identity/oauth2/token?api-version=2018"
            "-02-01&resource=https://fhir.example&client_id=abc")
    finally:
        root.removeHandler(handler)
    assert seen == ["token request to http://169.254.169.254/metadata/identity/oauth2/token (query string removed) "
                    "failed"]


def test_strip_query_strings_leaves_other_text_alone() -> None:
    assert telemetry.strip_query_strings("no url? here") == "no url? here"
    assert telemetry.strip_query_strings("GET https://h/p?a=1#frag done") == (
        "GET https://h/p (query string removed)#frag done")
