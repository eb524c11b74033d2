"""What `azd deploy` uploads (the repository root less `.funcignore`) is what the remote build needs to build the
app as requirements.txt asks: its `.` is this project (setup.py, pyproject.toml, writeback/ with its maps), and
nothing a checkout builds in place (compiled modules, build/) rides along."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def left_out(path: str) -> bool:
    """Whether `.funcignore` leaves `path` out of the package (gitignore rules, which azd and func apply)."""
    done = subprocess.run(["git", "-c", f"core.excludesFile={ROOT / '.funcignore'}", "check-ignore", "--no-index",
                           "--quiet", path], cwd=ROOT, capture_output=True, check=False, timeout=30)
    assert done.returncode in (0, 1), done.stderr
    return done.returncode == 0


def test_requirements_end_with_the_app_itself() -> None:
    lines = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[-1] == "."


@pytest.mark.parametrize("path", ["function_app.py", "host.json", "requirements.txt", "setup.py", "pyproject.toml",
                                  "writeback/__init__.py", "writeback/paths.py", "writeback/maps/contact.yaml"])
def test_the_package_holds_what_the_remote_build_builds(path: str) -> None:
    assert (ROOT / path).exists()
    assert not left_out(path)


@pytest.mark.parametrize("path", ["writeback/paths.cpython-311-x86_64-linux-gnu.so",
                                  "503cde1434844a5b5b2a__mypyc.cpython-311-x86_64-linux-gnu.so",
                                  "build/compile.log", "dataverse_fhir_writeback.egg-info/PKG-INFO",
                                  "tests/conftest.py", "local.settings.json"])
def test_the_package_leaves_out_what_a_checkout_builds(path: str) -> None:
    assert left_out(path)
