"""Who gets which role on which resource: the worker's least-privilege IAM, as data.

The bindings (`iam_bindings`) are one list that `worker setup --print-gcloud` prints
(worker/ops/gcloud.py) and the deployment guide's table is checked against
(tests/repo/test_deploy_docs.py); every role name is declared here once.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from worker.core.catalog import Catalog
from worker.core.roles import (
    CLOUD_TRACE_AGENT,
    CLOUDTASKS_ENQUEUER,
    CLOUDTASKS_TASK_DELETER,
    CLOUDTASKS_VIEWER,
    METRIC_WRITER,
    PUBSUB_PUBLISHER,
    PUBSUB_SUBSCRIBER,
    PUBSUB_VIEWER,
    RUN_INVOKER,
    RUN_JOB_EXECUTOR_WITH_OVERRIDES,
    RUN_JOBS_EXECUTOR,
    RUN_VIEWER,
    SERVICE_ACCOUNT_USER,
    TOKEN_CREATOR,
)
from worker.core.settings import Settings

# Unknown until asked: the printed script looks it up in a shell variable first.
PROJECT_NUMBER_VAR = "${PROJECT_NUMBER}"
# The kinds of principal an operator binding may name (IAM's member prefixes).
OPERATOR_MEMBER_PREFIXES = ("user:", "group:", "serviceAccount:", "domain:")
# What follows the prefix: an email address or a domain, nothing a shell or a comment
# line of the printed script could read as more (no space, newline, quote, `;`, `#`).
_OPERATOR_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._%+-]*(@[A-Za-z0-9.-]+)?")
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
            TOKEN_CREATOR,
            f"{project}/serviceAccounts/{push.service_account}",
            "Pub/Sub mints each push request's OIDC token as the push service account",
        ),
        Binding(
            f"serviceAccount:{push.service_account}",
            RUN_INVOKER,
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
    operators_can_impersonate: bool = False,
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
    lane_subs = [(lane, subscription(settings.lane_subscription(lane))) for lane in settings.lanes]
    dead_letters = topic(settings.dead_letter_topic)
    bindings = []
    for lane, lane_sub in lane_subs:
        bindings += [
            Binding(worker, PUBSUB_SUBSCRIBER, lane_sub, f"pull and ack jobs ({lane} lane)"),
            Binding(
                worker,
                PUBSUB_VIEWER,
                lane_sub,
                "read the dead-letter policy's max_delivery_attempts at start-up "
                "(not needed when WORKER_MAX_DELIVERY_ATTEMPTS is set)",
            ),
        ]
    bindings += [
        Binding(worker, PUBSUB_PUBLISHER, topic(settings.results_topic), "publish results"),
        Binding(worker, PUBSUB_PUBLISHER, dead_letters, "dead-letter jobs that failed for good"),
        Binding(
            worker,
            PUBSUB_PUBLISHER,
            topic(settings.control_topic),
            "answer status requests and pass pause orders on to new instances (worker pause/status)",
        ),
        Binding(
            worker,
            PUBSUB_SUBSCRIBER,
            topic(settings.control_topic),
            f"attach each instance's own subscription to {settings.control_topic} "
            "(pubsub.topics.attachSubscription, on this topic only: no other topic can be subscribed to)",
        ),
        Binding(
            worker,
            control_role(settings),
            project,
            f"create and pull each instance's own subscription to {settings.control_topic}; no "
            "attach (granted on the topic above) and no delete (the subscription expires after a "
            "day idle); without it an instance runs but ignores worker pause (it logs control_channel_off)",
        ),
    ]
    # On the project: neither service has a finer resource to grant on. Both only write.
    if "gcp_trace" in telemetry:
        bindings.append(
            Binding(worker, CLOUD_TRACE_AGENT, project, "write spans to Cloud Trace (OTEL_TRACES_EXPORTER)")
        )
    if "gcp_monitoring" in telemetry:
        bindings.append(
            Binding(
                worker,
                METRIC_WRITER,
                project,
                "write metrics to Cloud Monitoring (OTEL_METRICS_EXPORTER)",
            )
        )
    # The batch lane's topic: the children of batch kinds, and the jobs a publisher
    # marked lane=batch on the jobs topic, which the worker moves there.
    bindings.append(
        Binding(
            worker,
            PUBSUB_PUBLISHER,
            topic(settings.batch_topic),
            "publish the child jobs of batch kinds, and move there jobs marked lane=batch",
        )
    )
    if catalog.run_jobs(settings.region):
        bindings.append(
            Binding(
                worker,
                PUBSUB_PUBLISHER,
                topic(settings.jobs_topic),
                "publish the follow-ups that watch Cloud Run job executions",
            )
        )
    for service, region in sorted(catalog.services(settings.region)):
        # Per service, not on the project: the worker reads and calls the catalog's
        # services and no others.
        bindings += [
            run_viewer_binding(worker, settings.project, service, region),
            Binding(
                worker,
                RUN_INVOKER,
                service_resource(settings.project, service, region),
                "call the service with an ID token minted for its URL",
            ),
        ]
    for job, region in sorted(catalog.run_jobs(settings.region)):
        # Per job too: read the job and follow its executions; run them with overrides.
        job_resource = f"{project}/locations/{region}/jobs/{job}"
        bindings += [
            Binding(worker, RUN_VIEWER, job_resource, "read the job and follow its executions"),
            Binding(
                worker,
                RUN_JOB_EXECUTOR_WITH_OVERRIDES,
                job_resource,
                "start executions with overrides (run.jobs.runWithOverrides), cancel a duplicate one",
            ),
        ]
    # Jobs at a time (the Cloud Tasks queue); a grant the worker already has is not repeated.
    granted = {(b.member, b.role, b.resource) for b in bindings}
    bindings += [
        b for b in delay_bindings(settings, worker_sa) if (b.member, b.role, b.resource) not in granted
    ]
    bindings += [
        Binding(
            agent,
            PUBSUB_PUBLISHER,
            dead_letters,
            "Pub/Sub forwards jobs that exhausted their delivery attempts",
        ),
    ]
    bindings += [
        Binding(
            agent,
            PUBSUB_SUBSCRIBER,
            lane_sub,
            f"Pub/Sub acks the jobs it forwarded to the dead-letter topic ({lane} lane)",
        )
        for lane, lane_sub in lane_subs
    ]
    bindings += [
        Binding(webapp, PUBSUB_PUBLISHER, topic(settings.jobs_topic), "publish jobs"),
        Binding(
            webapp,
            PUBSUB_PUBLISHER,
            topic(settings.batch_topic),
            "publish bulk jobs to the batch lane (enqueue(..., lane='batch'))",
        ),
    ]
    if push is None:
        bindings.append(
            Binding(
                webapp,
                PUBSUB_SUBSCRIBER,
                subscription(settings.results_subscription),
                "read and ack results",
            )
        )
    else:
        bindings += push_bindings(settings, push, agent)
    for operator in operators:
        bindings += operator_bindings(
            settings, operator, worker_sa, catalog, can_impersonate=operators_can_impersonate
        )
    return bindings


CONTROL_ROLE_ID = "workerControlChannel"
# On the project, as Pub/Sub checks `create` there and `consume` on a subscription that
# only the project's policy covers when it is new. Not `topics.attachSubscription` (the
# control topic grants it, so no other topic can be subscribed to) nor
# `subscriptions.delete` (nobody's subscription can be deleted; these expire).
CONTROL_PERMISSIONS = (
    "pubsub.subscriptions.create",
    "pubsub.subscriptions.consume",
    "pubsub.subscriptions.get",
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
        RUN_VIEWER,
        service_resource(project, service, region),
        "resolve the service's URL through the Cloud Run Admin API",
    )


def check_operator(member: str) -> None:
    """Raise ValueError, saying how to write it, unless `member` is an IAM member."""
    prefix = next((p for p in OPERATOR_MEMBER_PREFIXES if member.startswith(p)), None)
    if prefix is not None and not _OPERATOR_NAME.fullmatch(member[len(prefix) :]):
        raise ValueError(
            f"operator {member!r} is not an email address or domain after {prefix!r} (letters, "
            "digits, . _ % + - and one @): fix the member, e.g. user:alice@example.com"
        )
    if prefix is None:
        raise ValueError(
            f"operator {member!r} is not an IAM member: write it as "
            + ", ".join(f"{prefix}NAME" for prefix in OPERATOR_MEMBER_PREFIXES)
            + " (for example user:alice@example.com)"
        )


def operator_bindings(
    settings: Settings,
    member: str,
    worker_sa: str,
    catalog: Catalog | None = None,
    *,
    can_impersonate: bool = False,
) -> list[Binding]:
    """What one operator needs for the dead-letter tools, the control verbs and `worker
    cancel`, each on its resource; with `can_impersonate` (`--operator-can-impersonate`)
    also the right to act as the worker's account, which `worker doctor` wants to test
    the worker's own grants, and which reaches everything the worker may do."""
    check_operator(member)
    project = f"projects/{settings.project}"
    jobs = sorted(catalog.run_jobs(settings.region)) if catalog is not None else []
    cancelling = [
        Binding(
            member,
            RUN_JOBS_EXECUTOR,
            f"{project}/locations/{region}/jobs/{job}",
            "cancel its executions (worker cancel): run.executions.cancel",
        )
        for job, region in jobs
    ]
    cancelling += [
        Binding(
            member,
            RUN_VIEWER,
            f"{project}/locations/{region}/jobs/{job}",
            "find the job's executions (worker cancel)",
        )
        for job, region in jobs
    ]
    if jobs:
        cancelling += [
            Binding(
                member,
                PUBSUB_PUBLISHER,
                f"{project}/topics/{settings.results_topic}",
                "publish the cancelled result (worker cancel)",
            ),
        ]
    return [
        *cancelling,
        *operator_delay_bindings(settings, member),
        Binding(
            member,
            PUBSUB_SUBSCRIBER,
            f"{project}/subscriptions/{settings.dead_letter_subscription}",
            "list dead letters (worker dead-letters) and take them back (worker replay)",
        ),
        *(
            Binding(
                member,
                PUBSUB_PUBLISHER,
                f"{project}/topics/{settings.lane_topic(lane)}",
                f"republish dead-lettered jobs (worker replay, {lane} lane)",
            )
            for lane in settings.lanes
        ),
        Binding(
            member,
            PUBSUB_PUBLISHER,
            f"{project}/topics/{settings.control_topic}",
            "send pause and resume orders and status requests (worker pause/resume/status)",
        ),
        Binding(
            member,
            PUBSUB_SUBSCRIBER,
            f"{project}/topics/{settings.control_topic}",
            f"attach the question's subscription to {settings.control_topic}, "
            "this topic only (worker status)",
        ),
        Binding(
            member,
            control_role(settings),
            project,
            f"create and pull a subscription to {settings.control_topic} made for the question, which "
            "expires after a day idle (worker status)",
        ),
    ] + (
        [
            Binding(
                member,
                TOKEN_CREATOR,
                f"{project}/serviceAccounts/{worker_sa}",
                "run worker doctor as the worker (WORKER_IMPERSONATE_SERVICE_ACCOUNT); "
                "only with --operator-can-impersonate: it can do all the worker can",
            )
        ]
        if can_impersonate
        else []
    )


# -- jobs at a time: the Cloud Tasks queue (worker/gcp/delay.py, worker/ops/delay.py) ------


def delay_queue(settings: Settings) -> str:
    return f"projects/{settings.project}/locations/{settings.region}/queues/{settings.delay_queue}"


def delay_account(settings: Settings, worker_sa: str) -> str:
    return settings.delay_service_account or worker_sa


def delay_bindings(settings: Settings, worker_sa: str) -> list[Binding]:
    """The worker's and the publishing account's bindings for jobs at a time."""
    account = delay_account(settings, worker_sa)
    worker = f"serviceAccount:{worker_sa}"
    return [
        Binding(
            worker, CLOUDTASKS_ENQUEUER, delay_queue(settings), "put off jobs with a not_before (CreateTask)"
        ),
        Binding(
            worker,
            SERVICE_ACCOUNT_USER,
            f"projects/{settings.project}/serviceAccounts/{account}",
            f"name {account} as the OAuth account of those tasks (iam.serviceAccounts.actAs)",
        ),
        *(
            Binding(
                f"serviceAccount:{account}",
                PUBSUB_PUBLISHER,
                f"projects/{settings.project}/topics/{settings.lane_topic(lane)}",
                f"the tasks publish each job back to its lane's topic ({lane}) at its not_before",
            )
            for lane in settings.lanes
        ),
    ]


def operator_delay_bindings(settings: Settings, member: str) -> list[Binding]:
    return [
        Binding(member, CLOUDTASKS_VIEWER, delay_queue(settings), "list scheduled jobs (worker scheduled)"),
        Binding(
            member, CLOUDTASKS_TASK_DELETER, delay_queue(settings), "cancel a scheduled job (worker cancel)"
        ),
        Binding(
            member,
            PUBSUB_PUBLISHER,
            f"projects/{settings.project}/topics/{settings.results_topic}",
            "publish a cancelled job's result (worker cancel)",
        ),
    ]
