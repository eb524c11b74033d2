"""When a message that could not be finished is tried again, and when it is given up. Pure: no I/O.

Service Bus redelivers an abandoned message at once, so a failure that lasts longer than a few seconds (the
FHIR service or Table Storage down, a token endpoint unreachable, a setting wrong, an update that came before
its row's Create) would burn the queue's MaxDeliveryCount in moments and land in the dead-letter queue. Instead
the function completes the message and schedules a copy of it on the same queue (`ScheduledEnqueueTimeUtc`),
with a growing delay: `WRITEBACK_RETRY_FIRST_SECONDS`, doubling up to `WRITEBACK_RETRY_MAX_DELAY_SECONDS`,
until `WRITEBACK_RETRY_WINDOW_HOURS` after the message was first tried; then it is dead-lettered as
`retries-exhausted` with the last reason in its description.

The copy carries the body, content type and application properties of the original (Dataverse's own, so the
duplicate check on RequestId keeps working), plus:

- ``writeback-attempt``: how many times the message has been rescheduled (1 on the first copy);
- ``writeback-first-tried``: when the original was first tried (ISO 8601, UTC), for the window. Counted from the
  first try, not from the first enqueue: a backlog older than the window (the app stopped over a weekend) would
  otherwise be dead-lettered at its first transient failure, never retried (found by review);
- ``writeback-original-message-id``: the MessageId of the message Dataverse posted;
- ``writeback-consent-waits``: how many of those attempts waited for a patient's consent (`consent-unknown`).
  The short waits that come after a consent gate (for a referenced row's resource, for an earlier save) count
  only the attempts that got past it: an hour spent waiting for the consent must not use them up;
- ``writeback-gate-opened``: when the first attempt after such waits got past the consent (ISO 8601, UTC). The
  rows it refers to waited for the same consent, each on its own retry schedule, by then up to
  `WRITEBACK_RETRY_MAX_DELAY_SECONDS` apart: the message waits for their resources that long (twice), whatever
  its own, shorter, delays (`facts.resolve`).

Its MessageId is the original's with ``~r<attempt>`` (after ``~s<epoch seconds>`` for a copy `resubmit` put back,
``writeback-resubmission``): the queue drops a message whose MessageId it saw in its duplicate-detection window, so
a copy under the original id would be dropped (lost), while a copy under an id derived from the attempt makes a
crash between "schedule the copy" and "complete the original" harmless: the original is redelivered, its copy is
scheduled again under the same id, and the queue drops the second one.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import field
from datetime import UTC, datetime, timedelta
from typing import Any

from writeback.immutable import immutable
from writeback.reasons import Reason
from writeback.settings import Settings

ATTEMPT = "writeback-attempt"
FIRST_TRIED = "writeback-first-tried"
ORIGINAL_ID = "writeback-original-message-id"
CONSENT_WAITS = "writeback-consent-waits"
GATE_OPENED = "writeback-gate-opened"
# How many of the attempts so far ended for another reason than a wait for a row or a consent (an outage, a
# conflict, the deadline, a configuration fault): they never looked for the rows the message refers to, so the
# grace of those lookups does not count them (found by review: after two `fhir-unavailable` tries a lookup no
# longer waited for its row, and was written by identifier only).
OUTAGES = "writeback-outage-tries"
# On a copy `resubmit` put back from the dead-letter queue: the reason it was dead-lettered. Such a copy starts a new
# retry window (its attempts and first-try time are not carried over) but is still a message tried before.
RESUBMITTED_FROM = "writeback-resubmitted-from"
# On such a copy, and carried by its retry copies: which resubmission it is (`s<epoch seconds>`), part of their
# MessageIds. Without it a resubmitted message's first retry copy was `<id>~r1` again, the id of the original's first
# copy: within the queue's duplicate-detection window the queue dropped it, and the message was lost (found by
# review).
RESUBMISSION = "writeback-resubmission"
MAX_MESSAGE_ID = 128  # Service Bus limit


@immutable
class RetryPolicy:
    first: timedelta = timedelta(seconds=15)
    longest: timedelta = timedelta(seconds=900)
    window: timedelta = timedelta(hours=24)

    @classmethod
    def of(cls, settings: Settings) -> RetryPolicy:
        return cls(timedelta(seconds=settings.retry_first_seconds),
                   timedelta(seconds=settings.retry_max_delay_seconds),
                   timedelta(hours=settings.retry_window_hours))

    def delay(self, attempt: int, jitter: float = 1.0) -> timedelta:
        """The wait before retry number `attempt` (1-based). `jitter` in (0, 1] spreads the retries of many
        messages that failed together (an outage) so they do not all come back in the same second."""
        doubled: timedelta = self.first * (2 ** min(max(attempt - 1, 0), 30))
        return min(self.longest, doubled) * jitter


@immutable
class Retry:
    """Schedule a copy of the message at `at` under `message_id`, with `properties`."""

    attempt: int
    at: datetime
    message_id: str
    properties: Mapping[str, Any] = field(default_factory=dict)


@immutable
class GiveUp:
    """The retry window is over: dead-letter the message as `retries-exhausted`."""

    attempts: int
    waited: timedelta

    def description(self, last_reason: str, last_detail: str) -> str:
        hours = self.waited.total_seconds() / 3600
        return (f"Retried {self.attempts} time(s) over {hours:.1f} h (WRITEBACK_RETRY_WINDOW_HOURS) without "
                f"success; last reason {last_reason}: {last_detail}")


def text_of(value: object) -> str:
    """A Service Bus property or header value as text (the SDK hands some over as bytes)."""
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def _count(properties: Mapping[str, Any] | None, name: str) -> int:
    raw = (properties or {}).get(name)
    try:
        return max(0, int(text_of(raw))) if raw is not None else 0
    except ValueError:
        return 0


def attempts_so_far(properties: Mapping[str, Any] | None) -> int:
    return _count(properties, ATTEMPT)


def outages_so_far(properties: Mapping[str, Any] | None) -> int:
    """How many of the attempts so far ended neither waiting for a row nor for a consent (`OUTAGES`)."""
    return _count(properties, OUTAGES)


def consent_waits_so_far(properties: Mapping[str, Any] | None) -> int:
    """How many of the attempts so far waited for a patient's consent."""
    return _count(properties, CONSENT_WAITS)


def _when(raw: object) -> datetime | None:
    try:
        when = datetime.fromisoformat(text_of(raw))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def gate_opened(properties: Mapping[str, Any] | None, now: datetime) -> datetime | None:
    """When the message, after waiting for a consent, first got past it (`GATE_OPENED`; `now` for the attempt
    being made, if it does); None when it never waited for one."""
    if not consent_waits_so_far(properties):
        return None
    raw = (properties or {}).get(GATE_OPENED)
    return (_when(raw) if raw is not None else None) or now


def first_tried(properties: Mapping[str, Any] | None, now: datetime) -> datetime:
    """When the message was first tried: its retry copies carry it (`FIRST_TRIED`); without it this is its first
    try (or the broker's redelivery of it, which MaxDeliveryCount bounds), `now`."""
    raw = (properties or {}).get(FIRST_TRIED)
    if raw is not None and (when := _when(raw)) is not None:
        return when
    return now


def original_id(properties: Mapping[str, Any] | None, message_id: str | None) -> str:
    raw = (properties or {}).get(ORIGINAL_ID)
    return text_of(raw) if raw is not None else (message_id or "")


# In a decision's `extra`: its `target-pending` waits for a patient (its contact to be a Patient again), and
# counts as a wait for a consent does (`CONSENT_WAITS`).
GATE_WAIT = "gate_wait"


def next_step(policy: RetryPolicy, *, properties: Mapping[str, Any] | None, message_id: str | None,
              now: datetime, jitter: float = 1.0, reason: Reason | None = None,
              gate_wait: bool = False, window: bool = True) -> Retry | GiveUp:
    """What happens to a message that ended transient (or in a configuration fault) on this delivery, with
    `reason` (its reason code). `gate_wait`: it waited for its patient (`GATE_WAIT`), as `consent-unknown` does.
    `window`: False where the retry was decided already, inside the window (`pipeline.give_up`) and recorded so: the
    copy is made, whatever the clock says now, so that the settlement says what the outcome log says."""
    done = attempts_so_far(properties)
    first = first_tried(properties, now)
    waited = now - first
    if window and waited >= policy.window:
        return GiveUp(done, waited)
    attempt = done + 1
    original = original_id(properties, message_id)
    resubmission = (properties or {}).get(RESUBMISSION)
    suffix = (f"~{text_of(resubmission)}" if resubmission is not None else "") + f"~r{attempt}"
    copy_id = (original[: MAX_MESSAGE_ID - len(suffix)] if original else "writeback") + suffix
    ours = (ATTEMPT, FIRST_TRIED, ORIGINAL_ID, CONSENT_WAITS, GATE_OPENED, OUTAGES)
    kept = {text_of(k): v for k, v in (properties or {}).items() if text_of(k) not in ours}
    props = {**kept, ATTEMPT: attempt, FIRST_TRIED: first.astimezone(UTC).isoformat(), ORIGINAL_ID: original}
    waiting = gate_wait or reason is Reason.CONSENT_UNKNOWN
    outage = reason is not None and not waiting and reason is not Reason.TARGET_PENDING
    if outages := outages_so_far(properties) + outage:
        props[OUTAGES] = outages
    waits = consent_waits_so_far(properties) + waiting
    if waits:
        props[CONSENT_WAITS] = waits
    if waits and not waiting:
        opened = gate_opened(properties, now)
        assert opened is not None
        props[GATE_OPENED] = opened.astimezone(UTC).isoformat()
    return Retry(attempt, now + policy.delay(attempt, jitter), copy_id, props)


def batch_jitter(rng: random.Random | None = None) -> float:
    """One jitter factor per invocation (copies of one batch with the same attempt go out together)."""
    return (rng or random).uniform(0.8, 1.0)  # spreading load, not security
