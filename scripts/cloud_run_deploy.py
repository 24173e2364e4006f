"""Deploy the worker's image to Cloud Run: a worker pool (the default) or a service.

cloudbuild.yaml's deploy step runs this with python3 from the Cloud SDK image, passing
every setting as an environment variable (never through a shell, so no substitution
value is ever run as a command):

    TARGET           worker-pool or service
    NAME, REGION, PROJECT_ID, SERVICE_ACCOUNT
    IMAGE            the image pushed by the build, by tag; deployed by its digest
    MIN_INSTANCES    worker pool: its instance count when it is first created (CREMA
                     sets it afterwards; a redeploy keeps the current count).
                     service: --min-instances
    MAX_INSTANCES, CONCURRENCY    service only
    CPU, MEMORY      per instance
    HEALTH_PORT      where the probes reach /readyz and /healthz (WORKER_HEALTH_PORT)
    GOOGLE_CLOUD_PROJECT and WORKER_*    the container's environment, passed through

A worker pool gets its probes from a YAML spec (`gcloud beta run worker-pools replace`),
because `worker-pools deploy` has no probe flags in gcloud 528. `--dry-run` prints the
commands and the spec without running anything.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

TARGETS = ("worker-pool", "service")
# The instance count annotation of a worker pool (gcloud's worker_pool.py names it).
MANUAL_INSTANCE_COUNT = "run.googleapis.com/manualInstanceCount"
# Startup: up to 2 minutes for the catalog and clients (a pool's limit is 240 s).
# Liveness: replace an instance after /healthz failed for a minute, on top of the
# worker's own stall window, so a short Pub/Sub blip restarts nothing.
STARTUP_PROBE = {"path": "/readyz", "periodSeconds": 2, "timeoutSeconds": 2, "failureThreshold": 60}
LIVENESS_PROBE = {"path": "/healthz", "periodSeconds": 15, "timeoutSeconds": 5, "failureThreshold": 4}


class DeployError(Exception):
    """A setting is missing or wrong; the message names the variable."""


@dataclass(frozen=True)
class Target:
    kind: str
    name: str
    region: str
    project: str
    service_account: str
    image: str
    min_instances: int
    max_instances: int
    concurrency: int
    cpu: str
    memory: str
    health_port: int
    container_env: dict[str, str]

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Target:
        def need(name: str) -> str:
            value = environ.get(name, "")
            if not value:
                raise DeployError(f"{name} is not set; cloudbuild.yaml's deploy step passes it")
            return value

        def number(name: str) -> int:
            value = need(name)
            if not value.isdigit():
                raise DeployError(f"{name}={value!r} is not a whole number")
            return int(value)

        kind = need("TARGET")
        if kind not in TARGETS:
            raise DeployError(f"TARGET={kind!r}: set _TARGET to one of {', '.join(TARGETS)}")
        env = {k: v for k, v in environ.items() if k.startswith("WORKER_") or k == "GOOGLE_CLOUD_PROJECT"}
        health_port = number("HEALTH_PORT")
        if kind == "worker-pool":
            # A pool gets no PORT: the health server must be told where to listen.
            env["WORKER_HEALTH_PORT"] = str(health_port)
        return cls(
            kind=kind,
            name=need("NAME"),
            region=need("REGION"),
            project=need("PROJECT_ID"),
            service_account=need("SERVICE_ACCOUNT"),
            image=need("IMAGE"),
            min_instances=number("MIN_INSTANCES"),
            max_instances=number("MAX_INSTANCES") if kind == "service" else 0,
            concurrency=number("CONCURRENCY") if kind == "service" else 0,
            cpu=need("CPU"),
            memory=need("MEMORY"),
            health_port=health_port,
            container_env=dict(sorted(env.items())),
        )


def digest_command(image: str) -> list[str]:
    """The command that prints IMAGE's registry digest reference (REPO@sha256:...)."""
    return [
        "gcloud", "artifacts", "docker", "images", "describe", image,
        "--format=value(image_summary.fully_qualified_digest)",
    ]  # fmt: skip


def service_command(target: Target, image: str) -> list[str]:
    """`gcloud run deploy` for the worker as a service (the alternative to a pool)."""

    def probe(p: dict[str, Any]) -> str:
        return f"httpGet.path={p['path']},httpGet.port={target.health_port}," + ",".join(
            f"{k}={p[k]}" for k in ("periodSeconds", "timeoutSeconds", "failureThreshold")
        )

    env = ",".join(f"{k}={v}" for k, v in target.container_env.items())
    return [
        "gcloud", "run", "deploy", target.name,
        f"--image={image}",
        f"--region={target.region}",
        f"--project={target.project}",
        f"--service-account={target.service_account}",
        # Nobody calls the worker: no public invocations, no traffic from outside the project.
        "--no-allow-unauthenticated",
        "--ingress=internal",
        # A pull worker works between requests: the CPU must stay allocated.
        "--no-cpu-throttling",
        f"--min-instances={target.min_instances}",
        f"--max-instances={target.max_instances}",
        f"--concurrency={target.concurrency}",
        f"--cpu={target.cpu}",
        f"--memory={target.memory}",
        f"--port={target.health_port}",
        f"--startup-probe={probe(STARTUP_PROBE)}",
        f"--liveness-probe={probe(LIVENESS_PROBE)}",
        f"--set-env-vars={env}",
    ]  # fmt: skip


def worker_pool_spec(target: Target, image: str, instances: int) -> dict[str, Any]:
    """The worker pool as `gcloud beta run worker-pools replace` reads it (Cloud Run v1 YAML)."""

    def probe(p: dict[str, Any]) -> dict[str, Any]:
        return {
            "httpGet": {"path": p["path"], "port": target.health_port},
            **{k: p[k] for k in ("periodSeconds", "timeoutSeconds", "failureThreshold")},
        }

    return {
        "apiVersion": "run.googleapis.com/v1",
        "kind": "WorkerPool",
        "metadata": {
            "name": target.name,
            "namespace": target.project,
            "labels": {"cloud.googleapis.com/location": target.region},
            "annotations": {
                "run.googleapis.com/launch-stage": "BETA",
                "run.googleapis.com/scalingMode": "manual",
                MANUAL_INSTANCE_COUNT: str(instances),
            },
        },
        "spec": {
            "template": {
                "metadata": {},
                "spec": {
                    "serviceAccountName": target.service_account,
                    "containers": [
                        {
                            "image": image,
                            "env": [{"name": k, "value": v} for k, v in target.container_env.items()],
                            "resources": {"limits": {"cpu": target.cpu, "memory": target.memory}},
                            "startupProbe": probe(STARTUP_PROBE),
                            "livenessProbe": probe(LIVENESS_PROBE),
                        }
                    ],
                },
            }
        },
    }


def describe_pool_command(target: Target) -> list[str]:
    return [
        "gcloud", "beta", "run", "worker-pools", "describe", target.name,
        f"--region={target.region}", f"--project={target.project}", "--format=json",
    ]  # fmt: skip


def replace_pool_command(target: Target, spec_path: str) -> list[str]:
    # No --region: `replace` takes it from the spec's cloud.googleapis.com/location label.
    return ["gcloud", "beta", "run", "worker-pools", "replace", spec_path, f"--project={target.project}"]


def current_instances(described: dict[str, Any] | None, default: int) -> int:
    """The pool's instance count now (CREMA's last decision), or `default` for a new pool."""
    if not described:
        return default
    value = (described.get("metadata") or {}).get("annotations", {}).get(MANUAL_INSTANCE_COUNT)
    return int(value) if value and str(value).isdigit() else default


def run(
    command: Sequence[str], *, capture: bool = False, check: bool = True
) -> subprocess.CompletedProcess[str]:
    print("+ " + " ".join(command), flush=True)
    return subprocess.run(command, check=check, text=True, capture_output=capture)


def deploy(target: Target) -> None:
    image = run(digest_command(target.image), capture=True).stdout.strip()
    if "@sha256:" not in image:
        raise DeployError(f"no digest for {target.image} (got {image!r}): was it pushed?")
    if target.kind == "service":
        run(service_command(target, image))
        return
    described = run(describe_pool_command(target), capture=True, check=False)
    existing = json.loads(described.stdout) if described.returncode == 0 and described.stdout else None
    spec = worker_pool_spec(target, image, current_instances(existing, target.min_instances))
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as file:
        json.dump(spec, file, indent=2)  # JSON is YAML
    run(replace_pool_command(target, file.name))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print the commands and the spec only")
    args = parser.parse_args(argv)
    try:
        target = Target.from_environ(os.environ)
        if args.dry_run:
            image = target.image.rsplit(":", 1)[0] + "@sha256:DIGEST"
            if target.kind == "service":
                print(" ".join(service_command(target, image)))
            else:
                print(json.dumps(worker_pool_spec(target, image, target.min_instances), indent=2))
            return 0
        deploy(target)
    except DeployError as exc:
        print(f"deploy: {exc}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as exc:
        command = " ".join(exc.cmd)
        print(f"deploy: {command} failed with status {exc.returncode}: {exc.stderr or ''}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
