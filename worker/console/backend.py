"""What the console's pages show and do, from where the CLI gets it; no database of its own.

- dead letters: one scan of the dead-letter subscription (`worker.ops.operations`,
  the same look that never consumes), kept in memory so paging 10,000 of them costs
  no Pub/Sub call; `rescan()` looks again. Dry run and replay scan afresh, filtered
  by kind and reason, and replay is capped at the count the dry run showed.
- instances: `status` questions on the control channel (`worker.gcp.control`), and
  pause/resume orders, each followed by a question so every instance's answer shows.
- scheduled jobs: `worker scheduled`'s list of the jobs waiting on Cloud Tasks for their
  not_before, paged; Cancel is `worker cancel`'s path for a scheduled job (worker/cli/later.py).
- live results: a subscription of the console's own to the results topic, made at
  start with the control channel's expiration policy (gone a day after the console
  is) and deleted at a clean stop; what it hears is kept in bounded memory.

Every failure becomes a `ConsoleError` with one line naming cause and fix: the CLI's
own words (`explain`, given by `worker console`), or the operation's.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
import uuid
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from pydantic import ValidationError

from worker.core.messages import Result, now
from worker.core.pauses import PauseEntry
from worker.core.settings import Settings
from worker.ops import operations

PAGE_SIZE = 100
SAMPLE = 20  # job ids a dry run names
RECENT = 500  # results kept for the live page
LATEST = 50_000  # job ids whose latest result is kept for the look-up
RATE_WINDOW_S = 120  # seconds of the sparkline
MAX_BATCHES = 50
EXECUTIONS = 50  # latest executions listed per Cloud Run job
DETAIL_BYTES = 2 * 1024 * 1024  # a dead letter's data shown in full up to this (Pub/Sub's max is 10 MB)


NO_KIND = "choose a kind to replay (a group's Replay button): the console never replays every kind at once"


class ConsoleError(Exception):
    """An action that failed; the message is one line naming cause and fix."""


Explain = Callable[[BaseException], "str | None"]


@dataclass
class Snapshot:
    """One scan of the dead letters."""

    entries: list[operations.DeadLetterEntry] = field(default_factory=list)
    by_id: dict[str, operations.DeadLetterEntry] = field(default_factory=dict)
    truncated: bool = False
    scanned_at: datetime | None = None
    scan_s: float = 0.0


def group_key(entry: operations.DeadLetterEntry) -> tuple[str, str]:
    return (entry.kind or "", entry.reason)


def groups(entries: list[operations.DeadLetterEntry]) -> list[dict[str, Any]]:
    """Dead letters by kind and reason: count, first and last seen, an example message."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for entry in entries:
        key = group_key(entry)
        group = found.get(key)
        at = entry.dead_lettered_at
        if group is None:
            found[key] = {
                "kind": key[0],
                "reason": key[1],
                "count": 1,
                "first": at,
                "last": at,
                "example": entry.error_message,
                "replayed": entry.replay_count,
            }
            continue
        group["count"] += 1
        group["replayed"] = max(group["replayed"], entry.replay_count)
        if at is not None:
            group["first"] = at if group["first"] is None else min(group["first"], at)
            group["last"] = at if group["last"] is None else max(group["last"], at)
    ordered = sorted(found.values(), key=lambda g: (-g["count"], g["kind"], g["reason"]))
    return [{**g, "first": _iso(g["first"]), "last": _iso(g["last"])} for g in ordered]


def entry_row(entry: operations.DeadLetterEntry) -> dict[str, Any]:
    return {
        "message_id": entry.message_id,
        "job_id": entry.job_id,
        "kind": entry.kind,
        "reason": entry.reason,
        "lane": entry.lane,
        "status": entry.status,
        "error": entry.error_message[:300],
        "attempts": entry.attempts,
        "dead_lettered_at": _iso(entry.dead_lettered_at),
        "replay_count": entry.replay_count,
    }


def entry_detail(entry: operations.DeadLetterEntry) -> dict[str, Any]:
    data = entry.data[:DETAIL_BYTES]
    return {
        **entry_row(entry),
        "error": entry.error_message,
        "by": "pubsub" if entry.by_pubsub else "worker",
        "attributes": dict(sorted(entry.attributes.items())),
        "data": data.decode("utf-8", "replace"),
        "data_bytes": len(entry.data),
        "data_cut": len(entry.data) > DETAIL_BYTES,
    }


def scope(count: int, kind: str | None, reason: str | None) -> str:
    """The sentence a confirmation states: 'replay 312 jobs of kind K, reason R'."""
    jobs = "1 job" if count == 1 else f"{count} jobs"
    parts = [f"replay {jobs}"]
    if kind:
        parts.append(f" of kind {kind}")
    if reason:
        parts.append(f", reason {reason}" if kind else f" with reason {reason}")
    return "".join(parts)


def logging_url(project: str, job_id: str) -> str:
    query = f'jsonPayload.job_id="{job_id}"'
    return (
        f"https://console.cloud.google.com/logs/query;query={quote(query, safe='')}"
        f"?project={quote(project, safe='')}"
    )


def trace_url(project: str, trace_id: str) -> str:
    return (
        f"https://console.cloud.google.com/traces/list?tid={quote(trace_id, safe='')}"
        f"&project={quote(project, safe='')}"
    )


class LiveResults:
    """Results as they arrive: recent ones, each job's latest, counts, a per-second rate, batches."""

    def __init__(self, project: str) -> None:
        self._project = project
        self._lock = threading.Lock()
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT)
        self.latest: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.counts: Counter[tuple[str, str]] = Counter()
        self._per_second: Counter[int] = Counter()
        self.batches: OrderedDict[str, Any] = OrderedDict()
        self.unreadable = 0
        self.started = time.time()

    def add(self, data: bytes, at: float | None = None) -> None:
        from worker.client import BatchProgress

        try:
            result = Result.model_validate_json(data)
        except ValidationError:
            with self._lock:
                self.unreadable += 1
            return
        row = self.row(result)
        with self._lock:
            self.recent.appendleft(row)
            if result.job_id:
                self.latest[result.job_id] = row
                self.latest.move_to_end(result.job_id)
                while len(self.latest) > LATEST:
                    self.latest.popitem(last=False)
            self.counts[(result.kind or "", result.status.value)] += 1
            self._per_second[int(at if at is not None else time.time())] += 1
            batch_id = result.batch.id if result.batch else None
            if (
                batch_id is None
                and isinstance(result.response, dict)
                and "children_published" in result.response
            ):
                batch_id = result.job_id
            if batch_id:
                progress = self.batches.get(batch_id)
                if progress is None:
                    progress = self.batches[batch_id] = BatchProgress(batch_id)
                    while len(self.batches) > MAX_BATCHES:
                        self.batches.popitem(last=False)
                progress.update(result)

    def row(self, result: Result) -> dict[str, Any]:
        return {
            "job_id": result.job_id,
            "kind": result.kind,
            "status": result.status.value,
            "attempts": result.attempts,
            "http_status": result.http_status,
            "error": f"{result.error.code}: {result.error.message}"[:500] if result.error else None,
            "finished_at": _iso(result.finished_at),
            "duration_ms": result.duration_ms,
            "batch": f"{result.batch.id} #{result.batch.index}" if result.batch else None,
            "logs": logging_url(self._project, result.job_id) if result.job_id else None,
            "trace": trace_url(self._project, result.trace_id) if result.trace_id else None,
        }

    def view(self, *, kind: str | None = None, status: str | None = None, at: float | None = None) -> dict:
        at = time.time() if at is None else at
        with self._lock:
            rows = [
                r
                for r in self.recent
                if (not kind or r["kind"] == kind) and (not status or r["status"] == status)
            ][:100]
            second = int(at)
            rate = [self._per_second.get(second - i, 0) for i in range(RATE_WINDOW_S - 1, -1, -1)]
            for old in [s for s in self._per_second if s < second - RATE_WINDOW_S]:
                del self._per_second[old]
            counts = [{"kind": k, "status": s, "count": n} for (k, s), n in sorted(self.counts.items())]
            return {"results": rows, "counts": counts, "rate": rate, "unreadable": self.unreadable}

    def job(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            return self.latest.get(job_id)

    def batch_view(self) -> list[dict[str, Any]]:
        with self._lock:
            out = []
            for progress in reversed(self.batches.values()):
                shown = progress.as_dict()
                shown["finished"] = progress.finished
                shown["children_published"] = (
                    progress.parent.response.get("children_published")
                    if progress.parent is not None and isinstance(progress.parent.response, dict)
                    else None
                )
                out.append(shown)
            return out


class Backend:
    """The console's operations over the operator's Pub/Sub clients."""

    def __init__(
        self,
        settings: Settings,
        publisher: Any,
        subscriber: Any,
        *,
        explain: Explain,
        check_kind: Callable[[str], None],
        parse_duration: Callable[[str], float],
        kinds: list[str] | None = None,
        run_jobs: list[tuple[str, str, str]] | None = None,
        executions_client: Callable[[], Any] | None = None,
        cancel: Callable[[str], tuple[bool, str]] | None = None,
        explain_run: Explain | None = None,
        scheduled: Callable[[], tuple[str, list[dict[str, Any]]]] | None = None,
        cancel_scheduled: Callable[[str, str], tuple[bool, str]] | None = None,
        status_wait_s: float = 2.0,
        operator: str = "",
    ) -> None:
        self.settings = settings
        self.kinds = sorted(kinds or [])
        self._run_jobs = sorted(run_jobs or [])  # (kind, Cloud Run job, region)
        self._executions_client = executions_client or _no_client
        self._cancel = cancel or (lambda job_id: (False, "cancelling is not wired in this console"))
        self._explain_run = explain_run or (lambda exc: None)
        self._scheduled = scheduled or _no_tasks
        self._cancel_scheduled = cancel_scheduled or (
            lambda job_id, kind: (
                False,
                "cancelling is not wired in this console: start it with `worker console`",
            )
        )
        self._publisher = publisher
        self._subscriber = subscriber
        self._explain = explain
        self._check_kind = check_kind
        self._parse_duration = parse_duration
        self.status_wait_s = status_wait_s
        self._operator = operator[:100]
        self.dead_letter_path = subscriber.subscription_path(
            settings.project, settings.dead_letter_subscription
        )
        self._topic_path = publisher.topic_path
        self.snapshot = Snapshot()
        # One scan at a time: two scans at once each see only what the other is not holding.
        self._scan_lock = threading.RLock()
        self.live = LiveResults(settings.project)
        self._results_subscription: str | None = None
        self._results_future: Any = None
        self.live_error: str | None = None

    def lane_topic(self, lane: str) -> str:
        """Each dead letter goes back down the lane it came from, as `worker replay` sends it."""
        return str(self._topic_path(self.settings.project, self.settings.lane_topic(lane)))

    # -- errors

    def _fail(self, exc: BaseException, doing: str) -> ConsoleError:
        message = self._explain(exc)
        return ConsoleError(message or f"{doing} failed: {type(exc).__name__}: {str(exc)[:300]}")

    # -- dead letters

    def rescan(self) -> Snapshot:
        with self._scan_lock:
            started = time.monotonic()
            try:
                with operations.DeadLetterScan(self._subscriber, self.dead_letter_path) as scan:
                    entries = scan.pull()
                    truncated = scan.truncated
            except Exception as exc:
                raise self._fail(exc, "listing the dead letters") from None
            self.snapshot = Snapshot(
                entries=entries,
                by_id={e.message_id: e for e in entries},
                truncated=truncated,
                scanned_at=now(),
                scan_s=time.monotonic() - started,
            )
            return self.snapshot

    def dead_letters(
        self, *, kind: str | None, reason: str | None, offset: int, limit: int = PAGE_SIZE
    ) -> dict[str, Any]:
        snap = self.snapshot
        chosen = [
            e
            for e in snap.entries
            if (kind is None or (e.kind or "") == kind) and (reason is None or e.reason == reason)
        ]
        offset = max(0, min(offset, len(chosen)))
        return {
            "subscription": self.dead_letter_path,
            "scanned_at": _iso(snap.scanned_at),
            "scan_s": round(snap.scan_s, 2),
            "total": len(snap.entries),
            "truncated": snap.truncated,
            "groups": groups(snap.entries),
            "matching": len(chosen),
            "offset": offset,
            "limit": limit,
            "entries": [entry_row(e) for e in chosen[offset : offset + limit]],
        }

    def detail(self, message_id: str) -> dict[str, Any]:
        entry = self.snapshot.by_id.get(message_id)
        if entry is None:
            raise ConsoleError(
                f"no dead letter {message_id!r} in the last scan: replayed or acked since? press Rescan"
            )
        return entry_detail(entry)

    def dry_run(self, kind: str | None, reason: str | None) -> dict[str, Any]:
        if not kind:
            raise ConsoleError(NO_KIND)
        try:
            with self._scan_lock:
                report = operations.replay_dead_letters(
                    self._subscriber,
                    self._publisher,
                    self.dead_letter_path,
                    self.lane_topic,
                    kind=kind,
                    reason=reason,
                    dry_run=True,
                )
        except Exception as exc:
            raise self._fail(exc, "the dry run") from None
        count = len(report.selected)
        return {
            "count": count,
            "skipped": report.skipped,
            "truncated": report.truncated,
            "kind": kind,
            "reason": reason,
            "job_ids": [e.job_id or e.message_id for e in report.selected[:SAMPLE]],
            "scope": scope(count, kind, reason),
            "message": f"dry run: would {scope(count, kind, reason)}, skip {report.skipped}; "
            "nothing changed.",
        }

    def replay(self, kind: str | None, reason: str | None, count: int) -> dict[str, Any]:
        """Replay at most `count` (what the confirmed dry run showed) of kind and reason."""
        if not kind:
            raise ConsoleError(NO_KIND)
        if count < 1:
            raise ConsoleError("nothing to replay: the dry run found no dead letter of that kind and reason")
        try:
            with self._scan_lock:
                report = operations.replay_dead_letters(
                    self._subscriber,
                    self._publisher,
                    self.dead_letter_path,
                    self.lane_topic,
                    kind=kind,
                    reason=reason,
                    limit=count,
                )
        except Exception as exc:
            raise self._fail(exc, "the replay") from None
        failed = [{"job_id": e.job_id or e.message_id, "error": error} for e, error in report.failed[:SAMPLE]]
        message = f"replayed {len(report.replayed)}, skipped {report.skipped}, failed {len(report.failed)}"
        try:
            self.rescan()
        except ConsoleError as exc:
            message += f" (the list was not refreshed: {exc})"
        return {
            "replayed": len(report.replayed),
            "failed": len(report.failed),
            "failures": failed,
            "job_ids": [e.job_id for e in report.replayed if e.job_id][:SAMPLE],
            "message": message,
            "ok": not report.failed,
        }

    # -- instances

    def instances(self) -> dict[str, Any]:
        from worker.gcp.control import ask_status

        try:
            replies = ask_status(
                self._publisher,
                self._subscriber,
                self.settings.project,
                self.settings.control_topic,
                wait_s=self.status_wait_s,
            )
        except Exception as exc:
            raise self._fail(exc, "asking the instances") from None
        return {
            "topic": self.settings.control_topic,
            "wait_s": self.status_wait_s,
            "instances": [_instance(reply) for reply in replies],
        }

    def order(self, kind: str, *, paused: bool, duration: str | None) -> dict[str, Any]:
        from worker.gcp.control import send_order

        self._check_kind(kind)
        until = None
        if paused and duration:
            try:
                until = time.time() + self._parse_duration(duration)
            except ValueError as exc:
                raise ConsoleError(f"duration: {exc}") from None
        entry = PauseEntry(kind, paused, time.time(), until, by=self._operator)
        try:
            send_order(self._publisher, self.settings.project, self.settings.control_topic, entry)
        except Exception as exc:
            raise self._fail(exc, "sending the order") from None
        verb = "paused" if paused else "resumed"
        when = "" if until is None else f" until {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(until))}"
        time.sleep(0.5)  # let the order land before the question, as `worker pause` does
        shown = self.instances()
        confirmations = [
            {"replica": i["replica"], "confirmed": (kind in i["paused"]) == paused}
            for i in shown["instances"]
        ]
        agree = sum(c["confirmed"] for c in confirmations)
        return {
            **shown,
            "confirmations": confirmations,
            "message": f"{kind} {verb}{when} (order sent on {self.settings.control_topic}). "
            f"{agree} of {len(confirmations)} answering worker instance(s) confirm.",
            "ok": agree == len(confirmations),
        }

    # -- Cloud Run job executions

    def executions(self) -> dict[str, Any]:
        """The latest executions of every run_job kind's Cloud Run job, running ones first."""
        from worker.core.runjob import JOB_ID_ENV
        from worker.gcp.runjobs import execution_env, execution_state, job_path

        if not self._run_jobs:
            return {"executions": [], "message": "the catalog has no run_job kind: no execution to show"}
        rows, problems = [], []
        try:
            client = self._executions_client()
        except Exception as exc:
            raise ConsoleError(self._explain_run(exc) or f"no Cloud Run Admin API client: {exc}") from None
        for kind, job, region in self._run_jobs:
            parent = job_path(self.settings.project, region, job)
            try:
                pager = client.list_executions(
                    request={"parent": parent, "page_size": EXECUTIONS}, retry=None, timeout=30
                )
                listed = list(itertools.islice(pager, EXECUTIONS))
            except Exception as exc:
                problems.append(f"{parent}: {self._explain_run(exc) or exc}")
                continue
            for execution in listed:
                state = execution_state(execution)
                rows.append(
                    {
                        "name": execution.name,
                        "short": execution.name.rsplit("/", 1)[-1],
                        "kind": kind,
                        "job_id": execution_env(execution).get(JOB_ID_ENV),
                        "state": "running" if state is None else state.value,
                        "tasks": f"{execution.succeeded_count} ok, {execution.failed_count} failed, "
                        f"{execution.cancelled_count} cancelled of {execution.task_count}",
                        "created": _iso(execution.create_time),
                        "completed": _iso(execution.completion_time),
                        "log_uri": execution.log_uri or None,
                    }
                )
        rows.sort(key=lambda r: r["created"] or "", reverse=True)
        rows.sort(key=lambda r: r["state"] != "running")  # stable: running first, each newest first
        return {"executions": rows, "message": "; ".join(problems) or None}

    def cancel(self, job_id: str) -> dict[str, Any]:
        """`worker cancel JOB_ID`, its own words back."""
        ok, said = self._cancel(job_id)
        return {"ok": ok, "message": said, "executions": self.executions()["executions"]}

    # -- jobs waiting on Cloud Tasks for their not_before

    def scheduled(
        self, *, offset: int = 0, kind: str | None = None, limit: int = PAGE_SIZE
    ) -> dict[str, Any]:
        """A page of `worker scheduled`'s list, soonest first; listed afresh each time."""
        queue, rows = self._scheduled()
        chosen = [r for r in rows if kind is None or r["kind"] == kind]
        offset = max(0, min(offset, len(chosen)))
        return {
            "queue": queue,
            "total": len(rows),
            "matching": len(chosen),
            "offset": offset,
            "limit": limit,
            "jobs": [{**r, "short": r["task"].rsplit("/", 1)[-1]} for r in chosen[offset : offset + limit]],
        }

    def cancel_scheduled(self, job_id: str, kind: str, *, offset: int = 0) -> dict[str, Any]:
        """`worker cancel JOB_ID --kind KIND` for a scheduled job, its own words back, and the list again."""
        ok, said = self._cancel_scheduled(job_id, kind)
        shown = {"ok": ok, "message": said, "job_id": job_id}
        try:
            return {**shown, **self.scheduled(offset=offset)}
        except ConsoleError as exc:
            return {**shown, "message": f"{said} (the list was not refreshed: {exc})"}

    # -- live results

    def start_live(self) -> None:
        """Subscribe to the results topic with a subscription of the console's own."""
        from worker.gcp.control import create_subscription, subscription_id

        name = subscription_id(self.settings.results_topic, f"console-{uuid.uuid4().hex[:12]}")
        try:
            self._results_subscription = create_subscription(
                self._subscriber, self.settings.project, self.settings.results_topic, name
            )
        except Exception as exc:
            self.live_error = str(self._fail(exc, "subscribing to the results topic"))
            return

        def heard(message: Any) -> None:
            message.ack()
            self.live.add(bytes(message.data))

        self._results_future = self._subscriber.subscribe(self._results_subscription, heard)

    def stop_live(self) -> None:
        if self._results_future is not None:
            self._results_future.cancel()
        if self._results_subscription is not None:
            # One short try; if it fails, the expiration policy removes it a day later.
            with contextlib.suppress(Exception):
                self._subscriber.delete_subscription(
                    subscription=self._results_subscription, retry=None, timeout=5
                )
            self._results_subscription = None

    def results(self, *, kind: str | None, status: str | None) -> dict[str, Any]:
        return {
            **self.live.view(kind=kind, status=status),
            "subscription": self._results_subscription,
            "error": self.live_error,
        }

    def job(self, job_id: str) -> dict[str, Any]:
        found = self.live.job(job_id)
        return {
            "job_id": job_id,
            "result": found,
            "logs": logging_url(self.settings.project, job_id),
            "message": None
            if found
            else f"no result for {job_id} since the console started; its logs may say more",
        }


def _no_client() -> Any:
    raise ConsoleError("no Cloud Run Admin API client: start the console with `worker console`")


def _no_tasks() -> tuple[str, list[dict[str, Any]]]:
    raise ConsoleError("no Cloud Tasks client: start the console with `worker console`")


def _instance(reply: dict[str, Any]) -> dict[str, Any]:
    state = reply.get("status") or {}
    paused = state.get("paused") or {}
    targets = state.get("targets") or {}
    return {
        "replica": str(reply.get("replica")),
        "paused": {str(k): (None if u is None else str(u)) for k, u in sorted(paused.items())},
        "targets": [
            {
                "name": str(name),
                "breaker": str(t.get("breaker", "?")),
                "limit": t.get("limit"),
                "ceiling": t.get("ceiling"),
                "in_flight": t.get("in_flight", 0),
            }
            for name, t in sorted(targets.items())
        ],
        "in_flight": state.get("in_flight", 0),
        "held": state.get("held", 0),
        "lanes": [
            {
                "name": str(name),
                **{k: lane.get(k, 0) for k in ("in_flight", "calling", "waiting", "held")},
            }
            for name, lane in sorted((state.get("lanes") or {}).items())
            if isinstance(lane, dict)
        ],
    }


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()
