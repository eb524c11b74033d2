"""Review against what the Functions host and its Service Bus extension really read (fidelity to the host).

Each test states what the host does (with its source), what the product should do and what it did, and fails on
the current code for that reason. They run offline: `python -m writeback check-config` as an administrator runs
it, with the app settings an administrator sets by hand from the README's settings table.
"""

from __future__ import annotations

import contextlib
import io

import pytest

from writeback import cli
from writeback.settings import SETTINGS

# The host's own names for the trigger connection (not declared in SETTINGS, so cleared here too).
HOST_CONNECTION = ("ServiceBusConnection", "ServiceBusConnection__fullyQualifiedNamespace",
                   "ServiceBusConnection__clientId", "ServiceBusConnection__credential")
VALID = {  # settings that pass `check-config` offline: a managed identity to the FHIR service, Table Storage by URL
    "FHIR_URL": "https://ws-fhir.fhir.azurehealthcareapis.com",
    "OUTCOMES_TABLE_ENDPOINT": "https://stwriteback.table.core.windows.net",
    "WRITEBACK_QUEUE_NAME": "dataverse-writeback",
    "ServiceBusConnection__fullyQualifiedNamespace": "contoso.servicebus.windows.net",
    "WRITEBACK_IGNORE_USER_IDS": "9e7d5c3b-1a2f-4e6d-8c0b-7a5f3e1d9c2b",  # the FHIR-to-Dataverse sync's user
}


@pytest.fixture
def admin_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in {spec.name for spec in SETTINGS} | set(HOST_CONNECTION):
        monkeypatch.delenv(name, raising=False)
    for name, value in VALID.items():
        monkeypatch.setenv(name, value)
    return monkeypatch


def check_config() -> tuple[int, list[str]]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["check-config"])
    return code, out.getvalue().splitlines()


def test_baseline_the_settings_used_here_pass_check_config(admin_env: pytest.MonkeyPatch) -> None:
    """(Not a finding.) The settings the two findings start from pass, so each finding's FAIL is its own."""
    code, lines = check_config()
    assert code == 0, "\n".join(lines)


def test_check_config_passes_a_user_assigned_identity_the_trigger_does_not_use(
        admin_env: pytest.MonkeyPatch) -> None:
    """What the host does: the Service Bus extension builds the trigger's credential from the connection's section
    with Microsoft.Extensions.Azure `ClientFactory.CreateCredential` (Azure/azure-sdk-for-net,
    sdk/extensions/Microsoft.Extensions.Azure/src/Internal/ClientFactory.cs): `clientId` is used only when
    `credential` is `managedidentity` (`new ManagedIdentityCredential(clientId)`); without it the method returns
    null and the host falls back to its default credential, which ignores `ServiceBusConnection__clientId`. The
    Functions docs say the same: "a user-assigned identity can be specified with the credential and clientID
    properties" (learn.microsoft.com, Connect functions to Azure services).

    What the product does: its settings (writeback/settings.py SETTINGS, the README's settings table) say
    `ServiceBusConnection__clientId` alone is "the user-assigned managed identity the trigger connection (and the
    retry scheduler) authenticates with", declare no `ServiceBusConnection__credential`, and the scheduler
    (writeback/scheduler.py) uses the client id whatever `__credential` says. An administrator who sets the two
    settings the README lists gets `check-config` "All checks passed" and `ok trigger`, while the host's trigger
    authenticates without the user-assigned identity (the Bicep's only identity): the trigger gets no token and
    nothing is processed, though the retry scheduler's copies (made with the client id) would be sent.

    What it should do: `check-config` FAILs naming `ServiceBusConnection__credential` (to be `managedidentity`)
    when `ServiceBusConnection__clientId` is set without it."""
    admin_env.setenv("ServiceBusConnection__clientId", "6b3f2a44-1c9e-4b7d-9f0a-2e5c8d7a1b30")
    code, lines = check_config()
    named = [line for line in lines if "ServiceBusConnection__credential" in line and "FAIL" in line]
    assert named and code == cli.EXIT_CHECK_FAILED, (
        f"check-config (exit {code}) does not say the trigger ignores ServiceBusConnection__clientId without "
        "ServiceBusConnection__credential=managedidentity:\n" + "\n".join(lines))


def test_check_config_passes_without_the_queue_setting_the_trigger_binding_needs(
        admin_env: pytest.MonkeyPatch) -> None:
    """What the host does: function_app.py binds the trigger to `queue_name="%WRITEBACK_QUEUE_NAME%"`, an app-setting
    reference the WebJobs name resolver resolves when the host indexes the function; an unset setting fails the
    indexing with "Error indexing method ... '%WRITEBACK_QUEUE_NAME%' does not resolve to a value" (seen in
    Azure/azure-webjobs-sdk#2304 and Azure/azure-functions-vs-build-sdk#306 for `%name%` trigger arguments): the
    host has no default for it, and the function never runs.

    What the product does: SETTINGS declares `WRITEBACK_QUEUE_NAME` (host_only) with the default
    `dataverse-writeback`, the README's settings table shows that default, and `check-config` prints it as the
    effective value and passes ("All checks passed", exit 0) when the setting is not set. An administrator who
    leaves it out, trusting the documented default, is told all is well while the host cannot index the function.

    What it should do: `check-config` FAILs naming `WRITEBACK_QUEUE_NAME` when it is not set (the host reads it,
    and has no default)."""
    admin_env.delenv("WRITEBACK_QUEUE_NAME")
    code, lines = check_config()
    named = [line for line in lines if "WRITEBACK_QUEUE_NAME" in line and "FAIL" in line]
    assert named and code == cli.EXIT_CHECK_FAILED, (
        f"check-config (exit {code}) passes without WRITEBACK_QUEUE_NAME, which the host's trigger binding "
        "(%WRITEBACK_QUEUE_NAME%) cannot resolve:\n" + "\n".join(lines))


def test_a_client_id_beside_a_connection_string_is_not_called_unused(admin_env: pytest.MonkeyPatch) -> None:
    """(Noted by review.) With a connection string the host authenticates by it, and the client id is used by no
    one: check-config must not fail the settings for a credential setting that would change nothing."""
    admin_env.setenv("ServiceBusConnection__clientId", "6b3f2a44-1c9e-4b7d-9f0a-2e5c8d7a1b30")
    admin_env.setenv("ServiceBusConnection", "Endpoint=sb://localhost/;SharedAccessKeyName=k;SharedAccessKey=s")
    code, lines = check_config()
    assert code == 0 and not [line for line in lines if "FAIL" in line], "\n".join(lines)


# ---- a new user's trial of check-config ------------------------------------------------------------------------


def _lines(lines: list[str], mark: str, what: str) -> list[str]:
    return [line for line in lines if line.split()[:2] == [mark, what]]


def test_an_unset_queue_name_is_not_listed_with_a_value(admin_env: pytest.MonkeyPatch) -> None:
    """The settings list showed the project's value beside WRITEBACK_QUEUE_NAME, then failed it as not set: a
    setting the host reads has no default there."""
    admin_env.delenv("WRITEBACK_QUEUE_NAME")
    code, lines = check_config()
    (listed,) = [line for line in lines if line.split()[:1] == ["WRITEBACK_QUEUE_NAME"]]
    assert listed.split(maxsplit=1)[1] == "(not set; the project's files set dataverse-writeback)"
    assert code == cli.EXIT_CHECK_FAILED and _lines(lines, "FAIL", "trigger")
    admin_env.setenv("WRITEBACK_QUEUE_NAME", "hospital-writeback")
    code, lines = check_config()
    (listed,) = [line for line in lines if line.split()[:1] == ["WRITEBACK_QUEUE_NAME"]]
    assert listed.split() == ["WRITEBACK_QUEUE_NAME", "hospital-writeback"] and code == 0


def test_no_sync_user_to_ignore_is_a_warning(admin_env: pytest.MonkeyPatch) -> None:
    """Without the FHIR-to-Dataverse sync's user every record it saves is taken for a clinician's change: all
    checks passed with nothing said."""
    admin_env.delenv("WRITEBACK_IGNORE_USER_IDS")
    code, lines = check_config()
    (warned,) = _lines(lines, "warn", "echo")
    assert "WRITEBACK_IGNORE_USER_IDS is empty" in warned and "systemuserid" in warned
    assert code == 0 and lines[-1] == "All checks passed. 1 warning(s): read the `warn` lines."
    admin_env.setenv("WRITEBACK_IGNORE_USER_IDS", VALID["WRITEBACK_IGNORE_USER_IDS"])
    code, lines = check_config()
    assert not _lines(lines, "warn", "echo") and lines[-1] == "All checks passed."


def test_columns_not_checked_against_dataverse_says_what_a_misspelling_does(admin_env: pytest.MonkeyPatch) -> None:
    """A misspelt column (`lastnmae`) passed every check, then cleared every Patient's family name: without
    Dataverse's list of columns the check cannot see it, and says so, and what to run."""
    code, lines = check_config()
    (said,) = _lines(lines, "skip", "columns")
    assert "not checked against Dataverse" in said and "clears its element in FHIR" in said
    assert "--dataverse-metadata FILE" in said and code == 0


def test_a_client_secret_alone_names_what_is_missing_and_claims_nothing_set_that_is_not(
        admin_env: pytest.MonkeyPatch) -> None:
    """With only FHIR_CLIENT_SECRET set, the second failure said "when FHIR_TENANT_ID and FHIR_CLIENT_SECRET are
    set", of a tenant that was not (the stand-in `faults` gives a refused setting to find the next fault)."""
    admin_env.setenv("FHIR_CLIENT_SECRET", "s3cret-value")
    code, lines = check_config()
    failed = _lines(lines, "FAIL", "settings")
    assert code == cli.EXIT_CHECK_FAILED and len(failed) == 2
    assert "FHIR_TENANT_ID is required when FHIR_CLIENT_SECRET is set" in failed[0]
    assert "FHIR_CLIENT_ID is required with FHIR_CLIENT_SECRET" in failed[1] and "FHIR_TENANT_ID" not in failed[1]
    assert "s3cret-value" not in "\n".join(lines)
