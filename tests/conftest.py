"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from devtools.services import Azurite, FhirDevServer, azurite, fhir_dev_server

# ---- Loopback services (devtools.services) ---------------------------------------------------
# Started on first use and stopped when the session ends. The first use also runs `npm ci` in
# fhirdev/ if needed, so a clean checkout needs nothing but Node/npm on PATH.


@pytest.fixture(scope="session")
def fhir_server() -> Iterator[FhirDevServer]:
    """A real FHIR R4 server (Medplum engine, in memory) behind an OAuth client-credentials endpoint.

    Shared by the whole session: create resources with unique identifiers rather than assuming an
    empty server.
    """
    with fhir_dev_server() as server:
        yield server


@pytest.fixture(scope="session")
def azurite_tables() -> Iterator[Azurite]:
    """Azurite Table Storage on a free loopback port.

    ``stop()``/``start()`` simulate an outage (same port, same data); a test that stops it must
    start it again (try/finally) because later tests share it.
    """
    with azurite() as service:
        yield service
