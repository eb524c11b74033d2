"""A fault-injecting httpx transport for tests: sits in front of a real server and misbehaves on cue.

Rules are tried in order; a rule matches a request by method and URL substring and fires a bounded number of
times. It can answer in the server's place (status, headers, body), raise a transport error, delay, run a
side action first (e.g. a concurrent write), or rewrite the real server's answer.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

Rewrite = Callable[[httpx.Request, httpx.Response], httpx.Response]


@dataclass
class Fault:
    method: str | None = None
    url_contains: str = ""
    times: int = 1  # how often it fires; -1: always
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None
    error: type[httpx.TransportError] | None = None
    delay: float = 0.0
    before: Callable[[httpx.Request], Awaitable[None]] | None = None
    rewrite: Rewrite | None = None
    fired: int = 0

    def matches(self, request: httpx.Request) -> bool:
        if self.times != -1 and self.fired >= self.times:
            return False
        if self.method and request.method != self.method:
            return False
        return self.url_contains in str(request.url)


class FaultyTransport(httpx.AsyncBaseTransport):
    def __init__(self, faults: list[Fault] | None = None, inner: httpx.AsyncBaseTransport | None = None) -> None:
        self.faults = faults if faults is not None else []
        self.inner = inner or httpx.AsyncHTTPTransport()
        self.requests: list[httpx.Request] = []

    def add(self, fault: Fault) -> Fault:
        self.faults.append(fault)
        return fault

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        fault = next((f for f in self.faults if f.matches(request)), None)
        if fault is None:
            return await self.inner.handle_async_request(request)
        fault.fired += 1
        if fault.delay:
            await asyncio.sleep(fault.delay)
        if fault.before is not None:
            await fault.before(request)
        if fault.error is not None:
            raise fault.error("injected fault", request=request)
        if fault.status is not None:
            content = b"" if fault.body is None else json.dumps(fault.body).encode()
            headers = {"Content-Type": "application/fhir+json", **fault.headers} if content else fault.headers
            return httpx.Response(fault.status, headers=headers, content=content, request=request)
        response = await self.inner.handle_async_request(request)
        if fault.rewrite is not None:
            await response.aread()
            return fault.rewrite(request, response)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()
