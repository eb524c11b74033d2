"""The build of the `writeback` package: its pure core compiled with mypyc, the rest as Python.

The core (parse, decide, map, validate, converge) is plain functions over plain data, typed under `mypy --strict`:
mypyc compiles exactly that into C extensions: about 28% fewer instructions per message on the benchmark's core path
(README, Performance).
The same sources stay importable as Python; `writeback/__init__.py` falls back to them in a checkout where any
source is newer than the compiled modules (`writeback.build`).

Built twice, the same way:
* in Azure, by the remote build: requirements.txt names this project (`.`), so `pip install -r requirements.txt`
  builds and installs it into .python_packages, where the worker imports it from (ahead of the app directory);
* in a checkout, by `make compile` (`setup.py build_ext --inplace`), which `make test`, `make demo` and `make bench`
  run first.
"""

import os

from mypyc.build import mypycify
from setuptools import setup

# The pure core: no I/O, no async, nothing a test replaces at run time. (Adapters stay Python: they wait on the
# network, and their tests stand in for their clients.)
COMPILED = [
    "writeback/messages.py",
    "writeback/mapping.py",
    "writeback/paths.py",
    "writeback/marks.py",
    "writeback/validation.py",
    "writeback/decide.py",
    "writeback/facts.py",
    "writeback/converge.py",
]

# Third-party packages are typed `Any` to the compiler wherever it builds: Azure's remote build isolates the build
# from the app's packages, so a checkout's build must not see them either (the two would compile differently).
# What `mypy --strict` says of Any is `make typecheck`'s business, not the build's.
# (A cache of its own: `make typecheck`'s, under other options, would be checked afresh each time.)
OPTIONS = ["--no-site-packages", "--ignore-missing-imports", "--no-warn-unused-ignores", "--allow-subclassing-any",
           "--allow-untyped-decorators", "--no-warn-return-any", "--cache-dir=build/mypyc-cache"]

# WRITEBACK_COMPILE=0 builds the sources alone, for a machine without a C compiler: the same app, slower (the log
# at start says which core runs: `writeback started: core ...`).
COMPILE = os.environ.get("WRITEBACK_COMPILE", "1") != "0"

# Built for a short build rather than the last percent: Azure's remote build has a time limit (docs/deploy.md).
# Measured on two busy cores: opt_level 3 in one C file, 90 s; opt_level 1 in a C file per module, 40 s, for 1%
# more instructions per message on the benchmark's core path (opt_level 0: 38 s, 31% more).
setup(ext_modules=mypycify([*OPTIONS, *COMPILED], opt_level="1", multi_file=True) if COMPILE else [],
      options={"build_ext": {"parallel": os.cpu_count() or 1}})
