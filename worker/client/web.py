"""Thin adapters from a PushHandler to Flask and to Starlette/FastAPI.

Neither framework is a dependency of the worker: each is imported when its adapter
is built (`pip install flask` or `pip install starlette`). The token is checked
before the body is read, and a body over MAX_ENVELOPE_BYTES is refused with 413
without reading it all.

    app.add_url_rule("/pubsub/results", view_func=flask_view(handler), methods=["POST"])   # Flask
    app.add_route("/pubsub/results", starlette_endpoint(handler), methods=["POST"])        # Starlette
    app.add_api_route("/pubsub/results", starlette_endpoint(handler), methods=["POST"])    # FastAPI
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from worker.client.push import MAX_ENVELOPE_BYTES, PushHandler, PushResponse

_TOO_LARGE = PushResponse(413, {"error": f"push body over {MAX_ENVELOPE_BYTES} bytes: not a Pub/Sub message"})


def flask_view(handler: PushHandler) -> Callable[[], Any]:
    """A Flask view function for the push endpoint (route it with methods=["POST"])."""
    from flask import request

    def push_endpoint() -> Any:
        refused = handler.authorize(request.headers.get("Authorization"))
        if refused is not None:
            return _flask(refused)
        if (request.content_length or 0) > MAX_ENVELOPE_BYTES:
            return _flask(_TOO_LARGE)
        if request.content_length is not None:
            body = request.get_data(cache=True)  # bounded by the length checked above
        else:  # chunked: read no more than the limit
            body = request.stream.read(MAX_ENVELOPE_BYTES + 1)
        if len(body) > MAX_ENVELOPE_BYTES:
            return _flask(_TOO_LARGE)
        return _flask(handler.receive(body))

    push_endpoint.__name__ = f"pubsub_push_{id(handler):x}"  # Flask keys views by name
    return push_endpoint


def _flask(response: PushResponse) -> Any:
    from flask import jsonify

    if response.body is None:
        return "", response.status
    return jsonify(response.body), response.status


def starlette_endpoint(handler: PushHandler) -> Callable[[Any], Awaitable[Any]]:
    """An async Starlette (or FastAPI) endpoint for the push endpoint.

    Verification may fetch certificates and the store may block, so both run in
    Starlette's thread pool rather than on the event loop."""
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request

    async def push_endpoint(request: Request) -> Any:
        refused = await run_in_threadpool(handler.authorize, request.headers.get("authorization"))
        if refused is not None:
            return _starlette(refused)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_ENVELOPE_BYTES:
            return _starlette(_TOO_LARGE)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_ENVELOPE_BYTES:
                return _starlette(_TOO_LARGE)
            chunks.append(chunk)
        return _starlette(await run_in_threadpool(handler.receive, b"".join(chunks)))

    # Real classes, not the strings `from __future__ import annotations` leaves: FastAPI
    # resolves a parameter's annotation to know it wants the Request.
    push_endpoint.__annotations__ = {"request": Request, "return": Any}
    return push_endpoint


def _starlette(response: PushResponse) -> Any:
    from starlette.responses import JSONResponse, Response

    if response.body is None:
        return Response(status_code=response.status)
    return JSONResponse(response.body, status_code=response.status)
