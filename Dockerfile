# syntax=docker/dockerfile:1
# The worker's image. Build stage: build the wheel and install it, with its
# dependencies, into /opt/worker. Runtime stage: a clean slim image that receives only
# /opt/worker, so no compiler, wheel, pip cache or source tree ships. cloudbuild.yaml
# builds it on every push; tests/e2e/test_wheel_install.py runs the same two scripts.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY scripts/build-wheel.sh scripts/install-wheel.sh scripts/
COPY jobs/ jobs/
COPY worker/ worker/
RUN scripts/build-wheel.sh /wheels
RUN scripts/install-wheel.sh /opt/worker /wheels

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
# Cloud Run sets PORT (8080 by default); `worker run` serves /healthz and /readyz there.
EXPOSE 8080
# Exec form: the worker is PID 1 and receives Cloud Run's SIGTERM itself, drains, exits 0.
ENTRYPOINT ["worker"]
CMD ["run"]
