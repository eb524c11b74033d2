"""`make demo`: the shipped sample messages through the real pipeline, against real local services.

Starts the FHIR dev server (Medplum's engine) and Azurite on free loopback ports, processes every message in
`samples/` exactly as the function would, prints one line per message, reads one written resource and its
Provenance back from the server, prints the outcome log, and stops what it started.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections import Counter

import httpx

from devtools.samples import SAMPLES, SYNC_USER
from devtools.services import Azurite, FhirDevServer, azurite, fhir_dev_server
from writeback import cli
from writeback.fhir_client import build_delivery
from writeback.maps import load_maps
from writeback.outcomes import OutcomeStore
from writeback.pipeline import Envelope, Pipeline, Result
from writeback.settings import Settings

WIDTH = 118


def demo_env(server: FhirDevServer, tables: Azurite) -> dict[str, str]:
    env = {
        "FHIR_URL": server.base_url,
        "FHIR_TOKEN_URL": server.token_url,
        "FHIR_CLIENT_ID": server.client_id,
        "FHIR_CLIENT_SECRET": server.client_secret,
        "WRITEBACK_IGNORE_USER_IDS": SYNC_USER,
        "FHIR_RETRY_MAX_SECONDS": "10",
    }
    env["OUTCOMES_CONNECTION_STRING"] = tables.connection_string
    env["OUTCOMES_TABLE_PREFIX"] = "demo"
    return env


def _line(name: str, result: Result) -> str:
    decision = result.decision
    where = result.resource or result.detail
    return (f"{name:<36} {decision.table or '-':<24} {result.state:<14} {result.reason or '-':<20} "
            f"{decision.resource_type or '-':<13} {where}")


async def _read_back(server: FhirDevServer, results: list[Result]) -> None:
    """The first resource written, as the server holds it now (after every sample), and the Provenance of the
    last version the demo wrote of it."""
    first = next((r for r in results if r.state == "written" and r.resource and r.provenance), None)
    if first is None or first.resource is None:
        return
    resource = first.resource.split("/_history/")[0]
    last = [r for r in results if r.state == "written" and r.provenance and r.resource
            and r.resource.startswith(resource + "/")][-1]
    async with httpx.AsyncClient() as http:
        token = (await http.post(server.token_url, data={"grant_type": "client_credentials"},
                                 auth=(server.client_id, server.client_secret))).json()["access_token"]
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/fhir+json"}
        for ref, what in ((resource, "now"), (last.provenance, f"naming {last.resource}")):
            body = (await http.get(f"{server.base_url}/{ref}", headers=headers)).json()
            print(f"\nRead back {ref} ({what}):")
            text = json.dumps(body, indent=2)
            lines = text.splitlines()
            # Whole lines only (a cut mid-string looked broken), and said when some are left out.
            print("\n".join(lines[:80]) + (f"\n  … ({len(lines) - 80} more lines)" if len(lines) > 80 else ""))


async def run(env: dict[str, str], server: FhirDevServer) -> Counter[str]:
    settings = Settings.from_env(env, need_outcomes=True)
    maps = load_maps(settings.maps_dir)
    delivery, aclose = build_delivery(settings)
    ledger = OutcomeStore.from_settings(settings)
    await ledger.ensure_tables()
    pipeline = Pipeline(maps, settings, delivery, ledger)
    results: list[Result] = []
    print(f"{'message':<36} {'table':<24} {'outcome':<14} {'reason':<20} {'resource type':<13} resource / detail")
    print("-" * WIDTH)
    try:
        for path in sorted(SAMPLES.glob("*.json")):
            result = await pipeline.process(Envelope(path.read_bytes(), message_id=path.stem))
            results.append(result)
            print(_line(path.name, result))
        # At-least-once delivery: the first sample again is written once, then skipped as a duplicate.
        first = sorted(SAMPLES.glob("*.json"))[0]
        again = await pipeline.process(Envelope(first.read_bytes(), message_id=first.stem, delivery_count=2))
        results.append(again)
        print(_line(f"{first.name} (redelivered)", again))
        await _read_back(server, results)
    finally:
        await aclose()
        await ledger.aclose()
    return Counter(r.state for r in results)


def _print_logs(env: dict[str, str]) -> None:
    print("\n$ python -m writeback logs --since 1h")
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        cli.main(["logs", "--since", "1h"])
    finally:
        os.environ.clear()
        os.environ.update(saved)


def main() -> int:
    print("Starting the FHIR dev server (Medplum engine) and Azurite on loopback...", flush=True)
    with fhir_dev_server() as server, azurite() as tables:
        env = demo_env(server, tables)
        counts = asyncio.run(run(env, server))
        _print_logs(env)
    dead = counts["dead-lettered"]
    print(f"\n{counts['written']} written, {counts['skipped']} skipped, {dead} dead-lettered")
    return 0 if counts["retry"] == 0 and counts["config-error"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
