"""Every app setting the product reads, declared once.

`SETTINGS` is the single source of truth: `Settings.from_env` reads it, the README's settings table and
`local.settings.sample.json` are checked against it, and the Bicep app settings are tested against it.
Secret values are never printed: `Settings.redacted()` is what the admin commands show.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from writeback.errors import ConfigError

DEFAULT_MAPS_DIR = Path(__file__).parent / "maps"
_GUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# A Dataverse logical name, as the message bodies name a column (see `maps._LOGICAL`).
_LOGICAL_NAME = re.compile(r"[a-z_][a-z0-9_]{0,127}")
# Seconds an invocation keeps, after its deadline and before its messages' lock expires, to settle them and to
# schedule the retries of what it did not finish.
DEADLINE_MARGIN_SECONDS = 30.0


@dataclass(frozen=True)
class SettingSpec:
    name: str
    description: str
    default: str | None = None
    secret: bool = False
    # Settings the Functions host or Azure reads itself; the code may never touch them, Bicep must still set them.
    host_only: bool = False


SETTINGS: tuple[SettingSpec, ...] = (
    # --- Service Bus trigger (read by the Functions host) ---
    SettingSpec("WRITEBACK_QUEUE_NAME", "Service Bus queue the Dataverse service endpoint posts to; retries are "
                "scheduled back onto it. Required: the trigger binding names it (`%WRITEBACK_QUEUE_NAME%`), and "
                "the host has no default (the project's files use the one shown).", "dataverse-writeback",
                host_only=True),
    SettingSpec("ServiceBusConnection__fullyQualifiedNamespace",
                "Service Bus namespace host (identity-based trigger connection, also used to schedule retries), "
                "e.g. `contoso.servicebus.windows.net`. Locally `ServiceBusConnection` (a connection string) "
                "may be set instead.", host_only=True),
    SettingSpec("ServiceBusConnection__clientId", "Client id of the user-assigned managed identity the trigger "
                "connection (and the retry scheduler) authenticates with, with ServiceBusConnection__credential "
                "`managedidentity` (the host reads it only then); empty: the system-assigned identity.",
                host_only=True),
    SettingSpec("ServiceBusConnection__credential", "`managedidentity`: the trigger connection (and the retry "
                "scheduler) authenticates with the managed identity ServiceBusConnection__clientId names. Without "
                "it the host takes its default credential and ignores the client id.", host_only=True),
    SettingSpec("PYTHON_ISOLATE_WORKER_DEPENDENCIES", "`1`: the Python worker loads the app's own protobuf and "
                "grpcio (the Service Bus extension needs newer ones than the 3.11/3.12 worker bundles).", "1",
                host_only=True),
    SettingSpec("AzureWebJobsStorage", "Storage for the Functions runtime (`UseDevelopmentStorage=true` "
                "with Azurite); in Azure identity-based `AzureWebJobsStorage__accountName`.", host_only=True,
                secret=True),  # (a connection string holds the account key)
    # --- Decision ---
    SettingSpec("WRITEBACK_MAPS_DIR", "Folder of entity map files (`*.yaml`). Default: the maps shipped "
                "in `writeback/maps`."),
    SettingSpec("WRITEBACK_IGNORE_USER_IDS", "Comma-separated Dataverse systemuser ids whose changes are "
                "ignored as `echo` (the FHIR-to-Dataverse sync's application user).", ""),
    SettingSpec("WRITEBACK_CONSENT_COLUMN", "Patient consent column (Yes/No); only patients with Yes are "
                "written.", "msemr_azurefhirsyncenabled"),
    # --- FHIR server ---
    SettingSpec("FHIR_URL", "Base URL of the FHIR R4 service, e.g. "
                "`https://ws-fhir.fhir.azurehealthcareapis.com`. https unless loopback."),
    SettingSpec("FHIR_TENANT_ID", "Entra tenant for a client-secret credential (else managed identity).", ""),
    SettingSpec("FHIR_CLIENT_ID", "Client id: of the app registration (with FHIR_CLIENT_SECRET), of a "
                "user-assigned managed identity (alone), or of the OAuth client (with FHIR_TOKEN_URL).", ""),
    SettingSpec("FHIR_CLIENT_SECRET", "Client secret for FHIR_CLIENT_ID; a Key Vault reference in Azure.", "",
                secret=True),
    SettingSpec("FHIR_TOKEN_URL", "OAuth 2.0 token URL for a non-Entra FHIR server (client credentials). "
                "Empty: Microsoft Entra ID through azure-identity.", ""),
    SettingSpec("FHIR_SCOPE", "Token scope. Default `<FHIR_URL>/.default`.", ""),
    SettingSpec("FHIR_TIMEOUT_SECONDS", "Timeout of one FHIR request.", "30"),
    SettingSpec("FHIR_MAX_RETRIES", "Retries of a request answered 429/5xx or failing to connect.", "4"),
    SettingSpec("FHIR_RETRY_MAX_SECONDS", "Upper bound on the total time spent retrying one request.", "60"),
    SettingSpec("FHIR_CONFLICT_RETRIES", "Re-reads after a concurrent change (412/409) before `conflict`.",
                "5"),
    # --- What we stamp on writes ---
    SettingSpec("WRITEBACK_META_SOURCE", "URI written to `meta.source` of every resource we write, so the "
                "FHIR-to-Dataverse direction can ignore our own writes.", "urn:dataverse-fhir-writeback"),
    SettingSpec("WRITEBACK_AGENT", "Provenance agent standing for this integration: `Device/<id>` or "
                "`Organization/<id>`. Empty: a Device named by identifier (no server resource needed).", ""),
    # --- Alternate endpoint (instead of the FHIR server) ---
    SettingSpec("WRITEBACK_TARGET", "`fhir` (write to FHIR_URL) or `alternate` (post the resource and its "
                "Provenance to ALTERNATE_ENDPOINT_URL).", "fhir"),
    SettingSpec("ALTERNATE_ENDPOINT_URL", "User-defined endpoint (e.g. a Logic App) for `alternate`.", ""),
    SettingSpec("ALTERNATE_TOKEN_URL", "OAuth 2.0 token URL of the alternate endpoint.", ""),
    SettingSpec("ALTERNATE_CLIENT_ID", "OAuth client id for the alternate endpoint.", ""),
    SettingSpec("ALTERNATE_CLIENT_SECRET", "OAuth client secret for the alternate endpoint; a Key Vault "
                "reference in Azure.", "", secret=True),
    SettingSpec("ALTERNATE_SCOPE", "Optional OAuth scope for the alternate endpoint.", ""),
    # --- Outcome log and per-row state (Table Storage) ---
    SettingSpec("OUTCOMES_TABLE_ENDPOINT", "Table service URL, e.g. `https://acct.table.core.windows.net` "
                "(managed identity)."),
    SettingSpec("OUTCOMES_CONNECTION_STRING", "Table Storage connection string instead of the endpoint "
                "(Azurite locally).", "", secret=True),
    SettingSpec("OUTCOMES_TABLE_PREFIX", "Prefix of the outcome tables.", "writeback"),
    # --- Throughput ---
    SettingSpec("WRITEBACK_MAX_CONCURRENCY", "Messages processed at once within one invocation.", "16"),
    SettingSpec("WRITEBACK_BUNDLE_SIZE", "Most entries in one FHIR batch bundle.", "50"),
    # --- Telemetry ---
    SettingSpec("APPLICATIONINSIGHTS_CONNECTION_STRING", "Application Insights connection string (the Bicep sets it "
                "from the component). Empty: no telemetry is exported (locally, in tests).", "",
                secret=True),  # (its key lets anyone send telemetry as this app: not shown, found by a new user)
    SettingSpec("APPLICATIONINSIGHTS_AUTHENTICATION_STRING", "`ClientId=<identity>;Authorization=AAD`: telemetry is "
                "ingested with Microsoft Entra ID as that managed identity. Empty: instrumentation-key ingestion.", ""),
    # --- Retries and the invocation deadline ---
    SettingSpec("WRITEBACK_RETRY_FIRST_SECONDS", "Delay before the first retry of a transient failure; each "
                "further retry waits twice as long, up to WRITEBACK_RETRY_MAX_DELAY_SECONDS.", "15"),
    SettingSpec("WRITEBACK_RETRY_MAX_DELAY_SECONDS", "Longest delay between two retries of one message.", "900"),
    SettingSpec("WRITEBACK_RETRY_WINDOW_HOURS", "How long a message keeps being retried (from its first "
                "delivery) before it is dead-lettered as `retries-exhausted`.", "24"),
    SettingSpec("WRITEBACK_LOCK_DURATION_SECONDS", "The queue's lock duration (Bicep `lockDurationSeconds`): "
                "an invocation stops working on its batch well inside it and reschedules what is unfinished.",
                "300"),
    SettingSpec("WRITEBACK_CONSENT_WAIT_MINUTES", "How long a row that belongs to a patient (child row, clinical "
                "row), saved while that patient had not consented, waits for the consent (retried as "
                "`consent-unknown`) before it is skipped as `consent-withheld`: a consent form signed during the "
                "visit still brings the visit's rows to FHIR. 0: skipped at once. Shorter than "
                "WRITEBACK_RETRY_WINDOW_HOURS.", "60"),
    SettingSpec("WRITEBACK_CONSENT_UNKNOWN", "What a row that belongs to a patient (child row, clinical row) does "
                "while that patient's consent is not known yet: `retry` (wait for the patient's contact message, "
                "then `consent-unknown`) or `skip` (skip it as `consent-unknown` at once).", "retry"),
)

SPEC_BY_NAME = {s.name: s for s in SETTINGS}


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# Azure Table names are `^[A-Za-z][A-Za-z0-9]{2,62}$` (ASCII only: `str.isalnum` let "écriture" through, found by
# review); the prefix leaves room for the longest suffix.
_TABLE_PREFIX = re.compile(r"[A-Za-z][A-Za-z0-9]{0,39}")


def checked_outcome_store(endpoint: str, connection_string: str) -> str:
    """The Table Storage settings' checks (the function's and the admin commands'); the endpoint as used."""
    if endpoint:
        endpoint = require_secure_url("OUTCOMES_TABLE_ENDPOINT", endpoint)
        if urlsplit(endpoint).query:
            # (a portal "Table service SAS URL": its token would be a secret in a plain setting, and unused)
            raise ConfigError("OUTCOMES_TABLE_ENDPOINT", "must be the account's table endpoint without a query (a SAS "
                              "token does not belong here: use the function's role, or OUTCOMES_CONNECTION_STRING)")
        if urlsplit(endpoint).scheme != "https":
            # The endpoint is used with a Microsoft Entra token, which the Table Storage client sends over https
            # only (even to loopback): Azurite goes by connection string.
            raise ConfigError("OUTCOMES_TABLE_ENDPOINT", "must use https (a Microsoft Entra token is sent over "
                              "https only; for Azurite set OUTCOMES_CONNECTION_STRING instead)")
    if connection_string:
        check_connection_string("OUTCOMES_CONNECTION_STRING", connection_string)
    return endpoint


def check_connection_string(name: str, text: str) -> None:
    """A storage connection string's shape: `key=value` pairs separated by `;`, naming an account, an endpoint or
    the development storage. (The value is a secret: never said back.)"""
    pairs = [part.partition("=") for part in text.split(";") if part.strip()]
    keys = {key.strip().lower() for key, eq, value in pairs if eq and key.strip() and value.strip()}
    if len(keys) != len(pairs) or not keys & {"accountname", "tableendpoint", "usedevelopmentstorage"}:
        raise ConfigError(name, "is not a storage connection string (`AccountName=...;AccountKey=...;...` or "
                          "`UseDevelopmentStorage=true`)")
    for key, _, value in pairs:
        if key.strip().lower() == "tableendpoint":
            require_secure_url(name, value.strip())


def require_secure_url(name: str, url: str) -> str:
    """TLS for every endpoint that leaves the machine."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(name, "is not an absolute http(s) URL")
    if parts.username is not None or parts.password is not None or "@" in _before_query(url):
        # (an `@` anywhere before the query: a password holding a bare `/` makes urlsplit read its user as the host)
        # (it would be shown and logged as a URL is: credentials come from their own settings or an identity)
        raise ConfigError(name, "holds credentials (user:password@): remove them; the client id and secret have "
                          "settings of their own, and a managed identity needs none")
    if parts.scheme != "https" and not _is_loopback(url):
        raise ConfigError(name, "must use https (plain http is allowed only for loopback addresses)")
    return url.rstrip("/")


def _int(env: Mapping[str, str], name: str, low: int, high: int) -> int:
    raw = _get(env, name)
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(name, f"must be a whole number, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(name, f"must be between {low} and {high}")
    return value


def _servicebus_client_id(env: Mapping[str, str]) -> str:
    """The user-assigned identity the Service Bus connection uses, as the host reads it: its client id only with
    `credential` `managedidentity` (Microsoft.Extensions.Azure's ClientFactory), else none."""
    if (env.get("ServiceBusConnection__credential") or "").strip().lower() != "managedidentity":
        return ""
    return (env.get("ServiceBusConnection__clientId") or "").strip()


def _get(env: Mapping[str, str], name: str) -> str:
    value = env.get(name)
    if value is None or value == "":
        value = SPEC_BY_NAME[name].default or ""
    return value.strip()


def _stand_ins(name: str) -> list[str]:
    """Values of `name`, in turn, until one passes its own check (`Settings.faults`): its default, one of its kind,
    and unset (an optional setting with a form of its own, `WRITEBACK_AGENT`, passes only that way)."""
    if name == "OUTCOMES_CONNECTION_STRING":
        return ["UseDevelopmentStorage=true"]
    default = SPEC_BY_NAME[name].default if name in SPEC_BY_NAME else None
    kind = "https://stand-in.invalid" if "URL" in name or "ENDPOINT" in name else "stand-in"
    return list(dict.fromkeys(v for v in (default, kind, "") if v is not None))


@dataclass(frozen=True)
class OAuthClient:
    token_url: str
    client_id: str
    client_secret: str = field(repr=False)
    scope: str = ""
    settings: str = "FHIR"  # the prefix of the settings it comes from (FHIR_TOKEN_URL, ...): errors name them


@dataclass(frozen=True)
class Settings:
    maps_dir: Path = DEFAULT_MAPS_DIR
    ignore_user_ids: frozenset[str] = frozenset()
    consent_column: str = "msemr_azurefhirsyncenabled"
    fhir_url: str = ""
    fhir_tenant_id: str = ""
    fhir_client_id: str = ""
    fhir_client_secret: str = field(default="", repr=False)
    fhir_token_url: str = ""
    fhir_scope: str = ""
    timeout_seconds: float = 30.0
    max_retries: int = 4
    retry_max_seconds: float = 60.0
    conflict_retries: int = 5
    meta_source: str = "urn:dataverse-fhir-writeback"
    agent: str = ""
    target: str = "fhir"
    alternate: OAuthClient | None = None
    alternate_url: str = ""
    outcomes_endpoint: str = ""
    outcomes_connection_string: str = field(default="", repr=False)
    outcomes_table_prefix: str = "writeback"
    max_concurrency: int = 16
    bundle_size: int = 50
    retry_first_seconds: float = 15.0
    retry_max_delay_seconds: float = 900.0
    retry_window_hours: float = 24.0
    lock_duration_seconds: float = 300.0
    consent_unknown: str = "retry"
    consent_wait_minutes: float = 60.0
    queue_name: str = "dataverse-writeback"
    servicebus_namespace: str = ""
    servicebus_connection_string: str = field(default="", repr=False)
    servicebus_client_id: str = ""

    @classmethod
    def for_planning(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Only what the pure core needs: no FHIR or storage settings required."""
        env = os.environ if env is None else env
        ids = frozenset(
            part.strip().lower() for part in _get(env, "WRITEBACK_IGNORE_USER_IDS").split(",") if part.strip()
        )
        # Compared with the GUIDs Dataverse sends (lowercase, no braces): anything else would never match, and the
        # two sync directions would feed each other's changes back and forth.
        if bad := sorted(i for i in ids if not _GUID.fullmatch(i)):
            what = "an entry that is not" if len(bad) == 1 else f"{len(bad)} entries that are not"
            raise ConfigError("WRITEBACK_IGNORE_USER_IDS", f"holds {what} a GUID (comma-separated GUIDs, like "
                              "9e7d5c3b-0000-0000-0000-000000000000, without braces)")
        maps_dir = Path(_get(env, "WRITEBACK_MAPS_DIR") or DEFAULT_MAPS_DIR)
        consent_unknown = _get(env, "WRITEBACK_CONSENT_UNKNOWN").lower()
        if consent_unknown not in ("retry", "skip"):
            raise ConfigError("WRITEBACK_CONSENT_UNKNOWN", "must be `retry` or `skip`")
        consent_column = _get(env, "WRITEBACK_CONSENT_COLUMN")
        if not _LOGICAL_NAME.fullmatch(consent_column):
            # A display name ("Azure FHIR Sync Enabled") matches no column of a body: every patient would read as
            # not consented and be skipped, with nothing to alert on (found trying the product).
            raise ConfigError("WRITEBACK_CONSENT_COLUMN", "must be the column's logical name (lowercase letters, "
                              "digits and underscores, as the message bodies name it: msemr_azurefhirsyncenabled), "
                              "not its display name")
        return cls(maps_dir=maps_dir, ignore_user_ids=ids, consent_column=consent_column,
                   consent_unknown=consent_unknown,
                   consent_wait_minutes=float(_int(env, "WRITEBACK_CONSENT_WAIT_MINUTES", 0, 24 * 60)))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, need_outcomes: bool = False) -> Settings:
        """Everything the delivery needs, validated; a fault raises ConfigError naming the setting."""
        env = os.environ if env is None else env
        base = cls.for_planning(env)
        target = _get(env, "WRITEBACK_TARGET").lower()
        if target not in ("fhir", "alternate"):
            raise ConfigError("WRITEBACK_TARGET", "must be `fhir` or `alternate`")
        fhir_url = _get(env, "FHIR_URL")
        if target == "fhir" and not fhir_url:
            raise ConfigError("FHIR_URL", "is not set")
        if fhir_url:
            fhir_url = require_secure_url("FHIR_URL", fhir_url)
            if "YOUR-" in fhir_url.upper():
                raise ConfigError("FHIR_URL", "still holds local.settings.sample.json's placeholder: set your FHIR "
                                  "service's URL")
            if urlsplit(fhir_url).path.rstrip("/").lower().endswith("/metadata"):
                raise ConfigError("FHIR_URL", "must be the service's base URL, without /metadata")
        token_url = _get(env, "FHIR_TOKEN_URL")
        if token_url:
            token_url = require_secure_url("FHIR_TOKEN_URL", token_url)
            for name in ("FHIR_CLIENT_ID", "FHIR_CLIENT_SECRET"):
                if not _get(env, name):
                    raise ConfigError(name, "is required when FHIR_TOKEN_URL is set")
        tenant, secret = _get(env, "FHIR_TENANT_ID"), _get(env, "FHIR_CLIENT_SECRET")
        if tenant and secret and not _get(env, "FHIR_CLIENT_ID"):
            raise ConfigError("FHIR_CLIENT_ID", "is required with FHIR_CLIENT_SECRET: the client id of the app "
                              "registration the secret belongs to")
        if target == "fhir" and tenant and not secret and not token_url:
            # (else the tenant would be ignored, and a managed identity used where a client secret was meant)
            raise ConfigError("FHIR_TENANT_ID", "is set, but FHIR_CLIENT_SECRET is not: set the secret for a "
                              "client-secret credential, or leave FHIR_TENANT_ID empty for a managed identity")
        if target == "fhir" and secret and not tenant and not token_url:
            # Else the secret would be ignored and FHIR_CLIENT_ID taken as a managed identity's.
            raise ConfigError("FHIR_TENANT_ID", "is required when FHIR_CLIENT_SECRET is set (a client-secret "
                              "credential), unless FHIR_TOKEN_URL is; for a managed identity, leave the secret unset")
        alternate: OAuthClient | None = None
        alternate_url = ""
        if target == "alternate":
            for name in ("ALTERNATE_ENDPOINT_URL", "ALTERNATE_TOKEN_URL", "ALTERNATE_CLIENT_ID",
                         "ALTERNATE_CLIENT_SECRET"):
                if not _get(env, name):
                    raise ConfigError(name, "is required when WRITEBACK_TARGET is `alternate`")
            alternate_url = require_secure_url("ALTERNATE_ENDPOINT_URL", _get(env, "ALTERNATE_ENDPOINT_URL"))
            alternate = OAuthClient(
                token_url=require_secure_url("ALTERNATE_TOKEN_URL", _get(env, "ALTERNATE_TOKEN_URL")),
                client_id=_get(env, "ALTERNATE_CLIENT_ID"),
                client_secret=_get(env, "ALTERNATE_CLIENT_SECRET"),
                scope=_get(env, "ALTERNATE_SCOPE"),
                settings="ALTERNATE",
            )
        agent = _get(env, "WRITEBACK_AGENT")
        if agent:
            kind, _, ident = agent.partition("/")
            if kind not in ("Device", "Organization") or not ident or "/" in ident:
                raise ConfigError("WRITEBACK_AGENT", "must look like `Device/<id>` or `Organization/<id>`")
        meta_source = _get(env, "WRITEBACK_META_SOURCE")
        if ":" not in meta_source:
            raise ConfigError("WRITEBACK_META_SOURCE", "must be an absolute URI")
        outcomes_endpoint = _get(env, "OUTCOMES_TABLE_ENDPOINT")
        outcomes_cs = _get(env, "OUTCOMES_CONNECTION_STRING")
        outcomes_endpoint = checked_outcome_store(outcomes_endpoint, outcomes_cs)
        if need_outcomes and not (outcomes_endpoint or outcomes_cs):
            raise ConfigError("OUTCOMES_TABLE_ENDPOINT", "is not set (nor OUTCOMES_CONNECTION_STRING)")
        prefix = _get(env, "OUTCOMES_TABLE_PREFIX")
        if not _TABLE_PREFIX.fullmatch(prefix):
            raise ConfigError("OUTCOMES_TABLE_PREFIX", "must be 1 to 40 ASCII letters and digits, starting with a "
                              "letter (Azure Table names allow no others)")
        first = _int(env, "WRITEBACK_RETRY_FIRST_SECONDS", 1, 3600)
        longest = _int(env, "WRITEBACK_RETRY_MAX_DELAY_SECONDS", 1, 86400)
        if longest < first:
            raise ConfigError("WRITEBACK_RETRY_MAX_DELAY_SECONDS",
                              "must not be less than WRITEBACK_RETRY_FIRST_SECONDS")
        window = _int(env, "WRITEBACK_RETRY_WINDOW_HOURS", 1, 24 * 13)
        if base.consent_wait_minutes >= window * 60:
            # (past the window the waiting row would be dead-lettered `retries-exhausted`, not skipped)
            raise ConfigError("WRITEBACK_CONSENT_WAIT_MINUTES", f"must be shorter than WRITEBACK_RETRY_WINDOW_HOURS "
                              f"({window} h)")
        lock = _int(env, "WRITEBACK_LOCK_DURATION_SECONDS", 30, 300)
        timeout = _int(env, "FHIR_TIMEOUT_SECONDS", 1, 600)
        if timeout + DEADLINE_MARGIN_SECONDS >= lock:
            raise ConfigError("FHIR_TIMEOUT_SECONDS", f"must leave room inside WRITEBACK_LOCK_DURATION_SECONDS "
                              f"({lock} s) for a request and the settlement margin ({DEADLINE_MARGIN_SECONDS:.0f} s)")
        return cls(
            maps_dir=base.maps_dir,
            ignore_user_ids=base.ignore_user_ids,
            consent_column=base.consent_column,
            fhir_url=fhir_url,
            fhir_tenant_id=tenant,
            fhir_client_id=_get(env, "FHIR_CLIENT_ID"),
            fhir_client_secret=secret,
            fhir_token_url=token_url,
            fhir_scope=_get(env, "FHIR_SCOPE") or (f"{fhir_url}/.default" if fhir_url else ""),
            timeout_seconds=float(timeout),
            max_retries=_int(env, "FHIR_MAX_RETRIES", 0, 20),
            retry_max_seconds=float(_int(env, "FHIR_RETRY_MAX_SECONDS", 1, 3600)),
            conflict_retries=_int(env, "FHIR_CONFLICT_RETRIES", 0, 50),
            meta_source=meta_source,
            agent=agent,
            target=target,
            alternate=alternate,
            alternate_url=alternate_url,
            outcomes_endpoint=outcomes_endpoint,
            outcomes_connection_string=outcomes_cs,
            outcomes_table_prefix=prefix,
            max_concurrency=_int(env, "WRITEBACK_MAX_CONCURRENCY", 1, 512),
            bundle_size=_int(env, "WRITEBACK_BUNDLE_SIZE", 1, 500),
            retry_first_seconds=float(first),
            retry_max_delay_seconds=float(longest),
            retry_window_hours=float(window),
            lock_duration_seconds=float(lock),
            consent_unknown=base.consent_unknown,
            consent_wait_minutes=base.consent_wait_minutes,
            queue_name=_get(env, "WRITEBACK_QUEUE_NAME"),
            servicebus_namespace=(env.get("ServiceBusConnection__fullyQualifiedNamespace") or "").strip(),
            servicebus_connection_string=(env.get("ServiceBusConnection") or "").strip(),
            servicebus_client_id=_servicebus_client_id(env),
        )

    @classmethod
    def faults(cls, env: Mapping[str, str] | None = None, *, need_outcomes: bool = False) -> list[ConfigError]:
        """Every setting `from_env` refuses, not only the first (what `check-config` reports, so that one round of
        fixes is enough): each one found is given a stand-in that passes its own check and the rest checked again.
        A setting refused with each of its stand-ins (a bound that depends on another, also wrong) ends the search.
        (It ended at the first stand-in refused: a wrong WRITEBACK_AGENT hid every setting checked after it, found
        by a new user's trial.)"""
        trial = dict(os.environ if env is None else env)
        found: list[ConfigError] = []
        left: dict[str, list[str]] = {}
        while True:
            try:
                cls.from_env(trial, need_outcomes=need_outcomes)
                return found
            except ConfigError as exc:
                if exc.setting not in left:
                    found.append(exc)
                    left[exc.setting] = _stand_ins(exc.setting)
                if not left[exc.setting]:
                    return found
                trial[exc.setting] = left[exc.setting].pop(0)

    @classmethod
    def for_retries(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Only what scheduling a retry needs, each value falling back to its default when it is invalid: a
        message must still be retried, not lost, when the fault it met is a wrong setting."""
        env = os.environ if env is None else env

        def number(name: str, low: int, high: int) -> float:
            try:
                return float(_int(env, name, low, high))
            except ConfigError:
                return float(SPEC_BY_NAME[name].default or 0)

        first = number("WRITEBACK_RETRY_FIRST_SECONDS", 1, 3600)
        return cls(
            retry_first_seconds=first,
            retry_max_delay_seconds=max(first, number("WRITEBACK_RETRY_MAX_DELAY_SECONDS", 1, 86400)),
            retry_window_hours=number("WRITEBACK_RETRY_WINDOW_HOURS", 1, 24 * 13),
            lock_duration_seconds=number("WRITEBACK_LOCK_DURATION_SECONDS", 30, 300),
            timeout_seconds=number("FHIR_TIMEOUT_SECONDS", 1, 600),
            queue_name=_get(env, "WRITEBACK_QUEUE_NAME"),
            servicebus_namespace=(env.get("ServiceBusConnection__fullyQualifiedNamespace") or "").strip(),
            servicebus_connection_string=(env.get("ServiceBusConnection") or "").strip(),
            servicebus_client_id=_servicebus_client_id(env),
        )

    @property
    def invocation_seconds(self) -> float:
        """How long one invocation works on its batch, counted from the moment its messages were locked: the
        lock duration less the margin for the last request in flight, the settlements and the scheduled retries
        (docs/operations.md, "Timing")."""
        return self.lock_duration_seconds - self.timeout_seconds - DEADLINE_MARGIN_SECONDS


def redacted(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Every declared setting with its effective value, secrets replaced by a marker."""
    env = os.environ if env is None else env
    shown: dict[str, str] = {}
    for spec in SETTINGS:
        value = env.get(spec.name) or ""
        if not value and spec.default:
            # A setting the host reads has no default there: the value shown is the one the project's files set.
            value = f"(not set; the project's files set {spec.default})" if spec.host_only else spec.default
        if spec.secret and value:
            value = "***redacted***"
        elif "://" in value:
            if "@" in value:
                value = _USERINFO.sub(r"\1***redacted***@", value)  # a URL with credentials (refused, not shown)
            if "?" in value:
                # A query may hold a credential (a SAS URL's `sig=`, found by review): refused too, not shown.
                value = value.split("?", 1)[0] + "?***redacted***"
        shown[spec.name] = value
    return shown


# Up to the last `@` before the query: a password may hold a bare `@` or `/` (found by review).
_USERINFO = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^?#]*@")


def _before_query(url: str) -> str:
    return url.split("?", 1)[0].split("#", 1)[0]
