"""`worker doctor`'s checks of a Cloud Run job a `run_job` kind starts: does the Admin API
show it to the worker, and may the worker start it with overrides.

The second check asks the job's IAM policy (testIamPermissions) rather than starting
an execution: a probe must not run the job's work.
"""

from __future__ import annotations

import asyncio
from typing import Any

from google.api_core import exceptions

from worker.core.gcloud_command import gcloud, grant
from worker.core.roles import RUN_JOB_EXECUTOR_WITH_OVERRIDES, RUN_VIEWER
from worker.core.settings import Settings
from worker.gcp.runjobs import job_path
from worker.ops.checks import Check, ServiceReport

# RunJob needs run.jobs.run, and run.jobs.runWithOverrides once it carries overrides.
RUN_PERMISSIONS = ("run.jobs.run", "run.jobs.runWithOverrides")


async def check_run_job(
    jobs_client: Any, settings: Settings, member: str, job: str, region: str
) -> ServiceReport:
    report = ServiceReport(job, region, what="Cloud Run job")
    name = job_path(settings.project, region, job)
    try:
        found = await asyncio.to_thread(jobs_client.get_job, name=name, retry=None, timeout=15)
    except exceptions.NotFound as exc:
        report.checks.append(
            Check(
                "job",
                False,
                f"{name} does not exist",
                [exc.message],
                [gcloud("run", "jobs", "list", region=region, project=settings.project)],
            )
        )
        return report
    except exceptions.Forbidden as exc:
        report.checks.append(
            Check(
                "job",
                False,
                f"the worker may not read {name}, or it does not exist",
                [
                    exc.message,
                    "granted per job, roles/run.viewer cannot tell the two apart: Cloud Run "
                    "answers 403 for both; the job list shows which it is",
                ],
                [
                    gcloud("run", "jobs", "list", region=region, project=settings.project),
                    grant(member, RUN_VIEWER, name),
                ],
            )
        )
        return report
    except exceptions.GoogleAPICallError as exc:
        report.checks.append(Check("job", False, f"the Admin API did not answer for {name}", [exc.message]))
        return report
    report.checks.append(
        Check(
            "job",
            True,
            f"{name} ({found.template.task_count} task(s) by default, "
            f"{found.execution_count} execution(s) so far)",
        )
    )
    try:
        answer = await asyncio.to_thread(
            jobs_client.test_iam_permissions,
            request={"resource": name, "permissions": list(RUN_PERMISSIONS)},
            retry=None,
            timeout=15,
        )
    except exceptions.GoogleAPICallError as exc:
        report.checks.append(
            Check("run with overrides", False, "could not ask the job's IAM policy", [exc.message])
        )
        return report
    missing = sorted(set(RUN_PERMISSIONS) - set(answer.permissions))
    if missing:
        report.checks.append(
            Check(
                "run with overrides",
                False,
                f"{member} lacks {', '.join(missing)} on {job}",
                [
                    "the worker starts each execution with overrides (args, env, task count, "
                    f"timeout), which needs both {' and '.join(RUN_PERMISSIONS)}; "
                    f"{RUN_JOB_EXECUTOR_WITH_OVERRIDES} "
                    "is the least role holding them (roles/run.invoker and roles/run.jobsExecutor "
                    "lack runWithOverrides)"
                ],
                [grant(member, RUN_JOB_EXECUTOR_WITH_OVERRIDES, name)],
            )
        )
    else:
        report.checks.append(
            Check("run with overrides", True, f"{member} holds {' and '.join(RUN_PERMISSIONS)}")
        )
    return report
