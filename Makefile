# Every target creates the virtual environment it needs: `make dev` and `make test`
# are the only two commands a fresh machine needs. The environment is uv.lock, exactly
# (`uv sync --locked` fails if the lock no longer matches pyproject.toml: run `make lock`);
# the image installs the same lock (Dockerfile) without the dev group and the bench extra.
PYTHON ?= python3
# The uv release pyproject.toml's [tool.uv] required-version names, kept in .tools.
UV_VERSION := 0.10.12
UV := .tools/bin/uv
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: dev webapp test test-fast test-container lint lock image bench soak clean

$(UV):
	$(PYTHON) -m venv .tools
	.tools/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

$(STAMP): pyproject.toml uv.lock | $(UV)
	$(UV) sync --locked --extra bench --python $(PYTHON) --quiet
	touch $(STAMP)

lock: $(UV)
	$(UV) lock

dev: $(STAMP)
	$(BIN)/worker dev

# The reference web app (examples/webapp) beside `make dev`, from the file `worker dev` writes.
webapp: $(STAMP)
	$(BIN)/python -m examples.webapp --env-file .worker-dev.env

test: $(STAMP)
	$(BIN)/pytest -q -m "not container"

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not e2e and not container and not gcloud"

# Builds the image with podman on a Debian stand-in base and runs it (scripts/container-build.sh).
test-container: $(STAMP)
	$(BIN)/pytest -q -m container

lint: $(STAMP)
	$(BIN)/ruff check worker localcloud tests bench scripts examples
	$(BIN)/ruff format --check worker localcloud tests bench scripts examples
	$(BIN)/mypy worker localcloud/src examples
	$(BIN)/lint-imports
	$(BIN)/hadolint Dockerfile
	$(BIN)/check-jsonschema --builtin-schema vendor.cloudbuild cloudbuild.yaml

image: $(STAMP)
	scripts/container-build.sh

bench: $(STAMP)
	$(BIN)/python -m bench
	$(BIN)/python -m bench.lanes

soak: $(STAMP)
	SOAK_SCALE=full $(BIN)/pytest -q -m soak -s

clean:
	rm -rf $(VENV) .tools dist build .pytest_cache .mypy_cache .ruff_cache .import_linter_cache
