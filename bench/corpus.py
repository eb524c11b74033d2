"""A deterministic corpus of realistic Dataverse messages (seeded): every mapped table, creates and updates.

Per "patient unit": the contact's Create, then (some of) its phone Update, its medical-identifier Create (an
update of the Patient), an Encounter and an Observation; Practitioner Creates in between. Dependent messages
always follow the row they need, as Dataverse would send them. `salt` makes every identifier distinct, so runs
against one server never collide.

The images are those of steps registered as docs/deploy.md asks: every Create carries its post image (the whole
new row), every Update its pre image and its post image (the whole row before and after), so every write is a
whole-row write (the convergent path), never the Target-only fallback.
"""

from __future__ import annotations

import json
import random
import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

from devtools.messages import Choice, Lookup, context
from writeback.pipeline import Envelope

PATIENT, PRACTITIONER = Choice(935000000), Choice(935000001)
CLINICIAN = "3f0c6a2e-8d1b-4e5f-a6b7-c8d9e0f1a2b3"
CODE_HEART_RATE = "1d4f7a29-8c3e-4b6a-9f2d-5e0c8b1a7f87"
T0 = datetime(2026, 11, 2, 9, 30, tzinfo=UTC)
GIVEN = ["Rosalind", "Imani", "Tobias", "Marta", "Wren", "Anselm", "Priya", "Kofi", "Ines", "Yusuf", "Dagny", "Oren"]
FAMILY = ["Quintero", "Okafor", "Lindqvist", "Castellanos", "Nakamura", "Adeyemi", "Moreau", "Kowalski", "Haddad"]
CITIES = [("Seattle", "WA", "98101"), ("Portland", "OR", "97201"), ("Boise", "ID", "83702"), ("Tacoma", "WA", "98402")]


def generate(count: int, seed: int = 7, salt: str = "") -> list[Envelope]:
    """`count` message envelopes (JSON bytes, as the broker hands them over), the same for the same arguments."""
    rng = random.Random(f"{seed}:{salt}")

    def rid() -> str:
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    out: list[Envelope] = []

    def emit(body: dict[str, object]) -> None:
        out.append(Envelope(json.dumps(body).encode(), message_id=str(body["RequestId"])))

    def create(table: str, row_id: str, row: dict[str, object], when: datetime) -> None:
        """A Create as the step sends it: the new row as Target and as post image."""
        emit(context("Create", table, row_id, row, post=row, user_id=CLINICIAN, request_id=rid(), created=when))

    while len(out) < count:
        when = T0 + timedelta(minutes=len(out))
        contact = rid()
        city, state, postal = rng.choice(CITIES)
        row: dict[str, object] = {
            "contactid": contact, "msemr_contacttype": PATIENT, "msemr_azurefhirsyncenabled": True,
            "firstname": rng.choice(GIVEN), "middlename": rng.choice(GIVEN), "lastname": rng.choice(FAMILY),
            "birthdate": date(1940 + rng.randrange(70), 1 + rng.randrange(12), 1 + rng.randrange(28)),
            "gendercode": Choice(1 + rng.randrange(2)), "telephone1": f"+1 206 555 {rng.randrange(10000):04d}",
            "mobilephone": f"+1 206 555 {rng.randrange(10000):04d}",
            "emailaddress1": f"p{rng.randrange(10**6)}@example.org",
            "address1_line1": f"{rng.randrange(1, 9999)} Harbor Way", "address1_city": city,
            "address1_stateorprovince": state, "address1_postalcode": postal, "address1_country": "US",
            "versionnumber": 1000, "modifiedon": when,
        }
        create("contact", contact, row, when)
        if rng.random() < 0.5:
            # An Update's Target holds the changed columns; its pre and post images hold the whole row.
            changed = {"telephone1": f"+1 206 555 {rng.randrange(10000):04d}", "versionnumber": 1001,
                       "modifiedon": when + timedelta(seconds=30)}
            emit(context("Update", "contact", contact, changed, pre=row, post={**row, **changed}, user_id=CLINICIAN,
                         request_id=rid(), created=when))
        if rng.random() < 0.4:
            ident = rid()
            create("msemr_medicalidentifier", ident, {
                "msemr_medicalidentifierid": ident, "msemr_assignee": Lookup("contact", contact),
                "msemr_identifiersystem": "http://hospital.example.org/mrn",
                "msemr_value": f"MRN-{rng.randrange(10**7):07d}", "msemr_use": Choice(935000001),
                "msemr_type": Choice(935000003), "versionnumber": 3001}, when)
        if rng.random() < 0.4:
            practitioner = rid()
            create("contact", practitioner, {
                "contactid": practitioner, "msemr_contacttype": PRACTITIONER, "firstname": rng.choice(GIVEN),
                "lastname": rng.choice(FAMILY), "gendercode": Choice(1 + rng.randrange(2)),
                "telephone1": f"+1 206 555 {rng.randrange(10000):04d}", "emailaddress1": "dr@example.org",
                "versionnumber": 2001}, when)
        encounter = rid()
        create("msemr_encounter", encounter, {
            "msemr_encounterid": encounter, "msemr_name": "Outpatient visit",
            "msemr_encounterstatus": Choice(935000005), "msemr_encounterclass": Choice(935000001),
            "msemr_subjectpatient": Lookup("contact", contact), "msemr_encounterstartdate": when,
            "msemr_encounterenddate": when + timedelta(minutes=30),
            "msemr_encounteridentifier": f"ENC-{rng.randrange(10**6)}", "versionnumber": 4001}, when)
        for _ in range(rng.randrange(1, 3)):
            observation = rid()
            create("msemr_observation", observation, {
                "msemr_observationid": observation, "msemr_description": "Heart rate",
                "msemr_status": Choice(935000002), "msemr_code": Lookup("msemr_codeableconcept", CODE_HEART_RATE),
                "msemr_subjecttypepatient": Lookup("contact", contact),
                "msemr_conexttypeencounter": Lookup("msemr_encounter", encounter),
                "msemr_effectivetypedatetime": when, "msemr_issueddate": when + timedelta(minutes=5),
                "msemr_valuetypequantityvalue": Decimal(str(50 + rng.randrange(60))),
                "msemr_valuequantityunit": "beats/minute", "msemr_valuequantitysystem": "http://unitsofmeasure.org",
                "versionnumber": 5001}, when)
    return out[:count]
