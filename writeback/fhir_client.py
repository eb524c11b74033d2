"""The FHIR adapter: turns a `WritePlan` into idempotent, concurrency-safe writes plus their Provenance.

- Create: conditional create on the Dataverse-row identifier (`If-None-Exist`), so a redelivered Create
  finds the resource its first delivery made instead of making a second one.
- Update: read → apply only the planned elements → `PUT` with `If-Match: W/"<vid>"`. A concurrent change
  (412, or 409 on servers that answer so) is re-read and re-applied a bounded number of times. Elements no
  map owns are carried over untouched, and an update that changes nothing writes nothing.
- Every resource we write has `meta.source` set, so the other sync direction can ignore our writes.
- Provenance goes in with a deterministic id (`PUT`), so a retried Provenance never duplicates.
- 429/5xx/timeouts/connection errors are retried with exponential backoff and jitter, honouring
  `Retry-After`, bounded in count and total time.

One pooled `httpx.AsyncClient` per process; see `build_delivery`.
"""

from __future__ import annotations

import asyncio
import email.utils
import json as stdjson
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import httpx
import orjson

from writeback.auth import OAuthClientCredentials, TokenProvider, fhir_tokens
from writeback.decide import WritePlan
from writeback.errors import WritebackError
from writeback.paths import apply
from writeback.pipeline import Delivered, Delivery, Issue
from writeback.provenance import build_provenance
from writeback.reasons import Reason
from writeback.settings import Settings

log = logging.getLogger("writeback.fhir")

FHIR_JSON = "application/fhir+json"
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
BACKOFF_BASE_SECONDS = 0.5
BACKOFF_CAP_SECONDS = 30.0


def _retry_after(response: httpx.Response) -> float | None:
    raw = response.headers.get("Retry-After")
    if not raw:
        return None
    raw = raw.strip()
    if raw.isdigit():
        return float(raw)
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _version_of(response: httpx.Response, body: Mapping[str, Any] | None) -> str | None:
    return version_from(response.headers.get("ETag", ""), body)


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


def _json(response: httpx.Response) -> dict[str, Any] | None:
    if not response.content:
        return None
    try:
        # orjson: decoding batch answers was an eighth of the end-to-end time with the standard library.
        data = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def encode(body: Any) -> bytes:
    """A request body as compact UTF-8 JSON (what httpx's `json=` sends), through orjson."""
    try:
        return orjson.dumps(body)
    except TypeError:  # integers beyond 64 bits, which orjson refuses; the standard library does not
        return stdjson.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def _strip_meta(resource: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resource.items() if k != "meta"}


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


def found_target(plan: WritePlan, bundle: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """The one resource a search by row identifier found, and its version."""
    target = plan.target
    found = [e["resource"] for e in bundle.get("entry") or []
             if isinstance(e, dict) and isinstance(e.get("resource"), dict)
             and e["resource"].get("resourceType") == target.resource_type]
    if not found:
        # Service Bus does not keep a row's messages in order: its Create may simply not be written yet.
        raise WritebackError(Reason.TARGET_PENDING,
                             f"no {target.resource_type} carries the identifier of Dataverse row "
                             f"{target.identifier_value} yet")
    if len(found) > 1:
        raise WritebackError(Reason.TARGET_MISSING,
                             f"more than one {target.resource_type} carries the identifier of Dataverse row "
                             f"{target.identifier_value}; merge or remove the duplicate on the server")
    resource = found[0]
    version = str((resource.get("meta") or {}).get("versionId") or "")
    if not version:
        raise WritebackError(Reason.FHIR_REJECTED, "the FHIR server's search answer has no resource version")
    return resource, version


def target_gone(plan: WritePlan) -> WritebackError:
    target = plan.target
    return WritebackError(Reason.TARGET_MISSING,
                          f"{target.resource_type}/{target.fhir_id} does not exist on the FHIR server")


def unversioned_read() -> WritebackError:
    return WritebackError(Reason.FHIR_REJECTED, "the FHIR server's read answer has no resource version")


def ambiguous_create() -> WritebackError:
    return WritebackError(Reason.TARGET_MISSING, "more than one resource carries the row identifier")


def unnamed_create() -> WritebackError:
    return WritebackError(Reason.FHIR_REJECTED, "the FHIR server's create answer names no id or version")


def vanished(plan: WritePlan, resource_id: str) -> WritebackError:
    return WritebackError(Reason.TARGET_MISSING, f"{plan.resource_type}/{resource_id} no longer exists")


def unversioned_update() -> WritebackError:
    return WritebackError(Reason.FHIR_REJECTED, "the FHIR server's update answer has no version")


def kept_changing(plan: WritePlan, settings: Settings) -> WritebackError:
    return WritebackError(Reason.CONFLICT,
                          f"{plan.resource_type} kept changing on the server through "
                          f"{settings.conflict_retries + 1} attempts")


def unchanged(merged: Mapping[str, Any], current: Mapping[str, Any]) -> bool:
    """An update that changes nothing writes nothing (meta aside)."""
    return _strip_meta(merged) == _strip_meta(current)


issues_of = _issues
json_of = _json


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
        self, method: str, path: str, *, json: Any = None, headers: Mapping[str, str] | None = None
    ) -> httpx.Response:
        """One FHIR interaction, with auth and bounded retries of transient failures."""
        url = path if path.startswith("http") else f"{self.base_url}/{path.lstrip('/')}"
        started, slept, budget = time.monotonic(), 0.0, self.settings.retry_max_seconds
        attempt = 0
        refreshed = False
        content = None if json is None else encode(json)
        while True:
            send_headers = {"Accept": FHIR_JSON, **(headers or {})}
            if json is not None:
                send_headers.setdefault("Content-Type", FHIR_JSON)
            if self.tokens is not None:
                send_headers["Authorization"] = f"Bearer {await self.tokens.token()}"
            failure: str
            wait: float | None = None
            try:
                response = await self.http.request(method, url, content=content, headers=send_headers,
                                                   timeout=self.settings.timeout_seconds)
            except httpx.TransportError as exc:
                failure = type(exc).__name__
            else:
                if response.status_code in (401, 403):
                    if self.tokens is not None and not refreshed and response.status_code == 401:
                        self.tokens.invalidate()  # the token may have been revoked or expired early
                        refreshed = True
                        continue
                    raise WritebackError(Reason.UNAUTHORIZED,
                                         f"the FHIR server refused our credentials (HTTP {response.status_code})")
                if response.status_code not in RETRY_STATUSES:
                    return response
                failure = f"HTTP {response.status_code}"
                wait = _retry_after(response)
            attempt += 1
            backoff = min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2 ** (attempt - 1))
            delay = wait if wait is not None else random.uniform(backoff / 2, backoff)  # noqa: S311 (jitter)
            spent = max(time.monotonic() - started, slept)
            if attempt > self.settings.max_retries or spent + delay > budget:
                where = path.split("?", maxsplit=1)[0]
                raise WritebackError(Reason.FHIR_UNAVAILABLE,
                                     f"{method} {where} kept failing ({failure}) after {attempt} tries")
            log.info("retrying FHIR request", extra={"attempt": attempt, "failure": failure, "delay_s": delay})
            await self._sleep(delay)
            slept += delay

    # ---- reading ---------------------------------------------------------------------------------

    async def read_target(self, plan: WritePlan) -> tuple[dict[str, Any], str]:
        """The resource an update applies to, and its version: by logical id, else by row identifier."""
        target = plan.target
        if target.fhir_id:
            response = await self.request("GET", read_path(plan))
            if response.status_code in (404, 410):
                raise target_gone(plan)
            body = self.check(response, "read")
            version = _version_of(response, body)
            if body is None or version is None:
                raise unversioned_read()
            return body, version
        response = await self.request("GET", read_path(plan))
        return found_target(plan, self.check(response, "search") or {})

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

    async def create(self, plan: WritePlan) -> tuple[str, str, bool, tuple[Issue, ...]]:
        """Conditional create. Returns (id, version, created, issues); created False: it already existed."""
        resource = self.stamp(plan.resource)
        response = await self.request("POST", plan.resource_type, json=resource, headers={
            "If-None-Exist": plan.target.search, "Prefer": "return=representation"})
        if response.status_code == 412:  # several resources carry the row identifier: the server cannot pick
            raise ambiguous_create()
        body = self.check(response, "create")
        version = _version_of(response, body)
        resource_id = (body or {}).get("id") or _id_from_location(response.headers.get("Location", ""))
        if not resource_id or not version:
            raise unnamed_create()
        return str(resource_id), version, response.status_code == 201, _issues(body)

    async def update(self, plan: WritePlan) -> tuple[str, str, bool, tuple[Issue, ...]]:
        """Read-modify-write under If-Match. Returns (id, version, changed, issues)."""
        for _ in range(self.settings.conflict_retries + 1):
            current, version = await self.read_target(plan)
            merged = apply(current, [*plan.assignments, plan.target.identity])
            resource_id = str(current.get("id"))
            if unchanged(merged, current):
                return resource_id, version, False, ()
            response = await self.request(
                "PUT", f"{plan.resource_type}/{resource_id}", json=self.stamp(merged),
                headers={"If-Match": f'W/"{version}"', "Prefer": "return=representation"})
            if response.status_code in (409, 412):
                log.info("concurrent change, re-reading", extra={"resource_type": plan.resource_type})
                continue
            if response.status_code in (404, 410):
                raise vanished(plan, resource_id)
            body = self.check(response, "update")
            new_version = _version_of(response, body)
            if not new_version:
                raise unversioned_update()
            return resource_id, new_version, True, _issues(body)
        raise kept_changing(plan, self.settings)

    async def put_provenance(self, provenance: dict[str, Any]) -> str:
        try:
            response = await self.request("PUT", f"Provenance/{provenance['id']}", json=provenance)
        except WritebackError as exc:
            if exc.reason is Reason.UNAUTHORIZED:
                raise
            raise provenance_unwritten(exc) from None
        body = _json(response)
        if not response.is_success:
            raise provenance_refused(response.status_code, body)
        version = _version_of(response, body) or ""
        return f"Provenance/{provenance['id']}" + (f"/_history/{version}" if version else "")


def read_path(plan: WritePlan) -> str:
    """The read an update starts from: by logical id, else a search by row identifier."""
    target = plan.target
    if target.fhir_id:
        return f"{target.resource_type}/{target.fhir_id}"
    return f"{target.resource_type}?{target.search}&_count=2"


def id_from_location(location: str) -> str | None:
    return _id_from_location(location)


def _id_from_location(location: str) -> str | None:
    # .../Patient/<id>/_history/<vid>
    parts = location.rstrip("/").split("/")
    if "_history" in parts:
        i = parts.index("_history")
        return parts[i - 1] if i >= 1 else None
    return parts[-1] if parts and parts[-1] else None


class FhirDelivery:
    """`pipeline.Delivery` against a FHIR server."""

    def __init__(self, client: FhirClient) -> None:
        self.client = client

    async def deliver(self, plan: WritePlan) -> Delivered:
        if plan.operation == "create":
            resource_id, version, created, issues = await self.client.create(plan)
        else:
            resource_id, version, _, issues = await self.client.update(plan)
            created = False
        versioned = f"{plan.resource_type}/{resource_id}/_history/{version}"
        settings = self.client.settings
        provenance = build_provenance(plan, versioned, created=created, agent=settings.agent,
                                      meta_source=settings.meta_source)
        provenance_ref = await self.client.put_provenance(provenance)
        return Delivered(versioned, provenance_ref, issues)


class FhirTarget(FhirDelivery):
    """The function's FHIR delivery: one plan as `FhirDelivery`'s direct requests, several as FHIR batch
    bundles (`bundles.BatchDelivery`), so a batch of one costs no bundle round trip."""

    def __init__(self, client: FhirClient) -> None:
        super().__init__(client)
        from writeback.bundles import BatchDelivery  # noqa: PLC0415 - bundles imports this module

        self.batch = BatchDelivery(client)

    async def deliver_many(self, plans: Sequence[WritePlan], memo: dict[Any, Any] | None = None,
                           written: asyncio.Event | None = None) -> list[Delivered | WritebackError]:
        """As `BatchDelivery.deliver_many`."""
        if len(plans) != 1 or memo:  # a batch that already wrote: its bundles know the copies they wrote
            return await self.batch.deliver_many(plans, memo, written)
        try:
            return [await self.deliver(plans[0])]
        except WritebackError as exc:
            return [exc]
        finally:
            if written is not None:
                written.set()


class AlternateDelivery:
    """`pipeline.Delivery` to a user-defined endpoint (e.g. a Logic App): the validated resource and its
    Provenance go out together as one FHIR transaction bundle, the Provenance pointing at the resource's
    entry; the endpoint does the rest (the overview's "alternate writeback")."""

    def __init__(self, url: str, http: httpx.AsyncClient, tokens: TokenProvider, settings: Settings) -> None:
        self.client = FhirClient(url, http, tokens, settings)
        self.url = url

    async def deliver(self, plan: WritePlan) -> Delivered:
        settings = self.client.settings
        resource = self.client.stamp(apply(plan.resource, [plan.target.identity]))
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
    """The process's one pooled client: keep-alive, bounded pool, TLS verification on."""
    limits = httpx.Limits(max_connections=max(8, settings.max_concurrency * 2),
                          max_keepalive_connections=max(8, settings.max_concurrency))
    return httpx.AsyncClient(limits=limits, timeout=settings.timeout_seconds, http2=False,
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
        delivery = FhirTarget(FhirClient(settings.fhir_url, http, tokens, settings))

    async def aclose() -> None:
        await tokens.aclose()
        await http.aclose()

    return delivery, aclose
