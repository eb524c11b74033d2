"""The FHIR adapter: the REST client (auth, bounded retries) and the errors every write shares.

Writes go out as FHIR batch bundles (`writeback.bundles.BatchDelivery`): each is a read-modify-write with
`If-Match` whose content `writeback.converge` decides on the copy just read, so a concurrent change (412, or
409 on servers that answer so) is read again and decided again; a create is `PUT <Type>/<id>` with an id
derived from the row, so it cannot make a second resource. Every resource written has `meta.source` set, so
the other sync direction can ignore our writes; every version written gets its Provenance.

429/5xx/timeouts/connection errors are retried with exponential backoff and jitter, honouring `Retry-After` (or
the Azure FHIR service's `x-ms-retry-after-ms`; for throttled batch entries, those on the bundle's answer), bounded
in count and total time. One pooled `httpx.AsyncClient` per process; see `build_delivery`.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import httpx
import msgspec

from writeback.auth import OAuthClientCredentials, TokenProvider, fhir_tokens
from writeback.decide import Target, WritePlan
from writeback.errors import NotApplied, TargetGone, WritebackError
from writeback.mapping import resolve_refs
from writeback.paths import apply
from writeback.pipeline import Delivered, Delivery, Issue
from writeback.provenance import build_provenance
from writeback.reasons import Reason
from writeback.settings import Settings
from writeback.transport import Connections

log = logging.getLogger("writeback.fhir")

FHIR_JSON = "application/fhir+json"
# What a request body declares: FHIR's http rules ask for the charset explicitly (http.html#mime-type).
FHIR_JSON_UTF8 = "application/fhir+json; charset=utf-8"
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# Refusals that mean the request was not carried out (throttled, or not taken in); a 500, 502, 504 or 408 may
# come after the server (or the one behind a gateway) applied it.
NOT_APPLIED_STATUSES = frozenset({429, 503})
BACKOFF_BASE_SECONDS = 0.5
BACKOFF_CAP_SECONDS = 30.0


def retry_after(response: httpx.Response) -> float | None:
    """How long the server asks to wait before the next try: `Retry-After` (seconds or an HTTP date), else the
    Azure FHIR service's `x-ms-retry-after-ms`. A batch answered 200 carries its throttled entries' wait there too
    (microsoft/fhir-server's BundleHandler copies both onto the bundle's answer)."""
    raw = response.headers.get("Retry-After")
    if not raw:
        millis = (response.headers.get("x-ms-retry-after-ms") or "").strip()
        return int(millis) / 1000 if millis.isdigit() else None
    raw = raw.strip()
    if raw.isdigit():
        return float(raw)
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def version_from(etag: str | None, body: Mapping[str, Any] | None) -> str | None:
    """The version a write or read answered with: the ETag, else `meta.versionId` (also for batch entries)."""
    if etag:
        return etag.removeprefix("W/").strip('"')
    meta = (body or {}).get("meta") or {}
    vid = meta.get("versionId")
    return str(vid) if vid else None


def _issues(body: Mapping[str, Any] | None) -> tuple[Issue, ...]:
    """Warnings and information from an OperationOutcome (inline or in `Prefer: OperationOutcome`)."""
    if not body or body.get("resourceType") != "OperationOutcome":
        return ()
    found: list[Issue] = []
    for issue in body.get("issue") or []:
        if not isinstance(issue, dict):
            continue
        severity = str(issue.get("severity", ""))
        if severity not in ("warning", "information"):
            continue
        codings = ((issue.get("details") or {}).get("coding") or [])
        detail = ",".join(str(c.get("code")) for c in codings if isinstance(c, dict) and c.get("code"))
        expression = ",".join(str(e) for e in issue.get("expression") or [] if isinstance(e, str))
        found.append(Issue(severity, str(issue.get("code", "")), expression[:200], detail[:200]))
    return tuple(found)


def _problem(body: Mapping[str, Any] | None) -> str:
    """Issue codes and element expressions of an error OperationOutcome: never its diagnostics text,
    which servers fill with the values they refused."""
    if not body or body.get("resourceType") != "OperationOutcome":
        return ""
    parts = []
    for issue in (body.get("issue") or [])[:3]:
        if isinstance(issue, dict):
            where = ",".join(e for e in issue.get("expression") or [] if isinstance(e, str))
            parts.append(f"{issue.get('severity', '?')}/{issue.get('code', '?')}" + (f" at {where}" if where else ""))
    return "; ".join(parts)


# msgspec, one pass each way: every JSON number with a fraction or exponent is decoded as a Decimal, so a value
# read back and written again keeps the text it had ("72.50" stays 72.50, which a float cannot hold), and a
# Decimal is encoded as the number it holds.
_DECODER = msgspec.json.Decoder(float_hook=Decimal)
_ENCODER = msgspec.json.Encoder(decimal_format="number")


def _json(response: httpx.Response) -> dict[str, Any] | None:
    if not response.content:
        return None
    try:
        data = _DECODER.decode(response.content)
    except (msgspec.DecodeError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def encode(body: Any, *, indent: bool = False) -> bytes:
    """A request body as compact UTF-8 JSON (what httpx's `json=` sends); decimals as written. `indent`: for
    people to read (the dry run)."""
    encoded = _ENCODER.encode(body)
    return msgspec.json.format(encoded, indent=2) if indent else encoded


def refused(status: int, body: Mapping[str, Any] | None, what: str) -> WritebackError:
    """The error for a refused interaction, the same for a single request and for a batch entry."""
    problem = _problem(body)
    return WritebackError(Reason.FHIR_REJECTED,
                          f"the FHIR server refused the {what} (HTTP {status})" + (f": {problem}" if problem else ""))


def provenance_refused(status: int, body: Mapping[str, Any] | None) -> WritebackError:
    problem = _problem(body)
    return WritebackError(Reason.PROVENANCE_FAILED,
                          f"the FHIR server refused the Provenance (HTTP {status})"
                          + (f": {problem}" if problem else ""))


def provenance_unwritten(exc: WritebackError) -> WritebackError:
    """A request-level failure of a Provenance write: credentials stay `unauthorized`, the rest is
    `provenance_failed`."""
    if exc.reason is Reason.UNAUTHORIZED:
        return exc
    return WritebackError(Reason.PROVENANCE_FAILED, f"Provenance not written: {exc.detail}")


def found_target(target: Target, bundle: Mapping[str, Any]) -> tuple[dict[str, Any], str] | None:
    """The one resource a search by row identifier found, and its version; None when there is none."""
    found = [e["resource"] for e in bundle.get("entry") or []
             if isinstance(e, dict) and isinstance(e.get("resource"), dict)
             and e["resource"].get("resourceType") == target.resource_type]
    if not found:
        return None
    if len(found) > 1:
        raise WritebackError(Reason.TARGET_MISSING,
                             f"more than one {target.resource_type} carries the identifier of Dataverse row "
                             f"{target.identifier_value}; merge or remove the duplicate on the server")
    resource = found[0]
    version = str((resource.get("meta") or {}).get("versionId") or "")
    if not version:
        raise WritebackError(Reason.FHIR_REJECTED, "the FHIR server's search answer has no resource version")
    return resource, version


def target_pending(target: Target) -> WritebackError:
    # Service Bus does not keep messages in order: the row's (or its parent's) Create may not be written yet.
    return WritebackError(Reason.TARGET_PENDING, f"no {target.resource_type} for {target.table or 'Dataverse row'} "
                          f"{target.identifier_value} exists on the FHIR server yet")


def target_gone(target: Target) -> WritebackError:
    reference = f"{target.resource_type}/{target.fhir_id}"
    return TargetGone(target.row, reference, f"{reference} does not exist on the FHIR server")


def unversioned_read() -> WritebackError:
    return WritebackError(Reason.FHIR_REJECTED, "the FHIR server's read answer has no resource version")


def vanished(target: Target, resource_id: str) -> WritebackError:
    reference = f"{target.resource_type}/{resource_id}"
    return TargetGone(target.row, reference, f"{reference} no longer exists")


def being_created(target: Target) -> WritebackError:
    return WritebackError(Reason.CONFLICT, f"another instance is creating the {target.resource_type} of "
                          f"{target.table} {target.identifier_value}; tried again after the delay")


def unversioned_update() -> WritebackError:
    return WritebackError(Reason.FHIR_REJECTED, "the FHIR server's update answer has no version")


def kept_changing(target: Target, settings: Settings) -> WritebackError:
    return WritebackError(Reason.CONFLICT,
                          f"{target.resource_type} kept changing on the server through "
                          f"{settings.conflict_retries + 1} attempts")


issues_of = _issues
json_of = _json


@dataclass(slots=True)
class SendWindow:
    """The requests of a write that holds create leases: none is sent after `not_after` (monotonic seconds), when
    the leases may have expired; `maybe_applied` once any of them may have changed something on the server (sent
    without an answer, or answered so as not to rule it out), which tells whether the leases may be given back
    when the write is stopped."""

    not_after: float
    in_flight: int = 0
    maybe_applied: bool = False

    @property
    def unapplied(self) -> bool:
        return not self.maybe_applied and not self.in_flight


class FhirClient:
    """Small async FHIR REST client around one shared httpx client."""

    def __init__(
        self,
        base_url: str,
        http: httpx.AsyncClient,
        tokens: TokenProvider | None,
        settings: Settings,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.http = http
        self.tokens = tokens
        self.settings = settings
        self._sleep = sleep

    async def request(
        self, method: str, path: str, *, json: Any = None, headers: Mapping[str, str] | None = None,
        window: SendWindow | None = None,
    ) -> httpx.Response:
        """One FHIR interaction, with auth and bounded retries of transient failures; `window`, the time a create's
        lease allows it to be sent in, and what became of it."""
        url = path if path.startswith("http") else f"{self.base_url}/{path.lstrip('/')}"
        started, slept, budget = time.monotonic(), 0.0, self.settings.retry_max_seconds
        attempt = 0
        refreshed = False
        maybe_applied = False  # a try got no answer, or one that does not rule out that it was applied
        content = None if json is None else encode(json)
        while True:
            send_headers = {"Accept": FHIR_JSON, **(headers or {})}
            if json is not None:
                send_headers.setdefault("Content-Type", FHIR_JSON_UTF8)
            if self.tokens is not None:
                send_headers["Authorization"] = f"Bearer {await self.tokens.token()}"
            if window is not None and time.monotonic() > window.not_after:
                # Held up (a token endpoint answering slowly, a wait for a slot): a create sent now could land after
                # its lease expired, over a newer version another instance wrote meanwhile (found by review).
                kind = WritebackError if maybe_applied else NotApplied
                raise kind(Reason.FHIR_UNAVAILABLE, f"{method} {path.split('?', maxsplit=1)[0]} was not sent: held "
                           "up past the time its create lease allows (FHIR_RETRY_MAX_SECONDS)")
            failure: str
            wait: float | None = None
            if window is not None:
                window.in_flight += 1
            try:
                response = await self.http.request(method, url, content=content, headers=send_headers,
                                                   timeout=self.settings.timeout_seconds)
            except (httpx.TransportError, httpx.DecodingError) as exc:  # (a garbled compressed answer: decoding)
                failure = type(exc).__name__
                maybe_applied = True
            except BaseException:  # stopped (the deadline) with the request on its way: it may be applied
                if window is not None:
                    window.maybe_applied = True
                raise
            else:
                if window is not None and (response.status_code not in (401, 403, *NOT_APPLIED_STATUSES)):
                    window.maybe_applied = True
                if response.status_code in (401, 403):
                    if self.tokens is not None and not refreshed and response.status_code == 401:
                        self.tokens.invalidate()  # the token may have been revoked or expired early
                        refreshed = True
                        continue
                    raise WritebackError(Reason.UNAUTHORIZED,
                                         f"the FHIR server refused our credentials (HTTP {response.status_code})")
                if response.status_code not in RETRY_STATUSES:
                    # Sent before, and that try may have been applied (no answer, or one such as 500 that does not
                    # rule it out): an earlier copy may have done what this answer says was done.
                    response.extensions["writeback.resent"] = maybe_applied
                    return response
                failure = f"HTTP {response.status_code}"
                wait = retry_after(response)
                maybe_applied |= response.status_code not in NOT_APPLIED_STATUSES
            finally:
                if window is not None:
                    window.in_flight -= 1
            if window is not None:
                window.maybe_applied |= maybe_applied
            attempt += 1
            backoff = min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2 ** (attempt - 1))
            delay = wait if wait is not None else random.uniform(backoff / 2, backoff)  # noqa: S311 (jitter)
            spent = max(time.monotonic() - started, slept)
            if attempt > self.settings.max_retries or spent + delay > budget:
                where = path.split("?", maxsplit=1)[0]
                kind = WritebackError if maybe_applied else NotApplied
                raise kind(Reason.FHIR_UNAVAILABLE, f"{method} {where} kept failing ({failure}) after {attempt} tries")
            log.info("retrying FHIR request", extra={"attempt": attempt, "failure": failure, "delay_s": delay})
            await self._sleep(delay)
            slept += delay

    def check(self, response: httpx.Response, what: str) -> dict[str, Any] | None:
        body = _json(response)
        if response.is_success:
            return body
        raise refused(response.status_code, body, what)

    # ---- writing ---------------------------------------------------------------------------------

    def stamp(self, resource: dict[str, Any]) -> dict[str, Any]:
        meta = dict(resource.get("meta") or {})
        meta["source"] = self.settings.meta_source
        for key in ("versionId", "lastUpdated"):
            meta.pop(key, None)
        return {**resource, "meta": meta}


def read_path(target: Target) -> str:
    """The read a write starts from: by logical id, else a search by row identifier."""
    if target.fhir_id:
        return f"{target.resource_type}/{target.fhir_id}"
    return f"{target.resource_type}?{target.search}&_count=2"




class AlternateDelivery:
    """`pipeline.Delivery` to a user-defined endpoint (e.g. a Logic App): the validated resource and its
    Provenance go out together as one FHIR transaction bundle, the Provenance pointing at the resource's
    entry; the endpoint does the rest (the overview's "alternate writeback")."""

    def __init__(self, url: str, http: httpx.AsyncClient, tokens: TokenProvider, settings: Settings) -> None:
        self.client = FhirClient(url, http, tokens, settings)
        self.url = url

    async def deliver(self, plan: WritePlan) -> Delivered:
        settings = self.client.settings
        resource = self.client.stamp(resolve_refs(apply(plan.resource, [plan.target.identity]), plan.ref_ids))
        full_url = f"urn:uuid:{uuid.uuid4()}"
        # An update carries only the changed elements, as the overview's writeback does; the endpoint merges.
        method = "POST" if plan.operation == "create" else "PUT"
        provenance = build_provenance(plan, full_url, created=plan.operation == "create", agent=settings.agent,
                                      meta_source=settings.meta_source)
        provenance.pop("id")
        bundle = {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {"fullUrl": full_url, "resource": resource,
                 "request": {"method": method, "url": f"{plan.resource_type}?{plan.target.search}"
                             if method == "PUT" else plan.resource_type,
                             **({"ifNoneExist": plan.target.search} if method == "POST" else {})}},
                {"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": provenance,
                 "request": {"method": "POST", "url": "Provenance"}},
            ],
        }
        response = await self.client.request("POST", self.url, json=bundle)
        if not response.is_success:
            self.client.check(response, "bundle")
        return Delivered(f"{plan.resource_type}?{plan.target.search}", "Provenance (sent to the alternate endpoint)",
                         _issues(_json(response)))


def new_http_client(settings: Settings) -> httpx.AsyncClient:
    """The process's one pooled client: keep-alive, bounded pool, TLS verification on, over aiohttp's
    connections (`transport.Connections`: half the CPU per batch answer) unless a proxy is configured."""
    limits = httpx.Limits(max_connections=max(8, settings.max_concurrency * 2),
                          max_keepalive_connections=max(8, settings.max_concurrency))
    # aiohttp's sessions do not read HTTP(S)_PROXY: where the environment names a proxy, httpx's own connections
    # (which do) are kept, so a deployment behind one goes on working through it.
    transport = None if urllib.request.getproxies() else Connections(limits=limits, verify=True)
    return httpx.AsyncClient(transport=transport, limits=limits, timeout=settings.timeout_seconds,
                             headers={"User-Agent": "dataverse-fhir-writeback/0.1"})


def build_delivery(settings: Settings) -> tuple[Delivery, Callable[[], Awaitable[None]]]:
    """The configured delivery and a callable that closes what it opened. The FHIR target also delivers many
    plans at once (`deliver_many`, for `Pipeline.process_many`); the alternate endpoint takes one at a time."""
    http = new_http_client(settings)
    tokens: TokenProvider
    delivery: Delivery
    if settings.target == "alternate":
        assert settings.alternate is not None
        tokens = OAuthClientCredentials(settings.alternate, settings.timeout_seconds)
        delivery = AlternateDelivery(settings.alternate_url, http, tokens, settings)
    else:
        tokens = fhir_tokens(settings)
        from writeback.bundles import BatchDelivery  # noqa: PLC0415 - bundles imports this module

        delivery = BatchDelivery(FhirClient(settings.fhir_url, http, tokens, settings))

    async def aclose() -> None:
        await tokens.aclose()
        await http.aclose()

    return delivery, aclose
