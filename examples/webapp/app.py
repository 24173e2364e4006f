"""The reference web app (Flask): pages and JSON API, and the push endpoint.

GET  /                      the page (static/index.html)
POST /api/score             {"account_id": str} -> {"job_id"}: an account-scoring job
POST /api/batches           {"size": int} -> {"batch_id", "total"}: a batch-scoring job
GET  /api/jobs/<job_id>     the job's result, or {"status": "pending"} (202)
GET  /api/batches/<id>      the batch's progress, counted from its children's results
GET  /api/recent            the newest stored jobs and batches, whoever published them
POST /pubsub/results        Pub/Sub push (OIDC token verified), stored by job_id
"""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from flask import Flask, jsonify, request, send_from_directory

from examples.webapp.store import SqliteResultStore
from worker.client import (
    GOOGLE_CERTS_URL,
    InvalidJobError,
    PushHandler,
    PushVerifier,
    Settings,
    enqueue,
    flask_view,
    load_settings,
)

STATIC = Path(__file__).parent / "static"
PUSH_PATH = "/pubsub/results"
MAX_BATCH = 1000
MAX_IN_S = 30 * 86400  # "score later": at most 30 days ahead
_ACCOUNT_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")  # the catalog's maxLength (jobs/account-scoring.toml)


@dataclass(frozen=True)
class WebappConfig:
    """From the environment: WEBAPP_PUSH_AUDIENCE and WEBAPP_PUSH_SERVICE_ACCOUNT are
    the subscription's --push-auth-token-audience and --push-auth-service-account;
    WEBAPP_PUSH_CERTS_URL is unset on Cloud Run (Google's certificates) and set by
    `worker dev` to the local cloud's, the explicit opt-in to local tokens."""

    audience: str
    service_account: str
    certs_url: str = GOOGLE_CERTS_URL
    db_path: str = "webapp.sqlite3"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> WebappConfig:
        env = dict(os.environ if env is None else env)
        missing = [n for n in ("WEBAPP_PUSH_AUDIENCE", "WEBAPP_PUSH_SERVICE_ACCOUNT") if not env.get(n)]
        if missing:
            raise SystemExit(
                f"{' and '.join(missing)} not set: set them to the results subscription's "
                "--push-auth-token-audience and --push-auth-service-account, or run beside "
                "`worker dev` with `make webapp` (which reads .worker-dev.env)"
            )
        values = {
            "audience": env["WEBAPP_PUSH_AUDIENCE"],
            "service_account": env["WEBAPP_PUSH_SERVICE_ACCOUNT"],
            "certs_url": env.get("WEBAPP_PUSH_CERTS_URL") or GOOGLE_CERTS_URL,
            "db_path": env.get("WEBAPP_DB", "webapp.sqlite3"),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def create_app(
    config: WebappConfig,
    settings: Settings | None = None,
    publisher: Any = None,
    verifier: PushVerifier | None = None,
) -> Flask:
    settings = settings or load_settings()
    store = SqliteResultStore(config.db_path)
    verifier = verifier or PushVerifier(config.audience, config.service_account, certs_url=config.certs_url)
    app = Flask(__name__, static_folder=None)
    app.config["store"] = store

    def publish(kind: str, payload: Any, job_id: str | None = None, later: timedelta | None = None) -> str:
        return enqueue(kind, payload, job_id, settings=settings, publisher=publisher, not_before=later)

    @app.get("/")
    def index() -> Any:
        return send_from_directory(STATIC, "index.html")

    @app.post("/api/score")
    def score() -> Any:
        body = request.get_json(silent=True) or {}
        account_id = str(body.get("account_id", "")).strip()
        if not _ACCOUNT_ID.match(account_id):
            return jsonify(error="account_id: 1 to 128 letters, digits, '.', '_' or '-'"), 400
        # "Score in 1 minute": the job waits on Cloud Tasks (its result says `scheduled`).
        in_s = body.get("in_s")
        if in_s is not None and (
            isinstance(in_s, bool) or not isinstance(in_s, int) or not 1 <= in_s <= MAX_IN_S
        ):
            return jsonify(error=f"in_s: a whole number of seconds from 1 to {MAX_IN_S}"), 400
        later = timedelta(seconds=in_s) if in_s else None
        try:
            job_id = publish("account-scoring", {"account_id": account_id}, later=later)
        except InvalidJobError as exc:
            return jsonify(error=str(exc)), 400
        return jsonify(job_id=job_id), 202

    @app.post("/api/batches")
    def start_batch() -> Any:
        body = request.get_json(silent=True) or {}
        size = body.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= MAX_BATCH:
            return jsonify(error=f"size: a whole number from 1 to {MAX_BATCH}"), 400
        batch_id = f"batch-{uuid.uuid4().hex[:10]}"
        ids = [f"acct-{batch_id[6:]}-{i:04d}" for i in range(size)]
        publish("batch-scoring", {"account_ids": ids}, batch_id)
        return jsonify(batch_id=batch_id, total=size), 202

    @app.get("/api/jobs/<job_id>")
    def job(job_id: str) -> Any:
        result = store.result(job_id)
        return (jsonify(result), 200) if result else (jsonify(job_id=job_id, status="pending"), 202)

    @app.get("/api/batches/<batch_id>")
    def batch(batch_id: str) -> Any:
        return jsonify(store.progress(batch_id))

    @app.get("/api/recent")
    def recent() -> Any:
        return jsonify(store.recent())

    app.add_url_rule(PUSH_PATH, view_func=flask_view(PushHandler(verifier, store)), methods=["POST"])
    return app
