"""Review for fidelity to how the Azure Health Data Services FHIR service (microsoft/fhir-server) answers, where it
differs from the FHIR dev server: the dev server's answers are made to look like Azure's by the fault-injecting
transport of the delivery tests. Each test fails on the code it was written against, for the reason its docstring
gives, citing what the Azure FHIR service sends."""

from __future__ import annotations

from devtools.faults import Fault
from tests.delivery.conftest import Fhir, Rig, create_message, new_patient

# What Azure's BundleHandler puts in a batch-response entry whose action was throttled (RequestRateExceededException
# through OperationOutcomeExceptionFilterAttribute): a bare status code and the OperationOutcome in `outcome`.
THROTTLED_ENTRY = {"response": {"status": "429", "outcome": {
    "resourceType": "OperationOutcome",
    "issue": [{"severity": "error", "code": "throttled",
               "diagnostics": "The request rate exceeded the provisioned throughput. Retry the request later."}]}}}


async def test_a_batch_whose_entries_were_throttled_waits_the_retry_after_the_bundle_answer_carries(
        rig: Rig, fhir: Fhir) -> None:
    """Azure answers a batch bundle one of whose actions was throttled with HTTP 200, that entry (and every entry
    after it, not processed) as `"status": "429"`, and puts the throttled action's `Retry-After` (seconds) and
    `x-ms-retry-after-ms` headers on the bundle's own response: microsoft/fhir-server PR #1658 "Change 429 handling
    for bundles" ("If an action in a bundle does result in a 429, all subsequent actions will be skipped and will
    have the same 429 response. `Retry-After`, `x-ms-retry-after-ms` [...] will be added as headers to the bundle
    response"), src/Microsoft.Health.Fhir.Shared.Api/Features/Resources/Bundle/BundleHandler.cs
    (`HeadersToAccumulate = [Retry-After, x-ms-retry-after-ms, ...]`, `throttledEntryComponent`), and
    Features/Headers/HeaderDictionaryExtensions.cs `AddRetryAfterHeaders` (both headers on every 429).

    The product promises to honour Retry-After (writeback/fhir_client.py module docstring; README "429/5xx ...
    retried"), and does for a whole request answered 429 (`FhirClient.request`, `_retry_after`). It should wait
    what the bundle answer says before resending the throttled entries. It did not: `BatchDelivery._bundle`
    resends 408/429/5xx entries after its own jittered backoff (0.25 to 0.5 s first), never reading the
    response's headers, so against a throttled Azure service it resends within half a second of being told to
    wait 5 s, and spends its FHIR_MAX_RETRIES on throttled answers (then `fhir-unavailable`)."""
    rig.transport.add(Fault(method="POST", path_endswith="/R4", body_contains=b'"method":"PUT","url":"Patient/',
                            status=200, times=1,
                            headers={"Retry-After": "5", "x-ms-retry-after-ms": "5000"},
                            body={"resourceType": "Bundle", "type": "batch-response", "entry": [THROTTLED_ENTRY]}))
    row_id, row = new_patient(lastname="Throttled")
    result = await rig.send(create_message(row_id, row))

    assert result.state == "written", result.detail
    assert len(fhir.search(f"Patient?identifier=urn:dataverse:contact|{row_id}")) == 1
    assert rig.sleeps, "the throttled entry was resent without any wait"
    assert rig.sleeps[0] >= 5.0, (
        f"the throttled entry was resent after {rig.sleeps[0]:.2f} s; the bundle answer said Retry-After: 5")
