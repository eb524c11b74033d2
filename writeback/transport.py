"""The FHIR client's connections: httpx's interface over aiohttp's HTTP/1.1 stack.

`httpx_aiohttp` (by an httpx maintainer) keeps httpx's requests, answers and timeouts. Its error mapping is
coarse (every connection failure becomes a `ConnectTimeout`) and incomplete (a malformed answer escapes as
aiohttp's `ClientResponseError`): `Connections` maps every aiohttp failure, while the answer's head is read and
while its body is, to the httpx transport error that says what happened, so the client's retries, reason codes
and details see the failure httpx's own stack would report.

Why not httpx's own stack: receiving a batch bundle's answer of ~75 KB cost it about 3.7M instructions, this one
about 1.8M (callgrind), and a batch of 1,000 messages receives about 100 of them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport


def _mapped(exc: aiohttp.ClientError, request: httpx.Request) -> httpx.TransportError:
    """httpx's error for what happened. (httpx_aiohttp's own table calls every connection failure a
    `ConnectTimeout`: a refused connection, a failed DNS look-up, an untrusted certificate, a dropped connection.)
    The text names the kind only: aiohttp's quotes the bytes the server sent."""
    kind = type(exc).__name__
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(f"no connection in time ({kind})", request=request)
    if isinstance(exc, aiohttp.ServerTimeoutError):
        return httpx.ReadTimeout(f"no answer in time ({kind})", request=request)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return httpx.ConnectError(f"cannot connect ({kind})", request=request)
    if isinstance(exc, aiohttp.ClientPayloadError):
        return httpx.ReadError(f"answer cut short ({kind})", request=request)
    if isinstance(exc, aiohttp.ClientConnectionError):
        return httpx.RemoteProtocolError(f"connection lost ({kind})", request=request)
    return httpx.RemoteProtocolError(f"malformed answer ({kind})", request=request)


def _translated(exc: aiohttp.ClientError | httpx.TransportError, request: httpx.Request) -> BaseException:
    """What to raise for a failure from below: aiohttp's own, or the one httpx_aiohttp mapped it to, by what
    happened (`_mapped`); an httpx error of another origin as it is."""
    cause = exc if isinstance(exc, aiohttp.ClientError) else exc.__cause__
    return _mapped(cause, request) if isinstance(cause, aiohttp.ClientError) else exc


class _Body(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream, request: httpx.Request) -> None:
        self._inner = inner
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner:
                yield chunk
        except (aiohttp.ClientError, httpx.TransportError) as exc:
            raise _translated(exc, self._request) from None

    async def aclose(self) -> None:
        await self._inner.aclose()


class Connections(AiohttpTransport):
    """`AiohttpTransport` whose every failure is the httpx transport error that says what happened, with a bound
    on sending the request: aiohttp has no write timeout and starts its read timeout only once the body is
    sent, so a server that stops reading a large body would hold the request forever."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeout = request.extensions.get("timeout", {})
        bound = sum(timeout.get(k) or 0 for k in ("pool", "write", "read")) or None
        try:
            async with asyncio.timeout(bound):
                response = await super().handle_async_request(request)
        except (aiohttp.ClientError, httpx.TransportError) as exc:
            raise _translated(exc, request) from None
        except TimeoutError:  # the bound above (aiohttp's own timeouts arrive as httpx errors)
            raise httpx.WriteTimeout("the request was not taken in time", request=request) from None
        assert isinstance(response.stream, httpx.AsyncByteStream)
        return httpx.Response(response.status_code, headers=response.headers, request=request,
                              stream=_Body(response.stream, request), extensions=response.extensions)
