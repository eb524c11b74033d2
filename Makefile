# Two commands matter: `make demo` and `make test`. Each sets up what it needs from a fresh clone.
# The first interpreter that really runs and is 3.11+ (a pyenv shim may exist without its Python).
PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
	$$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && { command -v $$p; break; }; done)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NODE_STAMP := fhirdev/node_modules/.installed
CHECKOV_STAMP := .venv-checkov/.installed

.PHONY: demo test setup lint typecheck audit unit bench clean

setup: $(STAMP) $(NODE_STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	@touch $@

$(NODE_STAMP): fhirdev/package.json fhirdev/package-lock.json
	@command -v npm >/dev/null || { echo "npm is required (Node.js 18+) for the FHIR dev server and Azurite"; exit 1; }
	@cd fhirdev && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

$(CHECKOV_STAMP): requirements-checkov.txt
	@bash devtools/install-checkov.sh
	@touch $@

lint: $(STAMP)
	$(PY) -m ruff check .

typecheck: $(STAMP)
	$(PY) -m mypy

audit: $(STAMP)
	$(PY) -m pip_audit --requirement requirements.txt --progress-spinner off

unit: setup $(CHECKOV_STAMP)
	$(PY) -m pytest

test: lint typecheck unit

demo: setup
	@$(PY) -m devtools.demo

bench: setup
	@$(PY) -m bench

clean:
	rm -rf $(VENV) .venv-checkov fhirdev/node_modules .mypy_cache .ruff_cache .pytest_cache
