"""The reason codes: every skip, reject and failure carries one, and the README documents each.

Each code belongs to one class, and the class alone decides how a message is settled:
skip → complete; reject → dead-letter at once; transient and config → a copy is scheduled on the queue with a
growing delay and the message completed (`writeback.retry`), until the retry window is over: then
`retries-exhausted` (dead-letter). A config fault also logs one error naming the setting.
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
    DEADLINE_REACHED = "deadline-reached"
    CONSENT_UNKNOWN = "consent-unknown"
    RETRIES_EXHAUSTED = "retries-exhausted"

    @property
    def info(self) -> ReasonInfo:
        return REASONS[self]

    @property
    def kind(self) -> Kind:
        return REASONS[self].kind


REASONS: dict[Reason, ReasonInfo] = {
    Reason.NO_ENTITY_MAP: ReasonInfo(
        Kind.SKIP, "The table has no entity map, or its map has writeback disabled, or the row is of a type its map "
        "does not write (a contact that is a Related Person; the detail gives the value of its type column).",
        "Nothing, if the table (or the type) should not be written back; else add or enable its map (or map the "
        "type), then save the rows again in Dataverse (a skipped message is completed, not kept: there is nothing "
        "to resubmit)."),
    Reason.UNSUPPORTED_MESSAGE: ReasonInfo(
        Kind.SKIP, "The message (e.g. Delete, or an Update for a map that lists only Create) is not in the map's "
        "supported messages.",
        "Nothing; or add Create or Update to the map's `messages`, then save the rows again in Dataverse (a skipped "
        "message is not kept: there is nothing to resubmit)."),
    Reason.CONSENT_WITHHELD: ReasonInfo(
        Kind.SKIP, "The patient's consent column (Azure FHIR Sync Enabled) is not Yes; for a row that belongs to "
        "a patient (an identifier, an encounter), that patient's.",
        "Nothing: the patient has not consented. When consent is given, the contact's whole row is written; a child "
        "or clinical row saved while consent was off waits for it `WRITEBACK_CONSENT_WAIT_MINUTES` (60) as "
        "`consent-unknown` and is then written; past that wait it is skipped, and written at its next save. If "
        "the detail says the consent column is not in the message, and every patient's message says so, check "
        "WRITEBACK_CONSENT_COLUMN (or the map's `consent.column`) and the step's images."),
    Reason.ECHO: ReasonInfo(
        Kind.SKIP, "The change was made by a user in WRITEBACK_IGNORE_USER_IDS (the sync's own user).",
        "Nothing: this stops loops between the two sync directions."),
    Reason.NO_CHANGE: ReasonInfo(
        Kind.SKIP, "Nothing to write: the update changes no mapped column (nor type, consent, FHIR id or parent), "
        "or the FHIR server already holds this version of the row, or these very values.",
        "Nothing; map the column if it should be written back."),
    Reason.DUPLICATE: ReasonInfo(
        Kind.SKIP, "The same message (RequestId, row, message name and row version, or without one its OperationId, "
        "or its modifiedon and the names of the columns it sets; else MessageId) was already processed.",
        "Nothing: Service Bus delivered it twice and it was written once."),
    Reason.STALE: ReasonInfo(
        Kind.SKIP, "The FHIR server already holds a newer version of the row (or a newer change in the same batch "
        "does), which includes this change; a Target-only change is narrowed to the columns no newer change wrote.",
        "Nothing: the newer state is already on the FHIR server."),
    Reason.INVALID_CONTACT_TYPE: ReasonInfo(
        Kind.REJECT, "A contact whose Contact Type is missing from the message, or holds no choice's value (a "
        "contact of a type the map does not write, a Related Person, is skipped as `no-entity-map`).",
        "Set the contact's Contact Type in Dataverse, then save it again; if the contact has one, register the "
        "column in the steps' images (docs/deploy.md), then save the contact again. The message sent before lacks "
        "it, however often it is sent again: remove it with `python -m writeback discard --reason "
        "invalid-contact-type`."),
    Reason.MISSING_PARENT_LINK: ReasonInfo(
        Kind.REJECT, "An expansion row (e.g. a medical identifier) without the lookup to its parent, or whose "
        "parent lookup changed in a message without images (a step without pre and post images).",
        "Fill the parent lookup on the row in Dataverse and save it again; for a change sent without images, "
        "register the step's images (docs/deploy.md) and save the row again. Then `discard` the dead-lettered "
        "message (it lacks the link, however often it is sent again)."),
    Reason.INVALID_RESOURCE: ReasonInfo(
        Kind.REJECT, "The mapped resource fails FHIR R4 validation, or the row's FHIR id column holds no FHIR id; "
        "the detail names the element or the column.",
        "Correct the named column's value in Dataverse, or the entity map, then resubmit."),
    Reason.UNSUPPORTED_FORMAT: ReasonInfo(
        Kind.REJECT, "The body is not JSON (the service endpoint uses binary or text XML), or is JSON in UTF-16 or "
        "UTF-32, or in another encoding than UTF-8 (the detail says which), which Dataverse never sends.",
        "Set the service endpoint's Message Format to JSON in the Plug-in Registration Tool; for JSON in another "
        "encoding, check what sent it (Dataverse sends UTF-8). `resubmit` sends the same body again: remove these "
        "messages with `python -m writeback discard --reason unsupported-format`, and save their rows again in "
        "Dataverse."),
    Reason.MALFORMED_MESSAGE: ReasonInfo(
        Kind.REJECT, "Invalid JSON, JSON that is not an object, or a RemoteExecutionContext missing a required field "
        "or holding one in another form (a table or message name that is no logical name; the detail "
        "names the field, never its value), or whose Target or image is another row than PrimaryEntityName and "
        "PrimaryEntityId name.",
        "Check the sender: only Dataverse service endpoints should post to the queue. Then remove them: "
        "`python -m writeback discard --reason malformed-message` (or `--message-id` for one)."),
    Reason.PAYLOAD_DROPPED: ReasonInfo(
        Kind.REJECT, "Dataverse dropped the payload (MessageMaxSizeExceeded, over 192 KB).",
        "Register fewer image columns on the step; then save the row again in Dataverse, and `discard` the "
        "dead-lettered message (it holds no row to write)."),
    Reason.FHIR_REJECTED: ReasonInfo(
        Kind.REJECT, "The FHIR server refused the resource (400/422); the detail has its issue codes.",
        "Read the outcome's detail (`logs --json`, or the dead-letter description): it names the element and the "
        "server's issue code. Fix the data or the map, then resubmit."),
    Reason.TARGET_MISSING: ReasonInfo(
        Kind.REJECT, "The FHIR resource to update does not exist (404 on its FHIR id, or gone), or more than one "
        "resource carries the row identifier.",
        "Check the row's FHIR id column (clear it to create the resource anew) or merge the duplicates, then "
        "resubmit."),
    Reason.TARGET_PENDING: ReasonInfo(
        Kind.TRANSIENT, "The resource to write into does not exist yet: an identifier row came before its "
        "patient's Create was written (or a Target-only update before its row's Create); or a row's lookup names a "
        "row not written yet (an Observation before its Encounter), which waits two retries (after waiting for a "
        "patient's consent, twice WRITEBACK_RETRY_MAX_DELAY_SECONDS), then refers to it by identifier only; or a "
        "save of a record that came from FHIR before an earlier save of its row, which tells which of the record's "
        "items are the row's: it waits one retry, then is written; or an identifier row whose contact was a Patient "
        "until its last type change (made a Practitioner): it waits WRITEBACK_CONSENT_WAIT_MINUTES for the contact "
        "to be a Patient again, then is skipped as `no-entity-map`; or a contact's change sent without images whose "
        "Target does not hold the contact type, before any message of the row has told it.",
        "Usually none: it is retried with a growing delay until the Create is written. If it ends as "
        "retries-exhausted, resubmit the row's Create first "
        "(or save a row that predates writeback in Dataverse), then resubmit."),
    Reason.CONFLICT: ReasonInfo(
        Kind.TRANSIENT, "The resource kept changing on the server (412/409) through every re-apply.",
        "Usually none: it is retried with a growing delay. If it persists, find what else writes the resource."),
    Reason.PROVENANCE_FAILED: ReasonInfo(
        Kind.TRANSIENT, "The resource was written but its Provenance could not be.",
        "None: it is retried with a growing delay; if it persists, check the server's Provenance support."),
    Reason.FHIR_UNAVAILABLE: ReasonInfo(
        Kind.TRANSIENT, "The FHIR server kept answering 429/5xx, timing out or refusing connections.",
        "Check the FHIR service's health; messages are retried with a growing delay for the retry window."),
    Reason.OUTCOME_STORE_UNAVAILABLE: ReasonInfo(
        Kind.TRANSIENT, "Table Storage (outcome log and row state) could not be reached, also after the message was "
        "written (its retry finds it written and keeps what it tells about its row).",
        "Check the storage account and the function's role on it; messages are retried with a growing delay."),
    Reason.UNAUTHORIZED: ReasonInfo(
        Kind.CONFIG, "The FHIR server or token endpoint refused our credentials (401/403).",
        "Fix the client id/secret or the identity's FHIR Data Contributor role; messages are retried meanwhile."),
    Reason.CONFIG_ERROR: ReasonInfo(
        Kind.CONFIG, "A setting or entity map is missing or invalid; the detail names it.",
        "Fix the named setting or map file; messages are retried meanwhile."),
    Reason.DEADLINE_REACHED: ReasonInfo(
        Kind.TRANSIENT, "The invocation reached its deadline inside the message lock before this message was "
        "finished; it was rescheduled rather than worked on past the lock. Also a message handed over with too "
        "little of its lock left to work on (docs/operations.md, Timing).",
        "Usually none: it is retried. If it recurs, lower maxMessageBatchSize or look at the FHIR service's latency; "
        "if the messages were handed over late, at the worker's load."),
    Reason.CONSENT_UNKNOWN: ReasonInfo(
        Kind.TRANSIENT, "The row belongs to a patient (an identifier or clinical row) whose consent is not known "
        "yet: no message of that patient's contact row has been seen (skipped at once instead when "
        "WRITEBACK_CONSENT_UNKNOWN is skip); or it was saved while that patient had not consented, and waits "
        "`WRITEBACK_CONSENT_WAIT_MINUTES` for the consent.",
        "Usually none: it is retried until the contact's message has been seen. If it persists, save the "
        "patient's contact row in Dataverse, then resubmit."),
    Reason.RETRIES_EXHAUSTED: ReasonInfo(
        Kind.REJECT, "A transient failure or configuration fault lasted through the whole retry window "
        "(WRITEBACK_RETRY_WINDOW_HOURS, default 24 h); the description names the last reason.",
        "Fix what the last reason names (see its row in this table), then resubmit: python -m writeback resubmit "
        "--reason retries-exhausted."),
}
