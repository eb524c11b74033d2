"""The Provenance of one write. Pure.

`target` names the exact version written; `entity` (role source) names the Dataverse row and its version;
the agents are this integration (assembler) and the Dataverse user who made the change (author). The id is
derived from the version written alone, so each version has exactly one Provenance: a retried Provenance
replaces itself, and two instances that wrote nothing new (their write found its version already there) have no
Provenance of their own to write over the one of the instance that did.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from writeback.decide import Source, WritePlan

DATA_OPERATION = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
PARTICIPANT_TYPE = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
DATAVERSE_USER_SYSTEM = "urn:dataverse:systemuser"
_NAMESPACE = uuid.UUID("6f1c1f0e-2b9a-4f41-9a57-3c1d0b7e5a21")


def provenance_id(versioned_target: str) -> str:
    """The one Provenance of a version (`Patient/<id>/_history/<vid>`)."""
    return str(uuid.uuid5(_NAMESPACE, versioned_target))


def agent_reference(agent: str, meta_source: str) -> dict[str, Any]:
    if agent:
        return {"reference": agent}
    return {"type": "Device", "identifier": {"system": meta_source, "value": "dataverse-fhir-writeback"},
            "display": "Dataverse FHIR writeback"}


def row_version_text(source: Source) -> str:
    if source.row_version is not None:
        return f"versionnumber {source.row_version}"
    if source.modified_on is not None:
        return f"modifiedon {source.modified_on.isoformat()}"
    return "version unknown"


# The code system's own displays (http://terminology.hl7.org/CodeSystem/v3-DataOperation): UPDATE's is "revise"
# (found by review: "update" is reported by the HL7 validator as a wrong display).
_DISPLAY = {"CREATE": "create", "UPDATE": "revise"}


def build_provenance(
    plan: WritePlan | Source,
    versioned_target: str,
    *,
    created: bool,
    agent: str,
    meta_source: str,
    recorded: datetime | None = None,
) -> dict[str, Any]:
    source = plan.source if isinstance(plan, WritePlan) else plan
    operation = "CREATE" if created else "UPDATE"
    agents: list[dict[str, Any]] = [{
        "type": {"coding": [{"system": PARTICIPANT_TYPE, "code": "assembler", "display": "Assembler"}]},
        "who": agent_reference(agent, meta_source),
    }]
    if source.initiating_user_id:
        agents.append({
            "type": {"coding": [{"system": PARTICIPANT_TYPE, "code": "author", "display": "Author"}]},
            "who": {"identifier": {"system": DATAVERSE_USER_SYSTEM, "value": source.initiating_user_id}},
        })
    when = (recorded or datetime.now(UTC)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return {
        "resourceType": "Provenance",
        "id": provenance_id(versioned_target),
        "meta": {"source": meta_source},
        "target": [{"reference": versioned_target}],
        "recorded": when,
        "activity": {"coding": [{"system": DATA_OPERATION, "code": operation, "display": _DISPLAY[operation]}]},
        "agent": agents,
        "entity": [{
            "role": "source",
            "what": {
                "identifier": {"system": source.row_system, "value": source.record_id},
                "display": f"Dataverse {source.table} {source.record_id} {row_version_text(source)} "
                           f"({source.message_name})",
            },
        }],
    }
