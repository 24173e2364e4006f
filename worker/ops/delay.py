"""The Cloud Tasks queue jobs with a `not_before` wait in: its creation by `worker setup`
and `--print-gcloud`, and `worker doctor`'s check of it (docs/contract.md, "Jobs at a
time"). Its IAM, per resource and never on the project, is worker/ops/iam.py's data
(`delay_bindings`, `operator_delay_bindings`).

Who needs what: the worker `roles/cloudtasks.enqueuer` on the queue (CreateTask) and
`roles/iam.serviceAccountUser` on the account its tasks' OAuth tokens are minted for
(actAs); that account `roles/pubsub.publisher` on the jobs topic (the task publishes the
job back); operators `roles/cloudtasks.viewer` (`worker scheduled`) and
`roles/cloudtasks.taskDeleter` (`worker cancel`) on the queue, and publisher on the
results topic for the `cancelled` result.
"""

from __future__ import annotations

import asyncio
from typing import Any

from google.api_core import exceptions

from worker.core.gcloud_command import gcloud, grant
from worker.core.roles import CLOUDTASKS_ENQUEUER, SERVICE_ACCOUNT_USER
from worker.core.settings import Settings
from worker.ops.checks import Check, ServiceReport
from worker.ops.iam import delay_account, delay_queue
from worker.ops.provision import Change

# CreateTask with an OAuth token needs both (the second through actAs on the account).
ENQUEUE_PERMISSIONS = ("cloudtasks.tasks.create",)


def queue_command(settings: Settings) -> str:
    """The queue as `worker setup` creates it: Cloud Tasks' own retry defaults."""
    return gcloud(
        "tasks", "queues", "create", settings.delay_queue, location=settings.region, project=settings.project
    )


def apply_queue(client: Any, settings: Settings) -> Change:
    """Create the queue if it is missing (`worker setup`); report what was done."""
    from google.cloud import tasks_v2

    name = delay_queue(settings)
    try:
        client.get_queue(name=name, timeout=30)
        return Change(name, "unchanged")
    except exceptions.NotFound:
        pass
    except exceptions.Forbidden:
        pass  # not readable, or not there (Cloud Tasks does not say which): try to create it
    try:
        client.create_queue(parent=name.rsplit("/queues/", 1)[0], queue=tasks_v2.Queue(name=name), timeout=30)
    except exceptions.Conflict:
        return Change(name, "unchanged")
    except exceptions.GoogleAPICallError as exc:
        return Change(
            name,
            "differs",
            f"cannot create it ({exc.message}); that needs roles/cloudtasks.queueAdmin, "
            f"or run: {queue_command(settings)}",
        )
    return Change(name, "created")


async def check_delay_queue(client: Any, settings: Settings, member: str, worker_sa: str) -> ServiceReport:
    """May the worker create tasks on the queue (testIamPermissions: a probe must not
    schedule anything)? The actAs on the account cannot be asked without a task: its fix is
    printed with it."""
    name = delay_queue(settings)
    account = delay_account(settings, worker_sa)
    report = ServiceReport(settings.delay_queue, settings.region, what="Cloud Tasks queue")
    act_as = grant(member, SERVICE_ACCOUNT_USER, f"projects/{settings.project}/serviceAccounts/{account}")
    try:
        answer = await asyncio.to_thread(
            client.test_iam_permissions,
            request={"resource": name, "permissions": list(ENQUEUE_PERMISSIONS)},
            timeout=15,
        )
    except exceptions.NotFound as exc:
        report.checks.append(
            Check("queue", False, f"{name} does not exist", [exc.message], [queue_command(settings)])
        )
        return report
    except exceptions.GoogleAPICallError as exc:
        report.checks.append(
            Check("queue", False, f"Cloud Tasks did not answer for {name}", [exc.message or str(exc)], [])
        )
        return report
    except Exception as exc:  # unreachable endpoint
        report.checks.append(
            Check("queue", False, f"Cloud Tasks is unreachable ({type(exc).__name__})", [str(exc)[:300]], [])
        )
        return report
    held = set(answer.permissions)
    missing = [p for p in ENQUEUE_PERMISSIONS if p not in held]
    if missing:
        report.checks.append(
            Check(
                "enqueue",
                False,
                f"the worker may not create tasks on {name} (missing {', '.join(missing)}): jobs with a "
                "not_before are held, never run",
                ["or the queue does not exist"],
                [grant(member, CLOUDTASKS_ENQUEUER, name), act_as, queue_command(settings)],
            )
        )
        return report
    report.checks.append(
        Check(
            "enqueue",
            True,
            f"the worker may create tasks on {name}; they publish as {account} "
            f"(it needs {SERVICE_ACCOUNT_USER} on it: {act_as})",
        )
    )
    return report
