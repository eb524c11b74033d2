"""The dry run `python -m writeback plan FILE [--properties FILE] [--maps DIR]`, run as users run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from devtools.samples import SAMPLES, SYNC_USER
from writeback.settings import DEFAULT_MAPS_DIR

ROOT = Path(__file__).resolve().parents[2]
PYTHON = ROOT / ".venv" / "bin" / "python"
KEYS = {"decision", "reason", "detail", "table", "recordId", "message", "resourceType", "resource", "changes",
        "cleared", "clearedBy", "wholeRow", "absentColumns", "decidedWhenWritten"}

# Every shipped sample and what the dry run says about it.
EXPECTED: dict[str, tuple[int, str, str | None, str | None]] = {
    "01_patient_create.json": (0, "write", None, "Patient"),
    "02_patient_update_phone.json": (0, "write", None, "Patient"),
    "03_practitioner_create.json": (0, "write", None, "Practitioner"),
    "04_medicalidentifier_create.json": (0, "write", None, "Patient"),
    "05_encounter_create.json": (0, "write", None, "Encounter"),
    "06_observation_create.json": (0, "write", None, "Observation"),
    "07_patient_update_echo.json": (0, "skip", "echo", None),
    "08_patient_consent_withheld.json": (0, "skip", "consent-withheld", "Patient"),
    "09_broken_body.json": (3, "reject", "malformed-message", None),
    "10_relatedperson_create.json": (0, "skip", "no-entity-map", None),
}


class Run:
    def __init__(self, done: subprocess.CompletedProcess[str]) -> None:
        self.code = done.returncode
        self.stdout = done.stdout
        self.stderr = done.stderr

    def json(self) -> dict[str, Any]:
        data = json.loads(self.stdout)  # exactly one JSON document, nothing else on stdout
        assert isinstance(data, dict)
        return data


def env(**extra: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("WRITEBACK_", "PYTHON"))}
    return {**clean, "PYTHONIOENCODING": "utf-8", **extra}


def cli(*args: str | Path, **extra: str) -> Run:
    python = PYTHON if PYTHON.exists() else Path(sys.executable)
    done = subprocess.run(
        [str(python), "-m", "writeback", "plan", *map(str, args)],
        cwd=ROOT, env=env(**extra), capture_output=True, text=True, timeout=60, check=False,
    )
    return Run(done)


def assert_usage_error(run: Run, *words: str) -> None:
    assert run.code == 2
    assert run.stdout == ""
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    for word in words:
        assert word in lines[0]
    assert "Traceback" not in run.stderr


@pytest.fixture(scope="module")
def sample_runs() -> dict[str, Run]:
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(cli, SAMPLES / name, WRITEBACK_IGNORE_USER_IDS=SYNC_USER) for name in EXPECTED}
        return {name: f.result() for name, f in futures.items()}


def test_every_shipped_sample_is_listed():
    assert sorted(p.name for p in SAMPLES.glob("*.json")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_shipped_sample_decision(sample_runs, name):
    run = sample_runs[name]
    code, decision, reason, resource_type = EXPECTED[name]
    assert run.code == code, run.stderr
    assert "Traceback" not in run.stderr + run.stdout
    out = run.json()
    assert set(out) == KEYS
    assert (out["decision"], out["reason"], out["resourceType"]) == (decision, reason, resource_type)
    assert out["detail"]
    if decision == "write":
        assert out["resource"]["resourceType"] == resource_type
        assert out["changes"] and out["reason"] is None
    else:
        assert out["resource"] is None and out["changes"] is None


def test_write_output_names_the_row_and_the_change(sample_runs):
    out = sample_runs["02_patient_update_phone.json"].json()
    assert (out["table"], out["recordId"], out["message"]) == (
        "contact", "0c9a1e52-7b1d-4f6e-9a3c-5d2e8f4b6a10", "Update")
    assert out["wholeRow"] is True and "telecom" in out["changes"] and out["cleared"] == []
    # The whole row as the map renders it: what FHIR holds for every element the map owns after the write.
    assert {"system": "phone", "use": "work", "value": "+1 206 555 0177"} in out["resource"]["telecom"]
    assert out["resource"]["identifier"] == [{"system": "urn:dataverse:contact",
                                              "value": "0c9a1e52-7b1d-4f6e-9a3c-5d2e8f4b6a10"}]


def test_broken_body_has_no_row(sample_runs):
    out = sample_runs["09_broken_body.json"].json()
    assert out["table"] is None and out["recordId"] is None and "JSON" in out["detail"]


def test_echo_needs_the_ignore_setting():
    run = cli(SAMPLES / "07_patient_update_echo.json")
    assert run.json()["reason"] != "echo"


def test_properties_file_marks_a_dropped_payload(tmp_path):
    props = tmp_path / "props.json"
    props.write_text(json.dumps({"MessageMaxSizeExceeded": "true",
                                 "http://schemas.microsoft.com/xrm/2011/Claims/EntityLogicalName": "contact"}))
    run = cli(SAMPLES / "02_patient_update_phone.json", "--properties", props)
    assert run.code == 3
    assert run.json()["reason"] == "payload-dropped"


def test_properties_file_can_name_the_sync_user(tmp_path):
    props = tmp_path / "props.json"
    props.write_text(json.dumps({"http://schemas.microsoft.com/xrm/2011/Claims/InitiatingUser": SYNC_USER}))
    run = cli(SAMPLES / "02_patient_update_phone.json", "--properties", props, WRITEBACK_IGNORE_USER_IDS=SYNC_USER)
    assert (run.code, run.json()["reason"]) == (0, "echo")


def test_maps_option_uses_that_folder(tmp_path):
    folder = tmp_path / "maps"
    folder.mkdir()
    for source in DEFAULT_MAPS_DIR.glob("*.yaml"):
        text = source.read_text(encoding="utf-8")
        if source.name == "contact.yaml":
            text = text.replace("writeback: true", "writeback: false")
        (folder / source.name).write_text(text, encoding="utf-8")
    run = cli(SAMPLES / "01_patient_create.json", "--maps", folder)
    assert (run.code, run.json()["decision"], run.json()["reason"]) == (0, "skip", "no-entity-map")


def test_a_mistyped_column_of_a_map_is_listed_as_absent(tmp_path):
    """Found trying the product as a new user: `telephone_1` for `telephone1` passed every check, and each whole
    row then cleared the work phone in FHIR. The dry run lists the mapped columns a message does not hold."""
    folder = tmp_path / "maps"
    folder.mkdir()
    for source in DEFAULT_MAPS_DIR.glob("*.yaml"):
        text = source.read_text(encoding="utf-8")
        (folder / source.name).write_text(text.replace("column: telephone1,", "column: telephone_1,"), "utf-8")
    shipped = cli(SAMPLES / "01_patient_create.json").json()["absentColumns"]
    assert "telephone1" not in shipped and "telephone_1" not in shipped
    assert "telephone_1" in cli(SAMPLES / "01_patient_create.json", "--maps", folder).json()["absentColumns"]


def test_a_mistyped_column_shows_the_element_it_would_clear(tmp_path):
    """Found by a new user's trial: with `lastnmae` for `lastname` the dry run said "Update Patient (..., name,
    ...)" with nothing `cleared`, and the write deleted the family name (`cleared` names only elements emptied
    whole). `clearedBy` names each element the write leaves empty beside the column it is mapped from."""
    folder = tmp_path / "maps"
    folder.mkdir()
    for source in DEFAULT_MAPS_DIR.glob("*.yaml"):
        text = source.read_text(encoding="utf-8")
        (folder / source.name).write_text(text.replace("column: lastname,", "column: lastnmae,"), "utf-8")
    family = "name[use?=official].family"
    shipped = cli(SAMPLES / "02_patient_update_phone.json").json()
    assert shipped["decision"] == "write" and family not in shipped["clearedBy"]
    assert shipped["resource"]["name"][0]["family"]
    mistyped = cli(SAMPLES / "02_patient_update_phone.json", "--maps", folder).json()
    assert mistyped["clearedBy"][family] == "lastnmae" and "family" not in mistyped["resource"]["name"][0]
    # What the sample leaves empty is there too: an empty column clears its element the same way.
    assert set(shipped["clearedBy"].values()) == set(shipped["absentColumns"])


def test_changes_name_only_what_the_whole_state_holds(tmp_path):
    """Found trying the product as a new user: a constant (`action: default`, no column) is written only beside a
    row's value in its element; alone, the dry run still listed its element under `changes`."""
    folder = tmp_path / "maps"
    folder.mkdir()
    for source in DEFAULT_MAPS_DIR.glob("*.yaml"):
        text = source.read_text(encoding="utf-8")
        if source.name == "contact.yaml":
            text = text.replace("attributes:\n", "attributes:\n  - {target: maritalStatus.text, action: default, "
                                "value: Unknown, only_for: [Patient]}\n", 1)
        (folder / source.name).write_text(text, "utf-8")
    data = cli(SAMPLES / "01_patient_create.json", "--maps", folder).json()
    assert data["decision"] == "write" and "maritalStatus" not in data["resource"]
    assert "maritalStatus" not in data["changes"] and "name" in data["changes"]


def test_missing_message_file():
    assert_usage_error(cli("no-such-message.json"), "no-such-message.json")


def test_properties_file_that_is_not_json(tmp_path):
    props = tmp_path / "props.json"
    props.write_text("MessageMaxSizeExceeded=true\n")
    assert_usage_error(cli(SAMPLES / "01_patient_create.json", "--properties", props), "props.json")


def test_properties_file_that_is_not_an_object(tmp_path):
    props = tmp_path / "props.json"
    props.write_text('["MessageMaxSizeExceeded"]')
    assert_usage_error(cli(SAMPLES / "01_patient_create.json", "--properties", props), "props.json")


def test_properties_file_nested_too_deeply(tmp_path):
    """A usage error, not a RecursionError traceback (found by a new user's trial)."""
    props = tmp_path / "props.json"
    props.write_text("[" * 100_000 + "]" * 100_000)
    assert_usage_error(cli(SAMPLES / "01_patient_create.json", "--properties", props), "nested too deeply")


def test_missing_properties_file(tmp_path):
    assert_usage_error(cli(SAMPLES / "01_patient_create.json", "--properties", tmp_path / "gone.json"), "gone.json")


def test_maps_folder_that_does_not_exist(tmp_path):
    assert_usage_error(cli(SAMPLES / "01_patient_create.json", "--maps", tmp_path / "nomaps"), "nomaps")


def test_maps_folder_with_a_bad_map(tmp_path):
    (tmp_path / "contact.yaml").write_text((DEFAULT_MAPS_DIR / "contact.yaml").read_text(encoding="utf-8")
                                           .replace("target: birthDate", "target: birthdate"), encoding="utf-8")
    run = cli(SAMPLES / "01_patient_create.json", "--maps", tmp_path)
    assert_usage_error(run, "contact.yaml", "attributes[3].target")


def test_maps_folder_from_the_setting(tmp_path):
    run = cli(SAMPLES / "01_patient_create.json", WRITEBACK_MAPS_DIR=str(tmp_path / "nomaps"))
    assert_usage_error(run, "nomaps")


def test_plan_says_what_it_cannot_know_from_the_message_alone(sample_runs: dict[str, Run]) -> None:
    """An encounter's plan cannot read its patient's consent nor the patient's FHIR id: it says so, and the
    function decides those when it writes (`process` on the same file may retry while the consent is unknown)."""
    out = sample_runs["05_encounter_create.json"].json()
    assert [item.split(" of ")[0] for item in out["decidedWhenWritten"]] == ["consent", "FHIR id"]



def test_the_sample_script_remakes_the_committed_samples_identically():
    """Found trying the product as a new user: `python -m devtools.samples` rewrote nine samples (new
    CorrelationId and OperationId each run), though it says it remakes them identically."""
    from devtools.samples import build, stable

    for name, body in stable(build()).items():
        assert json.loads((SAMPLES / name).read_text(encoding="utf-8")) == json.loads(json.dumps(body)), name
