"""`validation.validate` goes element by element and remembers valid items: it must refuse exactly what
fhir.resources' whole resource model refuses, whatever it has seen before.

The oracle is the model itself (`model_validate` of the whole resource, missing elements forgiven as a partial
resource is), run over every resource the bench corpus plans and over mutations of them of the kinds a Dataverse
row or a map mistake produces.
"""

from __future__ import annotations

import copy
import json
import random
from decimal import Decimal
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from bench.corpus import generate
from writeback import validation
from writeback.decide import plan_message
from writeback.errors import WritebackError
from writeback.maps import load_maps
from writeback.reasons import Reason
from writeback.settings import DEFAULT_MAPS_DIR, Settings


def model_refuses(resource: dict[str, Any]) -> bool:
    """The whole model's verdict on a partial resource (the oracle)."""
    try:
        get_fhir_model_class(resource["resourceType"]).model_validate(copy.deepcopy(resource))
    except ValidationError as exc:
        return any("missing" not in str(e.get("type", "")) for e in exc.errors())
    except (ValueError, TypeError):
        return True
    return False


def refuses(resource: dict[str, Any]) -> bool:
    try:
        validation.validate(copy.deepcopy(resource), partial=True)
    except WritebackError as exc:
        assert exc.reason is Reason.INVALID_RESOURCE
        return True
    return False


def planned_resources() -> list[dict[str, Any]]:
    maps, settings = load_maps(DEFAULT_MAPS_DIR), Settings.for_planning({})
    out = []
    for envelope in generate(400, seed=3):
        decision = plan_message(envelope.body, None, maps, settings)
        if decision.plan is not None:
            out.append(decision.plan.resource)
    return out


BAD_LEAVES: list[Any] = ["", "  ", "1946-13-45", "2026-11-02T25:00:00Z", "not a code\n", None, [], {}, 12,
                         Decimal("1.5"), True, "x" * 3, {"unknown": 1}]


def mutations(resource: dict[str, Any], rng: random.Random) -> list[dict[str, Any]]:
    """The resource with one leaf, item or element replaced by something a row or a map can produce."""
    leaves: list[tuple[Any, Any]] = []  # (container, key) of every leaf

    def walk(node: Any) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in list(items):
            if isinstance(value, dict | list):
                leaves.append((node, key))
                walk(value)
            elif key != "resourceType":
                leaves.append((node, key))

    out = []
    for _ in range(12):
        changed = copy.deepcopy(resource)
        leaves.clear()
        walk(changed)
        container, key = rng.choice(leaves)
        container[key] = copy.deepcopy(rng.choice(BAD_LEAVES))
        out.append(changed)
    extra = copy.deepcopy(resource)
    extra["notAnElement"] = "x"
    out.append(extra)
    nulls = copy.deepcopy(resource)
    listed = [k for k, v in nulls.items() if isinstance(v, list)]
    if listed:
        nulls[listed[0]] = [*nulls[listed[0]], None]
        out.append(nulls)
    return out


@pytest.fixture(scope="module")
def resources() -> list[dict[str, Any]]:
    return planned_resources()


def test_the_corpus_is_valid_both_ways(resources: list[dict[str, Any]]) -> None:
    assert len(resources) > 300
    assert not [r for r in resources if model_refuses(r)]
    assert not [r for r in resources if refuses(r)]


def primitive_refusal(resource: dict[str, Any]) -> str | None:
    """Why `validate` refuses a resource for a FHIR rule the models leave out (a uri holding whitespace, a string
    holding a control character, a code outside its required value set, a value of another JSON type than its
    element's, which the models coerce, a null in a repeating primitive without its `_` sibling's item, which the
    models take), when that is why; else None."""
    try:
        validation.validate(copy.deepcopy(resource), partial=True)
    except WritebackError as exc:
        return exc.detail if any(why in exc.detail for why in ("holds whitespace", "holds a control character",
                                                               "not a code of its required value set",
                                                               "(not a JSON ", "(null, with nothing")) else None
    return None


def test_refuses_what_the_whole_model_refuses(resources: list[dict[str, Any]]) -> None:
    """Each mutated resource is validated twice (the second time after its valid items were remembered): the
    verdict is the model's both times, except where FHIR's primitive rules the models leave out refuse more
    (`test_primitive_rules_refuse_what_the_models_let_through`)."""
    rng = random.Random(5)
    disagreements = []
    refused = stricter = json_typed = nulls = 0
    for resource in resources[:150]:
        for changed in mutations(resource, rng):
            expected = model_refuses(changed)
            refused += expected
            if not expected and (why := primitive_refusal(changed)):
                stricter += 1
                if "(not a JSON " in why:
                    json_typed += 1
                elif "(null, with nothing" in why:
                    nulls += 1
                else:
                    text = json.dumps(changed, default=str)
                    assert any(c in text for c in (" ", "\\n", "\\t", "\\u00")), changed
                expected = True
            for attempt in (1, 2):
                if refuses(changed) != expected:
                    disagreements.append((attempt, expected, changed))
    assert refused > 500  # the mutations do reach the validators
    assert stricter < refused // 10  # the exception stays one
    assert json_typed  # (a number where a dateTime goes: the models take it as a time)
    assert nulls  # (`line: [None]`: the models take it)
    assert not disagreements[:3]


@pytest.mark.parametrize(("resource", "where"), [
    ({"resourceType": "Patient", "identifier": [{"system": "MRN 0042731", "value": "1"}]}, "identifier[0].system"),
    ({"resourceType": "Patient", "extension": [{"url": "http://example.org/a b", "valueString": "x"}]},
     "extension[0].url"),
    ({"resourceType": "Patient", "name": [{"given": ["Wren\x07"]}]}, "name[0].given[0]"),
    ({"resourceType": "Observation", "status": "final", "code": {"text": "t"}, "valueString": "a\x1bb"},
     "valueString"),
])
def test_primitive_rules_refuse_what_the_models_let_through(resource: dict[str, Any], where: str) -> None:
    assert not model_refuses(resource)
    assert (primitive_refusal(resource) or "").startswith(f"{resource['resourceType']}.{where} is invalid")


def test_primitive_rules_let_through_what_fhir_allows() -> None:
    ok = {"resourceType": "Patient", "name": [{"given": ["Anne Marie"], "family": "O'Neil\tSmith"}],
          "identifier": [{"system": "urn:oid:1.2.3", "value": "A 1"}], "address": [{"line": ["1 Main St\nApt 2"]}]}
    assert not refuses(ok)


def test_a_remembered_item_does_not_excuse_a_changed_one() -> None:
    """An Observation valid once; the same Observation with its quantity's value made text is refused (a FHIR
    decimal is a JSON number; the model coerces the text, but what is sent is the text), and the valid one is still
    accepted after it."""
    good = {"resourceType": "Observation", "status": "final",
            "valueQuantity": {"value": Decimal("72.50"), "unit": "kg"}}
    bad = {**good, "valueQuantity": {"value": "72.50", "unit": "kg"}}
    assert not refuses(good)
    assert not model_refuses(bad)
    assert primitive_refusal(bad) == "Observation.valueQuantity.value is invalid (not a JSON number)"
    assert not refuses(good)


@pytest.mark.parametrize(("valid", "bad", "where"), [
    ({"telecom": [{"system": "email", "value": "a@example.org"}]},
     {"telecom": [{"system": "email", "value": ""}]}, "telecom[0].value"),
    ({"name": [{"family": "Moreau", "given": ["Anne", "Lise"]}]},
     {"name": [{"family": "Moreau", "given": ["Anne", ""]}]}, "name[0].given[1]"),
    ({"identifier": [{"system": "urn:oid:1.2.3", "value": "1",
                      "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                           "code": "MR"}]}}]},
     {"identifier": [{"system": "urn:oid:1.2.3", "value": "1",
                      "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                           "code": " MR"}]}}]}, "identifier[0].type.coding[0].code"),
    ({"address": [{"period": {"start": "2026-11-02"}}]},
     {"address": [{"period": {"start": "2026-13-45"}}]}, "address[0].period.start"),
    # A contained resource's elements are those of the type it names, not of Resource (found by reading the
    # change: the second Practitioner raised KeyError instead of being validated).
    ({"contained": [{"resourceType": "Practitioner", "id": "p1", "name": [{"family": "Moreau"}]}]},
     {"contained": [{"resourceType": "Practitioner", "id": "p1", "name": [{"family": 7}]}]}, "contained"),
])
def test_an_item_shaped_like_a_valid_one_is_refused_for_its_values(valid: dict[str, Any], bad: dict[str, Any],
                                                                    where: str) -> None:
    """Items of a shape found valid have their values checked by the model's types for them, not again by the
    whole model: a bad value in that shape is still refused, and the error is the model's, naming the element."""
    validation.forget()
    assert not refuses({"resourceType": "Patient", **valid})
    resource = {"resourceType": "Patient", **bad}
    assert model_refuses(resource)
    with pytest.raises(WritebackError) as caught:
        validation.validate(resource, partial=True)
    assert caught.value.detail.startswith(f"Patient.{where}")
    assert not refuses({"resourceType": "Patient", **valid})
    if where == "contained":  # another valid value in the same shape
        assert not refuses({"resourceType": "Patient", "contained": [{**valid["contained"][0], "id": "p2"}]})


def test_the_error_names_the_element_not_the_value() -> None:
    with pytest.raises(WritebackError) as caught:
        validation.validate({"resourceType": "Patient", "birthDate": "1946-13-45",
                             "name": [{"family": "Moreau"}, {"family": 7}]}, partial=True)
    assert "1946" not in caught.value.detail and "Moreau" not in caught.value.detail
    assert caught.value.detail.startswith("Patient.")


def test_a_required_owned_element_left_empty_names_its_column() -> None:
    with pytest.raises(WritebackError) as caught:
        validation.validate({"resourceType": "Observation", "status": "final"}, partial=True,
                            required={"code": "msemr_code", "status": "msemr_status"})
    assert caught.value.detail == "Observation.code is required, and column msemr_code that gives it is empty"


def test_what_the_product_built_is_taken_as_valid_only_where_its_datatype_goes() -> None:
    """A lookup's identifier-only reference is not validated again under a Reference element; put by a map
    mistake under an element of another type, it is refused as the model refuses it."""
    reference = {"type": "Patient",
                 "identifier": {"system": "urn:dataverse:contact", "value": "b9f1c0de-0000-4000-8000-000000000001"}}
    ours = {"Reference": (reference,)}
    validation.validate({"resourceType": "Observation", "subject": reference}, partial=True, ours=ours)
    misplaced = {"resourceType": "Observation", "status": reference}
    assert model_refuses(misplaced)
    with pytest.raises(WritebackError) as caught:
        validation.validate(misplaced, partial=True, ours=ours)
    assert caught.value.detail.startswith("Observation.status is invalid")


def test_a_required_choice_element_is_required_like_any_other() -> None:
    """MedicationRequest.medication[x] is 1..1: a whole resource without it is refused; a partial one only when
    the map owns it (its column is empty), as for a required element."""
    whole = {"resourceType": "MedicationRequest", "status": "active", "intent": "order",
             "subject": {"reference": "Patient/p1"}}
    assert model_refuses(whole)
    with pytest.raises(WritebackError):
        validation.validate(whole, partial=False)
    validation.validate(whole, partial=True)  # the map does not own it: the server's copy holds it
    with pytest.raises(WritebackError) as caught:
        validation.validate(whole, partial=True, required={"medicationCodeableConcept": "msemr_medication"})
    assert caught.value.detail == ("MedicationRequest.medication[x] is required, and column msemr_medication that "
                                   "gives it is empty")


def test_an_unknown_name_from_the_value_stays_out_of_the_error() -> None:
    """JSON text in a column that a map puts on a complex element: its keys are the patient's data, not element
    names."""
    resource = {"resourceType": "Patient", "maritalStatus": {"Jean Moreau 1946-03-02": "x"}}
    assert model_refuses(resource)
    with pytest.raises(WritebackError) as caught:
        validation.validate(resource, partial=True)
    assert "Jean" not in caught.value.detail and "1946" not in caught.value.detail
    assert caught.value.detail == "Patient.maritalStatus holds an element FHIR does not define (extra_forbidden)"


@pytest.mark.parametrize(("resource", "where"), [
    ({"resourceType": "Observation", "status": "finished", "code": {"text": "t"}}, "status"),
    ({"resourceType": "Encounter", "status": "final", "class": {"code": "AMB"}}, "status"),
    ({"resourceType": "Patient", "gender": "man"}, "gender"),
    ({"resourceType": "Patient", "telecom": [{"system": "phone", "use": "cell", "value": "1"}]}, "telecom[0].use"),
    ({"resourceType": "Patient", "identifier": [{"use": "primary", "value": "1"}]}, "identifier[0].use"),
])
def test_a_code_outside_its_required_value_set_is_refused(resource: dict[str, Any], where: str) -> None:
    """The models accept any code, and a value that reached `status` without a checked value map (a copied
    column) was stored by the server: "finished" on an Observation."""
    assert not model_refuses(resource)
    with pytest.raises(WritebackError) as caught:
        validation.validate(copy.deepcopy(resource), partial=True)
    assert caught.value.detail.startswith(f"{resource['resourceType']}.{where} is invalid (not a code of its required")


def test_every_code_of_a_truncated_value_set_is_accepted() -> None:
    """fhir.resources lists Observation.status as "registered | preliminary | final | amended +": the codes after
    the "+" are FHIR's too."""
    for status in ("corrected", "cancelled", "entered-in-error", "unknown"):
        validation.validate({"resourceType": "Observation", "status": status}, partial=True)
    validation.validate({"resourceType": "Encounter", "status": "entered-in-error"}, partial=True)


def test_a_whole_item_missing_an_element_fhir_requires_is_refused() -> None:
    """`whole` (the row's whole state): an item without an element the model requires of it is refused as the model
    refuses it; without `whole` (a change naming some columns only) the rest may be on the server."""
    resource = {"resourceType": "Observation", "status": "final", "code": {"text": "t"},
                "component": [{"valueQuantity": {"value": Decimal("1.5")}}]}
    with pytest.raises(ValidationError, match=r"component\.0\.code"):
        get_fhir_model_class("Observation").model_validate(copy.deepcopy(resource))
    validation.validate(copy.deepcopy(resource), partial=True)
    with pytest.raises(WritebackError) as caught:
        validation.validate(copy.deepcopy(resource), partial=True, whole=True)
    assert caught.value.detail == "Observation.component[0].code is invalid (missing)"


@pytest.mark.parametrize(("resource", "detail"), [
    # Validators of the models that raise plain errors: each came out of `validate` (and out of planning).
    ({"resourceType": "Patient", "contained": [{"resourceType": "Bogus", "id": "a"}]},
     "Patient.contained[0] is invalid (KeyError)"),
    ({"resourceType": "Patient", "extension": [{"url": "http://example.org/x", "valueUrl": 5}]},
     "Patient.extension[0].valueUrl is invalid (not a JSON string)"),
    ({"resourceType": "Observation", "_status": '"abc"'}, "Observation._status is invalid (not a JSON object)"),
    # Text holding JSON where an object goes, in an item of a shape found valid before (`_given` below).
    ({"resourceType": "Patient", "name": [{"given": ["a"], "_given": ['"abc"']}]},
     "Patient.name[0]._given[0] is invalid (not a JSON object)"),
    # What the models coerce, and FHIR's JSON does not allow: what is sent is the value as planned.
    ({"resourceType": "Observation", "valueInteger": True}, "Observation.valueInteger is invalid (not a JSON integer)"),
    ({"resourceType": "Observation", "valueBoolean": 1}, "Observation.valueBoolean is invalid (not a JSON boolean)"),
    ({"resourceType": "Patient", "name": [{"period": {"start": 12}}]},
     "Patient.name[0].period.start is invalid (not a JSON string)"),
])
def test_a_value_of_another_json_type_is_refused_naming_its_element(resource: dict[str, Any], detail: str) -> None:
    validation.forget()
    validation.validate({"resourceType": "Patient", "name": [{"given": ["a"], "_given": [{"id": "x"}]}]},
                        partial=True)
    with pytest.raises(WritebackError) as caught:
        validation.validate(copy.deepcopy(resource), partial=True)
    assert (caught.value.reason, caught.value.detail) == (Reason.INVALID_RESOURCE, detail)


def test_a_required_primitive_given_by_its_extensions_alone_is_there() -> None:
    """As the model has it: `_status` with an extension (data-absent-reason) stands for the value, an empty one
    does not."""
    absent = {"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason", "valueCode": "unknown"}
    for resource in ({"resourceType": "Observation", "code": {"text": "t"}, "_status": {"extension": []}},
                     {"resourceType": "Observation", "code": {"text": "t"}, "_status": {"id": "x"}}):
        with pytest.raises(WritebackError) as caught:
            validation.validate(copy.deepcopy(resource), partial=True, required={"status": "msemr_status"})
        assert caught.value.detail == "Observation.status is required, and column msemr_status that gives it is empty"
    validation.validate({"resourceType": "Observation", "code": {"text": "t"}, "_status": {"extension": [absent]}},
                        partial=True, required={"status": "msemr_status"})


_ABSENT = {"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason", "valueCode": "unknown"}]}
_ORDER = {"resourceType": "ServiceRequest", "status": "active", "intent": "order",
          "subject": {"reference": "Patient/1"}}


@pytest.mark.parametrize("resource", [
    # A choice type present as null is absent (to the models too): not a second type.
    {"resourceType": "Observation", "status": "final", "code": {"text": "t"}, "valueString": "a",
     "valueQuantity": None},
    {"resourceType": "Observation", "status": "final", "code": {"text": "t"}, "valueString": None,
     "valueQuantity": {"value": 1}},
    # FHIR's JSON: a repeating primitive's item is null where its `_` sibling holds its extensions, and back.
    {**_ORDER, "instantiatesUri": [None, "http://example.org/a"], "_instantiatesUri": [_ABSENT, None]},
    {"resourceType": "Patient", "name": [{"given": [None, "Ana"], "_given": [_ABSENT, None]}]},
])
def test_what_fhir_json_allows_of_nulls_is_accepted(resource: dict[str, Any]) -> None:
    assert not model_refuses(resource)
    assert not refuses(resource)


@pytest.mark.parametrize(("resource", "detail"), [
    # A null no `_` item stands for: FHIR's JSON refuses it, the models take it.
    ({**_ORDER, "instantiatesUri": [None, "http://example.org/a"]},
     "ServiceRequest.instantiatesUri[0] is invalid (null, with nothing at its place in _instantiatesUri)"),
    ({"resourceType": "Patient", "address": [{"line": ["1 Main St", None]}]},
     "Patient.address[0].line[1] is invalid (null, with nothing at its place in _line)"),
    # A repeating primitive of the resource itself gets the primitive rules its single ones get.
    ({**_ORDER, "instantiatesUri": ["http://example.org/a b"]},
     "ServiceRequest.instantiatesUri[0] is invalid (holds whitespace)"),
    # A contained resource gets them as the resource holding it does: its own type's elements.
    ({"resourceType": "Patient", "contained": [{"resourceType": "Practitioner", "id": "p1",
                                                "identifier": [{"system": "MRN 0042731", "value": "1"}]}]},
     "Patient.contained[0].identifier[0].system is invalid (holds whitespace)"),
    ({"resourceType": "Patient", "contained": [{"resourceType": "Practitioner", "id": "p1", "active": 1}]},
     "Patient.contained[0].active is invalid (not a JSON boolean)"),
    ({"resourceType": "Encounter", "contained": [{"resourceType": "Observation", "id": "o1", "status": "finished",
                                                  "code": {"text": "t"}}]},
     "Encounter.contained[0].status is invalid (not a code of its required value set: amended, cancelled, "
     "corrected, entered-in-error, final, preliminary, registered, unknown)"),
])
def test_primitive_rules_reach_repeating_primitives_and_contained_resources(resource: dict[str, Any],
                                                                            detail: str) -> None:
    assert not model_refuses(resource)
    validation.forget()
    with pytest.raises(WritebackError) as caught:
        validation.validate(copy.deepcopy(resource), partial=True)
    assert (caught.value.reason, caught.value.detail) == (Reason.INVALID_RESOURCE, detail)


def test_a_duration_with_a_value_needs_a_ucum_code_of_time() -> None:
    """drt-1, which the models leave out: Encounter.length {"value": 45} is 45 of nothing (found by review). A change
    without images names the value alone: there it is checked where it meets the server's copy (`converge`)."""
    bare = {"resourceType": "Encounter", "status": "finished", "class": {"code": "AMB"}, "length": {"value": 45}}
    assert not model_refuses(bare)
    for partial, whole in ((False, False), (True, True)):
        with pytest.raises(WritebackError) as caught:
            validation.validate(copy.deepcopy(bare), partial=partial, whole=whole)
        assert caught.value.detail.startswith("Encounter.length holds a value without a UCUM code of time")
    validation.validate(copy.deepcopy(bare), partial=True)  # a change of the value alone
    with pytest.raises(WritebackError):
        validation.check_invariants(bare)
    other = {**bare, "length": {"value": 45, "code": "min", "system": "http://example.org/units"}}
    with pytest.raises(WritebackError):
        validation.check_invariants(other)
    timed = {**bare, "length": {"value": 45, "code": "min", "system": "http://unitsofmeasure.org", "unit": "min"}}
    validation.validate(copy.deepcopy(timed), partial=False)
    validation.check_invariants(timed)
