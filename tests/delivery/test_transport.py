"""The FHIR client's connections (`transport.Connections`) against servers that answer badly: a loopback socket
server written here sends each broken answer. Whatever it sends, the client retries and then says
`fhir-unavailable` with the failure's kind, never aiohttp's exception and never the bytes the server sent."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from writeback.errors import WritebackError
from writeback.fhir_client import FhirClient, new_http_client
from writeback.reasons import Reason
from writeback.settings import Settings
from writeback.transport import Connections

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


async def _detail(url: str) -> str:
    """What the client says after giving up on `url` (retries made without waiting)."""
    settings = Settings.from_env({"FHIR_URL": url})
    http = new_http_client(settings)
    try:
        with pytest.raises(WritebackError) as caught:
            await FhirClient(url, http, None, settings, sleep=_no_wait).request("GET", "Patient/1")
    finally:
        await http.aclose()
    assert caught.value.reason is Reason.FHIR_UNAVAILABLE
    return caught.value.detail


async def test_a_refused_connection_says_so() -> None:
    """Not "ConnectTimeout", which sent whoever read it after a slow server instead of a stopped one."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    assert "(ConnectError)" in await _detail(f"http://127.0.0.1:{port}/fhir")


async def test_a_connection_dropped_after_the_request_says_so() -> None:
    async with _answering(b"") as url:
        assert "(RemoteProtocolError)" in await _detail(url)


def _self_signed(folder: Path) -> ssl.SSLContext:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                       serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    return context


async def test_an_untrusted_certificate_is_refused(tmp_path: Path) -> None:
    """TLS verification is on: a server whose certificate no authority signed gets no request."""
    served: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            served.append(await reader.read(100))
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=_self_signed(tmp_path))
    port = server.sockets[0].getsockname()[1]
    try:
        detail = await _detail(f"https://localhost:{port}/fhir")
    finally:
        server.close()
    assert "(ConnectError)" in detail
    assert not any(served)


async def test_a_server_that_stops_reading_the_request_times_out() -> None:
    """aiohttp has no write timeout of its own: a large bundle to a server that takes none of it must not wait
    forever (the client's timeout bounds the whole sending)."""
    async def never_reads(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)
        writer.close()

    server = await asyncio.start_server(never_reads, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    http = httpx.AsyncClient(transport=Connections(), timeout=0.3)
    try:
        async with asyncio.timeout(10):  # the test's own bound: without the fix this waited the 30 s
            with pytest.raises(httpx.WriteTimeout):
                await http.post(f"http://127.0.0.1:{port}/fhir", content=b"x" * 16_000_000)
    finally:
        await http.aclose()
        server.close()


async def test_a_configured_proxy_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """aiohttp's sessions ignore HTTP(S)_PROXY; a deployment that names a proxy still goes through it."""
    async with _answering(GOOD) as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.removesuffix("/fhir"))
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        settings = Settings.from_env({"FHIR_URL": "http://127.0.0.2:9/fhir"})  # nothing listens there
        http = new_http_client(settings)
        try:
            answer = await FhirClient(settings.fhir_url, http, None, settings, sleep=_no_wait).request(
                "GET", "Patient/1")
        finally:
            await http.aclose()
    assert answer.json() == {"resourceType": "Patient"}  # the proxy's answer: directly, nothing would answer


async def test_a_garbled_compressed_answer_is_retried_then_fhir_unavailable() -> None:
    garbled = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 11\r\n\r\nnot gzip!!!"
    async with _answering(garbled) as url:
        assert "(DecodingError)" in await _detail(url)
