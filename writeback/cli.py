"""Command line: `python -m writeback plan|process|logs|check-config|resubmit`.

Every command prints JSON or a readable table, exits with a documented code, and never shows a traceback:
a fault in a setting, a map or an input file is one clear line on stderr (exit 2).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any, Literal

import httpx
from azure.core.exceptions import AzureError
from azure.identity import DefaultAzureCredential
from azure.servicebus import ServiceBusClient, ServiceBusMessage, ServiceBusReceivedMessage, ServiceBusSubQueue

from writeback.auth import OAuthClientCredentials, TokenProvider, fhir_tokens
from writeback.dataverse_metadata import MetadataError, problems, read_metadata, warnings_for
from writeback.decide import plan_message
from writeback.errors import ConfigError, WritebackError
from writeback.fhir_client import build_delivery, encode
from writeback.maps import MapSet, load_maps, map_faults
from writeback.outcomes import OutcomeRow, OutcomeStore, outcome_settings
from writeback.pipeline import Envelope, Pipeline
from writeback.reasons import Reason
from writeback.retry import (
    ATTEMPT,
    CONSENT_WAITS,
    FIRST_TRIED,
    GATE_OPENED,
    MAX_MESSAGE_ID,
    ORIGINAL_ID,
    OUTAGES,
    RESUBMISSION,
    RESUBMITTED_FROM,
    original_id,
)
from writeback.settings import DEFAULT_MAPS_DIR, Settings, redacted
from writeback.telemetry import CONNECTION_STRING as TELEMETRY_CONNECTION_STRING
from writeback.telemetry import settings_problem as telemetry_settings_problem

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_REJECT = 3


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse exits 2 with usage: keep that, but no traceback
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _read_bytes(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SystemExit(_fail(f"cannot read {path}: {exc.strerror}")) from None


def _fail(text: str) -> int:
    print(f"error: {text}", file=sys.stderr)
    return EXIT_USAGE


def read_properties(path: str | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        data = json.loads(_read_bytes(path))
    except ValueError:
        raise SystemExit(_fail(f"{path} is not valid JSON")) from None
    except RecursionError:
        raise SystemExit(_fail(f"{path} is nested too deeply to read as application properties")) from None
    if not isinstance(data, dict):
        raise SystemExit(_fail(f"{path} must hold a JSON object of application properties"))
    return data


def load_for_cli(maps_dir: str | None, settings: Settings) -> MapSet:
    return load_maps(Path(maps_dir) if maps_dir else settings.maps_dir)


def cmd_plan(args: argparse.Namespace) -> int:
    settings = Settings.for_planning()
    maps = load_for_cli(args.maps, settings)
    decision = plan_message(_read_bytes(args.file), read_properties(args.properties), maps, settings)
    print(encode(decision.as_json(), indent=True).decode("utf-8"))
    return EXIT_REJECT if decision.decision == "reject" else EXIT_OK


async def _process_files(files: list[str], settings: Settings, maps: MapSet) -> int:
    delivery, aclose = build_delivery(settings)
    worst = EXIT_OK
    try:
        pipeline = Pipeline(maps, settings, delivery, one_shot=True)  # `process` retries nothing
        bodies = [(name, _read_bytes(name)) for name in files]  # every file read before anything is written
        for name, body in bodies:
            result = await pipeline.process(Envelope(body, message_id=Path(name).stem))
            # `decision`: what the function would do with the message (`process` itself dead-letters and retries
            # nothing); `detail`: why, by ids and reason only, as the outcome log has it.
            print(json.dumps({
                "file": name, "decision": result.state, "reason": result.reason.value if result.reason else None,
                "detail": result.detail, "resource": result.resource, "provenance": result.provenance,
                "warnings": len(result.issues),
            }), flush=True)
            if result.state not in ("written", "skipped"):
                worst = EXIT_REJECT
    finally:
        await aclose()
    return worst


def cmd_process(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    maps = load_for_cli(args.maps, settings)
    return asyncio.run(_process_files(args.files, settings, maps))


# ---- admin commands: logs, check-config, resubmit (see docs/operations.md) ----------------------------------

EXIT_CHECK_FAILED = 1  # check-config: at least one check failed
EXIT_NOT_FOUND = 1  # resubmit, discard: a message id given matched no dead-lettered message
_SINCE = re.compile(r"^\s*(\d{1,6})\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


MAX_SINCE = timedelta(days=400)


def _positive(text: str) -> int:
    """A count of 1 or more (argparse type): 0 or less would show nothing and say nothing of why."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def _row_id(text: str) -> str:
    """A Dataverse row id (argparse type): a GUID, else no outcome could ever match."""
    try:
        return str(uuid.UUID(text.strip()))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a Dataverse row id (a GUID)") from None


def _dead_letter_reason(text: str) -> str:
    """A reason a message is dead-lettered with (argparse type): one of this product's codes, or the broker's own
    (`MaxDeliveryCountExceeded`, `TTLExpiredException`: CamelCase). A mistyped code would move nothing, silently."""
    text = text.strip()
    if text in {reason.value for reason in Reason} or re.fullmatch(r"[A-Z][A-Za-z]+", text):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not a reason code (README, Reason codes) nor a Service Bus "
                                     "reason such as MaxDeliveryCountExceeded")


def parse_since(text: str) -> timedelta:
    """`30m`, `24h`, `7d`, `2w` → timedelta (argparse type)."""
    match = _SINCE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30m, 24h or 7d")
    try:
        since = timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    except OverflowError:
        since = MAX_SINCE + MAX_SINCE
    if since > MAX_SINCE:
        # The outcome log is read one day and status at a time: a window of years is thousands of queries.
        raise argparse.ArgumentTypeError(f"{text!r} is longer than {MAX_SINCE.days} days")
    return since


def _cell(value: object, width: int) -> str:
    text = "-" if value is None or value == "" else str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def format_logs(rows: Sequence[OutcomeRow]) -> str:
    """The readable table of `logs`: one line per outcome, one indented line per OperationOutcome issue."""
    # The resource or detail last: a written row's versioned reference is shown whole (cut, it named no version,
    # and a server's version ids may be UUIDs: found by a new user's trial); a detail is cut at 60 and follows
    # whole below when it matters.
    columns = (("TIME (UTC)", 19), ("OUTCOME", 13), ("REASON", 25), ("TABLE", 24), ("RECORD", 36),
               ("MESSAGE", 12), ("DLV", 3), ("MS", 8), ("RESOURCE / DETAIL", 60))  # (12: Disassociate)
    lines = ["  ".join(name.ljust(width) for name, width in columns).rstrip()]
    for row in rows:
        shown = row.resource if row.status == "written" else row.detail
        values = (row.recorded_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S"), row.outcome, row.reason,
                  row.table, row.record_id, row.message_name, row.delivery_count,
                  f"{row.duration_ms:.0f}" if row.duration_ms is not None else None, shown)
        cells = [_cell(v, w).ljust(w) for v, (_, w) in zip(values[:-1], columns[:-1], strict=True)]
        cells.append(str(shown or "-") if row.status == "written" else _cell(shown, 60))
        lines.append("  ".join(cells).rstrip())
        if row.status == "failed" or (row.status != "written" and len(row.detail or "") > 60):
            # What an administrator acts on, whole, and the message it is about (to find it in the dead-letter
            # queue, or resubmit it): the table's cell is cut.
            lines.append(f"    ↳ message {row.message_id or '-'}: {row.detail or '-'}")
        for issue in row.issues:
            where = f" at {issue.expression}" if issue.expression else ""
            lines.append(f"    ↳ {issue.severity} {issue.code}{where}: {_cell(issue.details, 120)}")
        if row.issue_count > len(row.issues):
            lines.append(f"    ↳ … {row.issue_count - len(row.issues)} more issue(s) not stored")
    lines.append(f"{len(rows)} outcome(s)")
    return "\n".join(lines)


async def _read_logs(args: argparse.Namespace) -> list[OutcomeRow]:
    settings = outcome_settings()
    async with OutcomeStore.from_settings(settings) as store:
        # One more than asked: whether the list was cut is said (found by an administrator's trial: a cut list
        # read exactly as a whole one).
        rows = await store.query(status=args.status, since=args.since, record_id=args.record, limit=args.limit + 1)
    if store.missing:  # nothing recorded under this prefix at all: most often not the function app's prefix
        print(f"note: table {', '.join(sorted(store.missing))} does not exist in this storage account: nothing has "
              f"been recorded under OUTCOMES_TABLE_PREFIX={settings.outcomes_table_prefix} (is it the function "
              "app's?)", file=sys.stderr)
    return rows


def cmd_logs(args: argparse.Namespace) -> int:
    rows = asyncio.run(_read_logs(args))
    cut = len(rows) > args.limit
    rows = rows[:args.limit]
    if args.json:
        for row in rows:
            print(json.dumps(row.as_json(), ensure_ascii=False))
    else:
        print(format_logs(rows))
    if cut:
        print(f"note: more outcomes match than --limit {args.limit}: the {args.limit} newest are shown; raise --limit "
              "or narrow --since, --status or --record to see the rest", file=sys.stderr if args.json else sys.stdout)
    return EXIT_OK


async def _check_connections(settings: Settings, report: Callable[[bool | None, str, str], None]) -> None:
    try:
        async with OutcomeStore.from_settings(settings, retry_total=1) as store:
            await store.ensure_tables()
        report(True, "Table Storage", f"reachable; tables {', '.join(sorted(store.names.values()))}")
    except WritebackError as exc:
        report(False, "Table Storage", exc.detail)
    tokens: TokenProvider = (OAuthClientCredentials(settings.alternate, settings.timeout_seconds)
                             if settings.target == "alternate" and settings.alternate is not None
                             else fhir_tokens(settings))
    try:
        try:
            token = await tokens.token()
        except WritebackError as exc:
            report(False, "token", f"{exc.reason.value}: {exc.detail}")
            return
        report(True, "token", "obtained (not shown)")
        if settings.target == "alternate":
            report(None, "FHIR metadata", "skipped: WRITEBACK_TARGET is `alternate`")
            return
        url = f"{settings.fhir_url}/metadata"
        try:
            async with httpx.AsyncClient(timeout=settings.timeout_seconds) as http:
                response = await http.get(url, headers={"Authorization": f"Bearer {token}",
                                                        "Accept": "application/fhir+json"})
        except httpx.HTTPError as exc:
            report(False, "FHIR metadata", f"GET {url} failed ({type(exc).__name__})")
            return
        if response.status_code in (401, 403):
            report(False, "FHIR metadata", f"GET {url}: HTTP {response.status_code} (unauthorized: check the "
                   "identity's FHIR Data Contributor role or the client credentials)")
            return
        try:
            body = response.json() if response.is_success else None
        except ValueError:
            body = None
        if not isinstance(body, dict) or body.get("resourceType") != "CapabilityStatement":
            report(False, "FHIR metadata", f"GET {url}: HTTP {response.status_code}, not a CapabilityStatement")
            return
        software: dict[str, Any] = body["software"] if isinstance(body.get("software"), dict) else {}
        name = " ".join(str(software.get(k)) for k in ("name", "version") if software.get(k)) or "unnamed server"
        version = body.get("fhirVersion", "?")
        report(version.startswith("4.0") if isinstance(version, str) else False, "FHIR metadata",
               f"CapabilityStatement of {name}, FHIR {version}" + ("" if str(version).startswith("4.0")
                                                                  else " (expected R4, 4.0.x)"))
    finally:
        await tokens.aclose()


# A check's mark: ok, FAIL, `warn` (worth a look, but the command still passes: exit 0) or skip (not checked here).
WARN: Literal["warn"] = "warn"
Mark = bool | Literal["warn"] | None


def _check_columns(path: str, maps: MapSet | None, settings: Settings | None,
                   report: Callable[[Mark, str, str], None]) -> None:
    """The maps' tables and columns against the environment's own (a misspelt column reads as empty in every
    message: a whole-row write would clear its element on every resource), and what the document cannot settle
    (`warn`: a `type: date` on a date and time column)."""
    if maps is None:
        report(None, "columns", "skipped: fix the entity maps first")
        return
    try:
        tables = read_metadata(Path(path))
    except MetadataError as exc:
        report(False, "columns", str(exc))
        return
    consent = settings.consent_column if settings else (os.environ.get("WRITEBACK_CONSENT_COLUMN")
                                                         or Settings().consent_column)
    found = problems(maps, tables, consent)
    for problem in found:
        report(False, "columns", problem)
    if not found:
        report(True, "columns", f"every table and column the {len(maps.maps)} map(s) name is in {path} "
               f"({len(tables)} tables)")
    for warning in warnings_for(maps, tables):
        report(WARN, "columns", warning)


def cmd_check_config(args: argparse.Namespace) -> int:
    failures = warnings = 0

    def report(ok: Mark, what: str, text: str) -> None:
        nonlocal failures, warnings
        failures += ok is False
        warnings += ok == WARN
        mark = {True: "ok", False: "FAIL", None: "skip", WARN: "warn"}[ok]
        print(f"  {mark:<5} {what:<15} {text}")

    print("Settings (secrets redacted):")
    for name, value in redacted().items():
        print(f"  {name:<46} {value if value else '(empty)'}")
    print("Checks:")
    settings: Settings | None = None
    faults = Settings.faults(need_outcomes=True)
    if not faults:
        settings = Settings.from_env(need_outcomes=True)
        report(True, "settings", f"valid; target {settings.target}")
        if not settings.ignore_user_ids:
            report(WARN, "echo", "WRITEBACK_IGNORE_USER_IDS is empty: the FHIR-to-Dataverse sync's own saves are "
                   "not told apart (`echo`) but taken as clinical changes and written back to FHIR where they differ "
                   "from it, and the two directions may feed each other. Set it to the sync's application user's "
                   "systemuserid (docs/deploy.md)")
    for fault in faults:  # every one, so that one round of fixes is enough
        report(False, "settings", fault.detail)
    if (problem := telemetry_settings_problem(os.environ)) is not None:
        report(False, "telemetry", problem)
    elif os.environ.get(TELEMETRY_CONNECTION_STRING):
        report(True, "telemetry", "Application Insights settings are well formed (their values are not shown)")
    else:
        report(None, "telemetry", f"{TELEMETRY_CONNECTION_STRING} is not set: no outcome records reach Application "
               "Insights, nor do its alerts fire")
    trigger_settings = ("ServiceBusConnection", "ServiceBusConnection__fullyQualifiedNamespace")  # the host's names
    env: Mapping[str, str] = os.environ  # (the host's names are not upper case)
    credential = (env.get("ServiceBusConnection__credential") or "").strip()
    if not (os.environ.get("WRITEBACK_QUEUE_NAME") or "").strip():
        # (the binding's %WRITEBACK_QUEUE_NAME% does not resolve: the host does not index the function; found by
        # review)
        report(False, "trigger", "WRITEBACK_QUEUE_NAME is not set: the trigger binding names it, and the host has no "
               "default (set it to the queue the Dataverse service endpoint posts to)")
    if (env.get("ServiceBusConnection__clientId") or "").strip() and credential.lower() != "managedidentity" \
            and not (env.get("ServiceBusConnection") or "").strip():  # (a connection string wins: no identity used)
        # (the host takes its default credential then, and the trigger gets no token with the user-assigned
        # identity: found by review)
        report(False, "trigger", "ServiceBusConnection__clientId is set but ServiceBusConnection__credential is "
               "not `managedidentity`: the host uses the client id only then")
    if any(os.environ.get(name) for name in trigger_settings):
        report(True, "trigger", "ServiceBusConnection is set (its value is not shown)")
    else:
        report(None, "trigger", "neither ServiceBusConnection nor ServiceBusConnection__fullyQualifiedNamespace "
               "is set here (the Functions host reads it)")
    maps: MapSet | None = None
    try:
        # The maps the function would load: --maps, else WRITEBACK_MAPS_DIR (read as such when another setting is
        # wrong: checking the shipped maps instead would say "ok" of maps the function never loads).
        where = args.maps or (str(settings.maps_dir) if settings else os.environ.get("WRITEBACK_MAPS_DIR", ""))
        loaded = load_maps(Path(where) if where else DEFAULT_MAPS_DIR)
        report(True, "entity maps", f"{len(loaded.maps)} map(s) in {loaded.source}: {', '.join(sorted(loaded.maps))}")
        maps = loaded
    except WritebackError:
        for map_fault in map_faults(Path(where) if where else DEFAULT_MAPS_DIR):
            report(False, "entity maps", map_fault.detail)
    if args.dataverse_metadata:
        _check_columns(args.dataverse_metadata, maps, settings, report)
    else:
        # (A misspelt column is valid YAML and a valid name: only Dataverse's own list of columns tells it; found by
        # a new user's trial, whose misspelt `lastname` cleared every Patient's family name while all checks passed.)
        report(None, "columns", "not checked against Dataverse: a column the maps name that the table does not have "
               "(a misspelling) reads as empty in every message, and a whole-row write clears its element in FHIR. "
               "Run with --dataverse-metadata FILE (README, Entity maps)")
    if args.connect:
        if settings is None:
            report(None, "connections", "skipped: fix the settings first")
        else:
            asyncio.run(_check_connections(settings, report))
    print(("All checks passed." if not failures else f"{failures} check(s) failed.")
          + (f" {warnings} warning(s): read the `warn` lines." if warnings else ""))
    return EXIT_OK if not failures else EXIT_CHECK_FAILED


# The connection, by the names an administrator may have at hand: this command's own, the function app's trigger
# settings (`ServiceBusConnection`, `ServiceBusConnection__fullyQualifiedNamespace`: "the same settings as the
# function app"), azd's environment.
_SB_CONNECTION_STRINGS = ("SERVICEBUS_CONNECTION_STRING", "ServiceBusConnection")
_SB_NAMESPACES = ("SERVICEBUS_NAMESPACE", "ServiceBusConnection__fullyQualifiedNamespace", "SERVICE_BUS_NAMESPACE")


def servicebus_client() -> ServiceBusClient:
    """From a connection string, else a namespace (the bare name or the host name) + DefaultAzureCredential
    (az login); see `_SB_CONNECTION_STRINGS`, `_SB_NAMESPACES`."""
    for name in _SB_CONNECTION_STRINGS:
        conn = os.environ.get(name, "").strip()
        if conn:
            try:
                return ServiceBusClient.from_connection_string(conn)
            except ValueError:
                raise ConfigError(name, "is not a Service Bus connection string "
                                  "(Endpoint=sb://...;SharedAccessKeyName=...;SharedAccessKey=...)") from None
    namespace = next((value for name in _SB_NAMESPACES if (value := os.environ.get(name, "").strip())), "")
    if namespace and "." not in namespace:
        namespace += ".servicebus.windows.net"
    if namespace:
        credential = DefaultAzureCredential(exclude_interactive_browser_credential=True)
        return ServiceBusClient(namespace, credential=credential)
    others = ", ".join(_SB_CONNECTION_STRINGS[1:] + _SB_NAMESPACES)
    raise ConfigError("SERVICEBUS_CONNECTION_STRING", f"is not set (nor {others})")


# Dropped from a resubmitted copy: the dead-letter annotations, and the retry count and window, which would leave a
# message dead-lettered as `retries-exhausted` no retry at all (its 24 hours already spent), with the count of
# tries that waited for a consent among them.
_DROPPED = {"DeadLetterReason", "DeadLetterErrorDescription", ATTEMPT, FIRST_TRIED, CONSENT_WAITS, GATE_OPENED,
            OUTAGES}


def _requeued(message: ServiceBusReceivedMessage) -> ServiceBusMessage:
    """A copy for the main queue: same body, ids and properties, minus the dead-letter annotations and the retry
    bookkeeping (a new window of retries; `RESUBMITTED_FROM` still marks it as tried before)."""
    props: dict[str | bytes, Any] = {}
    for key, value in (message.application_properties or {}).items():
        name = key.decode("utf-8", errors="replace") if isinstance(key, bytes) else str(key)
        if name not in _DROPPED:
            props[name] = value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value
    props[RESUBMITTED_FROM] = message.dead_letter_reason or "unknown"
    original = original_id({str(k): v for k, v in props.items()}, message.message_id)
    props[ORIGINAL_ID] = original
    # Not under its own MessageId: the queue's duplicate detection drops a MessageId it saw within its window
    # (10 minutes), so a message dead-lettered and resubmitted within it would be lost. Its retry copies' ids carry
    # the same mark (`retry.next_step`), for the same reason.
    props[RESUBMISSION] = f"s{int(time.time())}"
    suffix = f"~{props[RESUBMISSION]}"
    return ServiceBusMessage(b"".join(message.body), application_properties=props,
                             content_type=message.content_type, correlation_id=message.correlation_id,
                             message_id=original[: MAX_MESSAGE_ID - len(suffix)] + suffix, subject=message.subject)


def _ids_of(message: ServiceBusReceivedMessage) -> set[str]:
    """The ids an administrator may name a dead-lettered message by: its own MessageId (`logs` shows the one each
    try had) and the one Dataverse posted it under (its retry copies' and resubmissions' ids start from it)."""
    props = {(k.decode("utf-8", errors="replace") if isinstance(k, bytes) else str(k)): v
             for k, v in (message.application_properties or {}).items()}
    return {i for i in (message.message_id, original_id(props, message.message_id)) if i}


def _settle_dead_letters(client: ServiceBusClient, queue: str, *, reason: str | None, message_ids: frozenset[str],
                         limit: int, wait: float, resend: bool) -> tuple[list[ServiceBusReceivedMessage], int, bool]:
    """Up to `limit` dead-lettered messages (those with `reason`, of `message_ids`, when given) sent back to `queue`
    (`resend`) or only removed. Returns what was settled, how many others were seen and left, and whether `limit`
    stopped it with a message it would have settled still there.

    Send first, then complete: a crash in between leaves a copy on both queues, which the ledger turns into
    one write and one `duplicate`. Messages not wanted are left in the dead-letter queue.
    """
    settled: list[ServiceBusReceivedMessage] = []
    held: list[ServiceBusReceivedMessage] = []
    seen: set[int] = set()
    more = False

    def wanted(message: ServiceBusReceivedMessage) -> bool:
        return (not reason or message.dead_letter_reason == reason) \
            and (not message_ids or not message_ids.isdisjoint(_ids_of(message)))

    with contextlib.ExitStack() as stack:
        receiver = stack.enter_context(client.get_queue_receiver(queue, sub_queue=ServiceBusSubQueue.DEAD_LETTER,
                                                                 max_wait_time=wait))
        # Only a resubmission sends: opening a sender needs the Send right, which `discard` is documented not to
        # need (a Receiver-only administrator could remove nothing; found by review).
        sender = stack.enter_context(client.get_queue_sender(queue)) if resend else None
        try:
            while not more:
                # Past the limit, one more look: whether a message it would move is left (found by an
                # administrator's trial: stopped at --max, it said nothing of the rest).
                batch = receiver.receive_messages(max_message_count=max(1, min(50, limit - len(settled))),
                                                  max_wait_time=wait)
                fresh = [m for m in batch if m.sequence_number not in seen]
                if not fresh:
                    break
                for message in fresh:
                    seen.add(message.sequence_number or -1)
                    if not wanted(message) or len(settled) >= limit:
                        more = more or wanted(message)
                        held.append(message)
                        continue
                    if sender is not None:
                        sender.send_messages(_requeued(message))
                    receiver.complete_message(message)
                    settled.append(message)
        finally:
            for message in held:
                with contextlib.suppress(AzureError):  # its lock lapsed on a long run: released all the same
                    receiver.abandon_message(message)
    return settled, sum(1 for m in held if not wanted(m)), more


def resubmit_dead_letters(client: ServiceBusClient, queue: str, *, reason: str | None = None,
                          message_ids: frozenset[str] = frozenset(), limit: int = 100,
                          wait: float = 5.0) -> tuple[list[ServiceBusReceivedMessage], int, bool]:
    """Move up to `limit` dead-lettered messages (optionally only those with `reason`, or of `message_ids`) back to
    `queue` (`_settle_dead_letters`)."""
    return _settle_dead_letters(client, queue, reason=reason, message_ids=message_ids, limit=limit, wait=wait,
                                resend=True)


def discard_dead_letters(client: ServiceBusClient, queue: str, *, reason: str | None = None,
                         message_ids: frozenset[str] = frozenset(), limit: int = 100,
                         wait: float = 5.0) -> tuple[list[ServiceBusReceivedMessage], int, bool]:
    """Remove up to `limit` dead-lettered messages with `reason` or of `message_ids` (at least one of them given):
    those that cannot succeed however often they are sent again (`_settle_dead_letters`)."""
    if not reason and not message_ids:
        raise ValueError("name what to discard: a reason or message ids")
    return _settle_dead_letters(client, queue, reason=reason, message_ids=message_ids, limit=limit, wait=wait,
                                resend=False)


def _dead_letter_queue(args: argparse.Namespace) -> str:
    return args.queue or os.environ.get("WRITEBACK_QUEUE_NAME", "").strip() or Settings().queue_name


def _service_bus_fault(exc: AzureError, what: str, queue: str, roles: str) -> WritebackError:
    """One line, no traceback: unreachable, no such queue, no sign-in, no rights."""
    return WritebackError(Reason.CONFIG_ERROR, f"Service Bus: {type(exc).__name__}: could not {what} the "
                          f"dead-lettered messages of queue {queue} (check the namespace or connection string, the "
                          f"queue name, your sign-in and your {roles})")


def _which(args: argparse.Namespace) -> str:
    parts = [f"with reason {args.reason}"] if args.reason else []
    if args.message_id:
        parts.append(f"of the {len(args.message_id)} message id(s) given")
    return "".join(f" {part}" for part in parts)


def _settle_from_cli(args: argparse.Namespace, *, resend: bool) -> int:
    """`resubmit` (`resend`) or `discard`: what it did, message by message, what it left, and whether --max stopped
    it."""
    queue = _dead_letter_queue(args)
    act = resubmit_dead_letters if resend else discard_dead_letters
    try:
        with servicebus_client() as client:
            settled, left, more = act(client, queue, reason=args.reason, message_ids=frozenset(args.message_id or ()),
                                      limit=args.max)
    except AzureError as exc:
        raise _service_bus_fault(exc, "move" if resend else "remove", queue, "Azure Service Bus Data Receiver and "
                                 "Data Sender roles" if resend else "Azure Service Bus Data Receiver role") from None
    for message in settled:
        print(f"  {'resubmitted' if resend else 'discarded'} message {message.message_id} (dead-letter reason "
              f"{message.dead_letter_reason or '-'})")
    which = _which(args)
    done = (f"Moved {len(settled)} dead-lettered message(s){which} from {queue}/$deadletterqueue back to {queue}."
            if resend else f"Removed {len(settled)} dead-lettered message(s){which} from {queue}/$deadletterqueue; "
            "they will not be written (a row's next save in Dataverse sends a new message for it).")
    print(done + (f" {left} other dead-lettered message(s) left in place." if left else ""))
    if more:
        print(f"Stopped at --max {args.max}: more dead-lettered messages{which} are still there; run it again (or "
              f"raise --max) to {'move' if resend else 'remove'} them.")
        return EXIT_OK
    # A mistyped id settles nothing: said, and not called success (found by review).
    unmatched = sorted(set(args.message_id or ()) - {i for message in settled for i in _ids_of(message)})
    if unmatched:
        print(f"No dead-lettered message{' with reason ' + args.reason if args.reason else ''} has the id(s): "
              f"{', '.join(unmatched)}.")
        return EXIT_NOT_FOUND
    return EXIT_OK


def cmd_resubmit(args: argparse.Namespace) -> int:
    return _settle_from_cli(args, resend=True)


def cmd_discard(args: argparse.Namespace) -> int:
    if not args.reason and not args.message_id:
        # (What is in a dead-letter queue may still be written once its cause is fixed: never removed wholesale.)
        raise WritebackError(Reason.CONFIG_ERROR, "name what to discard: --reason CODE and/or --message-id ID "
                             "(a dead-letter queue is never emptied wholesale)")
    return _settle_from_cli(args, resend=False)


def add_admin_commands(sub: Any) -> None:
    logs = sub.add_parser("logs", help="show the outcome log (Table Storage): what was written, skipped or failed")
    logs.add_argument("--status", choices=["failed", "skipped", "written"],
                      help="only this status; failed = dead-lettered, retry and config-error")
    logs.add_argument("--since", type=parse_since, default=timedelta(hours=24), metavar="DURATION",
                      help="how far back, e.g. 30m, 24h, 7d (default 24h)")
    logs.add_argument("--record", metavar="ID", type=_row_id, help="the history of one Dataverse row (its GUID)")
    logs.add_argument("--limit", type=_positive, default=200, help="most outcomes shown, newest first (default 200)")
    logs.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    logs.set_defaults(run=cmd_logs)
    check = sub.add_parser("check-config", help="validate settings and entity maps; --connect also tries them")
    check.add_argument("--connect", action="store_true",
                       help="also reach Table Storage, obtain a token and read the FHIR server's /metadata")
    check.add_argument("--dataverse-metadata", metavar="FILE",
                       help="the environment's Web API CSDL document (GET <environment URL>/api/data/v9.2/$metadata, "
                       "saved to a file): every table and column the maps name must be in it")
    check.add_argument("--maps", metavar="DIR", help="entity maps folder (default: WRITEBACK_MAPS_DIR, else the "
                       "shipped maps)")
    check.set_defaults(run=cmd_check_config)
    resubmit = sub.add_parser("resubmit", help="move dead-lettered messages back to their queue after a fix")
    resubmit.add_argument("--queue", help="the queue whose dead-letter queue is emptied (default: "
                          "WRITEBACK_QUEUE_NAME, else dataverse-writeback)")
    resubmit.add_argument("--reason", metavar="CODE", type=_dead_letter_reason,
                          help="only messages dead-lettered with this reason code (e.g. fhir-rejected, "
                               "MaxDeliveryCountExceeded)")
    resubmit.add_argument("--message-id", action="append", metavar="ID",
                          help="only this message (its MessageId, or the one Dataverse posted it under); repeatable")
    resubmit.add_argument("--max", type=_positive, default=100, help="most messages moved (default 100)")
    resubmit.set_defaults(run=cmd_resubmit)
    discard = sub.add_parser("discard", help="remove dead-lettered messages that cannot succeed however often they "
                             "are sent again (their rows are written at their next save)")
    discard.add_argument("--queue", help="the queue whose dead-letter queue it removes from (default: "
                         "WRITEBACK_QUEUE_NAME, else dataverse-writeback)")
    discard.add_argument("--reason", metavar="CODE", type=_dead_letter_reason,
                         help="messages dead-lettered with this reason code (e.g. malformed-message)")
    discard.add_argument("--message-id", action="append", metavar="ID",
                         help="this message (its MessageId, or the one Dataverse posted it under); repeatable")
    discard.add_argument("--max", type=_positive, default=100, help="most messages removed (default 100)")
    discard.set_defaults(run=cmd_discard)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m writeback", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    plan = sub.add_parser("plan", help="dry run: what one message would write to FHIR, or why not")
    plan.add_argument("file", help="a Dataverse message body (JSON RemoteExecutionContext)")
    plan.add_argument("--properties", help="Service Bus application properties, as a JSON object")
    plan.add_argument("--maps", help="folder of entity maps (default: WRITEBACK_MAPS_DIR or the shipped maps)")
    plan.set_defaults(run=cmd_plan)
    process = sub.add_parser("process", help="process message files for real against the configured FHIR server")
    process.add_argument("files", nargs="+", help="Dataverse message bodies")
    process.add_argument("--maps", help="folder of entity maps (default: WRITEBACK_MAPS_DIR or the shipped maps)")
    process.set_defaults(run=cmd_process)
    add_admin_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # azure-identity logs each credential of the chain it tried as a warning, which Python's last-resort handler
    # printed as a dozen lines before the command's own one-line error (it names what to check).
    logging.getLogger("azure.identity").setLevel(logging.ERROR)
    try:
        code: int = args.run(args)
    except WritebackError as exc:
        return _fail(exc.detail)
    except SystemExit as exc:
        return int(exc.code or 0)
    except BrokenPipeError:  # `plan ... | head`: the reader has gone; what was left to print is not wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return code
