"""Fixtures for the real-worker tests: one toolchain per installed Python 3.11 to 3.13, the emulated host."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.worker import toolchain
from tests.worker.host import EmulatedHost, Stubs, load_stubs


@pytest.fixture(scope="session")
def interpreters() -> dict[toolchain.Version, Path]:
    return toolchain.find_interpreters()


@pytest.fixture(scope="session", params=toolchain.SUPPORTED, ids=lambda v: f"py{toolchain.label(v)}")
def chain(request: pytest.FixtureRequest, interpreters: dict[toolchain.Version, Path]) -> toolchain.Toolchain:
    """The app's venv and the worker bundle for one Python version; skipped only if that version is not
    installed (test_some_python_runs_the_worker fails if none is)."""
    version: toolchain.Version = request.param
    if version not in interpreters:
        pytest.skip(f"Python {toolchain.label(version)} is not installed (looked for one that runs and can make a "
                    f"venv on {toolchain.search_places()}); the real-worker tests run on each installed version of "
                    "3.11 to 3.13")
    return toolchain.ensure(version, interpreters[version])


@pytest.fixture(scope="session")
def stubs() -> Stubs:
    return load_stubs()


@pytest.fixture
def emulated_host(stubs: Stubs, tmp_path: Path) -> Iterator[EmulatedHost]:
    with EmulatedHost(stubs, tmp_path) as host:
        yield host
