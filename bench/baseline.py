"""What the original product does: one message at a time, the resource written, then its Provenance as a
separate request, and a new connection (a fresh httpx client) for every request. Tokens are cached even here,
so the comparison is not flattered by token fetches."""

from __future__ import annotations

from typing import Any

import httpx

from writeback.auth import TokenProvider
from writeback.fhir_client import FhirClient, FhirDelivery
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
        pipeline = Pipeline(maps, settings, FhirDelivery(FhirClient(settings.fhir_url, http, tokens, settings)))
        return [await pipeline.process(e) for e in envelopes]
    finally:
        await http.aclose()
