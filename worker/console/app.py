"""The console's HTTP side: one static page and a JSON API over `Backend`, on aiohttp.

aiohttp is already a runtime dependency (the health server), so the console adds
none. The page is plain HTML and one script (worker/console/static/) that puts every
value into the page with `textContent`, never as markup; the Content-Security-Policy
allows no inline script, so even a mistake there could not run a dead letter's
`<script>`.

A page on the operator's machine that can replay jobs must not be driven by another
site: every request must name a loopback Host (no DNS rebinding), and every action
is a POST with the `X-Worker-Console` header and a JSON body, which a cross-site
form cannot send and a cross-site script cannot without a CORS preflight, which this
server never grants.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

from aiohttp import web

from worker.console.backend import Backend, ConsoleError

STATIC = Path(__file__).parent / "static"
HEADER = "X-Worker-Console"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "[::1]", "::1"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _host_name(host: str) -> str:
    if host.startswith("["):
        return host.split("]")[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def make_app(backend: Backend, *, check_host: bool = True) -> web.Application:
    """The console app; `check_host` refuses a Host that is not a loopback name."""

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if check_host and _host_name(request.host) not in LOOPBACK_HOSTS:
            return _error(
                f"host {request.host!r} is not this console's: open it as http://127.0.0.1 "
                "(or start it with --host NAME --allow-remote)",
                421,
            )
        if request.method == "POST" and request.headers.get(HEADER) != "1":
            return _error(f"an action needs the {HEADER} header: use the console's page", 403)
        response = await handler(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cache-Control"] = "no-store"
        return response

    app = web.Application(middlewares=[guard], client_max_size=64 * 1024)

    async def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> web.Response:
        try:
            body = await asyncio.to_thread(partial(fn, *args, **kwargs))
        except ConsoleError as exc:
            return _error(str(exc), 502)
        return _json(body)

    async def index(_: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html", headers={"Content-Type": "text/html; charset=utf-8"})

    async def dead_letters(request: web.Request) -> web.Response:
        q = request.query
        if q.get("rescan") == "1" or backend.snapshot.scanned_at is None:
            try:
                await asyncio.to_thread(backend.rescan)
            except ConsoleError as exc:
                return _error(str(exc), 502)
        try:
            offset = int(q.get("offset", "0"))
        except ValueError:
            return _error("offset must be a whole number", 400)
        return _json(
            backend.dead_letters(
                kind=q.get("kind") if "kind" in q else None,
                reason=q.get("reason") or None,
                offset=offset,
            )
        )

    async def detail(request: web.Request) -> web.Response:
        try:
            return _json(backend.detail(request.match_info["message_id"]))
        except ConsoleError as exc:
            return _error(str(exc), 404)

    async def dry_run(request: web.Request) -> web.Response:
        body = await _body(request)
        return await call(backend.dry_run, _text(body, "kind"), _text(body, "reason"))

    async def replay(request: web.Request) -> web.Response:
        body = await _body(request)
        count = body.get("count")
        if not isinstance(count, int) or isinstance(count, bool):
            return _error("replay needs the count its dry run showed: run the dry run first", 400)
        return await call(backend.replay, _text(body, "kind"), _text(body, "reason"), count)

    async def instances(_: web.Request) -> web.Response:
        return await call(backend.instances)

    async def pause(request: web.Request) -> web.Response:
        body = await _body(request)
        kind = _text(body, "kind")
        if not kind:
            return _error("pause needs a kind", 400)
        return await call(backend.order, kind, paused=True, duration=_text(body, "duration"))

    async def resume(request: web.Request) -> web.Response:
        body = await _body(request)
        kind = _text(body, "kind")
        if not kind:
            return _error("resume needs a kind", 400)
        return await call(backend.order, kind, paused=False, duration=None)

    async def results(request: web.Request) -> web.Response:
        q = request.query
        return _json(backend.results(kind=q.get("kind") or None, status=q.get("status") or None))

    async def job(request: web.Request) -> web.Response:
        return _json(backend.job(request.match_info["job_id"]))

    async def batches(_: web.Request) -> web.Response:
        return _json({"batches": backend.live.batch_view(), "error": backend.live_error})

    async def executions(_: web.Request) -> web.Response:
        return await call(backend.executions)

    async def cancel(request: web.Request) -> web.Response:
        body = await _body(request)
        job_id = _text(body, "job_id")
        if not job_id:
            return _error("cancel needs the job id of a running execution", 400)
        return await call(backend.cancel, job_id)

    async def scheduled(request: web.Request) -> web.Response:
        try:
            offset = int(request.query.get("offset", "0"))
        except ValueError:
            return _error("offset must be a whole number", 400)
        return await call(backend.scheduled, offset=offset, kind=request.query.get("kind") or None)

    async def cancel_scheduled(request: web.Request) -> web.Response:
        body = await _body(request)
        job_id, kind = _text(body, "job_id"), _text(body, "kind")
        if not job_id or not kind:
            return _error(
                "cancelling a scheduled job needs its job id and kind: use its row's Cancel button", 400
            )
        offset = body.get("offset", 0)
        if not isinstance(offset, int) or isinstance(offset, bool):
            return _error("offset must be a whole number", 400)
        return await call(backend.cancel_scheduled, job_id, kind, offset=offset)

    async def kinds(_: web.Request) -> web.Response:
        return _json({"kinds": backend.kinds, "project": backend.settings.project})

    app.router.add_get("/", index)
    app.router.add_static("/static/", STATIC)
    app.router.add_get("/api/kinds", kinds)
    app.router.add_get("/api/dead-letters", dead_letters)
    app.router.add_get("/api/dead-letters/{message_id}", detail)
    app.router.add_post("/api/dry-run", dry_run)
    app.router.add_post("/api/replay", replay)
    app.router.add_get("/api/instances", instances)
    app.router.add_post("/api/pause", pause)
    app.router.add_post("/api/resume", resume)
    app.router.add_get("/api/results", results)
    app.router.add_get("/api/jobs/{job_id}", job)
    app.router.add_get("/api/batches", batches)
    app.router.add_get("/api/executions", executions)
    app.router.add_post("/api/cancel", cancel)
    app.router.add_get("/api/scheduled", scheduled)
    app.router.add_post("/api/scheduled/cancel", cancel_scheduled)

    async def live(app: web.Application) -> Any:
        await asyncio.to_thread(backend.start_live)
        yield
        await asyncio.to_thread(backend.stop_live)

    app.cleanup_ctx.append(live)
    return app


class _BadBody(web.HTTPBadRequest):
    def __init__(self, message: str) -> None:
        super().__init__(text=json.dumps({"error": message}), content_type="application/json")


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise _BadBody("the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise _BadBody("the body must be a JSON object")
    return body


def _text(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    return value if isinstance(value, str) and value else None


def _json(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status)


def _error(message: str, status: int) -> web.Response:
    return web.json_response({"error": message}, status=status)
