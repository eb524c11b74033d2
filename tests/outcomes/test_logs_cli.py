"""`python -m writeback logs` against rows in real Azurite."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from azure.data.tables import TableServiceClient

from devtools.services import Azurite
from tests.function.helpers import FIRST, LAST, FakeDelivery, consent_body, create_body, new_id, reject_body
from tests.outcomes.conftest import new_prefix, store_settings
from writeback import cli
from writeback.maps import MapSet
from writeback.outcomes import OutcomeStore
from writeback.pipeline import Envelope, Issue, Pipeline
from writeback.reasons import Reason
from writeback.settings import Settings


@pytest.fixture
def logged(azurite_tables: Azurite, maps: MapSet, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Five outcomes of four rows: written (with a warning), skipped, dead-lettered, retry, then written again."""
    prefix = new_prefix()
    ids = {"written": new_id(), "skipped": new_id(), "rejected": new_id(), "retried": new_id()}

    async def fill() -> None:
        delivery = FakeDelivery(fail=[Reason.FHIR_UNAVAILABLE],
                                issues=(Issue("warning", "business-rule", "Patient.name[0]", "MSG_NAME"),))
        async with OutcomeStore.from_settings(store_settings(azurite_tables, prefix)) as store:
            pipeline = Pipeline(maps, Settings.for_planning({}), delivery, store)
            for body, mid in ((create_body(ids["retried"]), "m-retry"), (create_body(ids["written"]), "m-ok"),
                              (consent_body(ids["skipped"]), "m-skip"), (reject_body(ids["rejected"]), "m-rej")):
                await pipeline.process(Envelope(body, message_id=mid))

    asyncio.run(fill())
    monkeypatch.setenv("OUTCOMES_CONNECTION_STRING", azurite_tables.connection_string)
    monkeypatch.setenv("OUTCOMES_TABLE_PREFIX", prefix)
    monkeypatch.delenv("OUTCOMES_TABLE_ENDPOINT", raising=False)
    return ids


def test_logs_failed_table(logged: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["logs", "--status", "failed", "--since", "24h"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["TIME", "(UTC)", "OUTCOME", "REASON"]
    assert "RESOURCE / DETAIL" in lines[0]
    body = "\n".join(lines[1:])
    assert "dead-lettered" in body and "invalid-contact-type" in body and logged["rejected"] in body
    assert "retry" in body and "fhir-unavailable" in body and logged["retried"] in body
    assert logged["written"] not in body and logged["skipped"] not in body
    # newest first: the rejection was processed after the retry
    assert body.index(logged["rejected"]) < body.index(logged["retried"])
    # Each failure's whole detail and its message id, on a line of its own (the table's cell is cut at 60)
    rejected = lines.index(next(line for line in lines if logged["rejected"] in line))
    assert lines[rejected + 1].startswith("    ↳ message ") and "not in the message" in lines[rejected + 1]
    assert lines[-1] == "2 outcome(s)"
    assert FIRST not in out and LAST not in out


def test_logs_all_and_issue_lines(logged: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["logs"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == "4 outcome(s)"
    written = next(line for line in out.splitlines() if logged["written"] in line)
    assert "written" in written and "Patient/fake" in written and "Create" in written
    assert "    ↳ warning business-rule at Patient.name[0]: MSG_NAME" in out
    skipped = next(line for line in out.splitlines() if logged["skipped"] in line)
    assert "consent-withheld" in skipped


def test_logs_status_and_record(logged: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["logs", "--status", "skipped"]) == 0
    out = capsys.readouterr().out
    assert logged["skipped"] in out and out.splitlines()[-1] == "1 outcome(s)"
    assert cli.main(["logs", "--record", logged["rejected"].upper(), "--json"]) == 0
    [line] = capsys.readouterr().out.splitlines()
    row = json.loads(line)
    assert (row["outcome"], row["reason"], row["settlement"], row["recordId"]) == (
        "dead-lettered", "invalid-contact-type", "deadletter", logged["rejected"])
    assert row["messageId"] == "m-rej"


def test_logs_since_excludes_older(logged: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    time.sleep(1.1)
    assert cli.main(["logs", "--since", "1s"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "0 outcome(s)"


def test_logs_store_down_is_one_line(azurite_tables: Azurite, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("OUTCOMES_CONNECTION_STRING",
                       azurite_tables.connection_string.replace(str(azurite_tables.port), "1"))
    monkeypatch.setenv("OUTCOMES_TABLE_PREFIX", new_prefix())
    assert cli.main(["logs"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Table Storage could not be used") and len(err.splitlines()) == 1


def test_logs_reads_without_creating_tables(azurite_tables: Azurite, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """An administrator with Storage Table Data Reader only can read the log: `logs` never creates a table
    (before the function has recorded anything, there is simply nothing to show)."""
    prefix = new_prefix()
    monkeypatch.setenv("OUTCOMES_CONNECTION_STRING", azurite_tables.connection_string)
    monkeypatch.setenv("OUTCOMES_TABLE_PREFIX", prefix)
    monkeypatch.delenv("OUTCOMES_TABLE_ENDPOINT", raising=False)
    assert cli.main(["logs", "--since", "7d"]) == 0
    assert cli.main(["logs", "--record", new_id()]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[-1] == "0 outcome(s)"
    # A mistyped prefix read nothing and said nothing of why: the missing table is named.
    assert f"table {prefix}outcomes does not exist" in captured.err and f"PREFIX={prefix}" in captured.err
    with TableServiceClient.from_connection_string(azurite_tables.connection_string) as service:
        assert [t.name for t in service.list_tables() if t.name.startswith(prefix)] == []


@pytest.mark.parametrize("args", [["--limit", "0"], ["--limit", "-5"], ["--record", "not-a-guid"]])
def test_logs_refuses_what_could_only_show_nothing(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Found trying the product as a new user: these printed `0 outcome(s)` and exit 0, as if there were none."""
    try:
        code = cli.main(["logs", *args])
    except SystemExit as exited:
        code = int(exited.code or 0)
    err = capsys.readouterr().err
    assert code == 2 and args[0] in err and "Traceback" not in err


def test_a_written_rows_long_reference_is_shown_whole() -> None:
    """An Observation's versioned reference is longer than the table's cell: cut, it named no version (found by a new
    user's trial); it is the line's last cell, whole."""
    from datetime import UTC, datetime

    from writeback.outcomes import OutcomeRow

    reference = f"Observation/{new_id()}/_history/123"
    row = OutcomeRow("rk", datetime.now(UTC), "written", "written", None, "", "complete", "msemr_observation", new_id(),
                     "Update", "m-1", None, None, "update", reference, None, 1, 12.0, 0)
    lines = cli.format_logs([row]).splitlines()
    assert lines[1].endswith(f"  {reference}") and len(lines) == 3 and lines[2] == "1 outcome(s)"
