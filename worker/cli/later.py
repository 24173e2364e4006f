"""Jobs at a time, for operators: `worker scheduled` lists the jobs waiting on Cloud Tasks
for their `not_before`; `worker cancel` (worker/cli/jobs.py) deletes one's task here first."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import click

from worker.cli.common import (
    EXIT_OK,
    CommandError,
    exits_with_code,
    google_errors,
    load_settings_or_fail,
    operator_clients,
    table,
)

if TYPE_CHECKING:
    from worker.core.settings import Settings

_ROLES_FIX = (
    "listing needs roles/cloudtasks.viewer on the queue, cancelling also roles/cloudtasks.taskDeleter "
    "(see `worker setup --print-gcloud --operator MEMBER`)"
)


def _queue_and_client(settings: Settings) -> tuple[str, Any]:
    from worker.gcp.delay import queue_path
    from worker.runtime.app import access_credentials, tasks_client

    queue = queue_path(settings.project, settings.region, settings.delay_queue)
    return queue, tasks_client(settings, access_credentials(settings))


def _tasks_failure(exc: Exception, queue: str) -> CommandError:
    from google.api_core import exceptions

    if isinstance(exc, exceptions.Forbidden):
        return CommandError(f"Cloud Tasks refused on {queue}: {exc.message}; {_ROLES_FIX}")
    if isinstance(exc, exceptions.NotFound):
        return CommandError(f"Cloud Tasks queue {queue} does not exist; create it with `worker setup`")
    return CommandError(f"Cloud Tasks did not answer ({type(exc).__name__}: {str(exc)[:200]}); try again")


def not_scheduled(job_id: str, queue: str) -> str:
    return (
        f"job {job_id} is not scheduled (no task for it in {queue}: it ran already, was cancelled, "
        "or had no not_before)"
    )


def delete_scheduled(settings: Settings, job_id: str, kind: str | None) -> tuple[str, list[tuple[Any, Any]]]:
    """Delete `job_id`'s task(s) (only `kind`'s, with a kind): the queue and (task, job) of
    each deleted. A Cloud Tasks failure is a CommandError naming cause and fix."""
    from worker.ops.cancel import cancel_scheduled

    queue, client = _queue_and_client(settings)
    try:
        return queue, cancel_scheduled(client, queue, job_id, kind)
    except Exception as exc:
        raise _tasks_failure(exc, queue) from None


def publish_cancelled(settings: Settings, job_id: str, cancelled: list[tuple[Any, Any]]) -> Iterator[str]:
    """Publish the `cancelled` result of each deleted task; the sentence `worker cancel`
    prints for each, once it is published (the console shows the same)."""
    from worker.ops.cancel import scheduled_cancelled_result

    publisher, _ = operator_clients(settings)
    topic = publisher.topic_path(settings.project, settings.results_topic)
    with google_errors(settings):
        for task, job in cancelled:
            result = scheduled_cancelled_result(job, task)
            publisher.publish(topic, result.to_bytes(), **result.attributes()).result(timeout=60)
            yield (
                f"cancelled job {job_id} before its not_before ({job.not_before}): deleted {task.name}; "
                "published its `cancelled` result"
            )


def cancel_if_scheduled(settings: Settings, job_id: str, kind: str | None, *, quiet_failure: bool) -> bool:
    """Delete `job_id`'s task and publish its `cancelled` result; False if it has none.
    With `quiet_failure` (there are executions to look at next) a Cloud Tasks failure is
    printed and passed over, else it is the command's error."""
    try:
        queue, cancelled = delete_scheduled(settings, job_id, kind)
    except CommandError as failure:
        if not quiet_failure:
            raise
        click.echo(f"worker: could not look for a scheduled task: {failure.message}", err=True)
        return False
    if not cancelled:
        if quiet_failure:
            return False
        raise CommandError(
            f"{not_scheduled(job_id, queue)} and the catalog has no run_job kind whose execution could "
            "be cancelled"
        )
    for said in publish_cancelled(settings, job_id, cancelled):
        click.echo(said)
    return True


def scheduled_rows(settings: Settings, kind: str | None) -> tuple[str, list[dict[str, Any]]]:
    """The queue and its scheduled jobs (only `kind`'s, with a kind), soonest first, as
    `worker scheduled --json` prints them; a Cloud Tasks failure is a CommandError."""
    from worker.gcp.delay import scheduled_tasks

    queue, client = _queue_and_client(settings)
    rows = []
    try:
        for task, job, attributes in scheduled_tasks(client, queue):
            if job is None or kind not in (None, job.kind):
                continue
            rows.append(
                {
                    "job_id": job.job_id,
                    "kind": job.kind,
                    "not_before": job.not_before.isoformat() if job.not_before else None,
                    "publish_at": task.schedule_time.isoformat(),
                    "task": task.name,
                    "times_put_off": int(attributes.get("scheduled", "0") or 0),
                }
            )
    except Exception as exc:
        raise _tasks_failure(exc, queue) from None
    rows.sort(key=lambda r: r["publish_at"])
    return queue, rows


@click.command()
@click.option("--kind", help="Only jobs of this kind.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option(
    "--limit", type=click.IntRange(min=1), default=1000, show_default=True, help="At most this many."
)
@exits_with_code
def scheduled(kind: str | None, as_json: bool, limit: int) -> int:
    """List the jobs waiting on Cloud Tasks for their not_before, soonest first."""
    settings = load_settings_or_fail()
    queue, rows = scheduled_rows(settings, kind)
    rows = rows[:limit]
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
        return EXIT_OK
    table(
        f"{len(rows)} scheduled job(s) in {queue}",
        ["job_id", "kind", "not_before", "task"],
        [[r["job_id"], r["kind"], str(r["not_before"]), r["task"].rsplit("/", 1)[1]] for r in rows],
    )
    return EXIT_OK


COMMANDS = [scheduled]
