"""The sixteenth review, of the administrator's-trial fixes (4a044ef), at the function level against the real services
(FHIR dev server, Azurite) and the project's Service Bus simulator (tests/reliability/broker.py). Each test asserts
what docs/operations.md promises and fails today for the reason its docstring names."""

from __future__ import annotations

from datetime import timedelta

from tests.admin.test_admin_trial import DeadLetterBroker, admin_env, app_on, create, patient
from writeback.outcomes import OutcomeRow, OutcomeStore
from writeback.settings import Settings

__all__ = ["admin_env"]  # the fixture, shared with the administrator's trial


async def _outcome_rows(env: dict[str, str]) -> list[OutcomeRow]:
    async with OutcomeStore.from_settings(Settings.from_env(env, need_outcomes=True)) as store:
        return await store.query(since=timedelta(days=7), limit=1000)


async def test_y1_a_wrong_fhir_setting_leaves_the_outcome_log_empty_for_a_day_of_retries_and_their_dead_letter(
        admin_env: dict[str, str]) -> None:
    """FHIR_URL set without its scheme (`fhir.contoso.example/r4`) on an app that has been running (its outcome
    tables exist; OUTCOMES_* are sound). docs/operations.md (section 1), as 4a044ef rewrote it: "A fault in other
    settings or in an entity map is also a `config-error` row per message and try, with the message's table and row,
    and so is the `retries-exhausted` dead-letter that ends its retries"; only a fault in the OUTCOMES_* settings
    is outside the outcome log. The message retries for the window and is dead-lettered, and the outcome log holds
    no row at all: `FunctionApp._fault_ledger` builds its ledger from `Settings.from_env`, which validates every
    setting, so any setting fault (not only OUTCOMES_*) leaves it without a ledger. Only a map fault gets rows."""
    async with OutcomeStore.from_settings(Settings.from_env(admin_env, need_outcomes=True)) as store:
        await store.ensure_tables()  # the app has been running before the setting was changed
    env = {**admin_env, "FHIR_URL": "fhir.contoso.example/r4", "WRITEBACK_RETRY_WINDOW_HOURS": "2"}
    broker = DeadLetterBroker(batch=10)
    app = app_on(broker, env)
    row, columns = patient()
    broker.send(create("contact", row, columns), row=row)
    await broker.run()
    await app.aclose()
    [(_, _message, end)] = broker.dlq
    assert end.reason == "retries-exhausted" and "FHIR_URL" in end.description
    assert broker.copies_scheduled > 1  # retried for the window, as the docs say
    rows = await _outcome_rows(admin_env)
    tries = [r for r in rows if r.outcome == "config-error" and r.record_id == row]
    ended = [r for r in rows if r.outcome == "dead-lettered" and r.reason == "retries-exhausted" and r.record_id == row]
    assert tries and ended, (f"{broker.copies_scheduled + 1} tries and a dead-letter; outcome rows of the row: "
                             f"{[(r.outcome, r.reason) for r in rows if r.record_id == row]}")
