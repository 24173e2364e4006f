#!/bin/sh
# Build the worker's wheel (code plus the jobs/ catalog, packaged as worker/_catalog)
# into OUTPUT_DIR. The Dockerfile's build stage runs this, and so does
# tests/e2e/test_wheel_install.py, so the test exercises the image's own recipe.
set -eu
out="${1:?usage: scripts/build-wheel.sh OUTPUT_DIR}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$(dirname "$0")/.."
# --no-deps: only our wheel; dependencies are resolved when it is installed.
python -m pip wheel --no-deps --no-cache-dir --disable-pip-version-check \
    --wheel-dir "$out" .
