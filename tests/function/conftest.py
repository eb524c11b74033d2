"""Fixtures for the function tests: the real decorated function, a mocked settlement API, settings."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

import function_app
from devtools.services import Azurite, FhirDevServer
from tests.function.helpers import FakeDelivery
from tests.outcomes.conftest import new_prefix
from writeback import functions
from writeback.outcomes import OutcomeRow, OutcomeStore, outcome_settings
from writeback.pipeline import Delivery
from writeback.scheduler import Copy
from writeback.settings import SETTINGS, Settings


@dataclass
class Settlement:
    kind: str
    message: Any
    reason: str | None = None
    description: str | None = None


@dataclass
class MockMessageActions:
    """A mock of `ServiceBusMessageActions`: Service Bus settlement cannot run here (it is a gRPC call into the
    Functions host), so this records each call with the arguments the real one takes, by the same keywords."""

    calls: list[Settlement] = field(default_factory=list)
    fail: bool = False
    fail_for: list[Any] = field(default_factory=list)  # messages whose settlement fails (the others succeed)

    def _record(self, settlement: Settlement) -> None:
        self.calls.append(settlement)
        if self.fail or any(settlement.message is m for m in self.fail_for):
            raise RuntimeError("the host lost the message lock")

    def complete(self, message: Any) -> None:
        self._record(Settlement("complete", message))

    def abandon(self, message: Any) -> None:
        self._record(Settlement("abandon", message))

    def deadletter(self, message: Any, deadletter_reason: str | None = None,
                   deadletter_error_description: str | None = None) -> None:
        self._record(Settlement("deadletter", message, deadletter_reason, deadletter_error_description))

    def defer(self, message: Any) -> None:  # pragma: no cover - never used by the app
        self._record(Settlement("defer", message))

    def of(self, message: Any) -> Settlement:
        """The single settlement of one message of a batch (fails if it had zero or several)."""
        mine = [c for c in self.calls if c.message is message]
        assert len(mine) == 1, f"expected exactly one settlement, got {[c.kind for c in mine]}"
        return mine[0]

    @property
    def only(self) -> Settlement:
        """The single settlement of a single message (fails if there were zero or several)."""
        assert len(self.calls) == 1, f"expected exactly one settlement, got {[c.kind for c in self.calls]}"
        return self.calls[0]


UserFunction = Callable[..., Awaitable[None]]


@pytest.fixture(scope="session")
def user_function() -> UserFunction:
    """The real decorated function, as the worker indexes and calls it."""
    fn: UserFunction = function_app.writeback.build().get_user_function()
    return fn


@pytest.fixture
def actions() -> MockMessageActions:
    return MockMessageActions()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for spec in SETTINGS:
        monkeypatch.delenv(spec.name, raising=False)
    return monkeypatch


@pytest.fixture
def outcome_env(clean_env: pytest.MonkeyPatch, azurite_tables: Azurite) -> str:
    """Settings for the outcome log in Azurite (fresh tables); returns the table prefix."""
    prefix = new_prefix()
    clean_env.setenv("OUTCOMES_CONNECTION_STRING", azurite_tables.connection_string)
    clean_env.setenv("OUTCOMES_TABLE_PREFIX", prefix)
    return prefix


@dataclass
class FakeFactory:
    """Counts how often the app builds its delivery (it must be once per process)."""

    delivery: FakeDelivery = field(default_factory=FakeDelivery)
    built: int = 0
    closed: int = 0

    def __call__(self, settings: Settings) -> tuple[Delivery, Callable[[], Awaitable[None]]]:
        self.built += 1

        async def close() -> None:
            self.closed += 1

        return self.delivery, close


@pytest.fixture
def fake_factory() -> FakeFactory:
    return FakeFactory()


@dataclass
class RecordingScheduler:
    """Stands in for the Service Bus sender that schedules retry copies (no broker runs here): it keeps what it
    was asked to schedule, or fails like an unreachable namespace when `fail` is set."""

    copies: list[Copy] = field(default_factory=list)
    fail: bool = False
    closed: bool = False

    async def schedule(self, copies: Sequence[Copy]) -> None:
        if self.fail:
            raise ConnectionError("injected: the Service Bus namespace cannot be reached")
        self.copies.extend(copies)

    async def aclose(self) -> None:
        self.closed = True

    def factory(self, settings: Settings) -> RecordingScheduler:
        return self


@pytest.fixture
def scheduler() -> RecordingScheduler:
    return RecordingScheduler()


@pytest.fixture
async def fake_app(outcome_env: str, fake_factory: FakeFactory, scheduler: RecordingScheduler,
                   monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[functions.FunctionApp]:
    """The process-wide app with the fake delivery (FHIR_URL set but never called) and a recording scheduler."""
    monkeypatch.setenv("FHIR_URL", "http://127.0.0.1:9/fhir")
    app = functions.FunctionApp(delivery_factory=fake_factory, scheduler_factory=scheduler.factory)
    monkeypatch.setattr(functions, "_APP", app)
    yield app
    await app.aclose()


# ---- end to end: the real delivery and ledger against the FHIR dev server and Azurite ----------------------

ROW_SYSTEM = "urn:dataverse:contact"  # the identifier system of the shipped contact map


@pytest.fixture
def live_env(clean_env: pytest.MonkeyPatch, azurite_tables: Azurite, fhir_server: FhirDevServer) -> FhirDevServer:
    """Settings for the dev servers: the FHIR server behind its OAuth endpoint, fresh outcome tables."""
    clean_env.setenv("FHIR_URL", fhir_server.base_url)
    clean_env.setenv("FHIR_TOKEN_URL", fhir_server.token_url)
    clean_env.setenv("FHIR_CLIENT_ID", fhir_server.client_id)
    clean_env.setenv("FHIR_CLIENT_SECRET", fhir_server.client_secret)
    clean_env.setenv("OUTCOMES_CONNECTION_STRING", azurite_tables.connection_string)
    clean_env.setenv("OUTCOMES_TABLE_PREFIX", new_prefix())
    clean_env.setenv("WRITEBACK_QUEUE_NAME", "dataverse-writeback")  # (the trigger binding's, set as the Bicep does)
    clean_env.setenv("WRITEBACK_IGNORE_USER_IDS", "9e7d5c3b-1a2f-4e6d-8c0b-7a5f3e1d9c2b")  # (the sync user, deployed)
    return fhir_server


@pytest.fixture
async def live_app(live_env: FhirDevServer, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[functions.FunctionApp]:
    """The process-wide app exactly as in Azure (real delivery, real ledger), configured for the dev servers."""
    app = functions.FunctionApp()
    monkeypatch.setattr(functions, "_APP", app)
    yield app
    await app.aclose()


@pytest.fixture(scope="module")
def fhir(fhir_server: FhirDevServer) -> Iterator[httpx.Client]:
    token = httpx.post(fhir_server.token_url, data={"grant_type": "client_credentials"},
                       auth=(fhir_server.client_id, fhir_server.client_secret)).json()["access_token"]
    with httpx.Client(base_url=fhir_server.base_url, timeout=30.0,
                      headers={"Authorization": f"Bearer {token}", "Accept": "application/fhir+json"}) as client:
        yield client


async def rows_of(record_id: str) -> list[OutcomeRow]:
    async with OutcomeStore.from_settings(outcome_settings()) as store:
        return await store.query(record_id=record_id)


def patients_of(fhir: httpx.Client, record_id: str) -> list[dict[str, Any]]:
    bundle = fhir.get("/Patient", params={"identifier": f"{ROW_SYSTEM}|{record_id}"}).json()
    return [entry["resource"] for entry in bundle.get("entry", [])]
