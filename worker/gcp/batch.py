"""Batch scoring: one batch job fans out into one child job per account id.

A batch job's payload is either `{"account_ids": [...]}` or `{"source": true}` (or no
payload), meaning "page through the kind's `service`" (POST {"page_token",
"page_size"} -> {"account_ids", "next_page_token"}), called like any job: through the
Invoker, with the worker's ID token, the kind's retries and the resolver's URL cache.

Child ids are `f"{batch_id}:{index}"`, so a redelivered batch republishes the same ids
and the web app (which keys results by job id) sees each child once.

Every child carries `batch.total`, so the total must be known before the first child
is published. The source is paged twice: once to count (ids only, nothing kept), then
again to publish. That costs one extra page call per `page_size` ids (100 calls for
50,000 ids at 500 a page) but needs no change to the source's contract and keeps
memory flat: at most one page of ids and one window of publish futures is held.
A source whose paging is not stable between the two passes (ids added meanwhile) is
caught: the second pass stops at the counted total, and a short one fails the batch.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from datetime import UTC, datetime
from typing import Any

import structlog

from worker.core.catalog import JobKind
from worker.core.errors import InvalidJobError, PermanentJobError
from worker.core.messages import BatchRef, Job, now
from worker.core.shapes import Caller, CallResult, Resolver

log = structlog.get_logger("worker.gcp.batch")

_PUBLISH_TIMEOUT_S = 120.0
_MAX_JOB_ID = 128  # JOB_ID_PATTERN's length limit


def batch_id_for(job: Job, published: datetime) -> str:
    """The batch id: the job id, plus the UTC date for a `"daily": true` job.

    Cloud Scheduler publishes the same fixed body every night and cannot template a
    date into it; were the batch id the job id alone, every night's children would
    reuse the ids of the night before and the web app would drop them as duplicates.
    The date is the day Pub/Sub received the message (its publish time, the same on
    every redelivery), so a redelivery after midnight still continues that night's
    batch. A replay is a new publish: a batch replayed on a later day gets that day's id.
    """
    payload = job.payload if isinstance(job.payload, dict) else {}
    if payload.get("daily") is True:
        return f"{job.job_id}-{published.astimezone(UTC):%Y%m%d}"
    return job.job_id


class BatchFanOut:
    """The pipeline's batch handler: `await fan_out(job, kind)` publishes the children."""

    def __init__(
        self,
        publisher: Any,
        jobs_topic: str,
        invoker: Caller,
        resolver: Resolver,
        *,
        region: str,
        clock: Callable[[], datetime] = now,
    ) -> None:
        self._publisher = publisher
        self._topic = jobs_topic
        self._invoker = invoker
        self._resolver = resolver
        self._region = region
        self._clock = clock

    async def __call__(self, job: Job, kind: JobKind, publish_time: datetime | None = None) -> CallResult:
        assert kind.batch is not None  # the catalog guarantees it for "batch" kinds
        spec = kind.batch
        # Without a publish time (never the case for a message from Pub/Sub), the clock.
        batch_id = batch_id_for(job, publish_time or self._clock())
        ids = _explicit_ids(job.payload, spec.max_ids)
        source = _SourcePager(kind, job, self._invoker, self._resolver, self._region)
        if ids is None:
            total, pages = await source.open(spec.max_ids)
        else:
            total = len(ids)
            pages = _chunks(ids, spec.page_size)
        if total == 0:
            await pages.aclose()
            return CallResult(200, {"batch_id": batch_id, "children_published": 0, "total": 0}, 1)
        if len(f"{batch_id}:{total - 1}") > _MAX_JOB_ID:
            raise PermanentJobError(
                "batch_id_too_long",
                f"batch id {batch_id!r} leaves no room for child ids within {_MAX_JOB_ID} characters",
            )
        published = 0
        async with aclosing(pages):  # closed even when a grown source is cut short
            async for page in pages:
                page = page[: total - published]  # a source that grew since the count
                await asyncio.to_thread(
                    self._publish_window, job, spec.child_kind, batch_id, total, published, page
                )
                published += len(page)
                if published >= total:
                    break
        if published < total:
            raise PermanentJobError(
                "source_changed",
                f"{kind.service} counted {total} ids but its pages listed only {published}",
            )
        log.info("batch_published", batch_id=batch_id, children=published, page_calls=source.calls)
        response = {"batch_id": batch_id, "children_published": published, "total": total}
        return CallResult(200, response, max(1, source.attempts))

    def _publish_window(
        self, parent: Job, child_kind: str, batch_id: str, total: int, start: int, ids: Sequence[str]
    ) -> None:
        """Publish one window of children and wait for all of them (runs in a thread).

        Waiting per window is the flow control: at most one window of messages and
        futures is in memory, and Pub/Sub's pace sets the pace of the paging.
        """
        created = now()
        futures = []
        for offset, account_id in enumerate(ids):
            index = start + offset
            child = Job(
                job_id=f"{batch_id}:{index}",
                kind=child_kind,
                payload={"account_id": account_id},
                created_at=created,
                not_before=None,
                not_after=None,
                batch=BatchRef(id=batch_id, index=index, total=total),
                traceparent=parent.traceparent,
            )
            futures.append(self._publisher.publish(self._topic, child.to_bytes(), **child.attributes()))
        for future in futures:
            future.result(timeout=_PUBLISH_TIMEOUT_S)


class _SourcePager:
    """Pages through a batch kind's source service with the Invoker."""

    def __init__(self, kind: JobKind, job: Job, invoker: Caller, resolver: Resolver, region: str) -> None:
        assert kind.batch is not None
        # A "call" copy of the batch kind: same service, path, timeout and retries.
        self._kind = kind.model_copy(update={"handler": "call", "batch": None, "payload_schema": None})
        self._job = job
        self._page_size = kind.batch.page_size
        self._invoker = invoker
        self._resolver = resolver
        self._region = kind.region or region
        self.calls = 0
        self.attempts = 0
        self.total_size: int | None = None  # the source's own count, from its first page

    async def open(self, max_ids: int) -> tuple[int, AsyncGenerator[Sequence[str], None]]:
        """The batch's total and its pages. A source that says `total_size` on its first
        page is paged once; one that does not is counted first, then paged again."""
        pages = self.pages()
        try:
            first = await anext(pages)
            if self.total_size is not None:
                self._check_size(self.total_size, max_ids)
                return self.total_size, _prepend(first, pages)
        except BaseException:
            await pages.aclose()
            raise
        total = len(first)
        async with aclosing(pages):
            async for page in pages:
                total += len(page)
                self._check_size(total, max_ids)
        self._check_size(total, max_ids)
        return total, self.pages()

    def _check_size(self, total: int, max_ids: int) -> None:
        if total > max_ids:
            raise PermanentJobError(
                "batch_too_large", f"{self._kind.service} lists more than max_ids={max_ids} ids"
            )

    async def pages(self) -> AsyncGenerator[list[str], None]:
        if not self._kind.service:
            raise PermanentJobError("no_source", f"kind {self._kind.kind!r} names no source service")
        url = await self._resolver.resolve(self._kind.service, self._region)
        token: str | None = None
        while True:
            body = {"page_token": token, "page_size": self._page_size}
            request = self._job.model_copy(update={"payload": body})
            call = await self._invoker.invoke(self._kind, url, request, self._region)
            self.calls += 1
            self.attempts += call.attempts
            ids, token, total_size = _parse_page(self._kind.service, call.response)
            if self.total_size is None:
                self.total_size = total_size
            yield ids
            if token is None:
                return


def _parse_page(service: str, body: Any) -> tuple[list[str], str | None, int | None]:
    ids = body.get("account_ids") if isinstance(body, dict) else None
    token = body.get("next_page_token") if isinstance(body, dict) else None
    size = body.get("total_size") if isinstance(body, dict) else None
    if (
        not isinstance(ids, list)
        or not all(isinstance(i, str) and i for i in ids)
        or not (token is None or (isinstance(token, str) and token))
        or not (size is None or (isinstance(size, int) and not isinstance(size, bool) and size >= 0))
    ):
        raise PermanentJobError(
            "bad_source_page",
            f"{service} did not answer {{'account_ids': [str], 'next_page_token': str|null, "
            f"'total_size': int (optional)}}: {json.dumps(body)[:200]}",
        )
    if not ids and token is not None:
        raise PermanentJobError("bad_source_page", f"{service} answered an empty page with a next page")
    return ids, token, size


def _explicit_ids(payload: Any, max_ids: int) -> list[str] | None:
    """The payload's account ids, or None when the batch pages through the source."""
    if payload is None:
        return None
    if not isinstance(payload, dict):
        raise InvalidJobError("invalid_payload", "a batch payload is an object: account_ids or source")
    ids = payload.get("account_ids")
    if ids is None:
        if payload.get("source", True) is not True:
            raise InvalidJobError("invalid_payload", "give account_ids, or source: true to page the source")
        return None
    if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
        raise InvalidJobError("invalid_payload", "account_ids must be a list of non-empty strings")
    if len(ids) > max_ids:
        raise InvalidJobError("invalid_payload", f"{len(ids)} account_ids is over max_ids={max_ids}")
    return ids


async def _prepend(
    first: Sequence[str], rest: AsyncGenerator[Sequence[str], None]
) -> AsyncGenerator[Sequence[str], None]:
    yield first
    async with aclosing(rest):
        async for page in rest:
            yield page


async def _chunks(ids: list[str], size: int) -> AsyncGenerator[list[str], None]:
    for start in range(0, len(ids), size):
        yield ids[start : start + size]
