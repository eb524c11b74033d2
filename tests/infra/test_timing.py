"""A batch never outlives its lock: functionTimeout, the lock duration, the retry budget and the batch size agree,
as host.json, the Bicep and the settings' defaults have them (docs/operations.md, "Timing")."""

from __future__ import annotations

import json
import re
from datetime import timedelta

from tests.infra.test_bicep import INFRA, MODULES, ROOT, app_settings, declared, text
from writeback.settings import DEADLINE_MARGIN_SECONDS, SPEC_BY_NAME, Settings

SERVICE_BUS_MAX_LOCK_SECONDS = 300


def _timespan(value: str) -> timedelta:
    hours, minutes, seconds = (int(part) for part in value.split(":"))
    return timedelta(hours=hours, minutes=minutes, seconds=seconds)


def _int_default(path: str, name: str) -> int:
    param = declared(MODULES / path if path != "main.bicep" else INFRA / path, "param")[name]
    assert param.value is not None, f"{path} {name} has no default"
    return int(text(param.value))


def _defaults() -> Settings:
    return Settings.from_env({"FHIR_URL": "https://fhir.example.org"})


def test_one_lock_duration_feeds_the_queue_and_the_app() -> None:
    lock = _int_default("main.bicep", "lockDurationSeconds")
    assert lock == _int_default("servicebus.bicep", "lockDurationSeconds") == _int_default(
        "functionapp.bicep", "lockDurationSeconds")
    assert lock == int(SPEC_BY_NAME["WRITEBACK_LOCK_DURATION_SECONDS"].default or 0) <= SERVICE_BUS_MAX_LOCK_SECONDS
    assert text(app_settings()["WRITEBACK_LOCK_DURATION_SECONDS"]) == "string(lockDurationSeconds)"
    queue = (MODULES / "servicebus.bicep").read_text(encoding="utf-8")
    assert re.search(r"lockDuration:\s*'PT\$\{lockDurationSeconds\}S'", queue)
    main = (INFRA / "main.bicep").read_text(encoding="utf-8")
    assert main.count("lockDurationSeconds: lockDurationSeconds") == 2  # passed to both modules
    assert "renews the lock" not in queue  # batch triggers get no lock renewal


def test_the_invocation_deadline_falls_inside_the_lock_and_inside_function_timeout() -> None:
    host = json.loads((ROOT / "host.json").read_text(encoding="utf-8"))
    settings = _defaults()
    deadline = settings.invocation_seconds
    assert deadline == settings.lock_duration_seconds - settings.timeout_seconds - DEADLINE_MARGIN_SECONDS
    assert 0 < deadline < settings.lock_duration_seconds
    # The host must never stop an invocation before its own deadline (and the settling after it).
    assert _timespan(host["functionTimeout"]).total_seconds() >= settings.lock_duration_seconds


def test_one_request_with_all_its_retries_fits_before_the_deadline() -> None:
    settings = _defaults()
    assert settings.retry_max_seconds + settings.timeout_seconds < settings.invocation_seconds


def test_a_batch_is_one_round_of_concurrent_bundles() -> None:
    """Each sequential round of a batch (creates, reads, writes, Provenances) sends the whole batch at once."""
    host = json.loads((ROOT / "host.json").read_text(encoding="utf-8"))
    batch = host["extensions"]["serviceBus"]["maxMessageBatchSize"]
    assert batch == _int_default("functionapp.bicep", "maxMessageBatchSize")
    settings = _defaults()
    assert batch <= settings.bundle_size * settings.max_concurrency


def test_batch_trigger_settings_that_do_nothing_are_not_set() -> None:
    service_bus = json.loads((ROOT / "host.json").read_text(encoding="utf-8"))["extensions"]["serviceBus"]
    assert "maxConcurrentCalls" not in service_bus and "maxAutoLockRenewalDuration" not in service_bus


def test_a_timeout_leaving_no_room_inside_the_lock_is_refused() -> None:
    env = {"FHIR_URL": "https://fhir.example.org", "WRITEBACK_LOCK_DURATION_SECONDS": "60",
           "FHIR_TIMEOUT_SECONDS": "45"}
    try:
        Settings.from_env(env)
    except Exception as exc:
        assert "FHIR_TIMEOUT_SECONDS" in str(exc)
    else:
        raise AssertionError("a timeout that leaves no deadline inside the lock was accepted")
