"""The suite's figures (docs/reliability.md): counted by the reliability and security tests, printed at the end."""

from __future__ import annotations

from collections import Counter

FIGURES: Counter[str] = Counter()

ORDER = [
    ("scenarios", "scenarios ending with the invariant check"),
    ("interleavings", "of which two-instance interleavings"),
    ("messages", "messages sent (broker and staged)"),
    ("deliveries", "deliveries (incl. redeliveries)"),
    ("written", "ended written"),
    ("skipped", "ended skipped (with reason)"),
    ("dead_lettered", "ended dead-lettered (with reason)"),
    ("max_delivery_exceeded", "of which MaxDeliveryCountExceeded"),
    ("faults_injected", "faults injected (bundle and entry faults fired + outages)"),
    ("outages", "outages (Azurite stopped / token endpoint down)"),
    ("concurrent_writes_412", "writes by another system between our read and PUT"),
    ("versions_written", "versions we wrote, each checked for its one Provenance"),
    ("lost", "lost (unsettled, final state differs, version without Provenance)"),
    ("duplicated", "duplicated (settled twice, second resource or Provenance)"),
    ("fuzz_messages", "fuzzed messages planned"),
    ("fuzz_unhandled", "unhandled exceptions in fuzzing"),
    ("canary_paths", "canary paths run"),
    ("canary_places", "places searched for canaries"),
    ("leaked", "leaked"),
]


def report() -> str:
    width = max(len(label) for _, label in ORDER)
    lines = ["reliability figures:"]
    lines += [f"  {label:<{width}}  {FIGURES[key]}" for key, label in ORDER]
    extra = sorted(set(FIGURES) - {key for key, _ in ORDER})
    lines += [f"  {key:<{width}}  {FIGURES[key]}" for key in extra]
    return "\n".join(lines)
