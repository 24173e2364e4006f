#!/usr/bin/env bash
# Build the worker's image with podman, on a machine without Docker or Docker Hub.
#
# The Dockerfile is built unchanged except for its two base images, which are
# replaced through its build arguments by local stand-ins:
#   PYTHON_IMAGE  a Debian bookworm root bootstrapped by scripts/standin-base.sh, standing
#                 in for python:3.11-slim (NOT the official image; see that script)
#   UV_IMAGE      an image holding only /uv and /uvx, taken from the uv release that
#                 pyproject.toml's [tool.uv] required-version names, installed from PyPI
#                 into the uv that `make` uses (the official image holds the same two files)
# The stand-in base is cached in podman's local storage under a tag derived from
# standin-base.sh's content, so a second run on the same machine skips the bootstrap.
#
# podman 4.3 here needs runc (crun 1.8 refuses this machine's hybrid cgroup layout)
# and explicit default ulimits (root lacks CAP_SYS_RESOURCE, so podman cannot raise
# them): both go into a containers.conf of our own, passed with CONTAINERS_CONF.
#
# usage: scripts/container-build.sh [IMAGE_REF]     (default localhost/cloudrun-job-worker:smoke)
# Prints, last, the lines image=..., containers_conf=... and base=... for callers.
set -euo pipefail
cd "$(dirname "$0")/.."

image="${1:-localhost/cloudrun-job-worker:smoke}"
state="${CONTAINER_STATE_DIR:-/var/tmp/cloudrun-job-worker-container}"
uv="${UV:-.tools/bin/uv}"
mkdir -p "$state"

for tool in podman runc debootstrap; do
    command -v "$tool" >/dev/null || {
        echo "container-build: $tool is missing; install it: apt-get install podman runc debootstrap" >&2
        exit 1
    }
done

export CONTAINERS_CONF="$state/containers.conf"
cat >"$CONTAINERS_CONF" <<EOF
[containers]
default_ulimits = ["nofile=$(ulimit -Hn):$(ulimit -Hn)", "nproc=16384:16384"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF

recipe="$(sha256sum scripts/standin-base.sh | cut -c1-12)"
base="localhost/python-standin:3.11-slim-bookworm-$recipe"
if podman image exists "$base"; then
    echo "container-build: reusing the stand-in base $base"
else
    started=$SECONDS
    echo "container-build: bootstrapping $base (Debian stand-in for python:3.11-slim)"
    scripts/standin-base.sh "$base"
    echo "container-build: stand-in base took $((SECONDS - started)) s"
fi

uv_version="$(sed -n 's/^required-version = "==\(.*\)"$/\1/p' pyproject.toml)"
have="$("$uv" --version 2>/dev/null | cut -d' ' -f2 || true)"
if [[ "$have" != "$uv_version" ]]; then
    echo "container-build: $uv is uv '${have:-missing}', pyproject.toml requires $uv_version: run make" >&2
    exit 1
fi
uv_image="localhost/uv-standin:$uv_version"
if ! podman image exists "$uv_image"; then
    bin="$(mktemp -d)"
    cp "$(readlink -f "$uv")" "$bin/uv"
    cp "$(readlink -f "$(dirname "$uv")/uvx")" "$bin/uvx"
    tar --owner=0 --group=0 -C "$bin" -c uv uvx | podman import - "$uv_image" >/dev/null
    rm -rf "$bin"
fi

previous="$(podman image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)"
started=$SECONDS
echo "container-build: NOTE the base is a Debian bookworm stand-in for python:3.11-slim, not the official image"
echo "container-build: building $image from the Dockerfile, on the stand-ins (PYTHON_IMAGE=$base, UV_IMAGE=$uv_image)"
podman build --network=host --layers \
    --build-arg "PYTHON_IMAGE=$base" --build-arg "UV_IMAGE=$uv_image" \
    --tag "$image" .
echo "container-build: build took $((SECONDS - started)) s; image size $(podman image inspect --format '{{.Size}}' "$image") bytes"
# The image this tag named before is now untagged: drop it, so repeated runs on one
# machine do not pile up images (the layer cache stays).
if [[ -n "$previous" && "$previous" != "$(podman image inspect --format '{{.Id}}' "$image")" ]]; then
    podman rmi "$previous" >/dev/null 2>&1 || true
fi
echo "image=$image"
echo "containers_conf=$CONTAINERS_CONF"
echo "base=$base"
