"""The web app's side of the contract (docs/contract.md), the one module it imports.

    from worker.client import ResultsReader, enqueue

    job_id = enqueue("account-scoring", {"account_id": "acct-1"})
    for result in ResultsReader():          # blocks; run it in a background thread
        store(result.job_id, result)

A web app on Cloud Run (CPU only during requests) takes its results by push instead:
`PushHandler` verifies each push request's OIDC token (`PushVerifier`) and stores the
result by job_id; `flask_view` and `starlette_endpoint` adapt it to a web framework.
"""

from __future__ import annotations

from worker.client._enqueue import build_job, enqueue, new_job_id
from worker.client._results import BatchProgress, ResultsReader, ResultWaiter, SeenResults
from worker.client.push import (
    GOOGLE_CERTS_URL,
    MemoryResultStore,
    PushHandler,
    PushRefused,
    PushResponse,
    PushVerifier,
    ResultStore,
)
from worker.client.web import flask_view, starlette_endpoint
from worker.core.errors import ConfigError, InvalidJobError, JobError
from worker.core.messages import BatchRef, ErrorInfo, ExecutionInfo, JobStatus, Result, supersedes
from worker.core.settings import Settings, load_settings

__all__ = [
    "GOOGLE_CERTS_URL",
    "BatchProgress",
    "BatchRef",
    "ConfigError",
    "ErrorInfo",
    "ExecutionInfo",
    "InvalidJobError",
    "JobError",
    "JobStatus",
    "MemoryResultStore",
    "PushHandler",
    "PushRefused",
    "PushResponse",
    "PushVerifier",
    "Result",
    "ResultStore",
    "ResultWaiter",
    "ResultsReader",
    "SeenResults",
    "Settings",
    "build_job",
    "enqueue",
    "flask_view",
    "load_settings",
    "new_job_id",
    "starlette_endpoint",
    "supersedes",
]
