"""Command line: `python -m writeback plan|process|logs|check-config|resubmit`.

Every command prints JSON or a readable table, exits with a documented code, and never shows a traceback:
a fault in a setting, a map or an input file is one clear line on stderr (exit 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from writeback.decide import plan_message
from writeback.errors import WritebackError
from writeback.maps import MapSet, load_maps
from writeback.settings import Settings

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
    if not isinstance(data, dict):
        raise SystemExit(_fail(f"{path} must hold a JSON object of application properties"))
    return data


def load_for_cli(maps_dir: str | None, settings: Settings) -> MapSet:
    return load_maps(Path(maps_dir) if maps_dir else settings.maps_dir)


def cmd_plan(args: argparse.Namespace) -> int:
    settings = Settings.for_planning()
    maps = load_for_cli(args.maps, settings)
    decision = plan_message(_read_bytes(args.file), read_properties(args.properties), maps, settings)
    print(json.dumps(decision.as_json(), indent=2, ensure_ascii=False))
    return EXIT_REJECT if decision.decision == "reject" else EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m writeback", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    plan = sub.add_parser("plan", help="dry run: what one message would write to FHIR, or why not")
    plan.add_argument("file", help="a Dataverse message body (JSON RemoteExecutionContext)")
    plan.add_argument("--properties", help="Service Bus application properties, as a JSON object")
    plan.add_argument("--maps", help="folder of entity maps (default: WRITEBACK_MAPS_DIR or the shipped maps)")
    plan.set_defaults(run=cmd_plan)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except WritebackError as exc:
        return _fail(exc.detail)
    except SystemExit as exc:
        return int(exc.code or 0)
    return code
