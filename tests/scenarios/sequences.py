"""Realistic hospital sequences, as data: what people (and the FHIR→Dataverse sync) save in Dataverse, in the order
they save it. Each sequence records its saves into a `Dataverse`, which keeps the messages a step with pre and post
images posts; `Expect` says what the rows' last states are and which FHIR records were there before.

A sequence may seed FHIR first (records that came from FHIR: names and telecoms without `use`, identifiers of
other systems, extensions), as the upsert API leaves them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any

from devtools.messages import Choice, Lookup
from tests.delivery.conftest import Fhir
from tests.scenarios.dataverse import MRN, PATIENT, PRACTITIONER, SSN, SYNC_USER, T0, Dataverse, new_id

CONSENT = "msemr_azurefhirsyncenabled"


@dataclass
class Expect:
    """What a sequence leaves behind in Dataverse, for the checks."""

    contacts: list[str] = field(default_factory=list)
    identifiers: list[str] = field(default_factory=list)
    encounters: list[str] = field(default_factory=list)
    observations: list[str] = field(default_factory=list)
    seeded: dict[str, dict[str, Any]] = field(default_factory=dict)  # contact row → the FHIR record it came from
    adopted: list[dict[str, Any]] = field(default_factory=list)  # seeded items an identifier row stands for
    # Sequences whose outcome depends on the order messages are received in (a child row saved around a consent
    # change): checked only in the modes where Dataverse's order is kept.
    ordered_only: bool = False


Sequence = Callable[[Dataverse, Fhir], Expect]


def admission(dv: Dataverse, fhir: Fhir) -> Expect:
    """A patient is registered, identified, seen, and corrected: the everyday path."""
    contact, _ = dv.patient(firstname="Rosalind", middlename="Elsie", lastname="Quintero", mobilephone="+1 555 0199",
                            emailaddress1="r.q@example.org", address1_line1="1200 Harbor Way", address1_city="Seattle")
    mrn, _ = dv.identifier(contact, MRN, "MRN-3001")
    ssn, _ = dv.identifier(contact, SSN, "123-45-6789")
    visit, _ = dv.encounter(contact)
    dv.update("contact", contact, {"telephone1": "+1 555 0142"})
    dv.update("msemr_encounter", visit, {"msemr_encounterstatus": Choice(935000005),
                                         "msemr_encounterenddate": T0 + timedelta(hours=1)})
    dv.update("contact", contact, {"lastname": "Quintero-Hale", "address1_line2": "Apt 4"})
    second_mrn, _ = dv.identifier(contact, MRN, "MRN-3002")  # a second number of the same system
    dv.update("msemr_medicalidentifier", mrn, {"msemr_value": "MRN-3001A"})
    return Expect([contact], [mrn, ssn, second_mrn], [visit])


def from_fhir(dv: Dataverse, fhir: Fhir) -> Expect:
    """A record that came from FHIR (ingested through the upsert API, as the sync's user), then edited in
    Dataverse and written back to the server it came from."""
    seeded = fhir.put({
        "resourceType": "Patient", "id": f"ext-{new_id()[:12]}",
        "extension": [{"url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex", "valueCode": "F"}],
        "identifier": [{"system": MRN, "value": "MRN-9001"}, {"system": "urn:oid:1.2.3.4", "value": "EXT-9"}],
        "name": [{"family": "Okafor", "given": ["Imani", "Grace"]}, {"use": "nickname", "given": ["Ima"]}],
        "telecom": [{"system": "phone", "value": "+1 555 0170"}, {"system": "fax", "value": "+1 555 0179"}],
        "gender": "female", "birthDate": "1979-03-14",
        "communication": [{"language": {"text": "Igbo"}}],
    })
    contact, _ = dv.patient(user=SYNC_USER, fhir_id=seeded["id"], firstname="Imani", middlename="Grace",
                            lastname="Okafor", telephone1="+1 555 0170", birthdate=date(1979, 3, 14))
    ingested_mrn, _ = dv.identifier(contact, MRN, "MRN-9001", user=SYNC_USER)
    dv.update("contact", contact, {"lastname": "Okafor-Bello", "telephone1": "+1 555 0171"})
    dv.update("msemr_medicalidentifier", ingested_mrn, {"msemr_value": "MRN-9001B"})
    ssn, _ = dv.identifier(contact, SSN, "987-65-4321")
    visit, _ = dv.encounter(contact)
    return Expect([contact], [ingested_mrn, ssn], [visit], seeded={contact: seeded},
                  adopted=[{"system": MRN, "value": "MRN-9001"}])


def consent_given_later(dv: Dataverse, fhir: Fhir) -> Expect:
    """Registered without consent, edited, consent given: the whole row reaches FHIR, its later changes too."""
    contact, _ = dv.patient(consent=False, lastname="Lindqvist")
    dv.update("contact", contact, {"mobilephone": "+1 555 0133", "lastname": "Lindqvist-Berg"})
    dv.update("contact", contact, {CONSENT: True})
    mrn, _ = dv.identifier(contact, MRN, "MRN-4001")
    dv.update("contact", contact, {"firstname": "Dagny"})
    return Expect([contact], [mrn])


def consent_withdrawn(dv: Dataverse, fhir: Fhir) -> Expect:
    """Consent withdrawn: what FHIR holds stays as it was at the last consented save; nothing further is written."""
    contact, _ = dv.patient(lastname="Moreau")
    dv.update("contact", contact, {"telephone1": "+1 555 0155"})
    dv.update("contact", contact, {CONSENT: False})
    dv.update("contact", contact, {"lastname": "Moreau-Withdrawn", "mobilephone": "+1 555 0166"})
    mrn, _ = dv.identifier(contact, MRN, "MRN-5001")  # after the withdrawal: must not reach FHIR
    return Expect([contact], [mrn], ordered_only=True)


def identifiers_move(dv: Dataverse, fhir: Fhir) -> Expect:
    """An identifier entered on the wrong patient is moved, moved back, and another moved for good."""
    one, _ = dv.patient(lastname="Kowalski")
    two, _ = dv.patient(lastname="Haddad")
    shared, _ = dv.identifier(one, MRN, "MRN-6001")
    other, _ = dv.identifier(one, MRN, "MRN-6002")
    dv.update("msemr_medicalidentifier", shared, {"msemr_assignee": Lookup("contact", two)})
    dv.update("msemr_medicalidentifier", other, {"msemr_assignee": Lookup("contact", two)})
    dv.update("msemr_medicalidentifier", shared, {"msemr_assignee": Lookup("contact", one)})
    return Expect([one, two], [shared, other])


def becomes_practitioner(dv: Dataverse, fhir: Fhir) -> Expect:
    """A contact registered as a patient by mistake is a practitioner."""
    contact, _ = dv.patient(lastname="Adeyemi")
    dv.update("contact", contact, {"msemr_contacttype": PRACTITIONER})
    dv.update("contact", contact, {"telephone1": "+1 555 0188"})
    return Expect([contact])


def practitioner_and_back(dv: Dataverse, fhir: Fhir) -> Expect:
    """Made a practitioner by mistake, and a patient again moments later; then one registered without consent, made a
    practitioner, and a consenting patient again (its Patient never made before the last save): the newest save
    makes the Patient even while the release of the middle one holds off older creates of it."""
    contact, _ = dv.patient(lastname="Adeyemi")
    dv.update("contact", contact, {"msemr_contacttype": PRACTITIONER})
    dv.update("contact", contact, {"msemr_contacttype": PATIENT})
    later, _ = dv.patient(consent=False, lastname="Okafor")
    dv.update("contact", later, {"msemr_contacttype": PRACTITIONER})
    dv.update("contact", later, {"msemr_contacttype": PATIENT, CONSENT: True})
    return Expect([contact, later])


def names_edited(dv: Dataverse, fhir: Fhir) -> Expect:
    """Name parts cleared, blank, re-entered."""
    contact, _ = dv.patient(firstname="Anselm", middlename="Tobias", lastname="Nakamura")
    dv.update("contact", contact, {"firstname": None})
    dv.update("contact", contact, {"middlename": "  "})
    dv.update("contact", contact, {"firstname": "Ans", "middlename": "Tobias"})
    return Expect([contact])


def columns_cleared(dv: Dataverse, fhir: Fhir) -> Expect:
    """Columns cleared, then other columns of the same rows edited. Dataverse leaves empty columns out of every
    later image, so the later saves' images lack the cleared columns: their whole-row writes must still clear them
    (the clearing save may be received after them, or in their batch, where it is stale)."""
    contact, _ = dv.patient(middlename="Elsie", mobilephone="+1 555 0199", emailaddress1="w.c@example.org")
    mrn, _ = dv.identifier(contact, MRN, "MRN-7001", msemr_use=Choice(935000001))
    visit, _ = dv.encounter(contact, msemr_encounterenddate=T0 + timedelta(hours=2))
    dv.update("contact", contact, {"middlename": None, "mobilephone": None})
    dv.update("msemr_medicalidentifier", mrn, {"msemr_use": None})
    dv.update("msemr_encounter", visit, {"msemr_encounterenddate": None})
    dv.update("contact", contact, {"telephone1": "+1 555 0142"})
    dv.update("msemr_medicalidentifier", mrn, {"msemr_value": "MRN-7001A"})
    dv.update("msemr_encounter", visit, {"msemr_encounterstatus": Choice(935000005)})
    return Expect([contact], [mrn], [visit])


def clinical(dv: Dataverse, fhir: Fhir) -> Expect:
    """Two patients' encounters and observations: statuses, classes and values change, a value type switches, an
    observation moves to another encounter and patient, an encounter to another patient; lookups that name rows
    whose messages may come later (Service Bus does not order rows)."""
    one, _ = dv.patient(lastname="Okafor")
    other, _ = dv.patient(lastname="Moreau")
    first, _ = dv.encounter(one, msemr_encounterstatus=Choice(935000000), msemr_encounterlength=30.5)
    second, _ = dv.encounter(one)
    rate, _ = dv.observation(one, first, msemr_comment="after exercise")
    trace, _ = dv.observation(one, first, msemr_valuestring="trace", msemr_valuetypequantityvalue=None,
                              msemr_valuequantityunit=None)
    dv.update("msemr_encounter", first, {"msemr_encounterstatus": Choice(935000003),
                                         "msemr_encounterclass": Choice(935000000)})
    dv.update("msemr_observation", rate, {"msemr_valuetypequantityvalue": 73.25, "msemr_comment": None})
    dv.update("msemr_observation", rate, {"msemr_conexttypeencounter": Lookup("msemr_encounter", second)})
    dv.update("msemr_encounter", second, {"msemr_subjectpatient": Lookup("contact", other)})
    dv.update("msemr_observation", rate, {"msemr_subjecttypepatient": Lookup("contact", other)})
    dv.update("msemr_encounter", first, {"msemr_encounterstatus": Choice(935000005),
                                         "msemr_encounterenddate": T0 + timedelta(hours=3),
                                         "msemr_encounterlength": None})
    dv.update("msemr_observation", trace, {"msemr_valuestring": None, "msemr_valuetypequantityvalue": 1.5,
                                           "msemr_valuequantityunit": "mg", "msemr_status": Choice(935000003)})
    dv.update("msemr_encounter", second, {"msemr_encounterclass": Choice(935000003)})
    return Expect([one, other], [], [first, second], observations=[rate, trace])


SEQUENCES: dict[str, Sequence] = {
    "admission": admission, "from-fhir": from_fhir, "consent-given-later": consent_given_later,
    "consent-withdrawn": consent_withdrawn, "identifiers-move": identifiers_move,
    "becomes-practitioner": becomes_practitioner, "practitioner-and-back": practitioner_and_back,
    "names-edited": names_edited, "columns-cleared": columns_cleared,
    "clinical": clinical,
}
