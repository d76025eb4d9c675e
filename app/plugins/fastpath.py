"""The heartbeat route as a plain ASGI handler in front of FastAPI.

Heartbeats are nearly all of the API's traffic. Served through FastAPI they pay for five
middleware layers, route matching and dependency solving: in a profile under load that was a
quarter of the API process's CPU. This handler answers POST /api/plugins/heartbeat itself, with
the same code as the FastAPI route (`accept_heartbeat`), and passes every other request on.
It sits inside RequestContextMiddleware, so request ids, latency metrics and logs are the same."""

from __future__ import annotations

from collections.abc import Mapping
from types import SimpleNamespace

import structlog
from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from app.core.errors import ApiError, error_body
from app.plugins.routes import accept_heartbeat
from app.services import Services

log = structlog.get_logger("selfheal.http")

HEARTBEAT_PATH = "/api/plugins/heartbeat"
# RequestContextMiddleware labels latency by the route template it finds in the scope.
_ROUTE = SimpleNamespace(path=HEARTBEAT_PATH)


class HeartbeatFastPath:
    def __init__(self, app: ASGIApp, owner: FastAPI) -> None:
        self.app = app
        self.owner = owner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != HEARTBEAT_PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        scope["route"] = _ROUTE
        svc: Services = self.owner.state.services
        headers = {
            key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]
        }
        try:
            answer = await accept_heartbeat(svc, headers, "POST", HEARTBEAT_PATH, receive)
        except ApiError as exc:
            structlog.contextvars.bind_contextvars(error=exc.code)
            await _respond(
                send, exc.status, error_body(exc.code, exc.message, exc.field), exc.headers
            )
            return
        except Exception:
            log.exception("unhandled_error")
            await _respond(
                send, 500, error_body("internal_error", "internal error; see the server log")
            )
            return
        await _respond(send, 200, answer.body, answer.headers)


async def _respond(
    send: Send, status: int, body: bytes, extra: Mapping[str, str] | None = None
) -> None:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if extra:
        headers.extend((k.lower().encode(), v.encode()) for k, v in extra.items())
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
