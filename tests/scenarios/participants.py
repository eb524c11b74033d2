"""An integration engineer's Encounter Participant map (the Healthcare Accelerator's msemr_encounterparticipant: a
child table of msemr_encounter, written as Encounter.participant items, as msemr_medicalidentifier rows are
Patient.identifier items), and the ward the reviews of it start from: a practitioner, a patient, her visit."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from devtools.messages import Lookup
from tests.scenarios import dataverse
from tests.scenarios.conftest import World
from tests.scenarios.dataverse import PRACTITIONER, Sent, new_id
from writeback.maps import MapSet, load_maps
from writeback.settings import DEFAULT_MAPS_DIR

PARTICIPANT_MAP = """\
table: msemr_encounterparticipant
writeback: true
messages: [Create, Update]
resource: Encounter
expansion:
  parent_table: msemr_encounter
  parent_link: msemr_encounterparticipantdetailsid
  element: participant
attributes:
  - {column: msemr_individualtypepractitioner, target: individual, action: lookup, resource: Practitioner}
  - {column: msemr_periodstart, target: period.start, type: date}
  - {column: msemr_periodend, target: period.end, type: date}
"""


@pytest.fixture
def scenario_maps(tmp_path: Path) -> MapSet:
    """The shipped maps and the participant map (imported by the modules that use it, as the `world`'s maps)."""
    folder = tmp_path / "maps"
    shutil.copytree(DEFAULT_MAPS_DIR, folder)
    (folder / "msemr_encounterparticipant.yaml").write_text(PARTICIPANT_MAP, encoding="utf-8")
    return load_maps(folder)


@dataclass
class Ward:
    doctor: str
    patient: str
    visit: str
    sent: list[Sent]  # the practitioner's, the patient's and the visit's Creates, not sent yet


def ward(world: World, monkeypatch: pytest.MonkeyPatch) -> Ward:
    monkeypatch.setitem(dataverse._KEYS, "msemr_encounterparticipant", "msemr_encounterparticipantid")
    dv = world.dataverse
    doctor = new_id()
    hired = dv.create("contact", doctor, {"msemr_contacttype": PRACTITIONER, "firstname": "Adaeze",
                                          "lastname": "Okafor"})
    patient, registered = dv.patient()
    visit, admitted = dv.encounter(patient)
    return Ward(doctor, patient, visit, [hired, registered, admitted])


def attend(world: World, visit: str, doctor: str, row: str | None = None, **columns: Any) -> Sent:
    """The Create of a participant row putting `doctor` on `visit`."""
    return world.dataverse.create("msemr_encounterparticipant", row or new_id(), {
        "msemr_encounterparticipantdetailsid": Lookup("msemr_encounter", visit),
        "msemr_individualtypepractitioner": Lookup("contact", doctor), **columns})


def tries(world: World, sent: Sent) -> list[tuple[str, str | None]]:
    """How each try of `sent` ended."""
    return [(r.state, r.reason.value if r.reason else None) for s, r in world.results if s is sent]


def status_of(world: World, reference: str) -> int:
    """The HTTP status of a read of `reference` (`Type/<id>`) on the FHIR server."""
    return httpx.get(f"{world.fhir.server.base_url}/{reference}", headers=world.fhir.headers).status_code
