"""What a contact row's columns say FHIR holds, written from the data model (the Healthcare Accelerator's contact
columns and FHIR R4's Patient), not from the product's maps: the scenario and reliability suites both compare
the server against it."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, datetime
from typing import Any

GENDER = {1: "male", 2: "female", 935000000: "other", 935000001: "unknown"}


def text(value: Any) -> str | None:
    """A column's text as FHIR holds it: trimmed; empty or whitespace-only is no value."""
    return value.strip() if isinstance(value, str) and value.strip() else None


def expected_contact(row: Mapping[str, Any]) -> dict[str, Any]:
    """The elements of a contact's Patient/Practitioner that its columns own, from its Dataverse state: a column
    absent from the row, or empty, is an element absent from the resource (a whole-row write clears it)."""
    given = [g for g in (text(row.get("firstname")), text(row.get("middlename"))) if g]
    lines = [x for x in (text(row.get(f"address1_line{n}")) for n in (1, 2, 3)) if x]
    address = {k: v for k, v in {"line": lines or None, "city": text(row.get("address1_city")),
                                 "state": text(row.get("address1_stateorprovince")),
                                 "postalCode": text(row.get("address1_postalcode")),
                                 "country": text(row.get("address1_country"))}.items() if v}
    birth, gender = row.get("birthdate"), row.get("gendercode")
    out = {
        "family": text(row.get("lastname")), "given": given or None,
        "birthDate": birth.isoformat()[:10] if isinstance(birth, date | datetime) else None,
        "gender": GENDER.get(int(gender)) if gender is not None else None,
        "phone/work": text(row.get("telephone1")), "phone/home": text(row.get("telephone2")),
        "phone/mobile": text(row.get("mobilephone")), "email": text(row.get("emailaddress1")),
        "address": address or None,
    }
    return {k: v for k, v in out.items() if v is not None}
