"""Endpoints leave the machine only over TLS, and secrets never show in what the admin commands print."""

from __future__ import annotations

import pytest

from writeback.errors import ConfigError
from writeback.settings import SETTINGS, Settings, redacted, require_secure_url

SECRET = "Qz-secret-value-4410"
BASE = {"FHIR_URL": "https://fhir.example.org", "WRITEBACK_META_SOURCE": "urn:test:writeback"}


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/fhir", "http://127.0.0.2/fhir", "http://[::1]:9/fhir",
                                 "http://localhost:1234", "https://fhir.example.org", "https://10.1.2.3/fhir"])
def test_loopback_or_https_is_allowed(url: str):
    assert require_secure_url("FHIR_URL", url) == url.rstrip("/")


@pytest.mark.parametrize("url", ["http://10.0.0.5/fhir", "http://192.168.1.10", "http://fhir.example.org",
                                 "http://localhost.example.org", "http://127.0.0.1.nip.io", "ftp://127.0.0.1/x",
                                 "fhir.example.org", "http://[::ffff:10.0.0.1]/", "http://0.0.0.0/"])
def test_plain_http_off_the_machine_is_refused_with_a_clear_error(url: str):
    with pytest.raises(ConfigError) as refused:
        require_secure_url("FHIR_URL", url)
    assert refused.value.setting == "FHIR_URL"
    assert "https" in refused.value.detail or "absolute" in refused.value.detail


@pytest.mark.parametrize("name", ["FHIR_URL", "FHIR_TOKEN_URL", "ALTERNATE_ENDPOINT_URL", "ALTERNATE_TOKEN_URL",
                                  "OUTCOMES_TABLE_ENDPOINT"])
def test_every_endpoint_setting_is_checked(name: str):
    env = {**BASE, "FHIR_CLIENT_ID": "c", "FHIR_CLIENT_SECRET": SECRET, "WRITEBACK_TARGET": "alternate",
           "ALTERNATE_ENDPOINT_URL": "https://alt.example.org", "ALTERNATE_TOKEN_URL": "https://login.example.org/t",
           "ALTERNATE_CLIENT_ID": "a", "ALTERNATE_CLIENT_SECRET": SECRET, name: "http://10.20.30.40/x"}
    with pytest.raises(ConfigError) as refused:
        Settings.from_env(env)
    assert refused.value.setting == name
    assert SECRET not in str(refused.value)


def test_secrets_are_redacted_in_redacted_and_in_repr():
    secrets = [s.name for s in SETTINGS if s.secret]
    assert {"FHIR_CLIENT_SECRET", "ALTERNATE_CLIENT_SECRET", "OUTCOMES_CONNECTION_STRING"} <= set(secrets)
    env = {**BASE, "FHIR_TOKEN_URL": "https://login.example.org/t", "FHIR_CLIENT_ID": "c",
           "FHIR_CLIENT_SECRET": SECRET, "OUTCOMES_CONNECTION_STRING": f"AccountKey={SECRET};",
           "ALTERNATE_CLIENT_SECRET": SECRET}
    shown = redacted(env)
    assert all(shown[name] == "***redacted***" for name in secrets)
    assert SECRET not in repr(shown)
    settings = Settings.from_env(env)
    alternate = Settings.from_env({**env, "WRITEBACK_TARGET": "alternate", "ALTERNATE_ENDPOINT_URL":
                                   "https://alt.example.org", "ALTERNATE_TOKEN_URL": "https://login.example.org/a",
                                   "ALTERNATE_CLIENT_ID": "a"})
    for text in (repr(settings), str(settings), repr(alternate), repr(alternate.alternate)):
        assert SECRET not in text
