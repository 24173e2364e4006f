"""The gcloud commands that set a real project up: topics, subscriptions, IAM bindings.

Each command is built by worker.core.gcloud_command, the one builder of printed commands.

`worker setup` creates the Pub/Sub resources itself; `worker setup --print-gcloud`
prints this instead, for a project where an operator (or Terraform) owns the
resources. The IAM bindings are data (`iam_bindings`), so the deployment guide's
table can be checked against the same list the commands are printed from.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from worker.core.catalog import Catalog
from worker.core.gcloud_command import gcloud, grant
from worker.core.settings import Settings
from worker.ops.provision import SetupOptions

# Unknown until asked: the printed script looks it up in a shell variable first.
PROJECT_NUMBER_VAR = "${PROJECT_NUMBER}"
# The kinds of principal an operator binding may name (IAM's member prefixes).
OPERATOR_MEMBER_PREFIXES = ("user:", "group:", "serviceAccount:", "domain:")
# The least predefined role holding run.jobs.runWithOverrides (with run.jobs.run and
# run.executions.cancel); roles/run.invoker and roles/run.jobsExecutor lack it.
RUN_JOB_EXECUTOR = "roles/run.jobsExecutorWithOverrides"
# The Cloud Scheduler job that fires the nightly batch.
SCHEDULER_JOB = "nightly-batch-scoring"


@dataclass(frozen=True)
class Binding:
    """One least-privilege IAM binding: `member` gets `role` on `resource`, because `why`.

    `resource` is a full resource name: projects/P, projects/P/topics/T,
    projects/P/subscriptions/S, projects/P/locations/R/services/S,
    projects/P/locations/R/jobs/J or projects/P/serviceAccounts/EMAIL.
    """

    member: str
    role: str
    resource: str
    why: str


@dataclass(frozen=True)
class PushTarget:
    """The web app's push endpoint: the results subscription pushes to `endpoint` with
    an OIDC token for `service_account`, audience `audience`; the web app is the Cloud
    Run service `service` in `region`."""

    endpoint: str
    service_account: str
    audience: str
    service: str
    region: str


def push_target(
    settings: Settings,
    endpoint: str,
    *,
    service_account: str | None = None,
    audience: str | None = None,
    service: str = "webapp",
) -> PushTarget:
    """A PushTarget, or ValueError saying what to fix (Pub/Sub pushes only to https)."""
    if not endpoint.startswith("https://") or len(endpoint) <= len("https://"):
        raise ValueError(
            f"push endpoint {endpoint!r} is not an https URL: Pub/Sub pushes only to https, "
            "e.g. https://webapp-abc123-uc.a.run.app/pubsub/results"
        )
    return PushTarget(
        endpoint=endpoint,
        service_account=service_account or default_push_sa(settings.project),
        audience=audience or endpoint,
        service=service,
        region=settings.region,
    )


def default_push_sa(project: str) -> str:
    return f"results-push@{project}.iam.gserviceaccount.com"


def push_bindings(settings: Settings, push: PushTarget, agent: str) -> list[Binding]:
    """What authenticated push needs: Pub/Sub mints tokens as the push account, which
    may invoke the web app."""
    project = f"projects/{settings.project}"
    return [
        Binding(
            agent,
            "roles/iam.serviceAccountTokenCreator",
            f"{project}/serviceAccounts/{push.service_account}",
            "Pub/Sub mints each push request's OIDC token as the push service account",
        ),
        Binding(
            f"serviceAccount:{push.service_account}",
            "roles/run.invoker",
            f"{project}/locations/{push.region}/services/{push.service}",
            "Pub/Sub's pushes, with the push account's token, pass Cloud Run's IAM check",
        ),
    ]


def default_worker_sa(project: str) -> str:
    return f"worker@{project}.iam.gserviceaccount.com"


def default_webapp_sa(project: str) -> str:
    return f"webapp@{project}.iam.gserviceaccount.com"


def pubsub_service_agent(project_number: str) -> str:
    """The Google-managed account Pub/Sub dead-letters messages as."""
    return f"service-{project_number}@gcp-sa-pubsub.iam.gserviceaccount.com"


def iam_bindings(
    settings: Settings,
    catalog: Catalog,
    worker_sa: str,
    webapp_sa: str,
    *,
    project_number: str = PROJECT_NUMBER_VAR,
    operators: Sequence[str] = (),
    push: PushTarget | None = None,
    telemetry: Collection[str] = (),
) -> list[Binding]:
    """Every binding the system needs, and nothing more, in the order they are applied;
    `operators` (IAM members such as user:alice@example.com) get what `worker
    dead-letters`, `worker replay` and `worker doctor` need. With `push` the web app
    no longer pulls results, so it gets no subscriber role; the push account does.
    `telemetry`: the exporters the worker is configured with (OTEL_TRACES_EXPORTER,
    OTEL_METRICS_EXPORTER): gcp_trace and gcp_monitoring each need a role."""
    project = f"projects/{settings.project}"

    def topic(name: str) -> str:
        return f"{project}/topics/{name}"

    def subscription(name: str) -> str:
        return f"{project}/subscriptions/{name}"

    worker = f"serviceAccount:{worker_sa}"
    webapp = f"serviceAccount:{webapp_sa}"
    agent = f"serviceAccount:{pubsub_service_agent(project_number)}"
    jobs_sub = subscription(settings.jobs_subscription)
    dead_letters = topic(settings.dead_letter_topic)
    bindings = [
        Binding(worker, "roles/pubsub.subscriber", jobs_sub, "pull and ack jobs"),
        Binding(
            worker,
            "roles/pubsub.viewer",
            jobs_sub,
            "read the dead-letter policy's max_delivery_attempts at start-up "
            "(not needed when WORKER_MAX_DELIVERY_ATTEMPTS is set)",
        ),
        Binding(worker, "roles/pubsub.publisher", topic(settings.results_topic), "publish results"),
        Binding(worker, "roles/pubsub.publisher", dead_letters, "dead-letter jobs that failed for good"),
        Binding(
            worker,
            "roles/pubsub.publisher",
            topic(settings.control_topic),
            "answer status requests and pass pause orders on to new instances (worker pause/status)",
        ),
        Binding(
            worker,
            control_role(settings),
            project,
            f"create, read and delete each instance's own subscription to {settings.control_topic} "
            "(no predefined role narrower than roles/pubsub.editor creates subscriptions); without "
            "it an instance runs but ignores worker pause (it logs control_channel_off)",
        ),
    ]
    # On the project: neither service has a finer resource to grant on. Both only write.
    if "gcp_trace" in telemetry:
        bindings.append(
            Binding(
                worker, "roles/cloudtrace.agent", project, "write spans to Cloud Trace (OTEL_TRACES_EXPORTER)"
            )
        )
    if "gcp_monitoring" in telemetry:
        bindings.append(
            Binding(
                worker,
                "roles/monitoring.metricWriter",
                project,
                "write metrics to Cloud Monitoring (OTEL_METRICS_EXPORTER)",
            )
        )
    published = (
        ["the child jobs of batch kinds (batch-scoring)"] if any(k.batch for k in catalog.values()) else []
    )
    if catalog.run_jobs(settings.region):
        published.append("the follow-ups that watch Cloud Run job executions")
    if published:
        bindings.append(
            Binding(
                worker,
                "roles/pubsub.publisher",
                topic(settings.jobs_topic),
                "publish " + " and ".join(published),
            )
        )
    for service, region in sorted(catalog.services(settings.region)):
        # Per service, not on the project: the worker reads and calls the catalog's
        # services and no others.
        bindings += [
            run_viewer_binding(worker, settings.project, service, region),
            Binding(
                worker,
                "roles/run.invoker",
                service_resource(settings.project, service, region),
                "call the service with an ID token minted for its URL",
            ),
        ]
    for job, region in sorted(catalog.run_jobs(settings.region)):
        # Per job too: read the job and follow its executions; run them with overrides.
        job_resource = f"{project}/locations/{region}/jobs/{job}"
        bindings += [
            Binding(worker, "roles/run.viewer", job_resource, "read the job and follow its executions"),
            Binding(
                worker,
                RUN_JOB_EXECUTOR,
                job_resource,
                "start executions with overrides (run.jobs.runWithOverrides), cancel a duplicate one",
            ),
        ]
    bindings += [
        Binding(
            agent,
            "roles/pubsub.publisher",
            dead_letters,
            "Pub/Sub forwards jobs that exhausted their delivery attempts",
        ),
        Binding(
            agent,
            "roles/pubsub.subscriber",
            jobs_sub,
            "Pub/Sub acks the jobs it forwarded to the dead-letter topic",
        ),
        Binding(webapp, "roles/pubsub.publisher", topic(settings.jobs_topic), "publish jobs"),
    ]
    if push is None:
        bindings.append(
            Binding(
                webapp,
                "roles/pubsub.subscriber",
                subscription(settings.results_subscription),
                "read and ack results",
            )
        )
    else:
        bindings += push_bindings(settings, push, agent)
    for operator in operators:
        bindings += operator_bindings(settings, operator, worker_sa, catalog)
    return bindings


CONTROL_ROLE_ID = "workerControlChannel"
CONTROL_PERMISSIONS = (
    "pubsub.subscriptions.create",
    "pubsub.subscriptions.delete",
    "pubsub.subscriptions.consume",
    "pubsub.subscriptions.get",
    "pubsub.topics.attachSubscription",
)


def control_role(settings: Settings) -> str:
    """The custom role the control channel's short-lived subscriptions need."""
    return f"projects/{settings.project}/roles/{CONTROL_ROLE_ID}"


def service_resource(project: str, service: str, region: str) -> str:
    return f"projects/{project}/locations/{region}/services/{service}"


def run_viewer_binding(member: str, project: str, service: str, region: str) -> Binding:
    """What resolving one service's URL through the Cloud Run Admin API needs."""
    return Binding(
        member,
        "roles/run.viewer",
        service_resource(project, service, region),
        "resolve the service's URL through the Cloud Run Admin API",
    )


def check_operator(member: str) -> None:
    """Raise ValueError, saying how to write it, unless `member` is an IAM member."""
    if not member.startswith(OPERATOR_MEMBER_PREFIXES):
        raise ValueError(
            f"operator {member!r} is not an IAM member: write it as "
            + ", ".join(f"{prefix}NAME" for prefix in OPERATOR_MEMBER_PREFIXES)
            + " (for example user:alice@example.com)"
        )


def operator_bindings(
    settings: Settings, member: str, worker_sa: str, catalog: Catalog | None = None
) -> list[Binding]:
    """What one operator needs for the dead-letter tools, `worker doctor` and `worker cancel`."""
    check_operator(member)
    project = f"projects/{settings.project}"
    jobs = sorted(catalog.run_jobs(settings.region)) if catalog is not None else []
    cancelling = [
        Binding(
            member,
            "roles/run.jobsExecutor",
            f"{project}/locations/{region}/jobs/{job}",
            "cancel its executions (worker cancel): run.executions.cancel",
        )
        for job, region in jobs
    ]
    if jobs:
        cancelling += [
            Binding(member, "roles/run.viewer", project, "find a job's execution (worker cancel)"),
            Binding(
                member,
                "roles/pubsub.publisher",
                f"{project}/topics/{settings.results_topic}",
                "publish the cancelled result (worker cancel)",
            ),
        ]
    return [
        *cancelling,
        Binding(
            member,
            "roles/pubsub.subscriber",
            f"{project}/subscriptions/{settings.dead_letter_subscription}",
            "list dead letters (worker dead-letters) and take them back (worker replay)",
        ),
        Binding(
            member,
            "roles/pubsub.publisher",
            f"{project}/topics/{settings.jobs_topic}",
            "republish dead-lettered jobs (worker replay)",
        ),
        Binding(
            member,
            "roles/pubsub.publisher",
            f"{project}/topics/{settings.control_topic}",
            "send pause and resume orders and status requests (worker pause/resume/status)",
        ),
        Binding(
            member,
            control_role(settings),
            project,
            f"read the instances' answers on a subscription to {settings.control_topic} made for "
            "the question and deleted after it (worker status)",
        ),
        Binding(
            member,
            "roles/iam.serviceAccountTokenCreator",
            f"{project}/serviceAccounts/{worker_sa}",
            "run worker doctor as the worker (WORKER_IMPERSONATE_SERVICE_ACCOUNT)",
        ),
    ]


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
    commands += [
        gcloud(
            "pubsub",
            "subscriptions",
            "create",
            settings.jobs_subscription,
            project=settings.project,
            topic=settings.jobs_topic,
            **common,
            dead_letter_topic=settings.dead_letter_topic,
            max_delivery_attempts=options.max_delivery_attempts,
            min_retry_delay=f"{options.min_backoff_s}s",
            max_retry_delay=f"{options.max_backoff_s}s",
        ),
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
    push: PushTarget | None = None,
    telemetry: Collection[str] = (),
) -> str:
    """`gcloud_commands` as a commented shell script, each binding with its reason."""
    reasons = {
        binding_command(b): f"# {b.member.split(':', 1)[1]} {b.role}: {b.why}"
        for b in iam_bindings(
            settings, catalog, worker_sa, webapp_sa, operators=operators, push=push, telemetry=telemetry
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
