"""Found by an eleventh review, of this release's own input checks (message parsing, value sets): Dataverse's bodies
the checks must accept (Associate, custom APIs, a Create's Target without its id) and FHIR codes they must allow."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from writeback.decide import decide
from writeback.maps import load_maps
from writeback.messages import parse_message
from writeback.settings import DEFAULT_MAPS_DIR, Settings
from writeback.validation import validate

PUBLIC = Path(__file__).resolve().parents[3] / "shared" / "samples" / "dataverse-public"
NIL = "00000000-0000-0000-0000-000000000000"
CONTACT = "1d4f7a29-8c3e-4b6a-9f2d-5e0c8b1a7f87"
USER = "3f0c6a2e-8d1b-4e5f-a6b7-c8d9e0f1a2b3"
ACCOUNT = "b76b3f4b-1be7-e611-8101-e0071b6af231"
CONTRACTS = "http://schemas.microsoft.com/xrm/2011/Contracts"


def _ref(table: str, row_id: str) -> dict[str, Any]:
    return {"__type": f"EntityReference:{CONTRACTS}", "Id": row_id, "KeyAttributes": [], "LogicalName": table,
            "Name": None, "RowVersion": None}


def _associate(name: str) -> bytes:
    """What Dataverse posts for an Associate/Disassociate step: such steps are registered with primary entity
    'none' (the only choice the Plug-in Registration Tool gives), and the context names no row of its own
    (PrimaryEntityName 'none', PrimaryEntityId the nil GUID); the rows are the Target and RelatedEntities."""
    body = {"MessageName": name, "PrimaryEntityName": "none", "PrimaryEntityId": NIL, "SecondaryEntityName": "none",
            "Depth": 1, "Stage": 40, "Mode": 1, "InitiatingUserId": USER, "UserId": USER, "OrganizationId": USER,
            "CorrelationId": USER, "RequestId": USER, "BusinessUnitId": USER,
            "InputParameters": [
                {"key": "Target", "value": _ref("contact", CONTACT)},
                {"key": "Relationship", "value": {"__type": f"Relationship:{CONTRACTS}", "PrimaryEntityRole": None,
                                                  "SchemaName": "msemr_contact_account"}},
                {"key": "RelatedEntities", "value": {"__type": f"EntityReferenceCollection:{CONTRACTS}",
                                                     "__value": [_ref("account", ACCOUNT)]}}],
            "PreEntityImages": [], "PostEntityImages": [], "OutputParameters": [], "SharedVariables": []}
    return json.dumps(body).encode()


@pytest.mark.parametrize("name", ["Associate", "Disassociate"])
def test_r2_an_associate_message_is_skipped_not_malformed(name):
    """A service endpoint step on Associate (N:N relationships: 'none' as primary entity) posts a context whose
    Target is the associated row, not a row of 'none'. It was parsed and skipped (no-entity-map); it must not be
    dead-lettered as malformed-message ("Check the sender": the sender is Dataverse)."""
    message = parse_message(_associate(name), None, "application/json")
    decision = decide(message, load_maps(DEFAULT_MAPS_DIR), Settings())
    assert decision.decision == "skip", decision


def test_r2_all_public_bodies_parse_with_images_and_targets():
    for path in sorted(PUBLIC.glob("*.json")):
        message = parse_message(path.read_bytes(), None, "application/json")
        assert message.target is not None and message.target.id == message.record_id, path.name


def test_r2_expression_language_is_an_extensible_binding():
    """Expression.language is bound *extensibly* in R4 (ExpressionLanguage: "text/cql | text/fhirpath |
    application/x-fhir-query | etc."): any MIME type is allowed. An extension holding an Expression in another
    language (a map writing `extension[url=...].valueExpression.language`) is valid FHIR."""
    validate({"resourceType": "Patient", "extension": [
        {"url": "http://example.org/fhir/StructureDefinition/eligibility-rule",
         "valueExpression": {"language": "text/x-python", "expression": "age >= 18"}}]}, partial=False)


@pytest.mark.parametrize("status", ["corrected", "entered-in-error", "cancelled", "unknown", "amended"])
def test_r2_observation_statuses_past_the_truncated_list(status):
    validate({"resourceType": "Observation", "status": status, "code": {"text": "x"}}, partial=False)


def test_r2_encounter_with_status_history():
    validate({"resourceType": "Encounter", "status": "finished", "class": {"code": "AMB"},
              "statusHistory": [{"status": "arrived", "period": {"start": "2026-01-01T08:00:00Z"}},
                                {"status": "entered-in-error", "period": {"start": "2026-01-01T09:00:00Z"}}]},
             partial=False)


def test_r2_custom_api_message_name_and_activity_update_parse():
    body = json.loads((PUBLIC / "03_customactivity_update_pre_post_images_activityparty.json").read_bytes())
    body["MessageName"] = "new_RecalculateRisk"
    message = parse_message(json.dumps(body).encode(), None, "application/json")
    assert message.message_name == "new_RecalculateRisk"


def test_r2_create_with_nil_target_id_parses():
    body = json.loads((PUBLIC / "04_allfields_create.json").read_bytes())
    for pair in body["InputParameters"]:
        if pair["key"] == "Target":
            pair["value"]["Id"] = NIL
    parse_message(json.dumps(body).encode(), None, "application/json")
