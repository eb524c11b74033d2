"""A senior healthcare-integration engineer's review of the changes since 9ee521b (the inherited consent gate of a
child row of a clinical row and its `leaving` removal, the `gone` row fact, a late-handed retry past its window),
through the real pipeline and function adapter: the FHIR dev server, Azurite,
messages shaped as Dataverse sends them (tests/scenarios/dataverse.py). Each test is one defect and fails on the
code it was written against."""

from __future__ import annotations

from datetime import timedelta

import pytest

from tests.admin.test_admin_trial import DeadLetterBroker, app_on
from tests.admin.test_review_operations import late_retry, logged, review_env
from tests.scenarios.checks import ENCOUNTER_SYSTEM, the_resource
from tests.scenarios.conftest import World, until_settled
from tests.scenarios.dataverse import new_id
from tests.scenarios.participants import attend, scenario_maps, tries, ward
from tests.scenarios.test_items import states
from tests.scenarios.test_review_session import saved_then_deleted
from writeback.pipeline import Envelope, Pipeline, Result

__all__ = ["review_env", "scenario_maps"]  # (fixtures: tests/admin/test_review_operations.py, participants.py)


async def test_a_participant_unlinked_from_a_visit_of_a_patient_without_consent_leaves_that_visit(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A consenting patient's visit and its attending physician (an Encounter Participant row) are written. The
    patient then withdraws her consent, and the clerk, who had put the physician on the wrong visit, clears the
    participant row's visit lookup (`msemr_encounterparticipantdetailsid`): the row belongs to no visit now.

    Expected (docs/convergence.md section 5: a child row of a clinical row obeys its parent's patient as a child
    row does; `facts.resolve`: "A removal goes whatever the old parent's consent: what it takes away is the child
    row's"; a medical identifier unlinked from its patient leaves that patient, test_06b, whatever her consent;
    the release's own fix, 919ff5e: a participant moved to a visit of a patient without consent leaves the visit it
    was in): the participant leaves the Encounter, where Dataverse no longer has it.

    What happened: the unlink waits, then is skipped `consent-withheld`; the patient's Encounter keeps a physician
    who was not on that visit, for good. `facts.resolve` keeps only the removal where the row is *added* to the
    visit of the patient without consent (`isinstance(first.edit, ItemEdit)`); an unlink's only write is the
    removal, which the inherited gate of the visit it leaves (`facts.inherited_gates`) skips whole."""
    dv, at = world.dataverse, ward(world, monkeypatch)
    doctor, patient, visit = at.doctor, at.patient, at.visit
    assert states(await world.send(*at.sent)) == [("written", None)] * 3
    participant = new_id()
    attending = attend(world, visit, doctor, participant)
    assert states(await world.send(attending)) == [("written", None)]
    assert the_resource(world.fhir, "Encounter", ENCOUNTER_SYSTEM, visit).get("participant")
    withdrawn = dv.update("contact", patient, {"msemr_azurefhirsyncenabled": False})
    assert states(await world.send(withdrawn)) == [("skipped", "consent-withheld")]
    unlinked = dv.update("msemr_encounterparticipant", participant, {"msemr_encounterparticipantdetailsid": None})
    await world.send(unlinked)
    await until_settled(world, unlinked)
    encounter = the_resource(world.fhir, "Encounter", ENCOUNTER_SYSTEM, visit)
    assert "participant" not in encounter, (
        f"the participant unlinked from the visit is still on its Encounter: {encounter['participant']}; the "
        f"unlink's tries: {tries(world, unlinked)}")


async def test_a_late_handed_retry_past_its_window_whose_outcome_row_is_slow_is_not_logged_dead_lettered_and_abandoned(
        review_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A patient's Create has been retried for more than WRITEBACK_RETRY_WINDOW_HOURS (24 h); its 40th copy is
    handed over with 6 s of its lock left (the worker was busy): too little to work on it, enough to settle it
    (SETTLE_SECONDS, 5 s). Table Storage answers slowly (2 s) while its outcome row is kept (`record_unworked`
    allows it FHIR_TIMEOUT_SECONDS, 30 s).

    Expected (docs/operations.md, Timing: "the log and the settlement agree (a message whose outcome row says
    dead-lettered is in the dead-letter queue)"; the fix 2f1a867: "its row must not say dead-lettered meanwhile"):
    either the row says dead-lettered and the message is dead-lettered, or the row says retry and it is abandoned.

    What happened: the row says `dead-lettered` / `retries-exhausted`, while the message was abandoned (back on
    the queue, not in the dead-letter queue). `FunctionApp._process` gives it up on the lock left *before* the row
    is kept (`now`), and chooses the settlement on the lock left *after* it (`self._clock()`): a slow write of the
    row crosses the 5 s margin between the two."""
    broker = DeadLetterBroker(batch=10, lock=timedelta(seconds=6))
    app = app_on(broker, review_env)
    row = late_retry(broker, "m-slow")
    record = Pipeline.record_unworked

    async def slow(self: Pipeline, envelope: Envelope, result: Result, within: float | None = None) -> Result:
        broker.now += timedelta(seconds=2)  # Table Storage answering slowly (the invocation's time passes)
        return await record(self, envelope, result, within)

    monkeypatch.setattr(Pipeline, "record_unworked", slow)
    await broker.run(max_invocations=1)
    await app.aclose()
    rows = await logged(monkeypatch, row)
    assert rows
    said_dead_lettered = any(r["outcome"] == "dead-lettered" for r in rows)
    assert said_dead_lettered == bool(broker.dlq), (
        f"the outcome log says {[(r['outcome'], r['reason'], r['settlement']) for r in rows]}; the dead-letter "
        f"queue holds {[(end.reason, end.description) for _, _, end in broker.dlq]} (the message was "
        f"{'dead-lettered' if broker.dlq else 'abandoned: back on the queue'})")


async def test_a_patient_written_again_under_an_id_once_found_gone_is_named_by_that_id_again(world: World) -> None:
    """A patient came from FHIR (the sync ingested Patient/<ext>; the contact's FHIR id column holds <ext>) and was
    corrected in Dataverse (written there). The FHIR side deleted the record by mistake, and the clerk's next save
    was dead-lettered `target-missing` (the row facts keep <ext> as gone). The FHIR system then restored its record
    under the same id, and the clerk saved the contact again: written into Patient/<ext>.

    Expected (docs/convergence.md section 5, "References": an id found missing "is named by no lookup after that
    (the facts keep it as `Gone`), until the row is written under it again"; the fix 919ff5e: "now only a write
    learned afterwards clears it"): the row facts no longer keep <ext> as gone, and the contact's id for a Patient
    is <ext> again, as before the deletion.

    What happened: `gone` stays for good. The write is learned as a fact without a version (`RowFacts(written=...)`),
    but the pipeline merges it into the message's own facts first (`merged(batch.learned, into=batch.local)`), and
    keeps the result, which has the message's version, over the stored facts (`OutcomeStore._learn`:
    `known.merge(fact)`); `RowFacts.merge` clears `gone` only when the fact merged in has no version, which a kept
    write's facts never lack."""
    dv = world.dataverse
    contact, seeded = await saved_then_deleted(world)
    phoned = dv.update("contact", contact, {"telephone1": "+1 555 0199"})
    assert states(await world.send(phoned)) == [("dead-lettered", "target-missing")]
    key = ("contact", contact)
    assert (await world.x.ledger.facts({key}))[key].gone == f"Patient/{seeded['id']}"
    world.fhir.put(seeded)  # the FHIR system restores its record, under the same id
    again = dv.update("contact", contact, {"telephone1": "+1 555 0200"})
    assert states(await world.send(again)) == [("written", None)]
    assert the_resource(world.fhir, "Patient", "urn:dataverse:contact", contact)["id"] == seeded["id"]
    facts = (await world.x.ledger.facts({key}))[key]
    assert facts.gone is None and facts.id_for("Patient") == seeded["id"], (
        f"written into Patient/{seeded['id']} again, the row facts still keep it gone ({facts.gone}): lookups to "
        f"the patient name {facts.id_for('Patient')}")
