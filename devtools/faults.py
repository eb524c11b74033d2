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

from writeback.transport import Connections

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


@dataclass
class EntryFault:
    """A fault on one entry of a FHIR batch bundle: the entry whose request matches (method, URL substring) is
    answered in the server's place (`status`, `outcome`) and never reaches the server, or is sent and its answer
    changed (`rewrite`); the other entries of the bundle go to the server as usual."""

    method: str | None = None
    url_contains: str = ""
    times: int = 1
    status: int | None = None
    outcome: dict[str, Any] | None = None
    rewrite: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    fired: int = 0

    def matches(self, entry: dict[str, Any]) -> bool:
        if self.times != -1 and self.fired >= self.times:
            return False
        request = entry.get("request") or {}
        if self.method and request.get("method") != self.method:
            return False
        return self.url_contains in str(request.get("url", ""))


class FaultyTransport(httpx.AsyncBaseTransport):
    def __init__(self, faults: list[Fault] | None = None, inner: httpx.AsyncBaseTransport | None = None) -> None:
        self.faults = faults if faults is not None else []
        self.entry_faults: list[EntryFault] = []
        self.inner = inner or Connections()  # the connections the product's client uses
        self.requests: list[httpx.Request] = []
        self.entries: list[dict[str, Any]] = []  # every batch entry sent, in order

    def add(self, fault: Fault) -> Fault:
        self.faults.append(fault)
        return fault

    def add_entry(self, fault: EntryFault) -> EntryFault:
        self.entry_faults.append(fault)
        return fault

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        bundle = _batch_of(request)
        if bundle is not None:
            self.entries.extend(bundle["entry"])
            if self.entry_faults:
                return await self._entries(request, bundle)
        return await self._request(request)

    async def _entries(self, request: httpx.Request, bundle: dict[str, Any]) -> httpx.Response:
        """Answer the faulted entries here, send the rest, and put the answers back in the bundle's order."""
        answers: list[dict[str, Any] | None] = []
        sent: list[dict[str, Any]] = []
        rewrites: list[tuple[int, EntryFault]] = []
        for entry in bundle["entry"]:
            fault = next((f for f in self.entry_faults if f.matches(entry)), None)
            if fault is not None:
                fault.fired += 1
            if fault is not None and fault.status is not None:
                answer: dict[str, Any] = {"status": str(fault.status)}
                if fault.outcome is not None:
                    answer["outcome"] = fault.outcome
                answers.append({"response": answer})
                continue
            if fault is not None and fault.rewrite is not None:
                rewrites.append((len(sent), fault))
            answers.append(None)
            sent.append(entry)
        if not sent:
            return httpx.Response(200, json={"resourceType": "Bundle", "type": "batch-response",
                                             "entry": answers}, request=request)
        headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}
        forwarded = httpx.Request(request.method, request.url, headers=headers, json={**bundle, "entry": sent})
        response = await self._request(forwarded)
        await response.aread()
        if response.status_code != 200:
            return response
        real = list(response.json().get("entry", []))
        for position, fault in rewrites:
            assert fault.rewrite is not None
            real[position] = fault.rewrite(real[position])
        answered = iter(real)
        merged = [a if a is not None else next(answered) for a in answers]
        return httpx.Response(200, json={"resourceType": "Bundle", "type": "batch-response", "entry": merged},
                              request=request)

    async def _request(self, request: httpx.Request) -> httpx.Response:
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


def _batch_of(request: httpx.Request) -> dict[str, Any] | None:
    """The FHIR batch bundle a request posts, if it is one."""
    if request.method != "POST" or b'"resourceType":"Bundle"' not in request.content[:200].replace(b" ", b""):
        return None
    try:
        bundle = json.loads(request.content)
    except ValueError:
        return None
    return bundle if isinstance(bundle, dict) and isinstance(bundle.get("entry"), list) else None
