"""A hospital administrator's review of docs/operations.md and the README's reason table, against the real services
the fixtures start (FHIR dev server, Azurite), with the project's Service Bus simulator as the queue and its
dead-letter queue (tests/admin/test_admin_trial.py).

Each test asserts what the administrator should see, and fails today because of the problem its docstring names.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import uuid
from datetime import timedelta

import pytest

from devtools.services import Azurite, FhirDevServer
from tests.admin.test_admin_trial import DeadLetterBroker, app_on, create, patient, run_cli
from tests.reliability.broker import SEQ, SimMessage
from writeback import cli
from writeback.reasons import REASONS, Reason
from writeback.retry import ATTEMPT, FIRST_TRIED, ORIGINAL_ID
from writeback.settings import SETTINGS


@pytest.fixture
def review_env(monkeypatch: pytest.MonkeyPatch, fhir_server: FhirDevServer, azurite_tables: Azurite) -> dict[str, str]:
    """The function app's settings against the dev servers, also exported for the CLI (as docs/operations.md asks)."""
    for spec in SETTINGS:
        monkeypatch.delenv(spec.name, raising=False)
    env = {"FHIR_URL": fhir_server.base_url, "FHIR_TOKEN_URL": fhir_server.token_url,
           "FHIR_CLIENT_ID": fhir_server.client_id, "FHIR_CLIENT_SECRET": fhir_server.client_secret,
           "OUTCOMES_CONNECTION_STRING": azurite_tables.connection_string,
           "OUTCOMES_TABLE_PREFIX": "rev" + uuid.uuid4().hex[:10], "FHIR_MAX_RETRIES": "1",
           "FHIR_RETRY_MAX_SECONDS": "2"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def late_retry(broker: DeadLetterBroker, message_id: str) -> str:
    """A patient's Create retried past WRITEBACK_RETRY_WINDOW_HOURS (first tried 25 h ago), its 40th copy put on the
    queue; the row's id."""
    row, columns = patient()
    broker.rows[1] = row
    props: dict[str, object] = {SEQ: 1, ATTEMPT: "40", ORIGINAL_ID: message_id,
                                FIRST_TRIED: (broker.now - timedelta(hours=25)).isoformat()}
    broker._enqueue(SimMessage(create("contact", row, columns), f"{message_id}~r40", props, broker.now), broker.now)
    return row


async def logged(monkeypatch: pytest.MonkeyPatch, row: str) -> list[dict[str, object]]:
    """What `logs --record <row> --json` shows the administrator."""
    code, out = await asyncio.to_thread(run_cli, monkeypatch, None, "logs", "--record", row, "--since", "7d", "--json")
    assert code == 0, out
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def _check_config() -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["check-config"])
    return code, out.getvalue()


# ---- findings ---------------------------------------------------------------------------------------------------


async def test_a_table_prefix_with_an_accented_letter_is_a_config_error_not_a_storage_outage(
        review_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The administrator sets OUTCOMES_TABLE_PREFIX=écriture (the hospital's word for writeback) and runs
    `check-config`, which docs/operations.md says reports "all settings valid; each wrong setting is one `FAIL` line
    naming it". It printed "ok settings valid" and exit 0, yet Azure Table names take ASCII letters and digits only:
    every message then retried as `outcome-store-unavailable` ("Check the storage account and the function's role
    on it", README), with "Table Storage could not be used to create the outcome tables (HttpResponseError)", for
    the whole retry window. A wrong setting should be `config-error` naming OUTCOMES_TABLE_PREFIX."""
    env = {**review_env, "OUTCOMES_TABLE_PREFIX": "écriture"}
    monkeypatch.setenv("OUTCOMES_TABLE_PREFIX", "écriture")
    broker = DeadLetterBroker(batch=10)
    app = app_on(broker, env)
    row, columns = patient()
    seq = broker.send(create("contact", row, columns), row=row)
    caplog.set_level(logging.INFO, logger="writeback")
    await broker.run(max_invocations=1)
    await app.aclose()
    # The outcome the administrator's queries read (a configuration fault is one record for the batch: the
    # messages are kept, never dead-lettered).
    told = [(r.__dict__.get("outcome"), r.getMessage()) for r in caplog.records if r.__dict__.get("outcome")]
    code, out = _check_config()
    settings_lines = [line for line in out.splitlines() if line.strip().split()[1:2] == ["settings"]]
    assert [o for o, _ in told] == ["config-error"] and "OUTCOMES_TABLE_PREFIX" in told[0][1], (
        f"the function's outcomes: {told}; check-config (exit {code}): {settings_lines}")
    assert seq not in broker.ends and not broker.dlq and broker.copies_scheduled == 1  # kept: a delayed copy
    assert code == 1 and any("FAIL" in line and "OUTCOMES_TABLE_PREFIX" in line for line in settings_lines), \
        settings_lines


async def test_invalid_contact_type_action_resubmit_after_fixing_the_images_dead_letters_it_again(
        review_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A Patient contact is saved while the step's images leave out `msemr_contacttype`: its Create is dead-lettered
    `invalid-contact-type`. The README's action: "if the contact has one, check that the steps' images hold the
    column (docs/deploy.md), then resubmit." The administrator adds the column to the images and runs
    `resubmit --reason invalid-contact-type`: the resubmitted message is the same body, still without the column,
    and is dead-lettered again with the same reason. Only a new save of the row (a new message, taken with the
    fixed images) can carry the type; the action should say so instead of "resubmit"."""
    broker = DeadLetterBroker(batch=10)
    app = app_on(broker, review_env)
    row, columns = patient(msemr_contacttype=None)  # the images did not hold the column
    broker.send(create("contact", row, columns), row=row)
    await broker.run()
    [(_, _, first)] = broker.dlq
    assert first.reason == "invalid-contact-type"
    # The fix the action names: the steps' images now hold msemr_contacttype (no new save of the row). Then resubmit.
    code, out = run_cli(monkeypatch, broker, "resubmit", "--reason", "invalid-contact-type")
    assert code == 0 and "Moved 1" in out, out
    await broker.run()
    await app.aclose()
    again = [end for _, _, end in broker.dlq]
    action = REASONS[Reason.INVALID_CONTACT_TYPE].action
    assert not again or "resubmit" not in action, (
        f"following the action ({action!r}) the message was dead-lettered again: "
        f"{[(end.reason, end.description) for end in again]}")


async def test_a_late_handed_retry_past_its_window_is_dead_lettered_while_its_outcome_row_says_retry(
        review_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A patient's Create has been retried for more than WRITEBACK_RETRY_WINDOW_HOURS (24 h); its 40th copy is
    handed over with too little of its lock left to be worked on (the worker was busy). The message is
    dead-lettered `retries-exhausted`, but the administrator's `logs --record <row>` shows only `retry` /
    `deadline-reached` / settlement `reschedule` ("Service Bus delivers it again"): no row says dead-lettered.
    docs/operations.md (Timing): "the pipeline ... records and hands back every outcome, so the log and the
    settlement agree (a message whose outcome row says dead-lettered is in the dead-letter queue)"; section 1: "after
    WRITEBACK_RETRY_WINDOW_HOURS (24 h) of retries it is dead-lettered as `retries-exhausted`", a row like every
    outcome. The dead-letter's description also says "Service Bus delivers it again", which it never does."""
    broker = DeadLetterBroker(batch=10, lock=timedelta(seconds=20))  # less than FHIR_TIMEOUT_SECONDS (30) left
    app = app_on(broker, review_env)
    row = late_retry(broker, "m-late")
    await broker.run(max_invocations=1)
    await app.aclose()
    [(_, _, end)] = broker.dlq
    assert end.reason == "retries-exhausted"  # what happened: it is in the dead-letter queue
    rows = await logged(monkeypatch, row)
    assert any(r["outcome"] == "dead-lettered" and r["reason"] == "retries-exhausted" for r in rows), (
        f"dead-lettered ({end.reason}: {end.description}); the outcome log says: "
        f"{[(r['outcome'], r['reason'], r['settlement']) for r in rows]}")


def test_check_config_does_not_print_the_sas_signature_of_a_table_endpoint(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The administrator copies the storage account's "Table service SAS URL" from the Azure portal into
    OUTCOMES_TABLE_ENDPOINT and runs `check-config` to see whether it will do. docs/operations.md, section 4:
    "Prints every setting with its effective value (secrets shown as `***redacted***`)" and "Tokens and secrets are
    never printed". It printed the URL whole, its `sig=` signature (a bearer secret for the storage account)
    included, and called the settings valid: the output, pasted into a ticket, hands out access to the account."""
    for spec in SETTINGS:
        monkeypatch.delenv(spec.name, raising=False)
    signature = "Qz7sAsSiGnAtUrE0123456789abcdefXYZ%3D"
    monkeypatch.setenv("FHIR_URL", "https://fhir.contoso.example/r4")
    monkeypatch.setenv("OUTCOMES_TABLE_ENDPOINT", "https://contosowriteback.table.core.windows.net/?sv=2022-11-02"
                       f"&ss=t&srt=sco&sp=rwdlacu&se=2027-01-01T00:00:00Z&spr=https&sig={signature}")
    code, out = _check_config()
    shown = [line for line in out.splitlines() if signature in line]
    assert not shown, f"check-config (exit {code}) printed the SAS signature: {shown}"
    # and the settings are not valid: a SAS token in a plain setting is a secret where secrets do not go
    assert code == 1 and any("FAIL" in line and "OUTCOMES_TABLE_ENDPOINT" in line for line in out.splitlines()), out


async def test_a_late_handed_retry_past_its_window_that_cannot_be_settled_is_not_logged_as_dead_lettered(
        review_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The same retry past its window, handed over with so little lock left that nothing can be settled (under the
    5 s settling margin): it is abandoned as it is, and Service Bus delivers it again, when it is given up. Its row
    must say what happened now (retry), not a dead-lettering that has not happened."""
    broker = DeadLetterBroker(batch=10, lock=timedelta(seconds=3))
    app = app_on(broker, review_env)
    row = late_retry(broker, "m-later")
    await broker.run(max_invocations=1)
    await app.aclose()
    assert not broker.dlq  # abandoned, not dead-lettered
    rows = await logged(monkeypatch, row)
    assert [(r["outcome"], r["reason"]) for r in rows] == [("retry", "deadline-reached")], rows
