#!/bin/sh
# Install the wheel found in WHEEL_DIR, with its dependencies, into a new virtual
# environment at VENV_DIR. The venv has no pip of its own and pip keeps no cache, so
# the image's runtime stage copies the application and nothing used to install it.
# Used by the Dockerfile and by tests/e2e/test_wheel_install.py.
set -eu
venv="${1:?usage: scripts/install-wheel.sh VENV_DIR WHEEL_DIR}"
wheels="${2:?usage: scripts/install-wheel.sh VENV_DIR WHEEL_DIR}"
python -m venv --without-pip "$venv"
python -m pip --python "$venv/bin/python" install --no-cache-dir --disable-pip-version-check \
    "$wheels"/*.whl
