# Two commands matter: `make demo` and `make test`. Each sets up what it needs from a fresh clone.
# The first interpreter that really runs and is 3.11 to 3.13, what Flex Consumption offers for new apps (a pyenv
# shim may exist without its Python).
PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
	$$p -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 13))' 2>/dev/null \
	&& { command -v $$p; break; }; done)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NODE_STAMP := fhirdev/node_modules/.fhirdev-installed
CHECKOV_STAMP := .venv-checkov/.installed
COMPILED_STAMP := build/compiled.stamp
# requirements.txt without its last line, `.` (the app itself, which Azure's remote build compiles and installs):
# the packages the app needs. A checkout runs its own sources, compiled in place (`compile`), never an installed copy.
APP_DEPS := build/requirements-deps.txt

.PHONY: demo test setup compile lint typecheck audit unit worker-toolchain bench clean FORCE

setup: $(STAMP) $(NODE_STAMP) $(COMPILED_STAMP)

$(APP_DEPS): requirements.txt
	@mkdir -p build
	@grep -v '^\.$$' requirements.txt > $@

$(STAMP): $(APP_DEPS) requirements-dev.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if (3, 11) <= sys.version_info[:2] <= (3, 13) else "Python 3.11 to 3.13 is required")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --quiet --disable-pip-version-check -r $(APP_DEPS) -r requirements-dev.txt
	@# (a venv once made with `pip install -r requirements.txt` holds a copy of the app, imported ahead of the sources)
	@$(PY) -m pip uninstall --quiet --disable-pip-version-check --yes dataverse-fhir-writeback 2>/dev/null || true
	@touch $@

# The pure core compiled by mypyc beside its sources (setup.py; under a minute). Rebuilt when any source of the
# package changes (the compiler reads the types of what the core imports too), or a compiled module is missing.
# `writeback.build` keeps a run started without make from using compiled modules older than any source. Each
# compiled module is dated at the build's start, so an edit made while it builds counts as not built.
compile: $(COMPILED_STAMP)

$(COMPILED_STAMP): setup.py pyproject.toml $(wildcard writeback/*.py) $(STAMP) \
		$(if $(or $(filter 0,$(WRITEBACK_COMPILE)),$(wildcard writeback/paths.*.so)),,FORCE)
	@echo "compiling the core with mypyc (setup.py) ..."
	@mkdir -p build && touch build/compile.start
	@rm -f writeback/*.so *.so
	@$(PY) setup.py --quiet build_ext --inplace > build/compile.log 2>&1 || { cat build/compile.log; exit 1; }
	@for f in writeback/*.so *.so; do if [ -e "$$f" ]; then touch -r build/compile.start "$$f"; fi; done
	@touch -r build/compile.start $@

FORCE:

# npm ci in fhirdev/ (Medplum's FHIR engine, Azurite, a Node 22 runtime), the same step the test fixtures take.
$(NODE_STAMP): fhirdev/package.json fhirdev/package-lock.json $(STAMP)
	@$(PY) -c "from devtools.services import ensure_node_packages; ensure_node_packages()"

$(CHECKOV_STAMP): requirements-checkov.txt
	@bash devtools/install-checkov.sh
	@touch $@

lint: $(STAMP)
	$(PY) -m ruff check .

typecheck: $(STAMP)
	$(PY) -m mypy

# pip-audit fails the build on a known vulnerability. Where the vulnerability service cannot be reached
# (a closed network), it audits nothing: that is said loudly, not mistaken for a clean result.
audit: $(STAMP) $(APP_DEPS)
	@$(PY) -m pip_audit --requirement $(APP_DEPS) --progress-spinner off > .audit.log 2>&1 \
		|| { cat .audit.log; exit 1; }
	@if grep -q "could not be audited" .audit.log; then \
		echo "pip-audit: WARNING: the vulnerability service was unreachable; $$(grep -c 'could not be audited' .audit.log) packages not audited"; \
	else head -1 .audit.log; fi

# What the real-worker tests (tests/worker) run with, under build/worker/: a venv of the app's requirements per
# installed Python 3.11 to 3.13, the worker library, the host's gRPC stubs. Built here so its progress shows (cold:
# about a minute per Python version, from PyPI); then reused, a check of a few stamps.
worker-toolchain: setup
	@$(PY) -m tests.worker.toolchain

unit: setup $(CHECKOV_STAMP) worker-toolchain
	$(PY) -m pytest

test: lint typecheck audit unit

demo: setup
	@$(PY) -m devtools.demo

bench: setup
	@$(PY) -m bench

clean:
	rm -rf $(VENV) .venv-checkov fhirdev/node_modules .mypy_cache .ruff_cache .pytest_cache build
	rm -f writeback/*.so *.so
