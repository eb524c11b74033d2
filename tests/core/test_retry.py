"""The retry policy: growing delays, the window, and copies that the queue's duplicate detection cannot drop."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from writeback.reasons import Reason
from writeback.retry import (
    ATTEMPT,
    CONSENT_WAITS,
    FIRST_TRIED,
    GATE_OPENED,
    ORIGINAL_ID,
    OUTAGES,
    RESUBMISSION,
    GiveUp,
    Retry,
    RetryPolicy,
    consent_waits_so_far,
    gate_opened,
    next_step,
)
from writeback.scheduler import Copy, servicebus_message
from writeback.settings import Settings

NOW = datetime(2026, 11, 30, 8, 0, tzinfo=UTC)
POLICY = RetryPolicy.of(Settings.from_env({"FHIR_URL": "https://fhir.example.org"}))


def step(properties: dict[str, object] | None = None, message_id: str | None = "m-1",
         now: datetime = NOW) -> Retry | GiveUp:
    return next_step(POLICY, properties=properties, message_id=message_id, now=now)


def test_delays_double_from_the_first_up_to_the_longest() -> None:
    assert [POLICY.delay(n).total_seconds() for n in range(1, 10)] == [15, 30, 60, 120, 240, 480, 900, 900, 900]
    assert POLICY.delay(3, jitter=0.8) == timedelta(seconds=48)


def test_the_first_retry_is_a_copy_under_an_id_derived_from_the_attempt() -> None:
    first = step({"http://schemas.microsoft.com/xrm/2011/Claims/User": "u-1"})
    assert isinstance(first, Retry)
    assert (first.attempt, first.message_id, first.at) == (1, "m-1~r1", NOW + timedelta(seconds=15))
    assert first.properties == {"http://schemas.microsoft.com/xrm/2011/Claims/User": "u-1", ATTEMPT: 1,
                                FIRST_TRIED: NOW.isoformat(), ORIGINAL_ID: "m-1"}


def test_a_copy_counts_on_from_its_properties_and_keeps_the_first_try_time() -> None:
    later = NOW + timedelta(hours=3)
    again = step({ATTEMPT: "7", FIRST_TRIED: NOW.isoformat(), ORIGINAL_ID: "m-1"}, message_id="m-1~r7", now=later)
    assert isinstance(again, Retry)
    assert (again.attempt, again.message_id, again.at) == (8, "m-1~r8", later + timedelta(seconds=900))
    assert again.properties[FIRST_TRIED] == NOW.isoformat() and again.properties[ORIGINAL_ID] == "m-1"


def test_a_copy_counts_the_tries_an_outage_took_apart_from_waits_for_a_row() -> None:
    """The grace of a lookup (two tries that looked for its row and did not find it) must not be used up by tries
    that never looked: an outage, a conflict, the deadline (tests/scenarios test_rf3)."""
    props: dict[str, object] | None = None
    counted = []
    for reason in (Reason.FHIR_UNAVAILABLE, Reason.TARGET_PENDING, Reason.CONFLICT, Reason.CONSENT_UNKNOWN,
                   Reason.DEADLINE_REACHED):
        copy = next_step(POLICY, properties=props, message_id="m-1", now=NOW, reason=reason)
        assert isinstance(copy, Retry)
        props = dict(copy.properties)
        counted.append(props.get(OUTAGES))
    assert counted == [1, 1, 2, 2, 3]


def test_a_copy_counts_the_tries_that_waited_for_a_consent_and_only_those() -> None:
    """The waits past the consent gate (a referenced row's resource, an earlier save) count the other tries: an
    hour spent waiting for the consent must not have used them up (tests/scenarios test_r2b)."""
    waits, props = [], None
    # (a `target-pending` that waits for the patient itself, its contact to be a Patient again, is such a wait)
    for reason, gate in ((Reason.CONSENT_UNKNOWN, False), (Reason.CONSENT_UNKNOWN, False),
                         (Reason.TARGET_PENDING, False), (Reason.CONSENT_UNKNOWN, False),
                         (Reason.TARGET_PENDING, True)):
        copy = next_step(POLICY, properties=props, message_id="m-1", now=NOW,
                         reason=reason, gate_wait=gate)
        assert isinstance(copy, Retry)
        props = dict(copy.properties)
        waits.append((props[ATTEMPT], consent_waits_so_far(props)))
    assert waits == [(1, 1), (2, 2), (3, 2), (4, 3), (5, 4)]
    plain = step()
    assert isinstance(plain, Retry) and CONSENT_WAITS not in plain.properties  # no wait, no property
    assert consent_waits_so_far({CONSENT_WAITS: "x"}) == 0  # unreadable (set by hand): counted as none


def test_a_copy_says_when_the_message_first_got_past_the_consent_it_waited_for() -> None:
    """What the message then waits for (a referenced row waiting for the same consent) may come up to the longest
    retry delay later, whatever its own next delay: the copy carries when that started."""
    props: dict[str, object] | None = None
    opened = []
    for minute, reason in enumerate((Reason.CONSENT_UNKNOWN, Reason.TARGET_PENDING, Reason.TARGET_PENDING)):
        when = NOW + timedelta(minutes=minute)
        copy = next_step(POLICY, properties=props, message_id="m-1", now=when,
                         reason=reason)
        assert isinstance(copy, Retry)
        props = dict(copy.properties)
        opened.append(gate_opened(props, NOW + timedelta(hours=1)))
    assert opened == [NOW + timedelta(hours=1), NOW + timedelta(minutes=1), NOW + timedelta(minutes=1)]
    never = step()  # never waited for a consent: no such time
    assert isinstance(never, Retry) and GATE_OPENED not in never.properties and gate_opened({}, NOW) is None


def test_the_same_delivery_retried_twice_yields_the_same_copy_id() -> None:
    """A crash between scheduling the copy and completing the original redelivers the original: its second copy
    has the first one's MessageId, so the queue's duplicate detection drops it."""
    one, two = step(), step(now=NOW + timedelta(minutes=5))
    assert isinstance(one, Retry) and isinstance(two, Retry) and one.message_id == two.message_id


def test_past_the_window_it_gives_up_with_the_count_and_the_last_reason() -> None:
    over = step({ATTEMPT: 30, FIRST_TRIED: NOW.isoformat()}, now=NOW + timedelta(hours=24, seconds=1))
    assert isinstance(over, GiveUp) and over.attempts == 30
    text = over.description("fhir-unavailable", "POST Patient kept failing (HTTP 503) after 5 tries")
    assert "30 time(s) over 24.0 h" in text and "last reason fhir-unavailable" in text


def test_a_two_hour_outage_is_inside_the_window_and_retried_about_every_15_minutes() -> None:
    waited, attempt, when = timedelta(0), 0, NOW
    while waited < timedelta(hours=2):
        result = step({ATTEMPT: attempt, FIRST_TRIED: NOW.isoformat()}, now=when)
        assert isinstance(result, Retry)
        attempt, when = result.attempt, result.at
        waited = when - NOW
    assert 10 <= attempt <= 14


def test_unreadable_counters_start_over_rather_than_fail() -> None:
    result = step({ATTEMPT: "not a number", FIRST_TRIED: "yesterday"})
    assert isinstance(result, Retry) and result.attempt == 1


def test_long_message_ids_stay_within_the_service_bus_limit() -> None:
    result = step(message_id="x" * 128)
    assert isinstance(result, Retry) and len(result.message_id) == 128 and result.message_id.endswith("~r1")


def test_the_service_bus_message_of_a_copy_is_scheduled_with_its_properties() -> None:
    at = NOW + timedelta(seconds=15)
    message = servicebus_message(Copy(b'{"MessageName": "Create"}', "m-1~r1", at, "application/json", "c-1",
                                      {ATTEMPT: 1, ORIGINAL_ID: "m-1"}))
    assert (message.message_id, message.content_type, message.correlation_id) == ("m-1~r1", "application/json", "c-1")
    assert message.scheduled_enqueue_time_utc == at
    assert b"".join(message.body) == b'{"MessageName": "Create"}'
    assert message.application_properties == {ATTEMPT: 1, ORIGINAL_ID: "m-1"}


def test_the_window_counts_from_the_first_try_not_the_first_enqueue() -> None:
    """A backlog older than the window (the app stopped over a weekend): its first try, however long after its
    enqueue, starts the window, and a resubmitted message's copies keep their own ids (`RESUBMISSION`)."""
    first = step(now=NOW + timedelta(hours=30))
    assert isinstance(first, Retry) and first.properties[FIRST_TRIED] == (NOW + timedelta(hours=30)).isoformat()
    resubmitted = step({ORIGINAL_ID: "m-1", RESUBMISSION: "s1764489600"}, message_id="m-1~s1764489600")
    assert isinstance(resubmitted, Retry) and resubmitted.message_id == "m-1~s1764489600~r1"
    again = step(dict(resubmitted.properties), message_id=resubmitted.message_id)
    assert isinstance(again, Retry) and again.message_id == "m-1~s1764489600~r2"
