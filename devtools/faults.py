"""A fault-injecting httpx transport for tests: sits in front of a real server and misbehaves on cue.

Rules are tried in order; a rule matches a request by method and URL substring (and, optionally, by a piece of
its body, its path's end, and while a condition holds, e.g. an outage on the test's clock) and fires a bounded
number of times. It can answer in the server's place (status, headers, body), raise a transport error, delay,
run a side action first (e.g. a concurrent write), or rewrite the real server's answer.
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
    # Fires only while this says so (e.g. an outage that ends at a time on the test's clock).
    active: Callable[[], bool] | None = None
    # Fires only for a request whose body contains this (e.g. one entry of a batch bundle).
    body_contains: bytes = b""
    # Fires only for a request whose path ends so (e.g. "/R4": a batch bundle posted to the base URL).
    path_endswith: str = ""
    fired: int = 0

    def matches(self, request: httpx.Request) -> bool:
        if self.times != -1 and self.fired >= self.times:
            return False
        if self.active is not None and not self.active():
            return False
        if self.body_contains and self.body_contains not in request.content:
            return False
        if self.path_endswith and not request.url.path.endswith(self.path_endswith):
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
