"""The FHIR client's connections: httpx's interface over aiohttp's HTTP/1.1 stack.

`httpx_aiohttp` (by an httpx maintainer) keeps httpx's requests, answers and timeouts and maps aiohttp's
connection and timeout errors to httpx's. A malformed answer (a bad status line, a broken chunked body) it lets
through as aiohttp's `ClientResponseError`, which httpx's own stack calls `RemoteProtocolError`: `Connections`
maps every aiohttp failure, while the answer's head is read and while its body is, to an httpx transport error, so
the client's retries and reason codes see the failure they expect.

Why not httpx's own stack: receiving a batch bundle's answer of ~75 KB cost it about 3.7M instructions, this one
about 1.8M (callgrind), and a batch of 1,000 messages receives about 100 of them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport


def _failure(exc: aiohttp.ClientError, request: httpx.Request) -> httpx.TransportError:
    # The type only: aiohttp's text quotes the bytes the server sent.
    return httpx.RemoteProtocolError(f"malformed answer ({type(exc).__name__})", request=request)


class _Body(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream, request: httpx.Request) -> None:
        self._inner = inner
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner:
                yield chunk
        except aiohttp.ClientError as exc:
            raise _failure(exc, self._request) from None

    async def aclose(self) -> None:
        await self._inner.aclose()


class Connections(AiohttpTransport):
    """`AiohttpTransport` whose every failure is an httpx transport error."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            response = await super().handle_async_request(request)
        except aiohttp.ClientError as exc:
            raise _failure(exc, request) from None
        assert isinstance(response.stream, httpx.AsyncByteStream)
        return httpx.Response(response.status_code, headers=response.headers, request=request,
                              stream=_Body(response.stream, request), extensions=response.extensions)
