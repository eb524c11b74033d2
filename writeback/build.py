"""Which build of the core runs: compiled by mypyc (setup.py) or the Python sources, and a checkout's guard.

In a checkout, `make compile` puts the compiled modules beside their sources, and Python imports an extension
module ahead of a source file of the same name. A source edited after the last build would then be silently not
what runs: `guard` (called by the package's `__init__`, before any compiled module is imported) sends every
compiled module of the package to its source instead, with a warning, when any source of the package (or setup.py)
is newer than the oldest compiled module. All of them, not only the edited one: compiled modules call each other
directly, not through the module objects, and read the types of the modules they import. An installed package
(Azure's .python_packages) is built in one go from one set of sources: not checked.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import warnings
from collections.abc import Mapping, Sequence
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType

PACKAGE = Path(__file__).resolve().parent
SENTINEL = "paths"  # a module setup.py compiles: how `core` tells which build runs


def _extensions(package: Path) -> dict[str, Path]:
    """The package's extension modules that have a source beside them, by module name."""
    found: dict[str, Path] = {}
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        for extension in package.glob(f"*{suffix}"):
            name = extension.name[: -len(suffix)]
            if "." not in name and (package / f"{name}.py").is_file():
                found.setdefault(name, extension)
    return found


def stale(package: Path = PACKAGE) -> list[str]:
    """In a checkout (setup.py beside the package): the sources newer than the oldest compiled module, any source
    of the package (the compiler read the types of what the core imports too) and setup.py."""
    setup = package.parent / "setup.py"
    extensions = _extensions(package)
    if not setup.is_file() or not extensions:
        return []
    built = min(extension.stat().st_mtime_ns for extension in extensions.values())
    return sorted(source.name for source in [setup, *package.glob("*.py")] if source.stat().st_mtime_ns > built)


class _Sources:
    """A finder that loads the named modules from their `.py` files (ahead of the path's extension modules)."""

    def __init__(self, sources: Mapping[str, Path]) -> None:
        self.sources = dict(sources)

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        source = self.sources.get(fullname)
        return None if source is None else importlib.util.spec_from_file_location(fullname, source)


def guard(package_name: str, package: Path = PACKAGE) -> None:
    outdated = stale(package)
    if not outdated:
        return
    sys.meta_path.insert(0, _Sources({f"{package_name}.{name}": package / f"{name}.py"
                                      for name in _extensions(package)}))
    warnings.warn(f"{package_name}: the compiled core is older than its sources ({', '.join(outdated)}): running "
                  "the sources instead, slower; `make compile` builds it again", stacklevel=2)


def core() -> str:
    """"compiled" or "interpreted", and where from: for the log at start and the benchmark's header."""
    module = importlib.import_module(f"{__package__}.{SENTINEL}")
    where = Path(module.__file__ or "?").parent
    kind = "compiled" if module.__file__ and not module.__file__.endswith(".py") else "interpreted"
    return f"{kind} ({where})"
