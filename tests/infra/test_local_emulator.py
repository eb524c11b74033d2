"""`func start` against the emulators (docs/local-development.md): the Service Bus emulator's Config.json,
compose.yaml, local.settings.sample.json and the Bicep agree.

No Docker engine runs here, so the files are checked statically: they parse, Config.json has the shape of
Microsoft's schema for it (github.com/Azure/azure-service-bus-emulator-installer,
ServiceBus-Emulator/Schema/Config-schema.json: the names, types and limits below), and the values match.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from tests.infra.test_bicep import INFRA, MODULES, declared, string_value, text
from writeback.settings import SPEC_BY_NAME

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "devtools" / "servicebus-emulator" / "Config.json"
COMPOSE = ROOT / "compose.yaml"
SAMPLE = ROOT / "local.settings.sample.json"

# The emulator's documented connection string for an app on the same machine (its README).
EMULATOR_CONNECTION = ("Endpoint=sb://localhost;SharedAccessKeyName=RootManageSharedAccessKey;"
                       "SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true;")
EMULATOR_NAMESPACE = "sbemulatorns"  # the only namespace name the emulator's schema allows
EMULATOR_IMAGE = "mcr.microsoft.com/azure-messaging/servicebus-emulator"
EMULATOR_CONFIG_PATH = "/ServiceBus_Emulator/ConfigFiles/Config.json"
AMQP_PORT = 5672

# Config-schema.json: queue properties, and the limits the emulator enforces.
QUEUE_PROPERTIES = {
    "DeadLetteringOnMessageExpiration": bool, "DefaultMessageTimeToLive": str,
    "DuplicateDetectionHistoryTimeWindow": str, "ForwardDeadLetteredMessagesTo": str, "ForwardTo": str,
    "LockDuration": str, "MaxDeliveryCount": int, "RequiresDuplicateDetection": bool, "RequiresSession": bool,
}
NAME = re.compile(r"^[A-Za-z0-9]$|^[A-Za-z0-9][\w\-./]*[A-Za-z0-9]$")
ISO_DURATION = re.compile(r"^P(?!$)(?:(\d+)D)?(?:T(?!$)(?:(\d+)H)?(?:(\d+)M)?(?:(\d+)S)?)?$")
EMULATOR_MAX_LOCK = 300
EMULATOR_MIN_LOCK = 5
EMULATOR_MAX_DUPLICATE_WINDOW = 300
EMULATOR_MAX_TTL = 3600
EMULATOR_MAX_DELIVERY_COUNT = 10


def seconds(duration: str) -> int:
    """ISO 8601 duration (days, hours, minutes, seconds) → seconds."""
    match = ISO_DURATION.match(duration)
    assert match, f"not an ISO 8601 duration the emulator accepts: {duration!r}"
    days, hours, minutes, secs = (int(g or 0) for g in match.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + secs


@cache
def config() -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(CONFIG.read_text(encoding="utf-8"))
    return parsed


@cache
def compose() -> dict[str, Any]:
    parsed: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return parsed


def sample() -> dict[str, str]:
    values: dict[str, str] = json.loads(SAMPLE.read_text(encoding="utf-8"))["Values"]
    return values


def queue() -> dict[str, Any]:
    (namespace,) = config()["UserConfig"]["Namespaces"]
    (only,) = namespace["Queues"]
    found: dict[str, Any] = only
    return found


def bicep_default(path: Path, name: str) -> str:
    param = declared(path, "param")[name]
    assert param.value is not None, f"{path.name}: {name} has no default"
    return string_value(param.value) or text(param.value)


def published_ports(service: dict[str, Any]) -> dict[int, str]:
    """Host port → host address of each `ports` entry (`[ip:]host:container`)."""
    ports = {}
    for entry in service.get("ports", []):
        parts = str(entry).split(":")
        host_ip = parts[0] if len(parts) == 3 else "0.0.0.0"  # compose's default: every interface
        ports[int(parts[-2])] = host_ip
    return ports


# --- Config.json: Microsoft's schema ---------------------------------------------------------------------------


def test_config_json_has_the_schemas_shape() -> None:
    user = config()["UserConfig"]
    assert set(user) == {"Namespaces", "Logging"}
    assert user["Logging"]["Type"] in ("File", "Console", "File,Console", "Console,File")
    (namespace,) = user["Namespaces"]  # the schema allows exactly one
    assert namespace["Name"] == EMULATOR_NAMESPACE
    assert {"Name", "Queues", "Topics"} <= set(namespace)
    assert len(namespace["Queues"]) + len(namespace["Topics"]) <= 50
    for entity in namespace["Queues"]:
        assert NAME.match(entity["Name"]), entity["Name"]
        properties = entity["Properties"]
        assert set(properties) <= set(QUEUE_PROPERTIES), set(properties) - set(QUEUE_PROPERTIES)
        for key, value in properties.items():
            assert type(value) is QUEUE_PROPERTIES[key], f"{key}: {value!r}"
        assert EMULATOR_MIN_LOCK <= seconds(properties["LockDuration"]) <= EMULATOR_MAX_LOCK
        assert 5 <= seconds(properties["DuplicateDetectionHistoryTimeWindow"]) <= EMULATOR_MAX_DUPLICATE_WINDOW
        assert 300 <= seconds(properties["DefaultMessageTimeToLive"]) <= EMULATOR_MAX_TTL
        assert 1 <= properties["MaxDeliveryCount"] <= EMULATOR_MAX_DELIVERY_COUNT


# --- the queue: emulator = local settings = Bicep -----------------------------------------------------------------


def test_queue_name_is_the_settings_default_the_samples_and_the_bicep() -> None:
    name = SPEC_BY_NAME["WRITEBACK_QUEUE_NAME"].default
    assert queue()["Name"] == name == sample()["WRITEBACK_QUEUE_NAME"]
    assert bicep_default(INFRA / "main.bicep", "queueName") == name
    assert json.loads((INFRA / "main.parameters.json").read_text())["parameters"]["queueName"]["value"] == (
        f"${{WRITEBACK_QUEUE_NAME={name}}}"
    )


def test_lock_duration_is_the_bicep_default_and_the_apps_setting() -> None:
    lock = seconds(queue()["Properties"]["LockDuration"])
    assert lock == int(bicep_default(INFRA / "main.bicep", "lockDurationSeconds"))
    assert lock == int(bicep_default(MODULES / "servicebus.bicep", "lockDurationSeconds"))
    assert lock == int(sample()["WRITEBACK_LOCK_DURATION_SECONDS"])
    assert lock == int(SPEC_BY_NAME["WRITEBACK_LOCK_DURATION_SECONDS"].default or 0) == 300


def test_max_delivery_count_is_the_bicep_default() -> None:
    count = queue()["Properties"]["MaxDeliveryCount"]
    assert count == int(bicep_default(INFRA / "main.bicep", "maxDeliveryCount"))
    assert count == int(bicep_default(MODULES / "servicebus.bicep", "maxDeliveryCount")) == 10


def test_duplicate_detection_and_dead_lettering_as_in_the_bicep() -> None:
    """On in both. The window is the Bicep's where the emulator allows it; the emulator caps it at 5 minutes
    (and message time to live at 1 hour), so there it is the cap."""
    properties = queue()["Properties"]
    queue_resource = next(r for r in declared(MODULES / "servicebus.bicep", "resource").values()
                          if r.resource_type == "Microsoft.ServiceBus/namespaces/queues")
    assert queue_resource.value is not None
    bicep_queue = text(queue_resource.value)
    assert "requiresDuplicateDetection: true" in bicep_queue
    assert properties["RequiresDuplicateDetection"] is True
    window = seconds(bicep_default(INFRA / "main.bicep", "duplicateDetectionWindow"))
    assert seconds(properties["DuplicateDetectionHistoryTimeWindow"]) == min(window, EMULATOR_MAX_DUPLICATE_WINDOW)
    assert "deadLetteringOnMessageExpiration: true" in bicep_queue
    assert properties["DeadLetteringOnMessageExpiration"] is True
    ttl = seconds(bicep_default(INFRA / "main.bicep", "messageTimeToLive"))
    assert seconds(properties["DefaultMessageTimeToLive"]) == min(ttl, EMULATOR_MAX_TTL)
    assert properties["RequiresSession"] is False and "requiresSession: false" in bicep_queue
    assert properties["ForwardTo"] == "" and properties["ForwardDeadLetteredMessagesTo"] == ""


# --- local.settings.sample.json and compose.yaml ---------------------------------------------------------------------


def test_the_sample_connects_the_trigger_to_the_emulator() -> None:
    values = sample()
    assert values["ServiceBusConnection"] == EMULATOR_CONNECTION
    assert values["ServiceBusConnection__fullyQualifiedNamespace"] == "", "would take precedence over the emulator"
    assert values["AzureWebJobsStorage"] == "UseDevelopmentStorage=true"


def test_compose_runs_the_emulator_with_this_config() -> None:
    services = compose()["services"]
    emulator = next(s for s in services.values() if str(s["image"]).startswith(EMULATOR_IMAGE + ":"))
    mounts = [str(v).split(":") for v in emulator["volumes"]]
    assert any((ROOT / source).resolve() == CONFIG and target == EMULATOR_CONFIG_PATH
               for source, target, *_ in mounts)
    database = emulator["environment"]["SQL_SERVER"]
    assert database in services, "the emulator's database is a service of the same compose file"
    for service in (emulator, services[database]):
        # the user accepts the licences and chooses the password: neither is decided in the repository
        assert str(service["environment"]["ACCEPT_EULA"]).startswith("${ACCEPT_EULA:?")
        assert str(service["environment"]["MSSQL_SA_PASSWORD"]).startswith("${SQL_PASSWORD:?")
    assert "ports" not in services[database], "the database is reached on the compose network only"


def test_compose_publishes_the_ports_the_samples_connection_strings_use() -> None:
    published: dict[int, str] = {}
    for service in compose()["services"].values():
        published.update(published_ports(service))
    values = sample()
    # sb://localhost without a port: AMQP's 5672
    host = urlsplit(values["ServiceBusConnection"].split(";")[0].removeprefix("Endpoint=")).hostname
    assert host == "localhost" and AMQP_PORT in published
    # UseDevelopmentStorage=true: Azurite's blob, queue and table ports
    assert {10000, 10001, 10002} <= set(published)
    # the outcome log's TableEndpoint
    table = re.search(r"TableEndpoint=([^;]+)", values["OUTCOMES_CONNECTION_STRING"])
    assert table is not None
    endpoint = urlsplit(table.group(1))
    assert endpoint.hostname == "127.0.0.1" and endpoint.port in published
    assert all(address == "127.0.0.1" for address in published.values()), "published on the loopback only"


def test_compose_azurite_is_the_tests_azurite_version() -> None:
    lock = json.loads((ROOT / "fhirdev" / "package-lock.json").read_text(encoding="utf-8"))
    version = lock["packages"]["node_modules/azurite"]["version"]
    images = [str(s["image"]) for s in compose()["services"].values()]
    assert f"mcr.microsoft.com/azure-storage/azurite:{version}" in images


def test_compose_file_is_left_out_of_the_deployment_package() -> None:
    assert "compose.yaml" in (ROOT / ".funcignore").read_text().splitlines()


def test_local_azurite_data_is_left_out_of_the_deployment_package() -> None:
    """docs/local-development.md keeps Azurite's data in `.azurite` at the repository's root: outcome rows of local
    runs, which `func publish` and azd would otherwise ship (found trying the product)."""
    guide = (ROOT / "docs" / "local-development.md").read_text(encoding="utf-8")
    assert "--location .azurite" in guide
    assert ".azurite/" in (ROOT / ".funcignore").read_text().splitlines()
