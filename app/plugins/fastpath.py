"""The heartbeat route as a plain ASGI handler in front of FastAPI.

Heartbeats are nearly all of the API's traffic. Served through FastAPI they pay for its own
middleware (server errors, body limit, telemetry), ours (request context, body limits), route
matching and dependency solving: in profiles under load each layer's coroutine, and the
wrappers around `send`, was a visible share of the API process's CPU. So a heartbeat with a
valid Content-Length within SELFHEAL_MAX_BODY_BYTES (what every plugin sends) is answered by
`SelfhealAPI.__call__` before any of that, with the same code as the FastAPI route
(`accept_heartbeat`), and with what RequestContextMiddleware gives every request done inline:
the X-Request-ID answer header, the latency histogram under the route template, and one log
line for a refused heartbeat (accepted ones are counted, not logged: QUIET_PATHS).

Any other heartbeat (chunked, a Content-Length that is not a number or over the limit) takes
the whole stack, where BodyLimitMiddleware answers it as it answers every route, and
HeartbeatFastPath below serves what is left of it."""

from __future__ import annotations

import time
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import structlog
from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from app.core.errors import ApiError, error_body
from app.core.metrics import REQUEST_LATENCY
from app.core.middleware import new_request_id, usable_request_id
from app.plugins.routes import accept_heartbeat, document_raw_bodies
from app.services import Services

log = structlog.get_logger("selfheal.http")

HEARTBEAT_PATH = "/api/plugins/heartbeat"
# RequestContextMiddleware labels latency by the route template it finds in the scope.
_ROUTE = SimpleNamespace(path=HEARTBEAT_PATH)
# The latency histogram's child per status code, looked up once per process.
_LATENCY: dict[int, Any] = {}


class SelfhealAPI(FastAPI):
    """FastAPI, with heartbeats answered before its stack (see the module's docstring)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["path"] == HEARTBEAT_PATH
            and scope["method"] == "POST"
        ):
            svc: Services | None = getattr(self.state, "services", None)
            if svc is not None:
                headers = _headers(scope)
                declared = headers.get("content-length")
                if (
                    declared is not None
                    and declared.isdigit()
                    and int(declared) <= svc.settings.max_body_bytes
                ):
                    await _serve(svc, headers, receive, send)
                    return
        await super().__call__(scope, receive, send)

    def openapi(self) -> dict[str, Any]:
        """FastAPI's document, with the bodies of the plugin routes, which read their raw
        bytes (app/plugins/routes.py, RAW_BODIES)."""
        if self.openapi_schema is None:
            document_raw_bodies(super().openapi())
        assert self.openapi_schema is not None
        return self.openapi_schema


async def _serve(svc: Services, headers: dict[str, str], receive: Receive, send: Send) -> None:
    """One heartbeat, with RequestContextMiddleware's work done inline."""
    started = time.perf_counter()
    request_id = usable_request_id(headers.get("x-request-id")) or new_request_id()
    status = 500
    try:
        status = await _answer(svc, headers, receive, send, (b"x-request-id", request_id.encode()))
    finally:
        elapsed = time.perf_counter() - started
        latency = _LATENCY.get(status)
        if latency is None:
            latency = _LATENCY[status] = REQUEST_LATENCY.labels("POST", HEARTBEAT_PATH, str(status))
        latency.observe(elapsed)
        if status >= 400:
            # The plugin id and the error code are bound in the request's context.
            log.info(
                "request",
                request_id=request_id,
                method="POST",
                path=HEARTBEAT_PATH,
                status=status,
                duration_ms=round(elapsed * 1000, 2),
            )


class HeartbeatFastPath:
    """The heartbeats SelfhealAPI passed on (see the module's docstring), inside
    RequestContextMiddleware and BodyLimitMiddleware; every other request goes on to FastAPI."""

    def __init__(self, app: ASGIApp, owner: FastAPI) -> None:
        self.app = app
        self.owner = owner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != HEARTBEAT_PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        scope["route"] = _ROUTE
        await _answer(self.owner.state.services, _headers(scope), receive, send)


def _headers(scope: Scope) -> dict[str, str]:
    return {key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]}


async def _answer(
    svc: Services,
    headers: Mapping[str, str],
    receive: Receive,
    send: Send,
    *extra: tuple[bytes, bytes],
) -> int:
    """Answer one heartbeat; its status code."""
    try:
        answer = await accept_heartbeat(svc, headers, "POST", HEARTBEAT_PATH, receive)
    except ApiError as exc:
        structlog.contextvars.bind_contextvars(error=exc.code)
        await _respond(
            send,
            exc.status,
            error_body(exc.code, exc.message, exc.field, exc.request),
            exc.headers,
            extra,
        )
        return exc.status
    except Exception:
        log.exception("unhandled_error")
        await _respond(
            send,
            500,
            error_body("internal_error", "internal error; see the server log"),
            None,
            extra,
        )
        return 500
    await _respond(send, 200, answer.body, answer.headers, extra)
    return 200


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    headers: Mapping[str, str] | None,
    extra: tuple[tuple[bytes, bytes], ...],
) -> None:
    raw = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if headers:
        raw.extend((k.lower().encode(), v.encode()) for k, v in headers.items())
    raw.extend(extra)
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
