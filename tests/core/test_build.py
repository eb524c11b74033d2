"""The compiled core (setup.py, mypyc): what runs in a checkout, and the guard against compiled modules older than
their sources (`writeback.build`)."""

from __future__ import annotations

import importlib.machinery
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from writeback import build

SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def test_the_suite_runs_the_compiled_core() -> None:
    """What ships is the compiled core, so what the tests check is too (`make test` compiles it first)."""
    assert build.core().startswith("compiled"), f"the core runs from its sources: {build.core()}; run `make compile`"


def package(tmp_path: Path, *, checkout: bool, edited_after_build: bool) -> Path:
    """A package `pkg` like `writeback`: a module with a source and an extension module beside it (not a loadable
    one: what matters is which of the two is imported), `__init__` calling the guard."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent("""
        from pathlib import Path
        from writeback import build
        build.guard(__name__, Path(__file__).parent)
    """))
    (pkg / "core.py").write_text("WHERE = 'source'\n")
    extension = pkg / f"core{SUFFIX}"
    extension.write_bytes(b"\x7fELF not a real module")
    if checkout:
        (tmp_path / "setup.py").write_text("")
    built, edited = 1_700_000_000, 1_700_000_100
    os.utime(extension, ns=(built * 10**9, built * 10**9))
    when = edited if edited_after_build else built - 100
    os.utime(pkg / "core.py", ns=(when * 10**9, when * 10**9))
    return tmp_path


def run(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(Path(build.__file__).parents[1])])}
    return subprocess.run([sys.executable, "-c", "import pkg.core; print(pkg.core.WHERE)"], capture_output=True,
                          text=True, env=env, cwd=root, timeout=60, check=False)


def test_a_source_edited_after_the_build_runs_instead_of_the_old_compiled_module(tmp_path: Path) -> None:
    root = package(tmp_path, checkout=True, edited_after_build=True)
    assert build.stale(root / "pkg") == ["core"]
    done = run(root)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "source"
    assert "the compiled core is older than its sources (core)" in done.stderr
    assert "make compile" in done.stderr


def test_a_compiled_module_newer_than_its_source_is_the_one_imported(tmp_path: Path) -> None:
    root = package(tmp_path, checkout=True, edited_after_build=False)
    assert build.stale(root / "pkg") == []
    done = run(root)
    # The extension module is imported (and, not being a real one, cannot load): no warning, no fallback.
    assert done.returncode != 0 and "ImportError" in done.stderr, done.stdout
    assert "older than its sources" not in done.stderr


def test_an_installed_package_is_not_checked(tmp_path: Path) -> None:
    """Azure's .python_packages: built in one go from one set of sources, whatever the files' times say."""
    root = package(tmp_path, checkout=False, edited_after_build=True)
    assert build.stale(root / "pkg") == []
    done = run(root)
    assert done.returncode != 0 and "ImportError" in done.stderr, done.stdout
