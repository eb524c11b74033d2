"""Fixtures for the outcome-log tests: a fresh set of tables (own prefix) in the session's Azurite."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from devtools.services import Azurite
from writeback.maps import MapSet, load_maps
from writeback.outcomes import OutcomeStore
from writeback.settings import DEFAULT_MAPS_DIR, Settings


def new_prefix() -> str:
    return "t" + uuid.uuid4().hex[:12]


def store_settings(azurite: Azurite, prefix: str) -> Settings:
    return Settings(outcomes_connection_string=azurite.connection_string, outcomes_table_prefix=prefix)


@pytest.fixture(scope="session")
def maps() -> MapSet:
    return load_maps(DEFAULT_MAPS_DIR)


@pytest.fixture
def prefix() -> str:
    return new_prefix()


@pytest.fixture
async def store(azurite_tables: Azurite, prefix: str) -> AsyncIterator[OutcomeStore]:
    async with OutcomeStore.from_settings(store_settings(azurite_tables, prefix), retry_total=1,
                                          retry_backoff=0.05) as ledger:
        yield ledger
