# syntax=docker/dockerfile:1
# The worker's image. Build stage: install uv.lock's runtime packages into /opt/worker,
# then the worker itself. Runtime stage: a clean slim image that receives only
# /opt/worker, so no uv, compiler, cache or source tree ships. cloudbuild.yaml builds it
# on every push; CI builds and runs it with podman (scripts/container-build.sh).
#
# Both images are pinned by digest; docs/deploy.md ("Updating the pinned images") says
# how to move them. Neither is pulled by tag at build time.
ARG PYTHON_IMAGE=python:3.11-slim@sha256:9c900dea9e8fb7e16277c179b555cc72d29a352dbc33cff48ad5a0412fd5bfc7
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.10.12@sha256:72ab0aeb448090480ccabb99fb5f52b0dc3c71923bffb5e2e26517a1c27b7fec

FROM ${UV_IMAGE} AS uv

FROM ${PYTHON_IMAGE} AS build
COPY --from=uv /uv /usr/local/bin/uv
# The venv uses the base image's interpreter (never a downloaded one), gets bytecode
# compiled now rather than at every start, and keeps no download cache in the layer.
ENV UV_PROJECT_ENVIRONMENT=/opt/worker \
    UV_PYTHON_DOWNLOADS=never \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1
WORKDIR /src
# Dependencies first, from the lock alone: this layer is reused until uv.lock or a
# pyproject.toml changes, so a code change rebuilds in seconds. --locked checks uv.lock
# against the workspace's pyproject files, the local cloud's included (its metadata
# only: the local cloud, a dev dependency, is not installed).
COPY pyproject.toml uv.lock ./
COPY localcloud/pyproject.toml localcloud/
RUN uv sync --locked --no-dev --no-install-project
# Then the worker, installed as a wheel (code plus the jobs/ catalog as worker/_catalog).
COPY README.md ./
COPY jobs/ jobs/
COPY worker/ worker/
RUN uv sync --locked --no-dev --no-editable

# The same base as the build stage: /opt/worker's python links to its interpreter.
FROM ${PYTHON_IMAGE}
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/worker/bin:$PATH
# The base image's pip, setuptools and wheel are installers and build tools the
# worker never uses at run time.
RUN python -m pip uninstall --yes --no-cache-dir --disable-pip-version-check pip setuptools wheel \
    && useradd --system --user-group --uid 10001 --no-create-home --shell /usr/sbin/nologin worker
COPY --from=build /opt/worker /opt/worker
USER 10001:10001
# The health endpoints (/healthz, /readyz) listen on WORKER_HEALTH_PORT, else on PORT
# (a Cloud Run service sets PORT=8080; a worker pool sets nothing, so its deploy sets
# WORKER_HEALTH_PORT=8080 for its probes).
EXPOSE 8080
# Exec form: the worker is PID 1 and receives Cloud Run's SIGTERM itself, drains, exits 0.
ENTRYPOINT ["worker"]
CMD ["run"]
