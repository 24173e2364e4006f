"""The gcloud commands that set a real project up: topics, subscriptions, IAM bindings.

Each command is built by worker.core.gcloud_command, the one builder of printed commands;
the bindings are worker/ops/iam.py's data. `worker setup` creates the Pub/Sub resources
itself; `worker setup --print-gcloud` prints this instead, for a project where an
operator (or Terraform) owns the resources.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence

from worker.core.catalog import Catalog
from worker.core.gcloud_command import gcloud, grant
from worker.core.settings import Settings
from worker.ops.delay import queue_command
from worker.ops.iam import (
    CONTROL_PERMISSIONS,
    CONTROL_ROLE_ID,
    PROJECT_NUMBER_VAR,
    SCHEDULER_JOB,
    Binding,
    PushTarget,
    iam_bindings,
)
from worker.ops.provision import SetupOptions


def binding_command(binding: Binding) -> str:
    """The gcloud command that adds one binding."""
    return grant(binding.member, binding.role, binding.resource)


def resource_commands(settings: Settings, options: SetupOptions, push: PushTarget | None = None) -> list[str]:
    """Topics and subscriptions as `worker setup` creates them (provision.SetupOptions);
    with `push`, the web app's results subscription pushes (retrying with the backoff)."""
    common: dict[str, str | int | None] = {
        "ack_deadline": options.ack_deadline_s,
        "message_retention_duration": f"{options.retention_days}d",
    }
    push_flags: dict[str, str | int | None] = {}
    if push is not None:
        push_flags = {
            "push_endpoint": push.endpoint,
            "push_auth_service_account": push.service_account,
            "push_auth_token_audience": push.audience,
            "min_retry_delay": f"{options.min_backoff_s}s",
            "max_retry_delay": f"{options.max_backoff_s}s",
        }
    commands = [
        gcloud("pubsub", "topics", "create", name, project=settings.project)
        for name in (
            settings.jobs_topic,
            settings.batch_topic,
            settings.results_topic,
            settings.dead_letter_topic,
            settings.control_topic,
        )
    ]
    commands.append(
        gcloud(
            "iam",
            "roles",
            "create",
            CONTROL_ROLE_ID,
            project=settings.project,
            title="Worker control channel",
            description="Make, read and delete the short-lived subscriptions of worker pause/status",
            permissions=",".join(CONTROL_PERMISSIONS),
            stage="GA",
        )
    )
    # Where the role already exists (made by an older script with attach and delete), its
    # permissions become exactly these.
    commands.append(
        gcloud(
            "iam",
            "roles",
            "update",
            CONTROL_ROLE_ID,
            project=settings.project,
            permissions=",".join(CONTROL_PERMISSIONS),
        )
    )
    # One subscription per lane, each with the same dead-letter and retry policies.
    commands += [
        gcloud(
            "pubsub",
            "subscriptions",
            "create",
            settings.lane_subscription(lane),
            project=settings.project,
            topic=settings.lane_topic(lane),
            **common,
            dead_letter_topic=settings.dead_letter_topic,
            max_delivery_attempts=options.max_delivery_attempts,
            min_retry_delay=f"{options.min_backoff_s}s",
            max_retry_delay=f"{options.max_backoff_s}s",
        )
        for lane in settings.lanes
    ]
    commands += [
        gcloud(
            "pubsub",
            "subscriptions",
            "create",
            settings.results_subscription,
            project=settings.project,
            topic=settings.results_topic,
            **common,
            **push_flags,
        ),
        gcloud(
            "pubsub",
            "subscriptions",
            "create",
            settings.dead_letter_subscription,
            project=settings.project,
            topic=settings.dead_letter_topic,
            **common,
        ),
        queue_command(settings),  # jobs at a time: where jobs with a not_before wait
    ]
    return commands


def gcloud_commands(
    settings: Settings,
    catalog: Catalog,
    worker_sa: str,
    webapp_sa: str,
    options: SetupOptions | None = None,
    *,
    project_number: str | None = None,
    extra_commands: Sequence[str] = (),
    operators: Sequence[str] = (),
    operators_can_impersonate: bool = False,
    push: PushTarget | None = None,
    telemetry: Collection[str] = (),
) -> list[str]:
    """Every command, in an order that works on an empty project.

    Extension point: `extra_commands` are appended after the core setup, for the
    pieces other features add (the Cloud Scheduler job of batch scoring).
    """
    commands = []
    if project_number is None:
        describe = gcloud("projects", "describe", settings.project, format="value(projectNumber)")
        commands.append(f'PROJECT_NUMBER="$({describe})"')
    commands += resource_commands(settings, options or SetupOptions(), push)
    bindings = iam_bindings(
        settings,
        catalog,
        worker_sa,
        webapp_sa,
        project_number=project_number or PROJECT_NUMBER_VAR,
        operators=operators,
        operators_can_impersonate=operators_can_impersonate,
        push=push,
        telemetry=telemetry,
    )
    commands += [binding_command(b) for b in bindings]
    commands += extra_commands
    return commands


def gcloud_script(
    settings: Settings,
    catalog: Catalog,
    worker_sa: str,
    webapp_sa: str,
    options: SetupOptions | None = None,
    *,
    extra_commands: Sequence[str] = (),
    operators: Sequence[str] = (),
    operators_can_impersonate: bool = False,
    push: PushTarget | None = None,
    telemetry: Collection[str] = (),
) -> str:
    """`gcloud_commands` as a commented shell script, each binding with its reason."""
    reasons = {
        binding_command(b): f"# {b.member.split(':', 1)[1]} {b.role}: {b.why}"
        for b in iam_bindings(
            settings,
            catalog,
            worker_sa,
            webapp_sa,
            operators=operators,
            operators_can_impersonate=operators_can_impersonate,
            push=push,
            telemetry=telemetry,
        )
    }
    lines = [
        f"# Topics, subscriptions and IAM for project {settings.project} (worker setup --print-gcloud).",
        "# Creating what already exists fails harmlessly; adding a binding twice is a no-op.",
    ]
    if push is not None:
        lines += [
            f"# The results subscription pushes to {push.endpoint} as {push.service_account}:",
            "# create that service account first, and whoever runs this needs iam.serviceAccounts.actAs",
            "# on it (roles/iam.serviceAccountUser). The web app verifies each token (worker.client.push).",
        ]
    for command in gcloud_commands(
        settings,
        catalog,
        worker_sa,
        webapp_sa,
        options,
        extra_commands=extra_commands,
        operators=operators,
        operators_can_impersonate=operators_can_impersonate,
        push=push,
        telemetry=telemetry,
    ):
        if command in reasons:
            lines.append(reasons[command])
        lines.append(command)
    return "\n".join(lines) + "\n"


def scheduler_commands(settings: Settings, schedule: str, time_zone: str) -> list[str]:
    """The Cloud Scheduler job that publishes the nightly batch-scoring job.

    Cloud Scheduler publishes the same body every night and cannot put the date in
    it, so the body says `"daily": true` and the worker makes the batch id the job id
    plus the UTC date (worker.gcp.batch.batch_id_for): each night's children get ids of
    their own, while redeliveries of one night's message reuse them.
    """
    body = {
        "job_id": SCHEDULER_JOB,
        "kind": "batch-scoring",
        "payload": {"source": True, "daily": True},
    }
    return [
        gcloud("services", "enable", "cloudscheduler.googleapis.com", project=settings.project),
        gcloud(
            "scheduler",
            "jobs",
            "create",
            "pubsub",
            SCHEDULER_JOB,
            project=settings.project,
            location=settings.region,
            schedule=schedule,
            time_zone=time_zone,
            topic=settings.jobs_topic,
            message_body=json.dumps(body),
            attributes=f"job_id={SCHEDULER_JOB},kind=batch-scoring",
        ),
    ]
