"""Review: fidelity to what Dataverse really sends (RemoteExecutionContext bodies and their Service Bus properties).

Each test fails on the code it was written against, for the defect its docstring names. Bodies are built with
`devtools.messages.context`, the encoder the shipped samples and the public Dataverse bodies are checked against.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import date
from typing import Any

from devtools.messages import Choice, context
from devtools.samples import CLINICIAN, PATIENT, PATIENT_TYPE, SYNC_USER, T0
from writeback.decide import Decision, plan_message
from writeback.maps import load_maps
from writeback.messages import CLAIMS
from writeback.reasons import Reason
from writeback.settings import DEFAULT_MAPS_DIR, Settings

MAPS = load_maps(DEFAULT_MAPS_DIR)
ECHO_SETTINGS = Settings(ignore_user_ids=frozenset({SYNC_USER}))
# An administrator account a step may be registered to run as ("Run in User's Context"), not the sync's user.
ADMIN = "6b0e3c9d-2f4a-4d7e-8b1c-5a9f0e2d7c14"


def _patient(**changes: object) -> dict[str, object]:
    row: dict[str, object] = {
        "contactid": PATIENT, "msemr_contacttype": PATIENT_TYPE, "msemr_azurefhirsyncenabled": True,
        "firstname": "Rosalind", "lastname": "Quintero", "birthdate": date(1987, 7, 25), "gendercode": Choice(2),
        "telephone1": "+1 206 555 0142", "versionnumber": 1001, "modifiedon": T0,
    }
    row.update(changes)
    return row


def _plan(body: Mapping[str, Any], properties: Mapping[str, Any] | None, settings: Settings) -> Decision:
    return plan_message(json.dumps(body), properties, MAPS, settings)


def _save_as(initiating_user: str, step_user: str) -> tuple[dict[str, Any], dict[str, str]]:
    """A phone change of a patient saved by `initiating_user`, posted by a step that runs as `step_user`: the body
    and the Service Bus application properties Dataverse sets beside it (User is the body's UserId, InitiatingUser
    its InitiatingUserId)."""
    body = context("Update", "contact", PATIENT, {"telephone1": "+1 206 555 0177"}, pre=_patient(),
                   post=_patient(telephone1="+1 206 555 0177", versionnumber=1002), user_id=initiating_user)
    body["UserId"] = step_user
    return body, {CLAIMS + "InitiatingUser": initiating_user, CLAIMS + "User": step_user}


def test_a_clinicians_save_is_no_echo_when_the_step_runs_in_the_syncs_user_context() -> None:
    """What Dataverse sends: `InitiatingUserId` is the user whose request started the pipeline (the one who saved
    the row); `UserId` is the user the step runs as, which is the calling user by default but the account chosen
    under the step's "Run in User's Context" when one is set (Microsoft Learn, "Impersonate a user": "By default
    this is set to use the Calling User, which is the user account which initiated the action"; the
    IExecutionContext.UserId "will apply the user account defined by the plug-in step registration", while
    InitiatingUserId is "the user account that initiated the action"). The Service Bus properties
    `.../Claims/User` and `.../Claims/InitiatingUser` carry the same two ids. Public sample 04 shows the two fields
    side by side. The product itself names InitiatingUserId as the change's author in its Provenance.

    What the product should do: an `echo` is a change *made by* the sync's user (README, reason `echo`), so only
    InitiatingUserId (or the InitiatingUser property) can tell it. A clinician's save posted by a step registered
    to run as the sync's application user (an administrator may pick the integration's account there) must be
    written.

    What it did: `decide.is_echo` also matches `UserId` and the `User` property, so with such a registration every
    save, by any clinician, is skipped `echo` (completed, nothing kept, nothing alerted): a silent drop of all
    writeback, reported as "made by the sync's own user". (A save by the sync itself, posted by a step that runs
    as another account, is still recognised as an echo: checked first.)"""
    sync_save, sync_props = _save_as(SYNC_USER, ADMIN)
    assert _plan(sync_save, sync_props, ECHO_SETTINGS).reason is Reason.ECHO  # the sync's own save: an echo

    clinician_save, clinician_props = _save_as(CLINICIAN, SYNC_USER)
    decision = _plan(clinician_save, clinician_props, ECHO_SETTINGS)
    assert (decision.decision, decision.reason) == ("write", None), (decision.reason, decision.detail)
