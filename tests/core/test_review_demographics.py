"""Review of medical identifiers as a registration clerk's edits in Dataverse produce them: pure reproducers
(the shipped maps, no I/O). Each test fails on the code it was written against, for the reason its docstring
gives."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from devtools.messages import Lookup, context
from writeback.decide import Decision, plan_message
from writeback.maps import load_maps
from writeback.settings import DEFAULT_MAPS_DIR, Settings

MAPS = load_maps(DEFAULT_MAPS_DIR)
SETTINGS = Settings()
METADATA = Path(__file__).resolve().parents[1] / "data" / "dataverse-metadata.xml"
CONTACT = "0c9a1e52-7b1d-4f6e-9a3c-5d2e8f4b6a10"
IDENTIFIER = "6d1f0c3a-2b4e-4c5d-8e9f-0a1b2c3d4e5f"


def _identifier_item(**columns: object) -> dict[str, Any]:
    row: dict[str, object] = {"msemr_medicalidentifierid": IDENTIFIER, "msemr_assignee": Lookup("contact", CONTACT),
                              "msemr_identifiersystem": "http://hospital.example.org/mrn", "msemr_value": "MRN-1001",
                              "versionnumber": 7, **columns}
    body = context("Create", "msemr_medicalidentifier", IDENTIFIER, row, post=row)
    decision: Decision = plan_message(json.dumps(body), None, MAPS, SETTINGS, None)
    assert decision.decision == "write", (decision.reason, decision.detail)
    assert decision.plan is not None
    [item] = decision.plan.resource["identifier"]
    return dict(item)


def test_d3_an_identifier_expiry_entered_east_of_greenwich_is_not_a_day_early() -> None:
    """A clerk in Amsterdam (CEST, UTC+2) enters a passport identifier's Period End: 31 May 2027.

    msemr_periodstart and msemr_periodend are date-only columns of *User Local* behavior in the Healthcare
    Accelerator's published solution (Entities/msemr_medicalidentifier/Entity.xml: `<Format>date</Format>`,
    `<Behavior>1</Behavior>`, as createdon has; the project's own trimmed $metadata, tests/data/
    dataverse-metadata.xml, declares them Edm.DateTimeOffset, not the Edm.Date of a Date Only column such as
    birthdate). Dataverse stores such a date as the user's local midnight in UTC ("Avoid Date Only format and
    User Local behavior ... when a user sets a date in a model-driven app, the time portion is set to midnight in
    their time zone": learn.microsoft.com, behavior-format-date-time-field): the message carries
    2027-05-30T22:00:00Z. The README says a `date` copy is "the UTC date of the column's value ... a day early east
    of Greenwich" for such columns, and asks to check each column's behavior; the shipped map itself maps both
    columns with `type: date`.

    FHIR R4 Identifier.period is a Period (https://hl7.org/fhir/R4/datatypes.html#Period) whose start and end are
    `dateTime`, which takes the instant with its offset: the column's value can be written exactly.

    Should: FHIR's period end denotes what the clerk entered: 31 May 2027 local (the instant
    2027-05-30T22:00:00Z, or the date 2027-05-31). Did: `period.end` is "2027-05-30", a day early: the passport
    reads as expired on 30 May, and a start entered the same way begins a day early, for every clerk east of UTC."""
    assert 'Name="msemr_periodend" Type="Edm.DateTimeOffset"' in METADATA.read_text(encoding="utf-8")
    entered = datetime(2027, 5, 30, 22, 0, tzinfo=UTC)  # 2027-05-31 00:00 in Amsterdam (CEST)
    item = _identifier_item(msemr_periodend=entered)
    end = item["period"]["end"]
    assert end in ("2027-05-31", "2027-05-30T22:00:00Z", "2027-05-30T22:00:00+00:00",
                   "2027-05-31T00:00:00+02:00"), item
