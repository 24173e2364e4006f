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
import re
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog

from worker.core.catalog import JobKind
from worker.core.errors import InvalidJobError, PermanentJobError
from worker.core.lanes import BATCH, LANE_ATTRIBUTE
from worker.core.messages import JOB_ID_PATTERN, BatchRef, Job, JobStatus, now
from worker.core.shapes import Caller, CallResult, Delivery, Resolver

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


# Children per turn: page_size x this. A turn publishes its children and the next turn.
PAGES_PER_TURN = 4
# The attribute that carries a turn's place in its batch (Cursor.dumps).
CURSOR_ATTRIBUTE = "batch_cursor"


@dataclass(frozen=True)
class Cursor:
    """Where a batch's next turn starts: the batch id, the first child index, the total,
    and for a paged source the page token to go on from."""

    batch_id: str
    start: int
    total: int
    page_token: str | None = None

    def dumps(self) -> str:
        return json.dumps(
            {"id": self.batch_id, "start": self.start, "total": self.total, "token": self.page_token},
            separators=(",", ":"),
        )

    @classmethod
    def read(cls, attributes: Mapping[str, str], max_ids: int) -> Cursor | None:
        """The cursor of a turn, None for a batch's first message; InvalidJobError for
        one that is not a cursor (a publisher's, say): it could only ask for what a
        batch job may anyway, but not for more than the kind's max_ids."""
        raw = attributes.get(CURSOR_ATTRIBUTE)
        if raw is None:
            return None
        try:
            fields = json.loads(raw)
            batch_id, start, total, token = fields["id"], fields["start"], fields["total"], fields["token"]
        except (ValueError, TypeError, KeyError):
            raise InvalidJobError("invalid_cursor", f"{CURSOR_ATTRIBUTE} is not a batch cursor") from None
        if (
            not (isinstance(batch_id, str) and re.match(JOB_ID_PATTERN, batch_id))
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, total))
            or not 0 < start < total <= max_ids
            or not (token is None or (isinstance(token, str) and 0 < len(token) <= 512))
        ):
            raise InvalidJobError(
                "invalid_cursor",
                f"{CURSOR_ATTRIBUTE} must name a batch id, 0 < start < total <= max_ids={max_ids} "
                "and a page token or null",
            )
        return cls(batch_id, start, total, token)


class BatchFanOut:
    """The pipeline's batch handler: `await fan_out(job, kind)` publishes the children
    to `jobs_topic`, the batch lane's topic (WORKER_BATCH_TOPIC), marked `lane=batch`."""

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

    async def __call__(self, job: Job, kind: JobKind, delivery: Delivery | None = None) -> CallResult:
        """Publish one turn of the batch's children (all of them if they fit in one), and
        the message that publishes the next turn: `running` until the last turn."""
        assert kind.batch is not None  # the catalog guarantees it for "batch" kinds
        spec = kind.batch
        cursor = Cursor.read(delivery.attributes if delivery else {}, spec.max_ids)
        # Without a publish time (never the case for a message from Pub/Sub), the clock.
        publish_time = delivery.publish_time if delivery else None
        batch_id = cursor.batch_id if cursor else batch_id_for(job, publish_time or self._clock())
        ids = _explicit_ids(job.payload, spec.max_ids)
        if ids is None and not spec.page_source:
            raise InvalidJobError(
                "invalid_payload",
                f"kind {kind.kind!r} does not page its source (its [batch] has no page_source = true): "
                "give account_ids",
            )
        source = _SourcePager(kind, job, self._invoker, self._resolver, self._region)
        start = cursor.start if cursor else 0
        pages: AsyncGenerator[Sequence[str], None]
        if cursor is not None:
            total = cursor.total
            if ids is not None and len(ids) != total - start:
                raise InvalidJobError(
                    "invalid_payload",
                    f"a batch turn from {start} of {total} lists {len(ids)} ids, not the rest",
                )
            pages = _chunks(ids, spec.page_size) if ids is not None else source.pages(cursor.page_token)
        elif ids is None:
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
        # This turn's pages: at most one turn of ids in memory.
        turn: list[Sequence[str]] = []
        taken = 0
        async with aclosing(pages):  # closed even when a grown source is cut short
            async for page in pages:
                page = page[: total - start - taken]  # a source that grew since the count
                turn.append(page)
                taken += len(page)
                if start + taken >= total or taken >= spec.page_size * PAGES_PER_TURN:
                    break
        end = start + taken
        following: tuple[Cursor, list[str] | None] | None = None
        if end < total:
            if ids is None and source.next_token is None:
                raise PermanentJobError(
                    "source_changed", f"{kind.service} counted {total} ids but its pages listed only {end}"
                )
            following = (
                Cursor(batch_id, end, total, source.next_token if ids is None else None),
                ids[taken:] if ids is not None else None,
            )
        published = start
        for number, window in enumerate(turn):
            await asyncio.to_thread(
                self._publish_window, job, spec.child_kind, batch_id, total, published, window
            )
            published += len(window)
            if number == 0 and following is not None:
                # The next turn goes out after this turn's first page and before the
                # others: it is pulled while they still wait, so the lane never runs dry,
                # and it never holds much more than a turn of one batch (two batches
                # started together take turns).
                await asyncio.to_thread(self._continue, job, *following)
        response = {"batch_id": batch_id, "children_published": end, "total": total}
        if following is not None:
            log.info("batch_turn_published", batch_id=batch_id, children=end, total=total)
            return CallResult(None, response, max(1, source.attempts), status=JobStatus.RUNNING)
        log.info("batch_published", batch_id=batch_id, children=end, page_calls=source.calls)
        return CallResult(200, response, max(1, source.attempts))

    def _continue(self, parent: Job, cursor: Cursor, rest: list[str] | None) -> None:
        """Publish the batch's next turn: the parent job again, down the batch lane, with
        the cursor in an attribute and, for a list of ids, the ids still to publish."""
        payload = parent.payload
        if rest is not None:
            payload = {**(payload if isinstance(payload, dict) else {}), "account_ids": rest}
        job = parent.model_copy(update={"payload": payload})
        attributes = {**job.attributes(), LANE_ATTRIBUTE: BATCH, CURSOR_ATTRIBUTE: cursor.dumps()}
        self._publisher.publish(self._topic, job.to_bytes(), **attributes).result(timeout=_PUBLISH_TIMEOUT_S)

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
            futures.append(
                self._publisher.publish(self._topic, child.to_bytes(), **child.attributes(), lane=BATCH)
            )
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
        self.next_token: str | None = None

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

    async def pages(self, token: str | None = None) -> AsyncGenerator[list[str], None]:
        """The source's pages from `token` (the first page without); `next_token` is the
        token after the last page yielded (None after the last page)."""
        if not self._kind.service:
            raise PermanentJobError("no_source", f"kind {self._kind.kind!r} names no source service")
        url = await self._resolver.resolve(self._kind.service, self._region)
        while True:
            body = {"page_token": token, "page_size": self._page_size}
            request = self._job.model_copy(update={"payload": body})
            call = await self._invoker.invoke(self._kind, url, request, self._region)
            self.calls += 1
            self.attempts += call.attempts
            ids, token, total_size = _parse_page(self._kind.service, call.response)
            if self.total_size is None:
                self.total_size = total_size
            self.next_token = token
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
