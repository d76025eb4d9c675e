"""Request context as a plain ASGI middleware (BaseHTTPMiddleware costs too much on the
heartbeat path): request id, latency histogram, one JSON log line per request."""

from __future__ import annotations

import os
import time

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.metrics import REQUEST_LATENCY

log = structlog.get_logger("selfheal.http")

# Accepted heartbeats are counted in /metrics; logging each one as well would cost more CPU
# than storing it. Rejections and every other request are logged.
QUIET_PATHS = frozenset({"/api/plugins/heartbeat", "/metrics", "/health"})


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = usable_request_id(_header(scope, b"x-request-id")) or new_request_id()
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            REQUEST_LATENCY.labels(scope["method"], template, str(status)).observe(elapsed)
            if status >= 400 or scope["path"] not in QUIET_PATHS:
                log.info(
                    "request",
                    method=scope["method"],
                    path=scope["path"],
                    status=status,
                    duration_ms=round(elapsed * 1000, 2),
                )


def new_request_id() -> str:
    """32 random hex digits (os.urandom: a uuid4's randomness without building a UUID)."""
    return os.urandom(16).hex()


def usable_request_id(text: str | None) -> str | None:
    """A caller-chosen id is echoed into logs: keep it short and printable (None: make one)."""
    if text is None:
        return None
    return text[:64] if text.isprintable() else None


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None
