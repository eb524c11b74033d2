"""Write the shipped sample messages in `samples/` (run: `python -m devtools.samples`).

The samples are committed; this script says how they were made and remakes them identically.
Every person in them is fictional.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from devtools.messages import Choice, Lookup, context

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
SYNC_USER = "9e7d5c3b-1a2f-4e6d-8c0b-7a5f3e1d9c2b"  # the FHIR→Dataverse sync's application user
CLINICIAN = "3f0c6a2e-8d1b-4e5f-a6b7-c8d9e0f1a2b3"
PATIENT = "0c9a1e52-7b1d-4f6e-9a3c-5d2e8f4b6a10"
PRACTITIONER = "5b8e2d41-3c6a-4b9f-8e1d-2a7c9f0b3e21"
NO_CONSENT = "7d3f9b20-6e4a-4c8d-b1f5-9a2e0c7d4b32"
RELATED = "2e6c8a14-9d3b-4f7e-a5c1-8b0d6e2f9a43"
IDENTIFIER = "8f1b3d65-2a9c-4e7b-9d0f-6c4a1e8b2d54"
ENCOUNTER = "4a7e0c96-5f2b-4d8a-b3e9-1c6f8a0d5e65"
OBSERVATION = "6c2a9e87-4b1f-4a3d-8e7c-0f5b2d9a6c76"
CODE_HEART_RATE = "1d4f7a29-8c3e-4b6a-9f2d-5e0c8b1a7f87"
PATIENT_TYPE, PRACTITIONER_TYPE, RELATED_TYPE = Choice(935000000), Choice(935000001), Choice(935000002)
T0 = datetime(2026, 11, 2, 9, 30, tzinfo=UTC)


def _rid(name: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"writeback-sample:{name}"))


def _patient(**changes: object) -> dict[str, object]:
    row: dict[str, object] = {
        "contactid": PATIENT, "msemr_contacttype": PATIENT_TYPE, "msemr_azurefhirsyncenabled": True,
        "firstname": "Rosalind", "middlename": "Elsie", "lastname": "Quintero", "birthdate": date(1987, 7, 25),
        "gendercode": Choice(2), "telephone1": "+1 206 555 0142", "mobilephone": "+1 206 555 0199",
        "emailaddress1": "r.quintero@example.org", "address1_line1": "1200 Harbor Way",
        "address1_city": "Seattle", "address1_stateorprovince": "WA", "address1_postalcode": "98101",
        "address1_country": "US", "versionnumber": 1001, "modifiedon": T0,
    }
    row.update(changes)
    return row


def build() -> dict[str, dict[str, Any]]:
    patient = _patient()
    updated = _patient(telephone1="+1 206 555 0177", versionnumber=1002, modifiedon=T0.replace(hour=11))
    return {
        "01_patient_create.json": context("Create", "contact", PATIENT, patient, post=patient,
                                          user_id=CLINICIAN, request_id=_rid("01"), created=T0),
        "02_patient_update_phone.json": context(
            "Update", "contact", PATIENT,
            {"telephone1": "+1 206 555 0177", "versionnumber": 1002, "modifiedon": T0.replace(hour=11)},
            pre=patient, post=updated, user_id=CLINICIAN, request_id=_rid("02"), created=T0.replace(hour=11)),
        "03_practitioner_create.json": context("Create", "contact", PRACTITIONER, {
            "contactid": PRACTITIONER, "msemr_contacttype": PRACTITIONER_TYPE, "firstname": "Imani",
            "lastname": "Okafor", "gendercode": Choice(2), "telephone1": "+1 206 555 0110",
            "emailaddress1": "dr.okafor@example.org", "versionnumber": 2001}, user_id=CLINICIAN,
            request_id=_rid("03"), created=T0),
        "04_medicalidentifier_create.json": context("Create", "msemr_medicalidentifier", IDENTIFIER, {
            "msemr_medicalidentifierid": IDENTIFIER, "msemr_assignee": Lookup("contact", PATIENT),
            "msemr_identifiersystem": "http://hospital.example.org/mrn", "msemr_value": "MRN-0042731",
            "msemr_use": Choice(935000001), "msemr_type": Choice(935000003), "versionnumber": 3001},
            user_id=CLINICIAN, request_id=_rid("04"), created=T0),
        "05_encounter_create.json": context("Create", "msemr_encounter", ENCOUNTER, {
            "msemr_encounterid": ENCOUNTER, "msemr_name": "Outpatient visit",
            "msemr_encounterstatus": Choice(935000005), "msemr_encounterclass": Choice(935000001),
            "msemr_subjectpatient": Lookup("contact", PATIENT),
            "msemr_encounterstartdate": T0, "msemr_encounterenddate": T0.replace(hour=10),
            "msemr_encounteridentifier": "ENC-2026-118", "versionnumber": 4001}, user_id=CLINICIAN,
            request_id=_rid("05"), created=T0),
        "06_observation_create.json": context("Create", "msemr_observation", OBSERVATION, {
            "msemr_observationid": OBSERVATION, "msemr_description": "Heart rate",
            "msemr_status": Choice(935000002), "msemr_code": Lookup("msemr_codeableconcept", CODE_HEART_RATE),
            "msemr_subjecttypepatient": Lookup("contact", PATIENT),
            "msemr_conexttypeencounter": Lookup("msemr_encounter", ENCOUNTER),
            "msemr_effectivetypedatetime": T0, "msemr_issueddate": T0.replace(minute=45),
            "msemr_valuetypequantityvalue": Decimal("72"), "msemr_valuequantityunit": "beats/minute",
            "msemr_valuequantitysystem": "http://unitsofmeasure.org", "versionnumber": 5001},
            user_id=CLINICIAN, request_id=_rid("06"), created=T0),
        "07_patient_update_echo.json": context(
            "Update", "contact", PATIENT, {"lastname": "Quintero-Hale"}, user_id=SYNC_USER,
            request_id=_rid("07"), created=T0.replace(hour=12)),
        "08_patient_consent_withheld.json": context("Create", "contact", NO_CONSENT, {
            "contactid": NO_CONSENT, "msemr_contacttype": PATIENT_TYPE, "msemr_azurefhirsyncenabled": False,
            "firstname": "Tobias", "lastname": "Lindqvist", "birthdate": date(1952, 1, 9), "gendercode": Choice(1)},
            user_id=CLINICIAN, request_id=_rid("08"), created=T0),
        "10_relatedperson_create.json": context("Create", "contact", RELATED, {
            "contactid": RELATED, "msemr_contacttype": RELATED_TYPE, "firstname": "Marta",
            "lastname": "Quintero"}, user_id=CLINICIAN, request_id=_rid("10"), created=T0),
    }


BROKEN = '{"MessageName": "Update", "PrimaryEntityName": "contact", "PrimaryEntityId": "0c9a1e52-7b1d-4f6e'


def stable(bodies: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The ids `context` draws anew on every call (CorrelationId, OperationId), fixed per sample: the script
    remakes the committed files identically."""
    for name, body in bodies.items():
        body["CorrelationId"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"urn:samples:{name}:correlation"))
        body["OperationId"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"urn:samples:{name}:operation"))
    return bodies


def main() -> None:
    SAMPLES.mkdir(exist_ok=True)
    for name, body in stable(build()).items():
        (SAMPLES / name).write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
    (SAMPLES / "09_broken_body.json").write_text(BROKEN + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
