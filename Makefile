# Two commands for a newcomer: `make demo` and `make test`. Each creates .venv/ with Python alone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test demo sim lint bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "angelstream needs Python 3.11 or newer (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

## test: lint, types, and the whole suite with 100 % line + branch coverage of worker/ and consumers/
test: lint
	@rm -f .coverage .coverage.*
	$(BIN)/coverage run -m pytest $(PYTEST_ARGS)
	@$(BIN)/coverage combine -q
	$(BIN)/coverage report

lint: $(STAMP)
	$(BIN)/ruff check worker consumers bench tests
	$(BIN)/ruff format --check worker consumers bench tests
	$(BIN)/mypy

## demo: simulator → worker → Redis, with a live table of the latest ticks until Ctrl-C
demo: $(STAMP)
	$(BIN)/angelstream demo

## sim: only the simulator, on http://127.0.0.1:8700, for `angelstream run` with .env pointing at it
sim: $(STAMP)
	$(BIN)/angelstream sim

## bench: the end-to-end benchmark (private Redis, simulator, the real worker; ~4 min), decode speed, CPU per tick
bench: $(STAMP)
	$(BIN)/python -m bench.decode
	$(BIN)/python -m bench.hotpath
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .coverage .coverage.* .mypy_cache .ruff_cache .hypothesis *.egg-info
