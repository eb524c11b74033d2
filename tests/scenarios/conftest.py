"""Hospital sequences through the real pipeline: the FHIR dev server (Medplum's engine) and Azurite, two
instances of the pipeline (as two Functions instances would run) sharing them, and Dataverse's side simulated by
tests/scenarios/dataverse.py."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from devtools.faults import FaultyTransport
from devtools.services import Azurite, FhirDevServer
from tests.delivery.conftest import Fhir
from tests.scenarios.dataverse import SYNC_USER, Dataverse, Sent
from writeback.auth import fhir_tokens
from writeback.bundles import BatchDelivery
from writeback.fhir_client import FhirClient
from writeback.maps import MapSet, load_maps
from writeback.outcomes import OutcomeStore
from writeback.pipeline import Envelope, Pipeline, Result
from writeback.retry import CONSENT_WAITS, FIRST_TRIED, GATE_OPENED, GATE_WAIT, OUTAGES, Retry, RetryPolicy, next_step
from writeback.settings import DEFAULT_MAPS_DIR, Settings

META_SOURCE = "urn:test:scenarios"


PAST_CONSENT_WAIT = 10  # the delivery that comes past WRITEBACK_CONSENT_WAIT_MINUTES (60): `since_first`


def since_first(delivery_count: int) -> float:
    """Seconds from a message's first delivery to its `delivery_count`-th under the default retry schedule."""
    policy = RetryPolicy()
    return sum(policy.delay(n).total_seconds() for n in range(1, delivery_count))


@dataclass
class Instance:
    """One Functions instance: its own pipeline, HTTP client and ledger connection."""

    pipeline: Pipeline
    transport: FaultyTransport
    client: FhirClient
    ledger: OutcomeStore


@dataclass
class World:
    fhir: Fhir
    dataverse: Dataverse
    instances: list[Instance]
    results: list[tuple[Sent, Result]] = field(default_factory=list)
    last: dict[int, tuple[Sent, Envelope, Result]] = field(default_factory=dict)  # each message's last delivery

    @property
    def x(self) -> Instance:
        return self.instances[0]

    @property
    def y(self) -> Instance:
        return self.instances[1]

    async def send(self, *sent: Sent, instance: int = 0, delivery_count: int = 1) -> list[Result]:
        """One invocation (one batch) on one instance. Delivery n comes as long after the first as the default
        retry schedule puts it (15 s, doubling up to 15 min): the 10th an hour later, past the consent wait. A
        delivery after one that ended to be retried carries what the function's retry copy would
        (`retry.next_step` over the last delivery and its outcome): how many tries waited for a consent."""
        envelopes = [Envelope(s.bytes(), message_id=uuid.uuid4().hex, delivery_count=delivery_count,
                              properties=self._carried(s, delivery_count)) for s in sent]
        results = await self.instances[instance].pipeline.process_many(envelopes)
        self.results += list(zip(sent, results, strict=True))
        self.last.update({id(s): (s, e, r) for s, e, r in zip(sent, envelopes, results, strict=True)})
        return results

    def _carried(self, sent: Sent, delivery_count: int) -> dict[str, Any]:
        """The retry copy's own properties the delivery count does not stand for already: when the first try was
        (`FIRST_TRIED`, as long before as the retry schedule puts the `delivery_count`-th), `CONSENT_WAITS`,
        `GATE_OPENED` (real time, as the pipeline's clock is), `OUTAGES`."""
        if delivery_count == 1:
            return {}
        first = {FIRST_TRIED: (datetime.now(UTC) - timedelta(seconds=since_first(delivery_count))).isoformat()}
        last = self.last.get(id(sent))
        if last is None or last[0] is not sent or last[2].settlement != "reschedule":
            return first
        _, envelope, result = last
        step = next_step(RetryPolicy(), properties=envelope.properties, message_id=envelope.message_id,
                         now=datetime.now(UTC), reason=result.reason,
                         gate_wait=bool(result.decision.extra.get(GATE_WAIT)))
        assert isinstance(step, Retry)
        return {**first, **{k: v for k, v in step.properties.items() if k in (CONSENT_WAITS, GATE_OPENED, OUTAGES)}}

    async def send_each(self, *sent: Sent, instance: int = 0) -> list[Result]:
        """One invocation per message, in the order given."""
        return [(await self.send(s, instance=instance))[0] for s in sent]

    async def deliver(self, sent: Sequence[Sent], *, mode: str, seed: int = 7, batch: int = 4) -> None:
        """Everything Dataverse posted, delivered the way the mode says: `in-order` (one at a time), `shuffled`
        (batches of a seeded shuffle), `duplicated` (every message twice, the copies late), `two-instances`
        (split across the two instances, running at the same time). Messages that end in a transient outcome are
        delivered again afterwards, as the retry schedule would."""
        rng = random.Random(seed)
        queue = list(sent)
        if mode == "shuffled":
            rng.shuffle(queue)
        elif mode == "duplicated":
            copies = list(sent)
            rng.shuffle(copies)
            queue = [*queue, *copies]
        if mode == "in-order":
            pending = await self._run_each(queue)
        elif mode == "two-instances":
            rng.shuffle(queue)
            halves = [queue[0::2], queue[1::2]]
            done = await asyncio.gather(*(self._run_batches(part, batch, i) for i, part in enumerate(halves)))
            pending = [s for part in done for s in part]
        else:
            pending = await self._run_batches(queue, batch, 0)
        for attempt in range(2, PAST_CONSENT_WAIT + 2):  # the retry schedule: transient outcomes come back
            if not pending:
                return
            pending = await self._run_batches(pending, batch, 0, delivery_count=attempt)
        assert not pending, [s.table for s in pending]

    async def _run_each(self, queue: list[Sent]) -> list[Sent]:
        pending = []
        for s in queue:
            [result] = await self.send(s)
            if result.settlement == "reschedule":
                pending.append(s)
        return pending

    async def _run_batches(self, queue: list[Sent], size: int, instance: int, delivery_count: int = 1) -> list[Sent]:
        pending = []
        for start in range(0, len(queue), size):
            part = queue[start:start + size]
            results = await self.send(*part, instance=instance, delivery_count=delivery_count)
            pending += [s for s, r in zip(part, results, strict=True) if r.settlement == "reschedule"]
        return pending


@pytest.fixture(scope="session")
def scenario_maps() -> MapSet:
    return load_maps(DEFAULT_MAPS_DIR)


@pytest.fixture
async def world(fhir_server: FhirDevServer, azurite_tables: Azurite, scenario_maps: MapSet) -> AsyncIterator[World]:
    prefix = "scn" + uuid.uuid4().hex[:12]
    env = {"FHIR_URL": fhir_server.base_url, "FHIR_TOKEN_URL": fhir_server.token_url,
           "FHIR_CLIENT_ID": fhir_server.client_id, "FHIR_CLIENT_SECRET": fhir_server.client_secret,
           "WRITEBACK_META_SOURCE": META_SOURCE, "WRITEBACK_IGNORE_USER_IDS": SYNC_USER,
           "OUTCOMES_CONNECTION_STRING": azurite_tables.connection_string, "OUTCOMES_TABLE_PREFIX": prefix,
           "FHIR_MAX_RETRIES": "2", "FHIR_RETRY_MAX_SECONDS": "10"}
    settings = Settings.from_env(env, need_outcomes=True)
    instances: list[Instance] = []
    opened: list[Any] = []
    for _ in range(2):
        transport = FaultyTransport()
        http = httpx.AsyncClient(transport=transport)
        tokens = fhir_tokens(settings)

        async def no_wait(seconds: float) -> None:  # retries are counted, not waited out
            return None

        client = FhirClient(settings.fhir_url, http, tokens, settings, sleep=no_wait)
        ledger = OutcomeStore.from_settings(settings, retry_total=1, retry_backoff=0.05)
        await ledger.ensure_tables()
        instances.append(Instance(Pipeline(scenario_maps, settings, BatchDelivery(client), ledger), transport,
                                  client, ledger))
        opened += [http, tokens, ledger]
    world = World(Fhir(fhir_server), Dataverse(), instances)
    yield world
    for thing in opened:
        await thing.aclose()


def body_text(entry: dict[str, Any]) -> str:
    return json.dumps(entry.get("resource", {}))


async def until_settled(world: World, *sent: Sent) -> None:
    """Deliver each message again, as the retry schedule would, until none is to be retried."""
    for delivery in range(2, PAST_CONSENT_WAIT + 2):
        pending = [s for s in sent if world.last[id(s)][2].settlement == "reschedule"]
        if not pending:
            return
        await world.send(*pending, delivery_count=delivery)
    raise AssertionError("still retried past the consent wait")
