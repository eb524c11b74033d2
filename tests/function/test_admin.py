"""`check-config` and `resubmit` (the Service Bus half runs only against a real namespace)."""

from __future__ import annotations

import json
import os
import socket
import uuid
from pathlib import Path

import pytest

from devtools.services import FhirDevServer
from tests.core.test_dataverse_metadata import METADATA
from tests.core.test_maps import edit, maps_dir
from tests.function.sb import received_message
from writeback import cli
from writeback.maps import map_faults


def test_check_config_offline(live_env: FhirDevServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check-config"]) == 0
    out = capsys.readouterr().out
    assert "ok    settings" in out and "ok    entity maps" in out and "All checks passed." in out
    assert live_env.client_secret not in out and "***redacted***" in out
    assert "AccountKey" not in out  # the connection string is a secret too


def test_check_config_names_the_bad_setting(live_env: FhirDevServer, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("FHIR_URL")
    monkeypatch.setenv("WRITEBACK_MAPS_DIR", "/nonexistent/maps")
    assert cli.main(["check-config", "--connect"]) == cli.EXIT_CHECK_FAILED
    out = capsys.readouterr().out
    assert "FAIL  settings        setting FHIR_URL is not set" in out
    assert "FAIL  entity maps" in out and "/nonexistent/maps" in out
    assert "skip  connections" in out and "2 check(s) failed." in out


@pytest.mark.parametrize(("name", "value", "words"), [
    ("FHIR_URL", "https://user:p4ssw0rd@fhir.example.org/r4", "FAIL  settings        setting FHIR_URL holds "
     "credentials (user:password@)"),
    ("FHIR_TENANT_ID", "72f988bf-86f1-41af-91ab-2d7cd011db47", "setting FHIR_TENANT_ID is set, but "
     "FHIR_CLIENT_SECRET is not"),
    ("APPLICATIONINSIGHTS_AUTHENTICATION_STRING", "junk", "FAIL  telemetry       "
     "APPLICATIONINSIGHTS_AUTHENTICATION_STRING must be `Key=Value` pairs"),
    ("APPLICATIONINSIGHTS_AUTHENTICATION_STRING", "Authorization=AAD;ClientId=not-a-guid", "ClientId must be the "
     "identity's client id"),
    ("APPLICATIONINSIGHTS_CONNECTION_STRING", "IngestionEndpoint=https://x.in.applicationinsights.azure.com/",
     "FAIL  telemetry       APPLICATIONINSIGHTS_CONNECTION_STRING holds no InstrumentationKey"),
])
def test_check_config_refuses_what_would_fail_later(live_env: FhirDevServer, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str], name: str, value: str,
                                                     words: str) -> None:
    """Found trying the product: each passed `check-config`, then shown a password in its output, ignored the
    tenant (a managed identity used where a client secret was meant), or turned telemetry off at start-up, so that
    no outcome record and no alert ever reached Application Insights."""
    if name == "FHIR_TENANT_ID":
        monkeypatch.delenv("FHIR_TOKEN_URL", raising=False)
        monkeypatch.delenv("FHIR_CLIENT_SECRET", raising=False)
    monkeypatch.setenv(name, value)
    assert cli.main(["check-config"]) == cli.EXIT_CHECK_FAILED
    out = capsys.readouterr().out
    assert words in out and "p4ssw0rd" not in out


def test_check_config_checks_the_maps_columns_against_the_environments(
        live_env: FhirDevServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A misspelt column passes every other check (it is a valid logical name) and would clear its element on
    every resource written: the environment's own `$metadata` names it."""
    metadata = str(METADATA)
    folder = maps_dir(tmp_path, {"contact.yaml": edit("contact.yaml", "column: firstname", "column: firstnme")})
    assert cli.main(["check-config", "--maps", str(folder), "--dataverse-metadata", metadata]) == cli.EXIT_CHECK_FAILED
    out = capsys.readouterr().out
    assert "  FAIL  columns         entity map contact.yaml: field `attributes[0].column` names 'firstnme', which " \
           "contact does not have (did you mean `firstname`?)" in out
    assert cli.main(["check-config", "--dataverse-metadata", metadata]) == cli.EXIT_OK
    assert "  ok    columns         every table and column the 4 map(s) name is in" in capsys.readouterr().out
    assert cli.main(["check-config", "--dataverse-metadata", str(tmp_path / "nowhere.xml")]) == cli.EXIT_CHECK_FAILED
    assert "  FAIL  columns         cannot read" in capsys.readouterr().out


def test_check_config_warns_of_a_date_from_a_date_and_time_column(
        live_env: FhirDevServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`type: date` on a User Local column (Edm.DateTimeOffset) writes the date of its UTC instant, a day early east
    of Greenwich; on a Time-Zone Independent one (Edm.DateTimeOffset too) it is right. A `warn` line names the file,
    the column and what to do, and the command passes (exit 0) unless another check fails."""
    metadata = str(METADATA)
    period = edit("msemr_medicalidentifier.yaml", "period.end, type: dateTime", "period.end, type: date")
    folder = maps_dir(tmp_path, {"msemr_medicalidentifier.yaml": period})
    assert cli.main(["check-config", "--maps", str(folder), "--dataverse-metadata", metadata]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "  ok    columns         every table and column the 4 map(s) name is in" in out
    assert "  warn  columns         entity map msemr_medicalidentifier.yaml: field `attributes[5]` writes " \
           "'msemr_periodend' with `type: date`, but msemr_medicalidentifier.msemr_periodend is " \
           "Edm.DateTimeOffset" in out
    assert "Change the column's behavior to Date Only" in out and "map it with `type: dateTime`" in out
    assert out.rstrip().endswith("All checks passed. 1 warning(s): read the `warn` lines.")
    # beside a fault: the exit code is the fault's, and both are said
    both = edit("contact.yaml", "column: firstname", "column: firstnme")
    (tmp_path / "both").mkdir()
    folder = maps_dir(tmp_path / "both", {"msemr_medicalidentifier.yaml": period, "contact.yaml": both})
    assert cli.main(["check-config", "--maps", str(folder), "--dataverse-metadata", metadata]) == \
        cli.EXIT_CHECK_FAILED
    out = capsys.readouterr().out
    assert "  FAIL  columns         entity map contact.yaml" in out and "  warn  columns         entity map " \
        "msemr_medicalidentifier.yaml" in out
    assert out.rstrip().endswith("1 check(s) failed. 1 warning(s): read the `warn` lines.")


def test_check_config_connect(live_env: FhirDevServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check-config", "--connect"]) == 0
    out = capsys.readouterr().out
    assert "ok    Table Storage" in out and "ok    token" in out
    assert "ok    FHIR metadata   CapabilityStatement of" in out and "FHIR 4.0.1" in out
    assert live_env.client_secret not in out


def test_check_config_connect_refused_credentials(live_env: FhirDevServer, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("FHIR_CLIENT_SECRET", "wrong-" + uuid.uuid4().hex)
    assert cli.main(["check-config", "--connect"]) == cli.EXIT_CHECK_FAILED
    out = capsys.readouterr().out
    assert "FAIL  token" in out and "unauthorized" in out
    assert "ok    Table Storage" in out


def test_resubmit_needs_a_connection(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("SERVICEBUS_CONNECTION_STRING", "ServiceBusConnection", "SERVICEBUS_NAMESPACE",
                 "ServiceBusConnection__fullyQualifiedNamespace", "SERVICE_BUS_NAMESPACE"):
        monkeypatch.delenv(name, raising=False)
    assert cli.main(["resubmit"]) == 2  # the queue defaults to the app's (WRITEBACK_QUEUE_NAME)
    assert capsys.readouterr().err == (
        "error: setting SERVICEBUS_CONNECTION_STRING is not set (nor ServiceBusConnection, SERVICEBUS_NAMESPACE, "
        "ServiceBusConnection__fullyQualifiedNamespace, SERVICE_BUS_NAMESPACE)\n")


def test_resubmit_with_a_malformed_connection_string_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SERVICEBUS_CONNECTION_STRING", "garbage")
    assert cli.main(["resubmit"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: setting SERVICEBUS_CONNECTION_STRING is not a Service Bus connection string")
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("since", ["999999w", "100000d", "401d"])
def test_logs_refuses_a_window_longer_than_the_log_is_read_for(since: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The outcome log is read a day and a status at a time: years would be thousands of queries (and an
    overflow past the calendar)."""
    with pytest.raises(SystemExit) as usage:  # argparse's usage error
        cli.main(["logs", "--since", since])
    assert usage.value.code == 2
    err = capsys.readouterr().err
    assert "400 days" in err and "Traceback" not in err


def test_resubmit_to_an_unreachable_namespace_is_one_line_not_a_traceback(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as unused:  # a loopback port nothing listens on
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    monkeypatch.setenv("SERVICEBUS_CONNECTION_STRING", f"Endpoint=sb://127.0.0.1:{port};SharedAccessKeyName=Root"
                       "ManageSharedAccessKey;SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true;")
    monkeypatch.setenv("WRITEBACK_QUEUE_NAME", "hospital-writeback")
    assert cli.main(["resubmit", "--reason", "fhir-rejected"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: Service Bus: ServiceBusConnectionError: could not move the dead-lettered "
                                   "messages of queue hospital-writeback")
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err and "SAS_KEY_VALUE" not in captured.err


def test_requeued_copy_keeps_ids_and_drops_dead_letter_fields() -> None:
    """A copy under a MessageId of its own (the queue would drop the original's within its duplicate-detection
    window: a message dead-lettered and resubmitted within 10 minutes would be lost), naming the original."""
    dead = received_message(b'{"MessageName": "Create"}', message_id="orig-1", correlation_id="corr-1",
                            application_properties={"DeadLetterReason": "fhir-rejected",
                                                    "DeadLetterErrorDescription": "status 422",
                                                    "http://schemas.microsoft.com/xrm/2011/Claims/User": "u"})
    assert dead.dead_letter_reason == "fhir-rejected"
    copy = cli._requeued(dead)
    assert b"".join(copy.body) == b'{"MessageName": "Create"}'
    props = {str(k): v for k, v in (copy.application_properties or {}).items()}
    assert copy.message_id == f"orig-1~{props.pop('writeback-resubmission')!s}"  # its retry copies' ids carry it too
    assert (copy.correlation_id, copy.content_type) == ("corr-1", "application/json")
    assert props == {"http://schemas.microsoft.com/xrm/2011/Claims/User": "u",
                     "writeback-resubmitted-from": "fhir-rejected", "writeback-original-message-id": "orig-1"}


def test_a_resubmitted_copy_gets_a_new_window_of_retries() -> None:
    """It kept the retry count and first-try time: a message dead-lettered `retries-exhausted` and put back
    after the outage was fixed was dead-lettered again at its first transient failure. It is still a message tried
    before: an earlier try may owe a Provenance, which only a retry looks for."""
    from datetime import UTC, datetime, timedelta

    from writeback.functions import envelope_of
    from writeback.pipeline import _retried
    from writeback.retry import ATTEMPT, CONSENT_WAITS, FIRST_TRIED, Retry, RetryPolicy, next_step

    now = datetime.now(UTC)
    dead = received_message(b'{"MessageName": "Update"}', message_id="orig-2~r12", application_properties={
        "DeadLetterReason": "retries-exhausted", ATTEMPT: "12", CONSENT_WAITS: "9",
        FIRST_TRIED: (now - timedelta(hours=25)).isoformat(), "writeback-original-message-id": "orig-2"})
    copy = cli._requeued(dead)
    props = {str(k): str(v) for k, v in (copy.application_properties or {}).items()}
    assert ATTEMPT not in props and FIRST_TRIED not in props and CONSENT_WAITS not in props
    assert props["writeback-original-message-id"] == "orig-2"
    step = next_step(RetryPolicy(), properties=props, message_id=str(copy.message_id), now=now)
    assert isinstance(step, Retry) and step.attempt == 1
    resubmitted = received_message(b"{}", message_id=str(copy.message_id), application_properties=props)
    assert _retried(envelope_of(resubmitted))
    assert not _retried(envelope_of(received_message(b"{}", message_id="fresh", application_properties={})))


@pytest.mark.servicebus
def test_resubmit_against_a_real_namespace(capsys: pytest.CaptureFixture[str]) -> None:
    """Dead-letter a message with a reason code, resubmit only that reason, find it back on the queue."""
    conn = os.environ.get("SERVICEBUS_CONNECTION_STRING")
    if not conn:
        pytest.skip("SERVICEBUS_CONNECTION_STRING is not set: no Service Bus namespace (or emulator) to test "
                    "resubmit against")
    from azure.servicebus import ServiceBusClient, ServiceBusMessage, ServiceBusSubQueue

    queue = os.environ.get("SERVICEBUS_TEST_QUEUE") or os.environ.get("WRITEBACK_QUEUE_NAME") or "dataverse-writeback"
    marker = uuid.uuid4().hex
    with ServiceBusClient.from_connection_string(conn) as client:
        with client.get_queue_receiver(queue, max_wait_time=2) as drain:  # start from an empty queue
            for stale in drain.receive_messages(max_message_count=100, max_wait_time=2):
                drain.complete_message(stale)
        with client.get_queue_sender(queue) as sender:
            sender.send_messages([ServiceBusMessage(b'{"n": 1}', message_id=f"{marker}-keep"),
                                  ServiceBusMessage(b'{"n": 2}', message_id=f"{marker}-move")])
        with client.get_queue_receiver(queue, max_wait_time=5) as receiver:
            got = {m.message_id: m for m in receiver.receive_messages(max_message_count=2, max_wait_time=5)}
            receiver.dead_letter_message(got[f"{marker}-move"], reason="fhir-rejected",
                                         error_description="test: status 422")
            receiver.dead_letter_message(got[f"{marker}-keep"], reason="invalid-contact-type",
                                         error_description="test")
    assert cli.main(["resubmit", "--queue", queue, "--reason", "fhir-rejected", "--max", "10"]) == 0
    out = capsys.readouterr().out
    assert f"resubmitted message {marker}-move" in out and f"{marker}-keep" not in out
    with ServiceBusClient.from_connection_string(conn) as client:
        with client.get_queue_receiver(queue, max_wait_time=5) as receiver:
            back = receiver.receive_messages(max_message_count=10, max_wait_time=5)
            assert [str(m.message_id).split("~s")[0] for m in back] == [f"{marker}-move"]
            props = back[0].application_properties or {}
            assert props[b"writeback-resubmitted-from"] == b"fhir-rejected"
            receiver.complete_message(back[0])
        with client.get_queue_receiver(queue, sub_queue=ServiceBusSubQueue.DEAD_LETTER,
                                       max_wait_time=5) as dlq:
            left = dlq.receive_messages(max_message_count=50, max_wait_time=5)
            assert f"{marker}-keep" in [m.message_id for m in left]
            for m in left:
                if m.message_id and m.message_id.startswith(marker):
                    dlq.complete_message(m)


def test_process_writes_an_observation_whose_encounter_is_nowhere_by_identifier(
        live_env: FhirDevServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`process` retries nothing, so nothing waits for a message that could still come: a lookup to an Encounter
    that is in no file given and not in FHIR is referred to by identifier at once, and the run exits 0."""
    from devtools.messages import Choice, Lookup, context

    patient, observation, encounter = (str(uuid.uuid4()) for _ in range(3))
    row = {"msemr_contacttype": Choice(935000000), "msemr_azurefhirsyncenabled": True, "lastname": "Okafor"}
    seen = {"msemr_status": Choice(935000002), "msemr_code": Lookup("msemr_codeableconcept", str(uuid.uuid4())),
            "msemr_subjecttypepatient": Lookup("contact", patient),
            "msemr_conexttypeencounter": Lookup("msemr_encounter", encounter), "msemr_valuestring": "trace"}
    files = []
    for name, body in (("patient", context("Create", "contact", patient, row, post=row)),
                       ("observation", context("Create", "msemr_observation", observation, seen, post=seen))):
        files.append(tmp_path / f"{name}.json")
        files[-1].write_text(json.dumps(body))
    assert cli.main(["process", *map(str, files)]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert out.count("written") >= 2, out


def test_process_reads_every_file_first_and_says_why_each_message_ends_as_it_does(
        live_env: FhirDevServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Found trying the product as a new user: a missing file stopped `process` part-way (the files before it
    written, those after it not), and a line gave the reason code without its detail."""
    from devtools.messages import Choice, context

    patient = str(uuid.uuid4())
    row = {"msemr_contacttype": Choice(935000000), "msemr_azurefhirsyncenabled": True, "lastname": "Okafor"}
    good = tmp_path / "patient.json"
    good.write_text(json.dumps(context("Create", "contact", patient, row, post=row)))
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps(context("Create", "account", str(uuid.uuid4()), {"name": "x"})))
    try:
        code = cli.main(["process", str(good), str(tmp_path / "missing.json")])
    except SystemExit as exited:
        code = int(exited.code or 0)
    captured = capsys.readouterr()
    assert code == 2 and "missing.json" in captured.err and captured.out == ""  # nothing was processed
    assert cli.main(["process", str(unknown)]) == 0
    [line] = [json.loads(text) for text in capsys.readouterr().out.splitlines()]
    assert (line["decision"], line["reason"]) == ("skipped", "no-entity-map")
    assert "account" in line["detail"] and "has no entity map" in line["detail"]


def test_resubmit_refuses_a_mistyped_reason_and_takes_the_function_apps_connection_setting(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Found trying the product as a new user: `--reason retries-exausted` was accepted and would move nothing, and
    the function app's own `ServiceBusConnection` was not read ("the same settings as the function app")."""
    try:
        code = cli.main(["resubmit", "--reason", "retries-exausted"])
    except SystemExit as exited:
        code = int(exited.code or 0)
    assert code == 2 and "retries-exausted" in capsys.readouterr().err
    for name in ("SERVICEBUS_CONNECTION_STRING", "SERVICEBUS_NAMESPACE", "SERVICE_BUS_NAMESPACE",
                 "ServiceBusConnection__fullyQualifiedNamespace"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ServiceBusConnection", "not a connection string")
    assert cli.main(["resubmit", "--reason", "MaxDeliveryCountExceeded"]) == 2
    err = capsys.readouterr().err
    assert "ServiceBusConnection" in err and "not a connection string" not in err and "Traceback" not in err


def test_check_config_checks_the_configured_maps_even_when_another_setting_is_wrong(
        clean_env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With a setting wrong, the maps check read the shipped maps, not WRITEBACK_MAPS_DIR, and said `ok` of maps
    the function would refuse. `--maps` checks a folder before it is configured."""
    from writeback.settings import DEFAULT_MAPS_DIR

    bad = tmp_path / "maps"
    bad.mkdir()
    for path in DEFAULT_MAPS_DIR.glob("*.yaml"):
        (bad / path.name).write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    (bad / "contact.yaml").write_text((bad / "contact.yaml").read_text().replace("table: contact\n",
                                                                                  "table: contacts\n"))
    clean_env.setenv("WRITEBACK_MAPS_DIR", str(bad))  # and no FHIR_URL: the settings check fails
    assert cli.main(["check-config"]) == cli.EXIT_CHECK_FAILED
    out = capsys.readouterr().out
    assert "FAIL  settings" in out and "FAIL  entity maps" in out and "contacts.yaml" in out
    clean_env.delenv("WRITEBACK_MAPS_DIR")
    assert cli.main(["check-config", "--maps", str(bad)]) == cli.EXIT_CHECK_FAILED
    assert "FAIL  entity maps" in capsys.readouterr().out


def test_check_config_reports_every_bad_setting_at_once(clean_env: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """It said only the first: an administrator fixed one setting, ran it again, and met the next."""
    clean_env.setenv("FHIR_URL", "http://fhir.contoso.example")  # not loopback: https required
    clean_env.setenv("OUTCOMES_CONNECTION_STRING", "DefaultEndpointsProtocol=https;oops")  # a secret: never echoed
    clean_env.setenv("WRITEBACK_BUNDLE_SIZE", "fifty")
    clean_env.setenv("WRITEBACK_CONSENT_UNKNOWN", "wait")
    clean_env.setenv("WRITEBACK_QUEUE_NAME", "dataverse-writeback")  # (right: only the four above fail)
    assert cli.main(["check-config"]) == cli.EXIT_CHECK_FAILED
    out = capsys.readouterr().out
    fails = [line for line in out.splitlines() if line.startswith("  FAIL  settings")]
    assert [line.split()[3] for line in fails] == [
        "WRITEBACK_CONSENT_UNKNOWN", "FHIR_URL", "OUTCOMES_CONNECTION_STRING", "WRITEBACK_BUNDLE_SIZE"], out
    assert "oops" not in out and "4 check(s) failed." in out


def test_a_wrong_setting_of_a_form_of_its_own_hides_none_after_it(clean_env: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A wrong WRITEBACK_AGENT (optional, no default) was given a stand-in its own check refused again, and the
    search ended there: the wrong FHIR_MAX_RETRIES and ignore list after it were never reported (found by a new
    user's trial)."""
    clean_env.setenv("FHIR_URL", "https://fhir.contoso.example")
    clean_env.setenv("OUTCOMES_TABLE_ENDPOINT", "https://acct.table.core.windows.net")
    clean_env.setenv("WRITEBACK_AGENT", "Practitioner/1")
    clean_env.setenv("FHIR_MAX_RETRIES", "-1")
    clean_env.setenv("WRITEBACK_IGNORE_USER_IDS", "bad")
    assert cli.main(["check-config"]) == cli.EXIT_CHECK_FAILED
    out = capsys.readouterr().out
    fails = sorted(line.split()[3] for line in out.splitlines() if line.startswith("  FAIL  settings"))
    assert fails == ["FHIR_MAX_RETRIES", "WRITEBACK_AGENT", "WRITEBACK_IGNORE_USER_IDS"], out


def test_check_config_reports_each_broken_map_at_once(clean_env: pytest.MonkeyPatch, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """It said only the first broken file: a new user with three fixed one, ran it again, and met the next. Files
    that read are checked against each other too (a lookup's type, a child's parent) when all of them read."""
    clean_env.setenv("FHIR_URL", "https://fhir.contoso.example")
    clean_env.setenv("OUTCOMES_TABLE_ENDPOINT", "https://acct.table.core.windows.net")
    enc = "msemr_encounter.yaml"
    folder = maps_dir(tmp_path, {
        "contact.yaml": edit("contact.yaml", "{column: birthdate,", "{colum: birthdate,"),
        enc: edit(enc, "resource: Encounter", "resourc: Encounter"),
        "msemr_observation.yaml": edit("msemr_observation.yaml", "writeback: true", 'writeback: "yes"')})
    assert cli.main(["check-config", "--maps", str(folder)]) == cli.EXIT_CHECK_FAILED
    fails = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  FAIL  entity maps")]
    assert [line.split()[5] for line in fails] == ["contact.yaml:", f"{enc}:", "msemr_observation.yaml:"], fails
    (tmp_path / "all-read").mkdir()
    folder = maps_dir(tmp_path / "all-read", {
        enc: edit(enc, "    target: status\n", "    target: statuz\n"),
        "msemr_medicalidentifier.yaml": edit("msemr_medicalidentifier.yaml", "resource: Patient",
                                             "resource: Encounter")})
    assert [e.file for e in map_faults(folder)] == [enc, "msemr_medicalidentifier.yaml"]


def test_a_bound_that_depends_on_a_wrong_setting_is_reported_once(clean_env: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    clean_env.setenv("FHIR_URL", "https://fhir.contoso.example")
    clean_env.setenv("OUTCOMES_TABLE_ENDPOINT", "https://acct.table.core.windows.net")
    clean_env.setenv("WRITEBACK_LOCK_DURATION_SECONDS", "45")  # leaves no room for the default 30 s timeout
    assert cli.main(["check-config"]) == cli.EXIT_CHECK_FAILED
    out = capsys.readouterr().out
    assert out.count("FAIL  settings") == 1 and "setting FHIR_TIMEOUT_SECONDS must leave room" in out, out


@pytest.mark.parametrize(("url", "words"), [
    ("https://YOUR-WORKSPACE-YOUR-FHIR.fhir.azurehealthcareapis.com", "placeholder"),
    ("https://ws-fhir.fhir.azurehealthcareapis.com/metadata", "without /metadata"),
])
def test_the_samples_placeholder_or_a_metadata_url_is_not_a_fhir_url(clean_env: pytest.MonkeyPatch, url: str,
                                                                     words: str,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Both passed `check-config` without --connect (a new user's first run), then failed every write."""
    clean_env.setenv("FHIR_URL", url)
    clean_env.setenv("OUTCOMES_TABLE_ENDPOINT", "https://acct.table.core.windows.net")
    assert cli.main(["check-config"]) == cli.EXIT_CHECK_FAILED
    out = capsys.readouterr().out
    assert "FAIL  settings        setting FHIR_URL" in out and words in out
