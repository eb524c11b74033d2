#!/usr/bin/env bash
# Create .venv-checkov with the pinned checkov from requirements-checkov.txt, unless it is already there.
# Idempotent and quiet: a second run only checks the installed version. Called by `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv-checkov
req=requirements-checkov.txt
want=$(sed -n 's/^checkov==\([^[:space:]]*\).*/\1/p' "$req")
# checkov 3.3 supports Python 3.9-3.12. Take the first interpreter that actually runs one of those
# (a pyenv shim can exist for a version that is not selected, so `command -v` alone is not enough).
python=${PYTHON:-}
if [ -z "$python" ]; then
    for candidate in python3.12 python3.11 python3; do
        if "$candidate" -c 'import sys; sys.exit(not (3, 9) <= sys.version_info[:2] <= (3, 12))' 2>/dev/null; then
            python=$candidate
            break
        fi
    done
fi
if [ -z "$python" ]; then
    echo "install-checkov: needs Python 3.9-3.12 (set PYTHON=/path/to/python)" >&2
    exit 1
fi

if [ -x "$venv/bin/checkov" ] \
   && [ "$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("checkov"))' 2>/dev/null)" = "$want" ]; then
    exit 0
fi

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req"
"$venv/bin/checkov" --version >/dev/null
