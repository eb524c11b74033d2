"""Bearer tokens for the FHIR server and the alternate endpoint, cached and refreshed before expiry.

Microsoft Entra ID goes through azure-identity (managed identity by default, a client secret when one is
configured); any other OAuth 2.0 server through authlib's client-credentials grant. Tokens and secrets are
never logged and never appear in an error text.
"""

from __future__ import annotations

import asyncio
import time
import warnings
from typing import Any, Protocol

import httpx
from authlib.integrations.base_client.errors import OAuthError
from azure.core.exceptions import ClientAuthenticationError, ServiceRequestError
from azure.identity import CredentialUnavailableError
from azure.identity.aio import ClientSecretCredential, DefaultAzureCredential

from writeback.errors import WritebackError
from writeback.reasons import Reason
from writeback.settings import OAuthClient, Settings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # authlib announces that its httpx integration moves to httpx2
    from authlib.integrations.httpx_client import AsyncOAuth2Client

# Refresh this long before expiry (at most a fifth of a token's life), so no request leaves with a dying token.
REFRESH_MARGIN_SECONDS = 120


class TokenProvider(Protocol):
    async def token(self) -> str: ...

    def invalidate(self) -> None: ...

    async def aclose(self) -> None: ...


class _Cached:
    """The caching and single-flight refresh shared by both providers."""

    def __init__(self) -> None:
        self._token: str | None = None
        self._refresh_at = 0.0
        self._lock = asyncio.Lock()

    async def token(self) -> str:
        if self._token is not None and time.time() < self._refresh_at:
            return self._token
        async with self._lock:
            if self._token is None or time.time() >= self._refresh_at:
                now = time.time()
                self._token, expires_at = await self._fetch()
                self._refresh_at = expires_at - min(REFRESH_MARGIN_SECONDS, (expires_at - now) / 5)
            return self._token

    def invalidate(self) -> None:
        self._token = None

    async def _fetch(self) -> tuple[str, float]:
        raise NotImplementedError


class OAuthClientCredentials(_Cached):
    """RFC 6749 client-credentials grant, via authlib."""

    def __init__(self, client: OAuthClient, timeout: float = 30.0) -> None:
        super().__init__()
        self._client = client
        self._status = 0  # of the token endpoint's last answer: authlib does not raise on an error status
        self._oauth = AsyncOAuth2Client(
            client_id=client.client_id,
            client_secret=client.client_secret,
            scope=client.scope or None,
            token_endpoint_auth_method="client_secret_basic",  # noqa: S106 (a method name, not a secret)
            timeout=timeout,
            event_hooks={"response": [self._answered]},
        )

    async def _answered(self, response: httpx.Response) -> None:
        self._status = response.status_code

    async def _fetch(self) -> tuple[str, float]:
        p = self._client.settings
        credentials = f"check {p}_CLIENT_ID and {p}_CLIENT_SECRET"
        self._status = 0
        try:
            token: Any = await self._oauth.fetch_token(self._client.token_url, grant_type="client_credentials")
        except OAuthError as exc:
            code = str(exc.error or "error")[:40]
            if code in ("invalid_client", "unauthorized_client", "invalid_grant", "access_denied"):
                raise WritebackError(Reason.UNAUTHORIZED,
                                     f"the token endpoint refused the client credentials ({code}): {credentials}"
                                     ) from None
            raise WritebackError(Reason.UNAUTHORIZED, f"the token endpoint answered {code}") from None
        except httpx.HTTPStatusError as exc:
            self._status = exc.response.status_code
            token = {}
        except httpx.HTTPError as exc:
            raise WritebackError(Reason.FHIR_UNAVAILABLE, f"the token endpoint could not be reached "
                                 f"({type(exc).__name__}): check {p}_TOKEN_URL") from None
        except ValueError:
            token = {}
        access = token.get("access_token") if isinstance(token, dict) else None
        if not isinstance(access, str) or not access:
            status = self._status
            if status in (401, 403):
                raise WritebackError(Reason.UNAUTHORIZED, f"the token endpoint refused the client credentials "
                                     f"(HTTP {status}): {credentials}")
            if status >= 500 or status in (408, 429):
                raise WritebackError(Reason.FHIR_UNAVAILABLE, f"the token endpoint answered HTTP {status}")
            answered = f"answered HTTP {status}, not a token" if status >= 300 else "answered without an access_token"
            raise WritebackError(Reason.UNAUTHORIZED, f"the token endpoint {answered}: check that {p}_TOKEN_URL "
                                 "is the OAuth token endpoint")
        expires_at = token.get("expires_at") or time.time() + float(token.get("expires_in") or 300)
        return access, float(expires_at)

    async def aclose(self) -> None:
        await self._oauth.aclose()


class AzureIdentityTokens(_Cached):
    """Microsoft Entra ID tokens for `<FHIR_URL>/.default` via azure-identity."""

    def __init__(self, settings: Settings, credential: Any | None = None) -> None:
        super().__init__()
        self._scope = settings.fhir_scope
        if credential is None:
            if settings.fhir_tenant_id and settings.fhir_client_id and settings.fhir_client_secret:
                credential = ClientSecretCredential(
                    settings.fhir_tenant_id, settings.fhir_client_id, settings.fhir_client_secret)
            else:
                # Managed identity in Azure; a developer's az login locally. A user-assigned identity
                # is picked by its client id.
                credential = DefaultAzureCredential(
                    managed_identity_client_id=settings.fhir_client_id or None,
                    exclude_interactive_browser_credential=True)
        self._credential = credential
        self._chained = isinstance(credential, DefaultAzureCredential)

    async def _fetch(self) -> tuple[str, float]:
        try:
            access = await self._credential.get_token(self._scope)
        except CredentialUnavailableError:
            raise WritebackError(Reason.CONFIG_ERROR,
                                 "setting FHIR_CLIENT_ID/FHIR_TENANT_ID: no Azure credential is available "
                                 "(no managed identity, no client secret)") from None
        except ClientAuthenticationError:
            # The chain of DefaultAzureCredential says the same when none of its credentials was there to try
            # (no managed identity, no az login) as when one was refused: the detail says both, not "refused".
            raise WritebackError(Reason.UNAUTHORIZED, "no Azure credential gave a token: none is available here (no "
                                 "managed identity, no az login, no client secret), or Microsoft Entra ID refused "
                                 "it" if self._chained else "Microsoft Entra ID refused the credential") from None
        except ServiceRequestError as exc:
            raise WritebackError(Reason.FHIR_UNAVAILABLE,
                                 f"Microsoft Entra ID could not be reached ({type(exc).__name__})") from None
        return access.token, float(access.expires_on)

    async def aclose(self) -> None:
        await self._credential.close()


def fhir_tokens(settings: Settings) -> TokenProvider:
    if settings.fhir_token_url:
        return OAuthClientCredentials(
            OAuthClient(settings.fhir_token_url, settings.fhir_client_id, settings.fhir_client_secret,
                        settings.fhir_scope if settings.fhir_scope != f"{settings.fhir_url}/.default" else ""),
            timeout=settings.timeout_seconds,
        )
    return AzureIdentityTokens(settings)
