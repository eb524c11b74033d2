"""Build Dataverse `RemoteExecutionContext` JSON bodies the way Dataverse serializes them.

Used to write the shipped samples, by tests, and by the benchmark's corpus generator: one encoder, so a
fixture can never drift from the wire format the parser is proven on with the public samples.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

CONTRACTS = "http://schemas.microsoft.com/xrm/2011/Contracts"
ORG_ID = "6a1f2f3e-5b7c-4c1d-9e8f-0a1b2c3d4e5f"


class Choice(int):
    """A Dataverse choice (OptionSetValue)."""


class Lookup:
    def __init__(self, table: str, row_id: str) -> None:
        self.table = table
        self.row_id = row_id


def date_value(when: datetime | date) -> str:
    if not isinstance(when, datetime):
        when = datetime(when.year, when.month, when.day, tzinfo=UTC)
    return f"/Date({int(when.timestamp() * 1000)})/"


def encode(value: object) -> object:
    if isinstance(value, Choice):
        return {"__type": f"OptionSetValue:{CONTRACTS}", "Value": int(value)}
    if isinstance(value, Lookup):
        return {"__type": f"EntityReference:{CONTRACTS}", "Id": value.row_id, "KeyAttributes": [],
                "LogicalName": value.table, "Name": None, "RowVersion": None}
    if isinstance(value, datetime | date):
        return date_value(value)
    if isinstance(value, Decimal):
        return {"__type": f"Money:{CONTRACTS}", "Value": float(value)}
    if isinstance(value, list):
        return [encode(v) for v in value]
    return value


def entity(table: str, row_id: str, attributes: Mapping[str, object], typed: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {
        "Attributes": [{"key": k, "value": encode(v)} for k, v in attributes.items()],
        "EntityState": None,
        "FormattedValues": [],
        "Id": row_id,
        "KeyAttributes": [],
        "LogicalName": table,
        "RelatedEntities": [],
        "RowVersion": None,
    }
    if typed:
        body = {"__type": f"Entity:{CONTRACTS}", **body}
    return body


def _primary(table: str, row_id: str, row: Mapping[str, object]) -> dict[str, object]:
    """What Dataverse's AsynchronousStepPrimaryName image holds: the row's id and primary name column."""
    out: dict[str, object] = {f"{table}id": row_id}
    if table == "contact":
        names = [row.get("firstname"), row.get("lastname")]
        out["fullname"] = " ".join(str(n) for n in names if n) or None
    return {k: v for k, v in out.items() if v is not None}


def context(
    message: str,
    table: str,
    row_id: str,
    target: Mapping[str, object] | None,
    *,
    pre: Mapping[str, object] | None = None,
    post: Mapping[str, object] | None = None,
    user_id: str = "3f0c6a2e-8d1b-4e5f-a6b7-c8d9e0f1a2b3",
    request_id: str | None = None,
    created: datetime | None = None,
    parent: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """`parent` is the ParentContext: the context of the operation this save ran inside (real bodies carry one,
    naming its own message and row, before the top-level PrimaryEntityId; see `inside`)."""
    request_id = request_id or str(uuid.uuid4())
    inputs = [] if target is None else [{"key": "Target", "value": entity(table, row_id, target)}]
    return {
        "BusinessUnitId": "0b1c2d3e-4f50-4a6b-8c7d-9e0f1a2b3c4d",
        "CorrelationId": str(uuid.uuid4()),
        "Depth": 1,
        "InitiatingUserId": user_id,
        "InputParameters": inputs,
        "IsExecutingOffline": False,
        "IsInTransaction": False,
        "IsOfflinePlayback": False,
        "IsolationMode": 1,
        "MessageName": message,
        "Mode": 1,
        "OperationCreatedOn": date_value(created or datetime.now(UTC)),
        "OperationId": str(uuid.uuid4()),
        "OrganizationId": ORG_ID,
        "OrganizationName": "contoso-health",
        "OutputParameters": [],
        "OwningExtension": {"Id": "2c28fe56-903e-eb11-a813-000d3ad9c2e1", "KeyAttributes": [],
                            "LogicalName": "sdkmessageprocessingstep",
                            "Name": f"Writeback: {message} of {table}", "RowVersion": None},
        "ParentContext": parent,
        # Dataverse's own image of an asynchronous step (Mode 1) comes first here, before the registered one (public
        # samples 02 and 03 carry it; with no image registered it is the only one).
        "PostEntityImages": [{"key": "AsynchronousStepPrimaryName", "value": entity(table, row_id, _primary(
            table, row_id, post or target or {}), False)},
            *([] if post is None else [{"key": "PostImage", "value": entity(table, row_id, post, False)}])],
        "PreEntityImages": [] if pre is None else [{"key": "PreImage", "value": entity(table, row_id, pre, False)}],
        "PrimaryEntityId": row_id,
        "PrimaryEntityName": table,
        "RequestId": request_id,
        "SecondaryEntityName": "none",
        "SharedVariables": [],
        "Stage": 40,
        "UserId": user_id,
    }


def inside(message: str, table: str, row_id: str, **kw: Any) -> dict[str, Any]:
    """A ParentContext: the operation a save ran inside, as Dataverse nests it (e.g. the Create of a patient whose
    plug-in created an identifier row; the same operation at stage 30, as the public samples show)."""
    return {**context(message, table, row_id, None, **kw), "Stage": 30}
