"""`check-config` found by a fourteenth review (6a5a9cd): a URL with credentials is refused and its credentials
never shown. Fails today."""

from __future__ import annotations

import pytest

from writeback import cli
from writeback.settings import SETTINGS


@pytest.mark.parametrize("url", [
    "https://writeback:Sp@ce-4711@fhir.example.org/r4",  # an unencoded @ in the password
    "https://writeback:Xy/4711@fhir.example.org/r4",  # an unencoded / in the password
])
def test_w1_check_config_never_shows_a_password_in_a_url(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str], url: str) -> None:
    """An administrator pastes the FHIR URL with a password whose `@` or `/` is not percent-encoded, as a proxy's
    basic-auth password often is. `check-config` must refuse it (6a5a9cd: "refuses credentials in URLs") and show
    no part of the password, in its settings list or its checks. Today: `settings.redacted` cuts the userinfo at
    the first `@` (`_USERINFO`'s `[^/@]*@`), so `ce-4711@fhir…` is shown; with a `/`, `require_secure_url` reads
    `writeback` as the host (urlsplit: no `@` before the first `/`), accepts the URL, and the list shows it whole."""
    for spec in SETTINGS:
        monkeypatch.delenv(spec.name, raising=False)
    monkeypatch.setenv("FHIR_URL", url)
    monkeypatch.setenv("OUTCOMES_CONNECTION_STRING", "UseDevelopmentStorage=true")
    assert cli.main(["check-config"]) == cli.EXIT_CHECK_FAILED
    out = capsys.readouterr().out
    assert "4711" not in out, out
    assert "setting FHIR_URL holds credentials" in out, out
