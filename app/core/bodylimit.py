"""Request body limits for every route, enforced before anything reads or parses a body.

A plain ASGI middleware (BaseHTTPMiddleware would cost the heartbeat path too much). Each
request gets the limit of its route class (`BodyLimits.for_path`):
- the plugin API, `/api/plugins/`: SELFHEAL_MAX_BODY_BYTES;
- the dashboard's forms, `/ops/`: SELFHEAL_FORM_MAX_BODY_BYTES;
- the ops API, `/api/ops/`, and every other route: SELFHEAL_OPS_MAX_BODY_BYTES.

A declared Content-Length over the limit is answered 413 at once: the application is not
called, not a byte of the body is read, and the connection is closed so the server reads no
more of it either. A body without a Content-Length (chunked) is counted as it streams in: the
moment it passes the limit the client gets 413 (unless the application already started its
answer), the application is told the client went away, and whatever it still sends is
dropped. A Content-Length that is not a number gets 400.

The 413 is the API's error shape (ErrorBody): {"error": {"code": "payload_too_large", ...}}."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.errors import error_body
from app.core.settings import Settings

log = structlog.get_logger("selfheal.http")

_DISCONNECT: Message = {"type": "http.disconnect"}


@dataclass(frozen=True, slots=True)
class BodyLimits:
    """The largest body of each route class: (path prefix, bytes), first match wins."""

    classes: Sequence[tuple[str, int]]
    default: int

    @classmethod
    def from_settings(cls, settings: Settings) -> BodyLimits:
        return cls(
            classes=(
                ("/api/plugins/", settings.max_body_bytes),
                ("/api/ops/", settings.ops_max_body_bytes),
                ("/ops/", settings.form_max_body_bytes),
            ),
            default=settings.ops_max_body_bytes,
        )

    def for_path(self, path: str) -> int:
        for prefix, limit in self.classes:
            if path.startswith(prefix) or path == prefix.rstrip("/"):
                return limit
        return self.default


def too_large_body(limit: int) -> bytes:
    return error_body("payload_too_large", f"request body is larger than {limit} bytes")


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, limits: BodyLimits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.for_path(scope["path"])
        declared = _content_length(scope)
        if declared is not None:
            if not declared.isdigit():
                await _answer(
                    send, 400, error_body("bad_request", "Content-Length is not a number")
                )
                return
            if int(declared) > limit:
                structlog.contextvars.bind_contextvars(error="payload_too_large")
                await _answer(send, 413, too_large_body(limit))
                return
            # The server frames the body by its Content-Length: no more than that arrives, so
            # there is nothing left to count (the heartbeat path pays no wrapper).
            await self.app(scope, receive, send)
            return

        received = 0
        started = False  # the application's answer began
        refused = False  # we answered 413: the application's answer is dropped

        async def counted_receive() -> Message:
            nonlocal received, refused
            if refused:
                return _DISCONNECT
            message = await receive()
            if message["type"] != "http.request":
                return message
            received += len(message.get("body", b""))
            if received <= limit:
                return message
            structlog.contextvars.bind_contextvars(error="payload_too_large")
            if not started:
                refused = True
                await _answer(send, 413, too_large_body(limit))
            # Nothing more is read: to the application, the client went away.
            return _DISCONNECT

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception as exc:
            if not refused:
                raise
            # The client has its 413; what the application made of the missing body
            # (ClientDisconnect, a parse error) is no one's concern.
            log.info("body_refused_app_error", error=type(exc).__name__)


def _content_length(scope: Scope) -> str | None:
    for key, value in scope["headers"]:
        if key == b"content-length":
            return str(value.decode("latin-1").strip())
    return None


async def _answer(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                # The rest of the body is not wanted: the server closes instead of reading it.
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
