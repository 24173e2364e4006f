# Every target creates the virtual environment it needs: `make dev` and `make test`
# are the only two commands a fresh machine needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: dev webapp test test-fast lint bench soak clean

$(STAMP): pyproject.toml localcloud/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]' -e ./localcloud
	touch $(STAMP)

dev: $(STAMP)
	$(BIN)/worker dev

# The reference web app (examples/webapp) beside `make dev`, from the file `worker dev` writes.
webapp: $(STAMP)
	$(BIN)/python -m examples.webapp --env-file .worker-dev.env

test: $(STAMP)
	$(BIN)/pytest -q

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not e2e"

lint: $(STAMP)
	$(BIN)/ruff check worker localcloud tests bench examples
	$(BIN)/mypy worker localcloud/src examples
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python -m bench

soak: $(STAMP)
	SOAK_SCALE=full $(BIN)/pytest -q -m soak -s

clean:
	rm -rf $(VENV) dist build .pytest_cache .mypy_cache .ruff_cache .import_linter_cache
