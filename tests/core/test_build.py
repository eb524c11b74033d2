"""The compiled core (setup.py, mypyc): what runs in a checkout, and the guard against compiled modules older than
their sources (`writeback.build`)."""

from __future__ import annotations

import importlib.machinery
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from writeback import build

SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def test_the_suite_runs_the_compiled_core() -> None:
    """What ships is the compiled core, so what the tests check is too (`make test` compiles it first)."""
    if os.environ.get("WRITEBACK_COMPILE") == "0":
        pytest.skip("WRITEBACK_COMPILE=0: this build, and what it ships, is the sources")
    assert build.core().startswith("compiled"), f"the core runs from its sources: {build.core()}; run `make compile`"


BUILT = 1_700_000_000


def package(tmp_path: Path, *, checkout: bool, edited: str | None) -> Path:
    """A package `pkg` like `writeback`: a compiled module with a source and an extension module beside it (not a
    loadable one: what matters is which of the two is imported), a module it imports that is not compiled,
    `__init__` calling the guard. Every file dated at the build, `edited` after it."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent("""
        from pathlib import Path
        from writeback import build
        build.guard(__name__, Path(__file__).parent)
    """))
    (pkg / "core.py").write_text("from pkg.settings import WHERE\n")
    (pkg / "settings.py").write_text("WHERE = 'source'\n")
    (pkg / f"core{SUFFIX}").write_bytes(b"\x7fELF not a real module")
    if checkout:
        (tmp_path / "setup.py").write_text("")
    for path in [*pkg.iterdir(), tmp_path / "setup.py"]:
        if path.exists():
            when = BUILT + 100 if path.name == edited else BUILT - 100 if path.suffix == ".py" else BUILT
            os.utime(path, ns=(when * 10**9, when * 10**9))
    return tmp_path


def run(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(Path(build.__file__).parents[1])])}
    return subprocess.run([sys.executable, "-c", "import pkg.core; print(pkg.core.WHERE)"], capture_output=True,
                          text=True, env=env, cwd=root, timeout=60, check=False)


@pytest.mark.parametrize("edited", ["core.py", "settings.py", "setup.py"])
def test_a_source_edited_after_the_build_runs_instead_of_the_old_compiled_module(tmp_path: Path, edited: str) -> None:
    """The compiled module's own source, a module whose types it was compiled against, or the build itself."""
    root = package(tmp_path, checkout=True, edited=edited)
    assert build.stale(root / "pkg") == [edited]
    done = run(root)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "source"
    assert f"pkg: the compiled core is older than its sources ({edited})" in done.stderr
    assert "make compile" in done.stderr


def test_a_compiled_module_newer_than_every_source_is_the_one_imported(tmp_path: Path) -> None:
    root = package(tmp_path, checkout=True, edited=None)
    assert build.stale(root / "pkg") == []
    done = run(root)
    # The extension module is imported (and, not being a real one, cannot load): no warning, no fallback.
    assert done.returncode != 0 and "ImportError" in done.stderr, done.stdout
    assert "pkg: the compiled core" not in done.stderr


def test_an_installed_package_is_not_checked(tmp_path: Path) -> None:
    """Azure's .python_packages: built in one go from one set of sources, whatever the files' times say."""
    root = package(tmp_path, checkout=False, edited="core.py")
    assert build.stale(root / "pkg") == []
    done = run(root)
    assert done.returncode != 0 and "ImportError" in done.stderr, done.stdout
