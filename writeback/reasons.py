"""The reason codes: every skip, reject and failure carries one, and the README documents each.

Each code belongs to one class, and the class alone decides how a message is settled:
skip → complete; reject → dead-letter at once; transient → abandon (Service Bus redelivers, then
dead-letters after MaxDeliveryCount); config → abandon and log one error naming the setting.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Kind(StrEnum):
    SKIP = "skip"
    REJECT = "reject"
    TRANSIENT = "transient"
    CONFIG = "config"


@dataclass(frozen=True)
class ReasonInfo:
    kind: Kind
    meaning: str
    action: str


class Reason(StrEnum):
    NO_ENTITY_MAP = "no-entity-map"
    UNSUPPORTED_MESSAGE = "unsupported-message"
    CONSENT_WITHHELD = "consent-withheld"
    ECHO = "echo"
    NO_CHANGE = "no-change"
    DUPLICATE = "duplicate"
    STALE = "stale"
    INVALID_CONTACT_TYPE = "invalid-contact-type"
    MISSING_PARENT_LINK = "missing-parent-link"
    INVALID_RESOURCE = "invalid-resource"
    UNSUPPORTED_FORMAT = "unsupported-format"
    MALFORMED_MESSAGE = "malformed-message"
    PAYLOAD_DROPPED = "payload-dropped"
    FHIR_REJECTED = "fhir-rejected"
    TARGET_MISSING = "target-missing"
    TARGET_PENDING = "target-pending"
    CONFLICT = "conflict"
    PROVENANCE_FAILED = "provenance-failed"
    FHIR_UNAVAILABLE = "fhir-unavailable"
    OUTCOME_STORE_UNAVAILABLE = "outcome-store-unavailable"
    UNAUTHORIZED = "unauthorized"
    CONFIG_ERROR = "config-error"

    @property
    def info(self) -> ReasonInfo:
        return REASONS[self]

    @property
    def kind(self) -> Kind:
        return REASONS[self].kind


REASONS: dict[Reason, ReasonInfo] = {
    Reason.NO_ENTITY_MAP: ReasonInfo(
        Kind.SKIP, "The table has no entity map, or its map has writeback disabled.",
        "Nothing, if the table should not be written back; else add or enable its map and resubmit."),
    Reason.UNSUPPORTED_MESSAGE: ReasonInfo(
        Kind.SKIP, "The message (e.g. Delete) is not in the map's supported messages.",
        "Nothing; or add the message to the map's `messages` and resubmit."),
    Reason.CONSENT_WITHHELD: ReasonInfo(
        Kind.SKIP, "The patient's consent column (Azure FHIR Sync Enabled) is not Yes.",
        "Nothing: the patient has not consented. Once consent is given, the next change is written."),
    Reason.ECHO: ReasonInfo(
        Kind.SKIP, "The change was made by a user in WRITEBACK_IGNORE_USER_IDS (the sync's own user).",
        "Nothing: this stops loops between the two sync directions."),
    Reason.NO_CHANGE: ReasonInfo(
        Kind.SKIP, "An Update that changes no mapped column.",
        "Nothing; map the column if it should be written back."),
    Reason.DUPLICATE: ReasonInfo(
        Kind.SKIP, "The same message (MessageId/RequestId) was already processed.",
        "Nothing: Service Bus delivered it twice and it was written once."),
    Reason.STALE: ReasonInfo(
        Kind.SKIP, "A change arrived after a newer change of the same row that wrote every column it carries "
        "(an older change of other columns is still written, narrowed to them).",
        "Nothing: the newer state is already on the FHIR server."),
    Reason.INVALID_CONTACT_TYPE: ReasonInfo(
        Kind.REJECT, "A contact whose Contact Type is missing or is not Patient or Practitioner.",
        "Set the contact's Contact Type in Dataverse, then save it again (or resubmit)."),
    Reason.MISSING_PARENT_LINK: ReasonInfo(
        Kind.REJECT, "An expansion row (e.g. a medical identifier) without the lookup to its parent.",
        "Fill the parent lookup on the row in Dataverse and save it again."),
    Reason.INVALID_RESOURCE: ReasonInfo(
        Kind.REJECT, "The mapped resource fails FHIR R4 validation; the detail names the element.",
        "Correct the named column's value in Dataverse, or the entity map, then resubmit."),
    Reason.UNSUPPORTED_FORMAT: ReasonInfo(
        Kind.REJECT, "The body is not JSON (the service endpoint uses binary or text XML).",
        "Set the service endpoint's Message Format to JSON in the Plug-in Registration Tool."),
    Reason.MALFORMED_MESSAGE: ReasonInfo(
        Kind.REJECT, "Invalid JSON, or a RemoteExecutionContext missing a required field.",
        "Check the sender: only Dataverse service endpoints should post to the queue."),
    Reason.PAYLOAD_DROPPED: ReasonInfo(
        Kind.REJECT, "Dataverse dropped the payload (MessageMaxSizeExceeded, over 192 KB).",
        "Register fewer image columns on the step; then save the row again in Dataverse."),
    Reason.FHIR_REJECTED: ReasonInfo(
        Kind.REJECT, "The FHIR server refused the resource (400/422); the detail has its issue codes.",
        "Read the OperationOutcome in the outcome log, fix the data or map, then resubmit."),
    Reason.TARGET_MISSING: ReasonInfo(
        Kind.REJECT, "The FHIR resource to update does not exist (404 on its FHIR id, or gone), or more than one "
        "resource carries the row identifier.",
        "Check the row's FHIR id column (clear it to create the resource anew) or merge the duplicates, then "
        "resubmit."),
    Reason.TARGET_PENDING: ReasonInfo(
        Kind.TRANSIENT, "No FHIR resource carries the row identifier yet: the update (or identifier row) came "
        "before the Create of its row (or of its parent) was written.",
        "Usually none: redelivery retries after the Create. If dead-lettered, resubmit the row's Create first "
        "(or save a row that predates writeback in Dataverse), then resubmit."),
    Reason.CONFLICT: ReasonInfo(
        Kind.TRANSIENT, "The resource kept changing on the server (412/409) through every re-apply.",
        "Usually none: redelivery retries. If it persists, find what else writes the resource."),
    Reason.PROVENANCE_FAILED: ReasonInfo(
        Kind.TRANSIENT, "The resource was written but its Provenance could not be.",
        "Redelivery retries; if dead-lettered, check the server's Provenance support, then resubmit."),
    Reason.FHIR_UNAVAILABLE: ReasonInfo(
        Kind.TRANSIENT, "The FHIR server kept answering 429/5xx, timing out or refusing connections.",
        "Check the FHIR service's health; messages retry and can be resubmitted from the dead-letter queue."),
    Reason.OUTCOME_STORE_UNAVAILABLE: ReasonInfo(
        Kind.TRANSIENT, "Table Storage (outcome log and row state) could not be reached.",
        "Check the storage account and the function's role on it; messages retry."),
    Reason.UNAUTHORIZED: ReasonInfo(
        Kind.CONFIG, "The FHIR server or token endpoint refused our credentials (401/403).",
        "Fix the client id/secret or the identity's FHIR Data Contributor role; messages stay on the queue."),
    Reason.CONFIG_ERROR: ReasonInfo(
        Kind.CONFIG, "A setting or entity map is missing or invalid; the detail names it.",
        "Fix the named setting or map file; messages stay on the queue."),
}
