# Every target creates the virtual environment it needs: `make dev` and `make test`
# are the only two commands a fresh machine needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: dev test test-fast lint bench soak clean

$(STAMP): pyproject.toml localcloud/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,bench]' -e ./localcloud
	touch $(STAMP)

dev: $(STAMP)
	$(BIN)/worker dev

test: $(STAMP)
	$(BIN)/pytest -q

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not e2e"

lint: $(STAMP)
	$(BIN)/ruff check worker localcloud tests bench
	$(BIN)/mypy worker localcloud/src
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python -m bench

soak: $(STAMP)
	SOAK_SCALE=full $(BIN)/pytest -q -m soak -s

clean:
	rm -rf $(VENV) dist build .pytest_cache .mypy_cache .ruff_cache .import_linter_cache
