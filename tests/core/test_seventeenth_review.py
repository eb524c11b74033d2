"""Found by a seventeenth review, of this release's changes: `check-config --dataverse-metadata` (9a143e1). Each
asserts the contract (README, docs/operations.md) and fails today."""

from __future__ import annotations

from pathlib import Path

from tests.core.test_dataverse_metadata import CONSENT, METADATA
from tests.core.test_maps import maps_dir
from writeback.dataverse_metadata import problems, read_metadata
from writeback.maps import load_maps

# Visits booked as appointments (an activity table: Dataverse's `appointment`) written as Encounters.
APPOINTMENT_MAP = """table: appointment
writeback: true
messages: [Create, Update]
resource: Encounter
identity:
  fhir_id_column: new_azurefhirid
  identifier_system: urn:dataverse:appointment
attributes:
  - {target: status, action: default, value: planned}
  - column: new_encounterclass
    target: class.code
    action: value_map
    values: {100000000: AMB, 100000001: EMER}
  - {target: class.system, action: default, value: "http://terminology.hl7.org/CodeSystem/v3-ActCode"}
  - {column: scheduledstart, target: period.start, type: dateTime}
  - {column: scheduledend, target: period.end, type: dateTime}
"""

# As Dataverse's $metadata declares an activity table: an EntityType deriving from `activitypointer`, which holds the
# columns every activity has (OData CSDL: a derived type declares none of its base type's properties again).
_POINTER = """    <EntityType Name="activitypointer" BaseType="mscrm.crmbaseentity">
      <Key>
        <PropertyRef Name="activityid"/>
      </Key>
      <Property Name="activityid" Type="Edm.Guid"/>
    </EntityType>"""
_ACTIVITIES = """    <EntityType Name="activitypointer" BaseType="mscrm.crmbaseentity">
      <Key>
        <PropertyRef Name="activityid"/>
      </Key>
      <Property Name="activityid" Type="Edm.Guid"/>
      <Property Name="subject" Type="Edm.String"/>
      <Property Name="scheduledstart" Type="Edm.DateTimeOffset"/>
      <Property Name="scheduledend" Type="Edm.DateTimeOffset"/>
      <Property Name="modifiedon" Type="Edm.DateTimeOffset"/>
      <Property Name="versionnumber" Type="Edm.Int64"/>
    </EntityType>
    <EntityType Name="appointment" BaseType="mscrm.activitypointer">
      <Property Name="location" Type="Edm.String"/>
      <Property Name="new_encounterclass" Type="Edm.Int32"/>
      <Property Name="new_azurefhirid" Type="Edm.String"/>
    </EntityType>"""


def test_z2_a_map_of_an_activity_table_passes_against_its_environments_metadata(tmp_path: Path) -> None:
    """An activity table's columns (its subject, scheduled start and end, `modifiedon`, `versionnumber`) are
    declared once, on `activitypointer`, the type it derives from (`BaseType`); the appointment's own type holds
    only its own. `check-config --dataverse-metadata` must pass a map that names only columns the table has.
    Today `dataverse_metadata.read_metadata` takes each EntityType's own properties only, never its base type's:
    every map of an activity table FAILs ("appointment does not have 'versionnumber' ... 'modifiedon' ...
    'scheduledstart': it would read as empty in every message"), which the administrator cannot fix."""
    text = METADATA.read_text(encoding="utf-8")
    assert text.count(_POINTER) == 1
    document = tmp_path / "metadata.xml"
    document.write_text(text.replace(_POINTER, _ACTIVITIES), encoding="utf-8")
    maps = load_maps(maps_dir(tmp_path, {"appointment.yaml": APPOINTMENT_MAP, "msemr_encounter.yaml": None,
                                         "msemr_observation.yaml": None}))
    assert problems(maps, read_metadata(document), CONSENT) == []
