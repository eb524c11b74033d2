"""checkov (`--framework bicep`) reports 0 failed checks on infra/; every skip carries its justification.

checkov lives in its own virtualenv, `.venv-checkov` (its pins conflict with the app's), created by
`devtools/install-checkov.sh` from `requirements-checkov.txt`. The scan runs once per session.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
CHECKOV = ROOT / ".venv-checkov" / "bin" / "checkov"
INSTALL_SCRIPT = "devtools/install-checkov.sh"

# `// checkov:skip=CKV_AZURE_35: why this check does not apply here` - one id per comment.
SKIP_COMMENT = re.compile(r"checkov:skip=([^\s:]*)(?::(.*))?")
MIN_JUSTIFICATION = 40  # characters: a reason, not a placeholder


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    if not CHECKOV.is_file():
        pytest.fail(f"checkov is not installed: run `{INSTALL_SCRIPT}` (creates .venv-checkov)")
    result = subprocess.run(
        [
            str(CHECKOV),
            "--framework", "bicep",
            "-d", "infra",
            "--compact",
            "--quiet",
            "-o", "json",
            "--skip-download",  # offline: no Prisma Cloud guideline download
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    # checkov exits 1 when a check failed; anything else is a crash.
    assert result.returncode in (0, 1), f"checkov crashed ({result.returncode}): {result.stderr[-2000:]}"
    parsed = json.loads(result.stdout)
    reports = parsed if isinstance(parsed, list) else [parsed]
    bicep = [r for r in reports if r.get("check_type") == "bicep"]
    assert len(bicep) == 1, f"no bicep report in checkov output: {result.stdout[:500]}"
    found: dict[str, Any] = bicep[0]
    return found


def skip_comments() -> list[tuple[str, str, str]]:
    """(file, check id, justification) of every checkov skip comment under infra/."""
    found = []
    for path in sorted(INFRA.rglob("*.bicep")):
        for line in path.read_text().splitlines():
            match = SKIP_COMMENT.search(line)
            if match:
                found.append((path.relative_to(INFRA).as_posix(), match.group(1), (match.group(2) or "").strip()))
    return found


def test_checkov_reports_no_failed_checks(report: dict[str, Any]):
    failed = report["results"].get("failed_checks", [])
    details = [f"{c['check_id']} {c['resource']} ({c['file_path']}): {c['check_name']}" for c in failed]
    assert report["summary"]["failed"] == 0 and not failed, "\n".join(details)


def test_checkov_parsed_every_file(report: dict[str, Any]):
    summary = report["summary"]
    assert summary["parsing_errors"] == 0
    assert summary["passed"] > 0, "checkov ran no check: did it find the Bicep files?"


def test_each_skip_carries_a_justification():
    comments = skip_comments()
    for file, check_id, reason in comments:
        assert re.fullmatch(r"CKV2?_AZURE_\d+", check_id), f"{file}: one check id per skip comment, got {check_id!r}"
        assert len(reason) >= MIN_JUSTIFICATION, f"{file}: skip of {check_id} needs a justification"


def test_every_skip_suppresses_a_check(report: dict[str, Any]):
    # A stale skip (the check would pass, or no longer exists) hides nothing and must be removed.
    assert report["summary"]["skipped"] == len(skip_comments())


def test_infra_readme_explains_every_skip():
    readme = (INFRA / "README.md").read_text()
    undocumented = sorted({check_id for _, check_id, _ in skip_comments() if check_id not in readme})
    assert not undocumented, f"infra/README.md does not explain: {undocumented}"
