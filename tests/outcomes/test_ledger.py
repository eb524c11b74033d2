"""The Table Storage ledger against real Azurite: outcome rows, duplicates, stale updates, races, outages."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from azure.data.tables import TableServiceClient

from devtools.services import Azurite
from tests.function.helpers import FIRST, LAST, FakeDelivery, create_body, new_id, reject_body, target_only_body
from tests.outcomes.conftest import new_prefix, store_settings
from writeback.decide import WritePlan, plan_message
from writeback.errors import WritebackError
from writeback.facts import NO_FHIR_ID, NO_PARENT, RowFacts
from writeback.leases import RELEASE_HOLDER, LocalLeases
from writeback.maps import MapSet
from writeback.marks import Version
from writeback.outcomes import OutcomeStore, inverted_key, table_names
from writeback.pipeline import Envelope, Issue, Leases, Pipeline
from writeback.reasons import Reason
from writeback.settings import Settings

SETTINGS = Settings.for_planning({})


def raw_entities(azurite: Azurite, prefix: str) -> dict[str, list[dict[str, Any]]]:
    """Every entity of the four tables, read with the synchronous SDK (independent of the code under test)."""
    service = TableServiceClient.from_connection_string(azurite.connection_string)
    out: dict[str, list[dict[str, Any]]] = {}
    for name, table in table_names(prefix).items():
        client = service.get_table_client(table)
        out[name] = [dict(e) for e in client.list_entities()]
    return out


def plan_for(body: bytes, maps: MapSet) -> WritePlan:
    decision = plan_message(body, None, maps, SETTINGS)
    assert decision.plan is not None, decision.detail
    return decision.plan


async def test_written_row_history_and_no_patient_data(store: OutcomeStore, maps: MapSet,
                                                       azurite_tables: Azurite, prefix: str) -> None:
    record = new_id()
    delivery = FakeDelivery()
    pipeline = Pipeline(maps, SETTINGS, delivery, store)
    result = await pipeline.process(Envelope(create_body(record, version=7), message_id="msg-1", delivery_count=2))
    assert result.state == "written"

    rows = await store.query(record_id=record)
    assert len(rows) == 1
    row = rows[0]
    assert (row.outcome, row.status, row.reason, row.table, row.record_id) == (
        "written", "written", None, "contact", record)
    assert row.message_id == "msg-1" and row.message_name == "Create" and row.delivery_count == 2
    assert row.resource == "Patient/fake1/_history/1" and row.provenance == "Provenance/fakeprov1/_history/1"
    assert row.correlation_id and row.message_key and row.duration_ms is not None
    assert row.operation == "create" and row.issue_count == 0
    assert [r.row_key for r in await store.query(status="written")] == [row.row_key]
    assert await store.query(status="failed") == []

    state = await store.row_state("contact", record)  # what other rows' writes need to know about this row
    assert state is not None and (state["FactsVersion"].split("@")[0], state["ResourceType"], state["Consent"]) == (
        "7", "Patient", True)  # (with the message's modifiedon after the @: `Version.stored`)
    assert await store.seen(row.message_key or "") == "processed"

    raw = raw_entities(azurite_tables, prefix)
    assert len(raw["outcomes"]) == 1 and len(raw["history"]) == 1 and len(raw["messages"]) == 1
    assert raw["outcomes"][0]["PartitionKey"] == f"{datetime.now(UTC):%Y%m%d}-written"
    assert raw["history"][0]["PartitionKey"] == record
    dump = json.dumps(raw, default=str)
    assert FIRST not in dump and LAST not in dump


async def test_duplicate_delivery_writes_once(store: OutcomeStore, maps: MapSet) -> None:
    record, request = new_id(), new_id()
    delivery = FakeDelivery()
    pipeline = Pipeline(maps, SETTINGS, delivery, store)
    body = create_body(record, version=3, request_id=request)
    first = await pipeline.process(Envelope(body, message_id="a"))
    # Dataverse posted the same operation again: another broker message, same RequestId.
    second = await pipeline.process(Envelope(body, message_id="b"))
    assert first.state == "written"
    assert (second.state, second.reason) == ("skipped", Reason.DUPLICATE)
    assert len(delivery.plans) == 1
    history = await store.query(record_id=record)
    assert [(r.outcome, r.reason) for r in history] == [("skipped", "duplicate"), ("written", None)]


async def test_message_id_is_the_key_without_request_id(store: OutcomeStore) -> None:
    assert not await store.seen("broker-id-1")
    assert not await store.seen("odd/key#with?chars")


async def test_stale_update_is_skipped_equal_version_goes_through(store: OutcomeStore, maps: MapSet) -> None:
    """Target-only updates (no images on the step) are ordered per column by the ledger; whole-row updates by the
    version marked in the FHIR resource (tests/delivery, tests/scenarios)."""
    record = new_id()
    delivery = FakeDelivery(fail=[Reason.FHIR_UNAVAILABLE])
    pipeline = Pipeline(maps, SETTINGS, delivery, store)
    v10 = Envelope(target_only_body(record, 10), message_id="v10")
    first = await pipeline.process(v10)
    assert (first.state, first.reason, first.settlement) == ("retry", Reason.FHIR_UNAVAILABLE, "reschedule")
    again = await pipeline.process(v10)  # the redelivery after the transient failure: same version, not stale
    assert again.state == "written"
    late = await pipeline.process(Envelope(target_only_body(record, 9), message_id="v9"))
    assert (late.state, late.reason, late.settlement) == ("skipped", Reason.STALE, "complete")
    newer = await pipeline.process(Envelope(target_only_body(record, 11), message_id="v11"))
    assert newer.state == "written"
    assert [p.source.row_version for p in delivery.plans] == [10, 10, 11]
    state = await store.row_state("contact", record)
    assert state is not None and state["Version"] == 11


async def test_modified_on_orders_rows_without_version(store: OutcomeStore, maps: MapSet) -> None:
    record = new_id()
    t0 = datetime(2026, 11, 2, 9, 30, tzinfo=UTC)
    newer = plan_for(target_only_body(record, None, modified=t0 + timedelta(minutes=5)), maps)
    older = plan_for(target_only_body(record, None, modified=t0), maps)
    assert newer.source.row_version is None and newer.source.modified_on is not None
    assert await store.claim(newer) == frozenset()
    assert await store.claim(older) == {"telephone1"}  # the same column, written by a newer change
    assert await store.claim(newer) == frozenset()  # equal: not stale


async def test_an_older_update_of_other_columns_still_writes_them(store: OutcomeStore, maps: MapSet) -> None:
    """Updates carry only their changed columns: a late older change is narrowed, never dropped whole."""
    record = new_id()
    delivery = FakeDelivery()
    pipeline = Pipeline(maps, SETTINGS, delivery, store)
    newer = Envelope(target_only_body(record, 8, address1_city="Newer City", telephone1="+1 206 555 0008"),
                     message_id="v8")
    older = Envelope(target_only_body(record, 7, telephone1="+1 206 555 0007", emailaddress1="p7@example.org"),
                     message_id="v7")
    assert (await pipeline.process(newer)).state == "written"
    late = await pipeline.process(older)
    assert (late.state, late.reason) == ("written", None)
    assert "not telephone1" in late.detail
    sent = delivery.plans[-1]
    assert sent.columns == {"emailaddress1"} and sent.changes == ("telecom",)
    assert all(a.column != "telephone1" for a in sent.assignments)
    state = await store.row_state("contact", record)
    assert state is not None and state["Version"] == 8
    stamps = json.loads(state["Columns"])
    assert stamps["telephone1"][0] == 8 and stamps["emailaddress1"][0] == 7 and stamps["address1_city"][0] == 8
    stale = await pipeline.process(Envelope(target_only_body(record, 6, telephone1="+1 206 555 0006",
                                                        address1_city="Old City"), message_id="v6"))
    assert (stale.state, stale.reason) == ("skipped", Reason.STALE)
    assert len(delivery.plans) == 2


async def test_row_state_from_before_per_column_stamps_orders_the_whole_row(
        store: OutcomeStore, maps: MapSet, azurite_tables: Azurite, prefix: str) -> None:
    """A row state an earlier release wrote (row version only) keeps its row-wide ordering: nothing is
    treated as never written."""
    record = new_id()
    service = TableServiceClient.from_connection_string(azurite_tables.connection_string)
    await store.ensure_tables()
    service.get_table_client(table_names(prefix)["rowstate"]).create_entity(
        {"PartitionKey": record, "RowKey": "contact", "Version": 10})
    assert await store.claim(plan_for(target_only_body(record, 9, emailaddress1="old@example.org"), maps)) == {
        "emailaddress1"}
    assert await store.claim(plan_for(target_only_body(record, 11, emailaddress1="new@example.org"), maps)) == set()
    state = await store.row_state("contact", record)
    assert state is not None and state["Version"] == 11
    columns = json.loads(state["Columns"])  # (version, modifiedon: here when the operation was created)
    assert columns["*"] == [10, None] and columns["emailaddress1"][0] == 11 and set(columns) == {"*", "emailaddress1"}
    # Still row-wide for every other column: version 10 may have written it.
    assert await store.claim(plan_for(target_only_body(record, 9, telephone1="+1 206 555 0009"), maps)) == {
        "telephone1"}


class _PausingStore(OutcomeStore):
    """Holds its claim between reading the row state and writing it, so a race can be staged exactly."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.read_done = asyncio.Event()
        self.go = asyncio.Event()
        self.reads = 0

    async def _call(self, what: str, op: Any) -> Any:
        value = await super()._call(what, op)
        if what == "read the row state":
            self.reads += 1
            if self.reads == 1:
                self.read_done.set()
                await self.go.wait()
        return value


async def test_concurrent_claim_race_two_ledgers(azurite_tables: Azurite, maps: MapSet) -> None:
    """Instance A reads v4, instance B writes v6, A's write of v5 hits 412, re-reads and loses as stale."""
    prefix = new_prefix()
    record = new_id()
    settings = store_settings(azurite_tables, prefix)
    base = OutcomeStore.from_settings(settings)
    slow = _PausingStore.from_settings(settings)
    assert isinstance(slow, _PausingStore)
    fast = OutcomeStore.from_settings(settings)
    try:
        assert await base.claim(plan_for(target_only_body(record, 4), maps)) == frozenset()
        a = asyncio.create_task(slow.claim(plan_for(target_only_body(record, 5), maps)))
        await asyncio.wait_for(slow.read_done.wait(), 10)
        assert await fast.claim(plan_for(target_only_body(record, 6), maps)) == frozenset()
        slow.go.set()
        assert await asyncio.wait_for(a, 10) == {"telephone1"}
        assert slow.reads == 2  # the 412 made it read again
        state = await base.row_state("contact", record)
        assert state is not None and state["Version"] == 6
    finally:
        for s in (base, slow, fast):
            await s.aclose()


async def test_many_concurrent_claims_end_at_the_newest(azurite_tables: Azurite, maps: MapSet) -> None:
    prefix, record = new_prefix(), new_id()
    settings = store_settings(azurite_tables, prefix)
    ledgers = [OutcomeStore.from_settings(settings), OutcomeStore.from_settings(settings)]
    try:
        await ledgers[0].ensure_tables()
        versions = list(range(1, 21))
        random.Random(7).shuffle(versions)
        plans = {v: plan_for(target_only_body(record, v), maps) for v in versions}
        superseded = await asyncio.gather(*(ledgers[i % 2].claim(plans[v]) for i, v in enumerate(versions)))
        by_version = dict(zip(versions, superseded, strict=True))
        assert by_version[20] == frozenset()
        state = await ledgers[1].row_state("contact", record)
        assert state is not None and state["Version"] == 20
        for v in (1, 10, 19):  # once 20 is stored, every older version is stale on either instance
            assert await ledgers[v % 2].claim(plans[v]) == {"telephone1"}
    finally:
        for ledger in ledgers:
            await ledger.aclose()


async def test_issue_child_rows(store: OutcomeStore, maps: MapSet, azurite_tables: Azurite, prefix: str) -> None:
    record = new_id()
    issues = (Issue("warning", "business-rule", "Patient.telecom[0]", "MSG_PARAM_INVALID"),
              Issue("information", "informational", "", "All OK"))
    pipeline = Pipeline(maps, SETTINGS, FakeDelivery(issues=issues), store)
    result = await pipeline.process(Envelope(create_body(record), message_id="with-issues"))
    assert result.state == "written"
    [row] = await store.query(record_id=record)
    assert row.issue_count == 2
    assert [(i.severity, i.code, i.expression, i.details) for i in row.issues] == [
        ("warning", "business-rule", "Patient.telecom[0]", "MSG_PARAM_INVALID"),
        ("information", "informational", "", "All OK")]
    raw = raw_entities(azurite_tables, prefix)["outcomes"]
    kids = sorted(e["RowKey"] for e in raw if e["Kind"] == "issue")
    assert kids == [f"{row.row_key}-001", f"{row.row_key}-002"]
    assert {e["PartitionKey"] for e in raw} == {f"{datetime.now(UTC):%Y%m%d}-written"}


async def test_failures_are_one_status_group(store: OutcomeStore, maps: MapSet) -> None:
    rejected, retried = new_id(), new_id()
    pipeline = Pipeline(maps, SETTINGS, FakeDelivery(fail=[Reason.FHIR_UNAVAILABLE]), store)
    r1 = await pipeline.process(Envelope(reject_body(rejected), message_id="rej"))
    r2 = await pipeline.process(Envelope(create_body(retried), message_id="ret"))
    assert (r1.state, r1.reason) == ("dead-lettered", Reason.INVALID_CONTACT_TYPE)
    assert (r2.state, r2.reason) == ("retry", Reason.FHIR_UNAVAILABLE)
    failed = await store.query(status="failed")
    assert [(r.outcome, r.reason, r.settlement) for r in failed] == [
        ("retry", "fhir-unavailable", "reschedule"), ("dead-lettered", "invalid-contact-type", "deadletter")]
    assert await store.query(status="written") == []
    # A failure may come again: not a duplicate, but known as tried (its redelivery may owe a Provenance).
    assert failed[0].message_key and await store.seen(failed[0].message_key) == "tried"
    assert len(await store.query()) == 2
    # `since` is a RowKey bound: nothing is newer than an hour from now
    assert await store.query(now=datetime.now(UTC) + timedelta(hours=2), since=timedelta(hours=1)) == []
    assert len(await store.query(record_id=rejected, status="failed")) == 1
    assert await store.query(record_id=rejected, status="written") == []


def test_inverted_keys_sort_newest_first() -> None:
    t = datetime(2026, 11, 20, 12, tzinfo=UTC)
    keys = [inverted_key(t + timedelta(microseconds=n)) for n in (0, 1, 1000, 10**9)]
    assert keys == sorted(keys, reverse=True)
    assert all(len(k) == 16 for k in keys)


async def test_outage_is_outcome_store_unavailable(azurite_tables: Azurite, maps: MapSet) -> None:
    settings = store_settings(azurite_tables, new_prefix())
    warm = OutcomeStore.from_settings(settings, retry_total=1, retry_backoff=0.05)
    await warm.ensure_tables()
    pipeline = Pipeline(maps, SETTINGS, FakeDelivery(), warm)
    record = new_id()
    written = await pipeline.process(Envelope(create_body(record), message_id="before"))
    assert written.state == "written"
    azurite_tables.stop()
    try:
        cold = OutcomeStore.from_settings(settings, retry_total=1, retry_backoff=0.05)
        with pytest.raises(WritebackError) as info:
            await cold.seen("x")
        assert info.value.reason == Reason.OUTCOME_STORE_UNAVAILABLE
        assert "no answer" in info.value.detail and "OUTCOMES_CONNECTION_STRING" in info.value.detail
        await cold.aclose()
        with pytest.raises(WritebackError) as info:
            await warm.record(Envelope(b"{}", message_id="during"), written)
        assert info.value.reason == Reason.OUTCOME_STORE_UNAVAILABLE
        result = await pipeline.process(Envelope(create_body(new_id()), message_id="during"))
        assert (result.state, result.reason, result.settlement) == (
            "retry", Reason.OUTCOME_STORE_UNAVAILABLE, "reschedule")
    finally:
        azurite_tables.start()
    again = await pipeline.process(Envelope(create_body(new_id()), message_id="after"))
    assert again.state == "written"
    await warm.aclose()


async def test_refused_credentials_say_what_to_check(azurite_tables: Azurite) -> None:
    wrong = azurite_tables.connection_string.replace(azurite_tables.account_key, "d3Jvbmcta2V5" * 8)
    store = OutcomeStore.from_settings(Settings(outcomes_connection_string=wrong, outcomes_table_prefix=new_prefix()),
                                       retry_total=0)
    try:
        with pytest.raises(WritebackError) as info:
            await store.seen("anything")
    finally:
        await store.aclose()
    assert info.value.reason == Reason.OUTCOME_STORE_UNAVAILABLE
    assert "Storage Table Data Contributor" in info.value.detail


async def test_row_facts_round_trip_through_table_storage(store: OutcomeStore) -> None:
    """What the row state keeps comes back as it was learned, in Azurite: the type a FHIR id was given under, and
    a child row known to be linked to no parent ("", which a newer message keeps over an older parent)."""
    contact, identifier = new_id(), new_id()
    learned = [RowFacts("contact", contact, Version(7), "Practitioner", True, "ext-1", fhir_type="Patient",
                        echoed=(("lastname", Version(6)), ("telephone1", Version(7))),  # (column names only)
                        seen=(5, 7), type_before="Patient", retyped=Version(6)),
               RowFacts("msemr_medicalidentifier", identifier, Version(9), "Patient", parent=NO_PARENT)]
    await store.learn(learned)
    known = await store.facts({f.key for f in learned})
    assert [known[f.key] for f in learned] == learned
    await store.learn([RowFacts("msemr_medicalidentifier", identifier, Version(8), "Patient", parent=contact)])
    assert (await store.facts({learned[1].key}))[learned[1].key].parent == NO_PARENT  # the newer one stays
    # A FHIR id a save cleared ("") is kept as such: an older message's id does not come back over it.
    await store.learn([RowFacts("contact", contact, Version(8), fhir_id=NO_FHIR_ID)])
    await store.learn([RowFacts("contact", contact, Version(6), fhir_id="ext-1")])
    assert (await store.facts({learned[0].key}))[learned[0].key].fhir_id == NO_FHIR_ID
    # An id found missing on the server stays so in the row state, until the row is written under it again.
    await store.learn([RowFacts("contact", contact, gone="Patient/ext-1")])
    assert (await store.facts({learned[0].key}))[learned[0].key].gone == "Patient/ext-1"
    await store.learn([RowFacts("contact", contact, written="Patient/ext-1", found="Patient/ext-1")])
    assert (await store.facts({learned[0].key}))[learned[0].key].gone is None


@pytest.mark.parametrize("kind", ["table-storage", "in-process"])
async def test_a_create_lease_goes_to_its_holder_again_and_to_a_newer_create_than_a_release(
        kind: str, store: OutcomeStore) -> None:
    """A creator takes a resource's create lease without a name: no one else gets it while it runs, not even
    another creator of the same resource. A release of the row's old type takes it under a name, with the version
    of the change that made the row another type: an older create cannot make the resource it found absent, a
    newer one (the type changed back) can; the release's own retry gets it again."""
    leases: Leases = store if kind == "table-storage" else LocalLeases()
    created, released = f"Patient/{uuid.uuid4()}", f"Patient/{uuid.uuid4()}"
    assert await leases.acquire(created, 30, version="10")
    assert not await leases.acquire(created, 30, version="12")
    assert not await leases.acquire(created, 30, RELEASE_HOLDER, "11")  # a creator is at work: the release waits
    assert await leases.acquire(released, 30, RELEASE_HOLDER, "11")
    assert await leases.acquire(released, 30, RELEASE_HOLDER, "11")
    assert not await leases.acquire(released, 30, version="10")  # older: must not make what the release left
    assert not await leases.acquire(released, 30, version="11")
    assert not await leases.acquire(released, 30)  # (a version not known is not newer)
    assert await leases.acquire(released, 30, version="12")  # the type changed back: a create of the newer state
    assert not await leases.acquire(released, 30, RELEASE_HOLDER, "11")  # now a creator's
    assert not await leases.acquire(released, 30, version="13")
    short = f"Patient/{uuid.uuid4()}"
    assert await leases.acquire(short, 0.05, RELEASE_HOLDER, "11")
    await asyncio.sleep(0.2)
    assert await leases.acquire(short, 30, "create-b", "10")  # expired: any create may go on
    # A create that was held up past its lease, and whose write is then refused, gives back only its own lease.
    await leases.release(short, "create-a")
    assert not await leases.acquire(short, 30, "create-c", "10")
    await leases.release(short, "create-b")
    assert await leases.acquire(short, 30, "create-c", "10")
    # A release of a newer change raises the version a release's lease holds off (Patient, Practitioner, Patient,
    # Practitioner: the third save's create is older than the fourth's release).
    twice = f"Patient/{uuid.uuid4()}"
    assert await leases.acquire(twice, 30, RELEASE_HOLDER, "11")
    assert await leases.acquire(twice, 30, RELEASE_HOLDER, "13")
    assert not await leases.acquire(twice, 30, "create-d", "12")
    # A newer create that took a release's lease over and whose write is refused (nothing made) puts the release's
    # lease back: an older create still cannot make the resource.
    over = f"Patient/{uuid.uuid4()}"
    assert await leases.acquire(over, 30, RELEASE_HOLDER, "11")
    assert await leases.acquire(over, 30, "create-e", "12")
    await leases.release(over, "create-e")
    assert not await leases.acquire(over, 30, "create-f", "10")
    assert await leases.acquire(over, 30, "create-g", "12")
