"""The KQL in docs/operations.md and in the alert rules reads only what the outcome record really carries.

A query on a field nobody logs returns nothing and raises no error, and an alert on a value that never occurs
never fires: so each `customDimensions[...]` field and each compared outcome, reason and settlement value is
checked against the code that writes the record.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest

from tests.infra.test_bicep import MODULES
from tests.infra.test_bicep import outcome_alert_queries as _alert_queries
from writeback import functions
from writeback.pipeline import Envelope, State
from writeback.reasons import Reason

REPO = Path(__file__).resolve().parents[2]
OPERATIONS = REPO / "docs" / "operations.md"
FUNCTIONS_SOURCE = (REPO / "writeback" / "functions.py").read_text(encoding="utf-8")

FIELD = re.compile(r"""\b(?:customDimensions|Properties)(?:\[\s*["']([^"']+)["']\s*\]|\.([A-Za-z_]\w*))""")


def doc_queries() -> list[str]:
    return re.findall(r"```kusto\n(.*?)```", OPERATIONS.read_text(encoding="utf-8"), flags=re.S)


def all_queries() -> dict[str, str]:
    found = {f"operations.md #{i + 1}": q for i, q in enumerate(doc_queries())}
    found.update({f"alerts.bicep {name}": q for name, q in _alert_queries().items()})
    return found


def record_fields() -> set[str]:
    """The fields of the outcome record: those `dimensions()` always sets, and those the adapter adds in some
    cases (passed to it or to the logger by name in writeback/functions.py)."""
    always = set(functions.dimensions(Envelope(b"{}"), None, "complete"))
    sometimes = {name for name in ("retry_attempt", "retry_at", "messages", "message_ids", "error")
                 if f'"{name}"' in FUNCTIONS_SOURCE}
    return always | sometimes


def compared_values(query: str, column: str) -> set[str]:
    """String literals a query compares `column` (or its customDimensions field) with."""
    ref = rf'(?:\b{column}\b|customDimensions\["{column}"\]\)?)'
    values = set(re.findall(rf'{ref}\s*(?:==|!=|=~)\s*"([^"]*)"', query))
    for group in re.findall(rf"{ref}\s*!?in\s*\(([^)]*)\)", query):
        values |= set(re.findall(r'"([^"]*)"', group))
    return values


def test_there_are_queries_and_alerts_to_check() -> None:
    queries = all_queries()
    assert len(doc_queries()) >= 6
    assert sum(name.startswith("alerts.bicep") for name in queries) == 2


@pytest.mark.parametrize("name", sorted(all_queries()))
def test_every_field_a_query_reads_is_in_the_outcome_record(name: str) -> None:
    query = all_queries()[name]
    fields = {a or b for a, b in FIELD.findall(query)}
    unknown = fields - record_fields()
    assert not unknown, f"{name} reads {sorted(unknown)}, which no outcome record carries"


@pytest.mark.parametrize("name", sorted(all_queries()))
def test_every_value_a_query_compares_is_one_the_code_writes(name: str) -> None:
    query = all_queries()[name]
    outcomes = set(typing.get_args(State))
    assert compared_values(query, "outcome") <= outcomes, name
    assert compared_values(query, "reason") <= {r.value for r in Reason}, name
    for settlement in compared_values(query, "settlement"):
        assert f'"{settlement}"' in FUNCTIONS_SOURCE, f"{name}: settlement {settlement!r}"


def test_the_outcomes_query_reads_the_records_text_and_fields() -> None:
    """The shared `let Outcomes` picks the per-message records (their text starts with `writeback outcome=`)
    that arrived with their fields (a host forwarding the text alone is not counted twice)."""
    (let,) = [q for q in doc_queries() if q.startswith("let Outcomes")]
    assert 'message startswith "writeback outcome="' in let
    assert 'isnotempty(customDimensions["outcome"])' in let
    assert '"writeback outcome=%s ' in FUNCTIONS_SOURCE, "the record's text still starts that way"


def test_the_alerts_cover_dead_letters_and_configuration_faults() -> None:
    values = set()
    for query in _alert_queries().values():
        values |= compared_values(query, "outcome")
    assert values == {"dead-lettered", "config-error"}
    # and none is left on failed requests, which the function never produces
    assert "requests/failed" not in (MODULES / "alerts.bicep").read_text()
