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
    assert {"FHIR_CLIENT_SECRET", "ALTERNATE_CLIENT_SECRET", "OUTCOMES_CONNECTION_STRING", "AzureWebJobsStorage",
            "APPLICATIONINSIGHTS_CONNECTION_STRING"} <= set(secrets)
    env = {**BASE, "FHIR_TOKEN_URL": "https://login.example.org/t", "FHIR_CLIENT_ID": "c",
           "FHIR_CLIENT_SECRET": SECRET, "OUTCOMES_CONNECTION_STRING": f"AccountName=a;AccountKey={SECRET};",
           "ALTERNATE_CLIENT_SECRET": SECRET, "AzureWebJobsStorage": f"AccountName=a;AccountKey={SECRET};",
           "APPLICATIONINSIGHTS_CONNECTION_STRING": f"InstrumentationKey={SECRET};IngestionEndpoint=https://x/"}
    shown = redacted(env)
    assert all(shown[name] == "***redacted***" for name in secrets)
    assert SECRET not in repr(shown)
    settings = Settings.from_env(env)
    alternate = Settings.from_env({**env, "WRITEBACK_TARGET": "alternate", "ALTERNATE_ENDPOINT_URL":
                                   "https://alt.example.org", "ALTERNATE_TOKEN_URL": "https://login.example.org/a",
                                   "ALTERNATE_CLIENT_ID": "a"})
    for text in (repr(settings), str(settings), repr(alternate), repr(alternate.alternate)):
        assert SECRET not in text


@pytest.mark.parametrize("ids", ["3f0c6a2e-8d1b-4e5f-a6b7-c8d9e0f1a2b3;9e7d5c3b-0000-0000-0000-000000000000",
                                 "{9e7d5c3b-0000-0000-0000-000000000000}", "sync-user"])
def test_ignored_user_ids_that_could_never_match_are_refused(ids: str):
    """Loop protection compares them with the GUIDs Dataverse sends: one that is not a GUID never matches."""
    with pytest.raises(ConfigError) as refused:
        Settings.for_planning({"WRITEBACK_IGNORE_USER_IDS": ids})
    assert refused.value.setting == "WRITEBACK_IGNORE_USER_IDS" and "GUID" in refused.value.detail
    assert Settings.for_planning({"WRITEBACK_IGNORE_USER_IDS": " 9E7D5C3B-0000-0000-0000-000000000000 , "
                                  "3f0c6a2e-8d1b-4e5f-a6b7-c8d9e0f1a2b3"}).ignore_user_ids == {
        "9e7d5c3b-0000-0000-0000-000000000000", "3f0c6a2e-8d1b-4e5f-a6b7-c8d9e0f1a2b3"}


def test_a_client_secret_without_its_tenant_is_refused():
    """Else the secret would be ignored and the client id taken as a managed identity's."""
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({**BASE, "FHIR_CLIENT_ID": "c", "FHIR_CLIENT_SECRET": SECRET})
    assert refused.value.setting == "FHIR_TENANT_ID" and SECRET not in str(refused.value)


@pytest.mark.parametrize("text", [SECRET, f"AccountKey={SECRET}", f"garbage;AccountName=x;{SECRET}",
                                  f"AccountName=acct;AccountKey={SECRET};TableEndpoint=http://10.1.2.3:10002/a"])
def test_a_malformed_storage_connection_string_is_a_configuration_error_that_never_repeats_it(
        text: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """Before, the Table Storage client raised a ValueError on first use: a traceback in the admin commands, and in
    the function an unexpected error that abandoned every message until MaxDeliveryCountExceeded."""
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({**BASE, "OUTCOMES_CONNECTION_STRING": text})
    assert refused.value.setting == "OUTCOMES_CONNECTION_STRING" and SECRET not in str(refused.value)
    monkeypatch.setenv("OUTCOMES_CONNECTION_STRING", text)
    monkeypatch.delenv("OUTCOMES_TABLE_ENDPOINT", raising=False)
    from writeback import cli

    assert cli.main(["logs"]) != 0
    err = capsys.readouterr().err
    assert "OUTCOMES_CONNECTION_STRING" in err and "Traceback" not in err and SECRET not in err


def test_the_table_endpoint_takes_https_only_even_on_loopback(monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]):
    """It is used with a Microsoft Entra token, which the Table Storage client refuses to send over http."""
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({**BASE, "OUTCOMES_TABLE_ENDPOINT": "http://127.0.0.1:10002/devstoreaccount1"})
    assert refused.value.setting == "OUTCOMES_TABLE_ENDPOINT" and "OUTCOMES_CONNECTION_STRING" in refused.value.detail
    monkeypatch.setenv("OUTCOMES_TABLE_ENDPOINT", "http://127.0.0.1:1")
    monkeypatch.delenv("OUTCOMES_CONNECTION_STRING", raising=False)
    from writeback import cli

    assert cli.main(["check-config", "--connect"]) != 0
    err = capsys.readouterr()
    assert "Traceback" not in err.err + err.out and "OUTCOMES_TABLE_ENDPOINT" in err.err + err.out
