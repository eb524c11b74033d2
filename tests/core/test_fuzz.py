"""Property-based: whatever arrives on the queue, `plan_message` answers with a decision, never an exception.

Inputs are arbitrary JSON and bytes, and mutations of the four public Dataverse bodies and the shipped samples:
dropped keys, swapped value types, wrong `__type`s, huge strings, deep nesting, unicode edge cases, truncation.
Derandomized and without an example database, so CI sees the same examples every run.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devtools.messages import CONTRACTS
from devtools.samples import SAMPLES, SYNC_USER
from writeback.decide import Decision, plan_message
from writeback.fhir_client import encode
from writeback.maps import load_maps
from writeback.reasons import Reason
from writeback.settings import DEFAULT_MAPS_DIR, Settings

PUBLIC = Path(__file__).resolve().parents[3] / "shared" / "samples" / "dataverse-public"
SEED_FILES = sorted(PUBLIC.glob("*.json")) + sorted(SAMPLES.glob("*.json"))
SEED_TEXTS = [p.read_text(encoding="utf-8") for p in SEED_FILES]
SEEDS: list[Any] = []
for _text in SEED_TEXTS:
    with contextlib.suppress(ValueError):  # the broken sample: used as text only
        SEEDS.append(json.loads(_text))

MAPS = load_maps(DEFAULT_MAPS_DIR)
PLANNING = [Settings(), Settings(ignore_user_ids=frozenset({SYNC_USER}))]
CLAIMS = "http://schemas.microsoft.com/xrm/2011/Claims/"
CORE_REASONS = {
    Reason.NO_ENTITY_MAP, Reason.UNSUPPORTED_MESSAGE, Reason.CONSENT_WITHHELD, Reason.ECHO, Reason.NO_CHANGE,
    Reason.INVALID_CONTACT_TYPE, Reason.MISSING_PARENT_LINK, Reason.INVALID_RESOURCE, Reason.UNSUPPORTED_FORMAT,
    Reason.MALFORMED_MESSAGE, Reason.PAYLOAD_DROPPED,
}
NEST = "\u0001nest\u0001"  # stands for a deeply nested value, spliced into the text after json.dumps

FUZZ = settings(max_examples=400, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

UNICODE = ["\ud800", "\udfff", "\ud83d", "\ufeff", "\u0000", "\u202e", "\u200b", "\U0001f600", "e\u0301",
           "\uffff", "\U0001d4b3", "\u2028", "\u0130", "\u00df", "\u3000", "\x0b", "Ω" * 50]
TYPE_NAMES = [f"{t}:{CONTRACTS}" for t in ("OptionSetValue", "Money", "EntityReference", "Entity",
                                           "EntityCollection", "AliasedValue", "BooleanManagedProperty")]
TYPE_NAMES += ["Guid:#System", "DateTime:#System", "Decimal:#System", "Int32:#System", "Boolean:#System",
               "String:#System", "OptionSetValue", "Entity:", ":", "", "Money:#System"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(), st.text(max_size=20), st.sampled_from(UNICODE),
    st.sampled_from(["/Date(1527757524000)/", "/Date(-62135596800000-2359)/", "/Date(999999999999999)/",
                     "/Date(1527757524000+9999)/", "1987-07-25", "0c9a1e52-7b1d-4f6e-9a3c-5d2e8f4b6a10",
                     "sNaN", "1E+1000000", "Infinity", "Create", "Update", "Delete", "contact",
                     "msemr_medicalidentifier", "msemr_encounter", "msemr_observation"]),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.sampled_from(["__type", "__value", "Value", "Id", "LogicalName", "Attributes", "key",
                                         "value", "Entities", "Name"]) | st.text(max_size=6), inner, max_size=4),
        st.fixed_dictionaries({"__type": st.sampled_from(TYPE_NAMES), "Value": inner}),
        st.fixed_dictionaries({"__type": st.sampled_from(TYPE_NAMES), "__value": inner}),
        st.fixed_dictionaries({"__type": st.sampled_from(TYPE_NAMES), "Id": inner, "LogicalName": inner}),
    ),
    max_leaves=12,
)
# The awkward cases a column can hold, as Dataverse would type them: numbers no FHIR decimal takes, lone
# surrogates, out-of-range dates, ids that are no GUID.
AWKWARD = ["sNaN", "NaN", "-Infinity", "1E+1000000", "1e-1000000", "-0", "72.50", "9" * 40, "", " ", "\ud800",
           "\udfff", "not-a-guid", "/Date(0)/", "/Date(-62135596800000)/", "/Date(253402300799999+1400)/",
           "1987-02-30", "0c9a1e52-7b1d-4f6e-9a3c-5d2e8f4b6a10"]
awkward = st.sampled_from(AWKWARD)
typed_values = st.one_of(
    st.builds(lambda t, v: {"__type": t, "__value": v},
              st.sampled_from(["Decimal:#System", "Guid:#System", "DateTime:#System", "Int32:#System"]), awkward),
    st.builds(lambda t, v: {"__type": f"{t}:{CONTRACTS}", "Value": v},
              st.sampled_from(["Money", "OptionSetValue"]), awkward | st.integers(935000000, 935000012)),
    st.builds(lambda i, n: {"__type": f"EntityReference:{CONTRACTS}", "Id": i, "LogicalName": n},
              st.uuids().map(str) | awkward, st.sampled_from(["contact", "msemr_encounter"]) | awkward),
)
column_values = st.one_of(typed_values, awkward, json_values)
properties = st.one_of(
    st.none(),
    st.dictionaries(
        st.sampled_from(["MessageMaxSizeExceeded", CLAIMS + "User", CLAIMS + "InitiatingUser",
                         CLAIMS + "EntityLogicalName", CLAIMS + "RequestName", "x"]),
        st.one_of(scalars, st.just(SYNC_USER), st.just(SYNC_USER.upper())),
        max_size=3,
    ),
)


def check(decision: Decision) -> None:
    assert decision.decision in ("write", "skip", "reject")
    if decision.decision == "write":
        assert decision.reason is None and decision.plan is not None
        assert decision.plan.resource["resourceType"] == decision.resource_type
    else:
        assert isinstance(decision.reason, Reason), decision.reason
        assert decision.reason in CORE_REASONS
        assert decision.reason.kind.value == decision.decision  # settlement follows the code's class
        assert decision.plan is None
    assert isinstance(decision.detail, str) and 0 < len(decision.detail) <= 1000
    # What the dry run prints and the outcome log stores: strict JSON, encodable as UTF-8.
    encode(decision.as_json())  # what `python -m writeback plan` prints must always encode


def run(body: bytes | str, props: dict[str, Any] | None = None, which: int = 0,
        content_type: str | None = None) -> Decision:
    decision = plan_message(body, props, MAPS, PLANNING[which], content_type)
    check(decision)
    return decision


# ---- the seeds themselves ----------------------------------------------------------------------


def test_seeds_plan_without_error():
    assert len(SEED_FILES) >= 14
    for text in SEED_TEXTS:
        run(text.encode("utf-8"))
        run(text)


# ---- arbitrary input ---------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=200), properties)
def test_arbitrary_bytes(body, props):
    run(body, props)


@FUZZ
@given(json_values, properties, st.booleans())
def test_arbitrary_json(value, props, as_bytes):
    text = json.dumps(value)
    run(text.encode("utf-8") if as_bytes else text, props)


@FUZZ
@given(
    st.fixed_dictionaries({}, optional={
        "MessageName": st.sampled_from(["Create", "Update", "Delete", "Assign"]) | json_values,
        "PrimaryEntityName": st.sampled_from(sorted(MAPS.maps)) | json_values,
        "PrimaryEntityId": st.uuids().map(str) | json_values,
        "InitiatingUserId": st.just(SYNC_USER) | json_values,
        "InputParameters": st.lists(st.fixed_dictionaries({"key": st.just("Target"), "value": json_values}),
                                    max_size=2) | json_values,
        "PreEntityImages": st.lists(st.fixed_dictionaries({"key": st.text(max_size=5), "value": json_values}),
                                    max_size=2) | json_values,
        "PostEntityImages": json_values,
        "Depth": json_values,
        "OperationCreatedOn": json_values,
    }),
    properties,
    st.integers(0, 1),
)
def test_arbitrary_remote_execution_context(body, props, which):
    run(json.dumps(body), props, which)


# ---- mutated seeds -----------------------------------------------------------------------------


def locations(node: Any) -> list[tuple[Any, Any]]:
    """Every (container, key-or-index) in a JSON tree."""
    found: list[tuple[Any, Any]] = []
    stack = [node]
    while stack:
        current = stack.pop()
        items = current.items() if isinstance(current, dict) else enumerate(current) if isinstance(current, list) \
            else ()
        for key, child in items:
            found.append((current, key))
            stack.append(child)
    return found


def hot_locations(node: Any) -> list[tuple[Any, Any]]:
    """Where a mutation matters most: the context's own fields, and the name and value of every column."""
    found = [(node, key) for key in node] if isinstance(node, dict) else []
    for parent, key in locations(node):
        if key == "value" and isinstance(parent, dict) and "key" in parent:
            found += [(parent, "key"), (parent, "value")]
    return found


def swapped(value: Any) -> Any:
    """The same content as another JSON type."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return [value] if not value.lstrip("-").isdigit() else int(value)
    if isinstance(value, list):
        return {str(i): v for i, v in enumerate(value)}
    if isinstance(value, dict):
        return list(value.values())
    return {}


MUTATIONS = ["drop", "swap", "replace", "type", "huge", "nest", "unicode", "rename", "null", "field", "field"]
# The context's own fields: the ones the parser and the decision read.
FIELDS = ["MessageName", "PrimaryEntityName", "PrimaryEntityId", "InitiatingUserId", "UserId", "InputParameters",
          "PreEntityImages", "PostEntityImages", "OperationCreatedOn", "Depth"]
# Seeds a map exists for come twice: mutations there reach the decision and the mapping, not only the parser.
MAPPED_SEEDS = [s for s in SEEDS if isinstance(s, dict) and s.get("PrimaryEntityName") in MAPS.maps]
WEIGHTED_SEEDS = SEEDS + MAPPED_SEEDS


def serialize(data: st.DataObject, body: Any, nest_depth: int) -> bytes | str:
    """JSON text of `body`, perhaps deeply nested at NEST, perhaps truncated; bytes unless only a str can hold it."""
    ascii_only = data.draw(st.booleans(), label="ascii")
    text = json.dumps(body, ensure_ascii=ascii_only)
    if nest_depth:
        opener = data.draw(st.sampled_from(["[", '{"a":', f'{{"__type":"Entity:{CONTRACTS}","LogicalName":"x",'
                                                               '"Attributes":[{"key":"k","value":']), label="opener")
        closer = {"[": "]", '{"a":': "}"}.get(opener, "}]}")
        text = text.replace(json.dumps(NEST, ensure_ascii=ascii_only), opener * nest_depth + "1" +
                            closer * nest_depth, 1)
    if data.draw(st.sampled_from([False] * 7 + [True]), label="truncate"):
        text = text[: data.draw(st.integers(0, len(text)), label="cut")]
    if data.draw(st.booleans(), label="as text"):
        return text
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return text  # a raw lone surrogate: only a str can carry it


@FUZZ
@given(st.data())
def test_mutated_bodies(data):
    body = json.loads(json.dumps(data.draw(st.sampled_from(WEIGHTED_SEEDS), label="seed")))
    nest_depth = 0
    for _ in range(data.draw(st.integers(1, 5), label="mutations")):
        where = hot_locations(body) if data.draw(st.booleans(), label="hot") else locations(body)
        if not where:
            break
        parent, key = data.draw(st.sampled_from(where), label="location")
        kind = data.draw(st.sampled_from(MUTATIONS), label="mutation")
        if kind == "drop":
            del parent[key]
        elif kind == "swap":
            parent[key] = swapped(parent[key])
        elif kind == "replace":
            parent[key] = data.draw(column_values, label="value")
        elif kind == "type":
            typed = [(p, k) for p, k in locations(body) if k == "__type"]
            if typed:
                p, k = data.draw(st.sampled_from(typed), label="typed")
                p[k] = data.draw(st.sampled_from(TYPE_NAMES) | scalars, label="type name")
        elif kind == "huge":
            parent[key] = "x" * data.draw(st.sampled_from([5_000, 200_000, 1_100_000]), label="size")
        elif kind == "nest" and not nest_depth:
            nest_depth = data.draw(st.sampled_from([13, 40, 1_000, 100_000]), label="depth")
            parent[key] = NEST
        elif kind == "unicode":
            parent[key] = data.draw(st.sampled_from(UNICODE), label="text") + str(parent[key])[:20]
        elif kind == "rename" and isinstance(parent, dict):
            parent[data.draw(st.sampled_from([str(key).lower(), str(key).upper(), f"{key}\u200b", "", "x" * 5000]),
                             label="name")] = parent.pop(key)
        elif kind == "null":
            parent[key] = None
        elif kind == "field" and isinstance(body, dict):
            name = data.draw(st.sampled_from(FIELDS), label="field")
            how = data.draw(st.sampled_from(["huge", "unicode", "value"]), label="how")
            current = body.get(name)
            kept = current if isinstance(current, str) else ""
            if how == "huge":
                body[name] = kept + "t" * 3000
            elif how == "unicode":  # e.g. a table name with a lone surrogate on its end
                body[name] = kept + data.draw(st.sampled_from(UNICODE), label="text")
            else:
                body[name] = data.draw(awkward | typed_values | json_values, label="field value")
    run(serialize(data, body, nest_depth), data.draw(properties, label="properties"),
        data.draw(st.integers(0, 1), label="settings"))


def images(body: dict[str, Any]) -> list[list[Any]]:
    """The attribute lists of the Target and the images of a seed."""
    found = []
    for collection in ("InputParameters", "PreEntityImages", "PostEntityImages"):
        for item in body.get(collection) or []:
            entity = item.get("value")
            if isinstance(entity, dict) and isinstance(entity.get("Attributes"), list):
                found.append(entity["Attributes"])
    return found


@FUZZ
@given(st.data())
def test_any_value_in_any_mapped_column(data):
    """Every mapped column, in the Target or an image, holding any value kind: a decision, never a crash."""
    body = json.loads(json.dumps(data.draw(st.sampled_from(MAPPED_SEEDS), label="seed")))
    entity_map = MAPS.maps[body["PrimaryEntityName"]]
    columns = sorted({a.column for a in entity_map.attributes if a.column} |
                     {c for c in (entity_map.choice_column, entity_map.expansion and entity_map.expansion.parent_link,
                                  "msemr_azurefhirsyncenabled", entity_map.fhir_id_column) if c})
    lists = images(body)
    for _ in range(data.draw(st.integers(1, 3), label="columns")):
        attributes = data.draw(st.sampled_from(lists), label="image")
        column = data.draw(st.sampled_from(columns), label="column")
        value = data.draw(column_values, label="value")
        attributes[:] = [a for a in attributes if a.get("key") != column] + [{"key": column, "value": value}]
    run(serialize(data, body, 0), None, data.draw(st.integers(0, 1), label="settings"))


# ---- a systematic grid: every awkward value in every mapped column ------------------------------

GRID_VALUES: list[Any] = [
    *AWKWARD, None, True, False, 0, -1, 2**63, 10**30, 1.5, 1e308, [], {}, ["a"], [None],
    *({"__type": t, "__value": v} for t in ("Decimal:#System", "DateTime:#System", "Guid:#System", "Int32:#System")
      for v in AWKWARD),
    *({"__type": f"{t}:{CONTRACTS}", "Value": v} for t in ("Money", "OptionSetValue") for v in AWKWARD),
    *({"__type": f"EntityReference:{CONTRACTS}", "Id": v, "LogicalName": "contact"} for v in AWKWARD),
    {"__type": f"OptionSetValue:{CONTRACTS}", "Value": 935000099},
    {"__type": f"EntityReference:{CONTRACTS}", "Id": SYNC_USER, "LogicalName": "systemuser"},
    {"__type": f"EntityCollection:{CONTRACTS}", "Entities": []},
    {"__type": f"Entity:{CONTRACTS}", "LogicalName": "contact", "Id": None, "Attributes": []},
    {"__type": "Unknown:http://example.org"},
]
GRID_SEEDS = ["01_patient_create.json", "02_patient_update_phone.json", "04_medicalidentifier_create.json",
              "05_encounter_create.json", "06_observation_create.json"]


@pytest.mark.parametrize("seed", GRID_SEEDS)
def test_every_awkward_value_in_every_mapped_column(seed):
    original = json.loads((SAMPLES / seed).read_text(encoding="utf-8"))
    entity_map = MAPS.maps[original["PrimaryEntityName"]]
    columns = {a.column for a in entity_map.attributes if a.column}
    columns |= {entity_map.choice_column or "", entity_map.fhir_id_column, "msemr_azurefhirsyncenabled"}
    if entity_map.expansion:
        columns.add(entity_map.expansion.parent_link)
    outcomes: set[tuple[str, Reason | None]] = set()
    for placement in range(len(images(original))):
        for column in sorted(columns - {""}):
            for value in GRID_VALUES:
                body = json.loads(json.dumps(original))
                attributes = images(body)[placement]
                attributes[:] = [a for a in attributes if a.get("key") != column] + [{"key": column, "value": value}]
                decision = run(json.dumps(body))
                outcomes.add((decision.decision, decision.reason))
    # The grid reaches the mapping, not only the parser.
    assert ("reject", Reason.INVALID_RESOURCE) in outcomes and ("reject", Reason.MALFORMED_MESSAGE) in outcomes
    assert any(decision == "write" for decision, _ in outcomes)


@FUZZ
@given(st.data())
def test_mutated_attribute_values_never_appear_in_the_detail(data):
    """Whatever a column holds, the decision's detail never repeats it (it may be patient data)."""
    index = data.draw(st.integers(0, len(SEEDS) - 1), label="seed")
    body = json.loads(json.dumps(SEEDS[index]))
    pairs = [(p, k) for p, k in locations(body) if k == "value" and isinstance(p, dict) and "key" in p
             and isinstance(p.get("key"), str) and not p["key"].endswith("Image") and p["key"] != "Target"]
    if not pairs:
        return
    canary = "Zq" + data.draw(st.text(alphabet="0123456789", min_size=6, max_size=6), label="canary")
    for parent, key in data.draw(st.lists(st.sampled_from(pairs), min_size=1, max_size=4, unique_by=id),
                                 label="columns"):
        parent[key] = data.draw(st.sampled_from([
            canary, f"{canary}  x", f"1987-02-3{canary}", f"/Date({canary})/",
            {"__type": f"OptionSetValue:{CONTRACTS}", "Value": canary},
            {"__type": f"EntityReference:{CONTRACTS}", "Id": canary, "LogicalName": "contact"},
            {"__type": "Guid:#System", "__value": canary},
            {"__type": "DateTime:#System", "__value": canary},
            {"__type": "Decimal:#System", "__value": canary},
            {"__type": f"Money:{CONTRACTS}", "Value": canary},
        ]), label="value")
    decision = run(json.dumps(body), None, data.draw(st.integers(0, 1), label="settings"))
    if decision.decision != "write":
        assert canary not in decision.detail


@FUZZ
@given(st.sampled_from(SEED_TEXTS), st.sampled_from([None, "application/json", "application/xml",
                                                       "application/msbin1", "text/plain", "", ";", "JSON"]),
       st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "latin-1"]))
def test_encodings_and_content_types(text, content_type, encoding):
    try:
        body = text.encode(encoding)
    except UnicodeEncodeError:
        return
    decision = plan_message(body, None, MAPS, PLANNING[1], content_type)
    check(decision)
    if content_type in ("application/xml", "application/msbin1") or encoding == "utf-16":
        assert decision.reason is Reason.UNSUPPORTED_FORMAT
