"""Microsoft Entra ID tokens through azure-identity. Entra ID cannot run here, so the credential is a mock
(`MockCredential`) standing at that boundary; the caching and error mapping under test are our own."""

from __future__ import annotations

import time

import pytest
from azure.core.credentials import AccessToken
from azure.core.exceptions import ClientAuthenticationError, ServiceRequestError
from azure.identity import CredentialUnavailableError

from writeback.auth import AzureIdentityTokens
from writeback.errors import WritebackError
from writeback.reasons import Reason
from writeback.settings import Settings


class MockCredential:
    """Stands in for ManagedIdentityCredential / ClientSecretCredential (Entra ID is unreachable here)."""

    def __init__(self, error: Exception | None = None, lifetime: float = 3600) -> None:
        self.error = error
        self.lifetime = lifetime
        self.scopes: list[str] = []
        self.closed = False

    async def get_token(self, *scopes: str) -> AccessToken:
        self.scopes.extend(scopes)
        if self.error is not None:
            raise self.error
        return AccessToken(f"token-{len(self.scopes)}", int(time.time() + self.lifetime))

    async def close(self) -> None:
        self.closed = True


SETTINGS = Settings.from_env({"FHIR_URL": "https://ws-fhir.fhir.azurehealthcareapis.com"})


async def test_token_is_requested_for_the_fhir_default_scope_and_cached():
    credential = MockCredential()
    tokens = AzureIdentityTokens(SETTINGS, credential)
    assert await tokens.token() == "token-1"
    assert await tokens.token() == "token-1"
    assert credential.scopes == ["https://ws-fhir.fhir.azurehealthcareapis.com/.default"]
    tokens.invalidate()  # after a 401 the next request asks again
    assert await tokens.token() == "token-2"
    await tokens.aclose()
    assert credential.closed


async def test_a_token_close_to_expiry_is_refreshed_before_use():
    credential = MockCredential(lifetime=60)  # refresh margin: a fifth of the lifetime, at most 120 s
    tokens = AzureIdentityTokens(SETTINGS, credential)
    await tokens.token()
    tokens._refresh_at = time.time() - 1  # as if 48 s had passed
    assert await tokens.token() == "token-2"


@pytest.mark.parametrize(("error", "reason"), [
    (ClientAuthenticationError("AADSTS7000215: invalid secret"), Reason.UNAUTHORIZED),
    (CredentialUnavailableError("no managed identity endpoint"), Reason.CONFIG_ERROR),
    (ServiceRequestError("connection refused"), Reason.FHIR_UNAVAILABLE),
])
async def test_credential_failures_map_to_reason_codes(error, reason):
    with pytest.raises(WritebackError) as info:
        await AzureIdentityTokens(SETTINGS, MockCredential(error)).token()
    assert info.value.reason is reason
    assert "AADSTS" not in info.value.detail


async def test_without_any_credential_here_the_detail_does_not_say_refused(monkeypatch: pytest.MonkeyPatch):
    """Found trying the product as a new user: with no managed identity and no az login, DefaultAzureCredential's
    chain ends in the same error as a refusal, and `check-config --connect` said Entra ID "refused the credential".
    The real DefaultAzureCredential runs here, every credential of its chain unavailable (no network to Entra ID is
    asked: the managed identity probe and az are what it tries)."""
    for name in ("AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET", "IDENTITY_ENDPOINT", "MSI_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")  # no az, azd or pwsh to ask
    tokens = AzureIdentityTokens(SETTINGS)
    try:
        with pytest.raises(WritebackError) as info:
            await tokens.token()
    finally:
        await tokens.aclose()
    assert info.value.reason is Reason.UNAUTHORIZED, info.value.detail
    assert "none is available here" in info.value.detail and "refused the credential" not in info.value.detail
