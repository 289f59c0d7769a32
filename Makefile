# The two commands a new user runs (README): `make demo` and `make test`.
# Each creates .venv on first use: torch==2.13.0 first (a range would pull a CUDA build), then the project.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.edgespec-installed

.PHONY: demo test lint format protos bench-core clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test,experiments]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/edgespec demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	@# pytest exits 5 when it collects nothing: that is a failure too, said out loud.
	$(BIN)/python -m pytest -q; rc=$$?; [ $$rc -ne 5 ] || echo 'pytest collected no tests' >&2; exit $$rc

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

protos: $(STAMP)
	$(BIN)/python -m protos.generate

bench-core: $(STAMP)
	$(BIN)/edgespec bench core --json bench-results/core.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
