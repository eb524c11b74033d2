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
