"""What the original product did: one message at a time, each request on a new connection (a fresh httpx
client), each step of the write (the read, the write, then its Provenance) a round trip of its own. Tokens are
cached even here, so the comparison is not flattered by token fetches."""

from __future__ import annotations

from typing import Any

import httpx

from writeback.auth import TokenProvider
from writeback.bundles import BatchDelivery
from writeback.fhir_client import FhirClient
from writeback.maps import MapSet
from writeback.pipeline import Envelope, Pipeline, Result
from writeback.settings import Settings


class FreshConnectionPerRequest(httpx.AsyncClient):
    """An httpx client that opens (and closes) a new client, so a new TCP connection, for every request."""

    async def request(self, *args: Any, **kwargs: Any) -> httpx.Response:
        async with httpx.AsyncClient() as one_shot:
            return await one_shot.request(*args, **kwargs)


async def run_baseline(maps: MapSet, settings: Settings, tokens: TokenProvider,
                       envelopes: list[Envelope]) -> list[Result]:
    http = FreshConnectionPerRequest()
    try:
        pipeline = Pipeline(maps, settings, BatchDelivery(FhirClient(settings.fhir_url, http, tokens, settings)))
        return [await pipeline.process(e) for e in envelopes]
    finally:
        await http.aclose()
