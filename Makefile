# The two commands a new user runs (README): `make demo` and `make test`.
# Each creates .venv on first use: torch==2.13.0 first (a range would pull a CUDA build), then the
# project as a strict editable install: a link tree under build/ that maps the top-level folders
# onto `edgespec.*`. A link tree lists files, so it is relinked whenever the set of files changes.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.edgespec-installed
FILES := $(VENV)/.edgespec-files
PKG_DIRS := sdk core protos serving edge cloud orchestrator linkemu

.PHONY: demo test test-fast lint typecheck format protos bench-core dev clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	@# setuptools' build warnings are long and harmless: kept in a log, shown if the install fails.
	$(BIN)/python -m pip install -q -e '.[test,experiments]' --config-settings editable_mode=strict \
		> $(VENV)/install.log 2>&1 || { cat $(VENV)/install.log; exit 1; }
	find $(PKG_DIRS) -type f -not -name '*.pyc' | sort > $(FILES)
	touch $(STAMP)

# Relink the editable install when a package file was added, removed or renamed.
dev: $(STAMP)
	@find $(PKG_DIRS) -type f -not -name '*.pyc' | sort > $(FILES).new
	@if ! cmp -s $(FILES).new $(FILES); then \
		echo 'package files changed: relinking the editable install'; \
		$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e . \
			--config-settings editable_mode=strict > $(VENV)/install.log 2>&1 \
			|| { cat $(VENV)/install.log; exit 1; }; \
		mv $(FILES).new $(FILES); \
	else rm -f $(FILES).new; fi

demo: dev
	$(BIN)/edgespec demo

lint: dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy

typecheck: dev
	$(BIN)/mypy

# The full suite: what CI runs. pytest exits 5 when it collects nothing: a failure, said out loud.
test: lint
	$(BIN)/pytest -q; rc=$$?; [ $$rc -ne 5 ] || echo 'pytest collected no tests' >&2; exit $$rc

# A quick loop: no Ray cluster, nothing marked slow.
test-fast: dev
	$(BIN)/pytest -q -m "not ray and not slow"; rc=$$?; [ $$rc -ne 5 ] || echo 'pytest collected no tests' >&2; exit $$rc

format: dev
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

protos: dev
	$(BIN)/python -m edgespec.protos.generate

bench-core: dev
	$(BIN)/edgespec bench core --json bench-results/core.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache
