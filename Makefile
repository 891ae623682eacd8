# One entry point for people and CI alike. Needs only Python 3.11+ on the machine:
# every target creates .venv and installs the project into it first.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-stamp
# The folders that are genline's subpackages once installed (pyproject.toml, [tool.setuptools]).
PACKAGE_DIRS := cli config pipelines provider storage tasks workers
PIP     := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: install demo test test-fast bench chaos lint typecheck clean help

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml
	@$(PY) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "genline needs Python 3.11 or newer")'
	$(PY) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP) ## Create .venv and install genline with its test tools

demo: $(STAMP) ## Run sample pipelines end to end on the zero-setup default
	$(BIN)/genline demo

test: $(STAMP) ## Run every test (integration tests need Redis and PostgreSQL; with CI=true they must run)
	$(BIN)/python -m pytest

test-fast: $(STAMP) ## Only the tests that need no Redis or PostgreSQL
	$(BIN)/python -m pytest -m "not integration"

bench: $(STAMP) ## Measure throughput against a bare Celery chain; writes var/bench/latest.json (QUICK=1 for a short run)
	$(BIN)/python -m lab.bench $(if $(QUICK),--quick,) $(if $(PROFILE),--profile,)

chaos: $(STAMP) ## Faults, kills and restarts on the production footprint; exits 1 if an invariant breaks (QUICK=1: 40 pipelines)
	$(BIN)/python -m lab.chaos $(if $(QUICK),--quick,)

lint: $(STAMP) ## ruff: the lint rules, and the formatting (Python blocks in README.md included)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP) ## mypy: strict on the code, relaxed on the tests
	@rm -rf build/typecheck && mkdir -p build/typecheck/genline
	@for f in genline/*.py; do ln -s ../../../$$f build/typecheck/genline/; done
	@for d in $(PACKAGE_DIRS); do ln -s ../../../$$d build/typecheck/genline/$$d; done
	$(BIN)/mypy

clean: ## Remove the virtualenv and local state
	rm -rf $(VENV) var build .pytest_cache .mypy_cache .ruff_cache
