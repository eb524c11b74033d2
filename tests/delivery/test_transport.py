"""The FHIR client's connections (`transport.Connections`) against servers that answer badly: a loopback socket
server written here sends each broken answer. Whatever it sends, the client retries and then says
`fhir-unavailable` with the failure's kind, never aiohttp's exception and never the bytes the server sent."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from writeback.errors import WritebackError
from writeback.fhir_client import FhirClient, new_http_client
from writeback.reasons import Reason
from writeback.settings import Settings

BROKEN = {
    "bad status line": b"SECRET-NAME garbage\r\n\r\n",
    "body shorter than its length": b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nSECRET-NAME",
    "broken chunked body": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nSECRET-NAME\r\n",
    "closed without an answer": b"",
}


@contextlib.asynccontextmanager
async def _answering(answer: bytes) -> AsyncIterator[str]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/fhir"
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("answer", BROKEN.values(), ids=BROKEN.keys())
async def test_a_broken_answer_is_fhir_unavailable_after_retries(answer: bytes) -> None:
    async with _answering(answer) as url:
        settings = Settings.from_env({"FHIR_URL": url})
        http = new_http_client(settings)
        sleeps: list[float] = []

        async def sleep(seconds: float) -> None:
            sleeps.append(seconds)

        try:
            with pytest.raises(WritebackError) as caught:
                await FhirClient(settings.fhir_url, http, None, settings, sleep=sleep).request("GET", "Patient/1")
        finally:
            await http.aclose()
        assert caught.value.reason is Reason.FHIR_UNAVAILABLE
        assert "GET Patient/1 kept failing" in caught.value.detail
        assert "SECRET" not in caught.value.detail
        assert sleeps  # retried before giving up


GOOD = (b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\nContent-Length: 27\r\n\r\n"
        b'{"resourceType":"Patient"}\n')


async def _no_wait(seconds: float) -> None:
    return None


async def test_a_good_answer_after_a_broken_one_on_the_same_client() -> None:
    """A broken connection leaves the pool usable: the next request on the same client, to a server that answers
    well, gets its answer."""
    async with _answering(BROKEN["broken chunked body"]) as bad, _answering(GOOD) as good:
        settings = Settings.from_env({"FHIR_URL": good})
        http = new_http_client(settings)
        try:
            with pytest.raises(WritebackError):
                await FhirClient(bad, http, None, settings, sleep=_no_wait).request("GET", "Patient/1")
            answer = await FhirClient(good, http, None, settings, sleep=_no_wait).request("GET", "Patient/1")
        finally:
            await http.aclose()
    assert answer.status_code == 200 and answer.json() == {"resourceType": "Patient"}
