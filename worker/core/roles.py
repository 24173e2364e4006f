"""The predefined IAM roles the worker and its operators are granted, named once.

Who gets which on what is worker/ops/iam.py's data; the adapters name a role only in
the fix they print when a call is refused (worker/gcp/resolver.py, invoker.py, ...).
"""

from __future__ import annotations

CLOUD_TRACE_AGENT = "roles/cloudtrace.agent"
METRIC_WRITER = "roles/monitoring.metricWriter"
PUBSUB_PUBLISHER = "roles/pubsub.publisher"
PUBSUB_SUBSCRIBER = "roles/pubsub.subscriber"
PUBSUB_VIEWER = "roles/pubsub.viewer"
RUN_INVOKER = "roles/run.invoker"
RUN_VIEWER = "roles/run.viewer"
# Cancels a Cloud Run job's executions (run.executions.cancel), for operators.
RUN_JOBS_EXECUTOR = "roles/run.jobsExecutor"
# The least predefined role holding run.jobs.runWithOverrides (with run.jobs.run and
# run.executions.cancel); roles/run.invoker and roles/run.jobsExecutor lack it.
RUN_JOB_EXECUTOR_WITH_OVERRIDES = "roles/run.jobsExecutorWithOverrides"
TOKEN_CREATOR = "roles/iam.serviceAccountTokenCreator"
# Cloud Tasks, for jobs with a not_before (worker/gcp/delay.py): create tasks on the
# queue; read them (worker scheduled); delete them (worker cancel).
CLOUDTASKS_ENQUEUER = "roles/cloudtasks.enqueuer"
CLOUDTASKS_VIEWER = "roles/cloudtasks.viewer"
CLOUDTASKS_TASK_DELETER = "roles/cloudtasks.taskDeleter"
# iam.serviceAccounts.actAs: name a service account as a task's OAuth token account.
SERVICE_ACCOUNT_USER = "roles/iam.serviceAccountUser"
