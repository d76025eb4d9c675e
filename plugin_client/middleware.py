"""ASGI middleware that feeds an agent's counters: one request per HTTP request, an error per
5xx answer or unhandled exception (re-raised), and the latency until the answer is complete.

Pure ASGI, so it needs no Starlette at runtime and works under FastAPI, Starlette, or any
ASGI server:

    app.add_middleware(SelfhealMiddleware, agent=agent)      # FastAPI / Starlette
    app = agent.asgi_middleware(app)                          # any ASGI app
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any, Protocol

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class Counting(Protocol):
    """What the middleware needs: Agent and AsyncAgent both qualify."""

    def record_request(self, count: int = 1) -> None: ...

    def record_error(self, exc: BaseException | None = None, count: int = 1) -> None: ...

    def record_latency(self, ms: float) -> None: ...


class SelfhealMiddleware:
    """`exclude_paths`: path prefixes not counted (health probes, for instance)."""

    def __init__(self, app: ASGIApp, *, agent: Counting, exclude_paths: Sequence[str] = ()) -> None:
        self.app = app
        self.agent = agent
        self.exclude_paths = tuple(exclude_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (
            self.exclude_paths and str(scope.get("path", "")).startswith(self.exclude_paths)
        ):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status: int | None = None

        async def send_counting(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        agent = self.agent
        try:
            await self.app(scope, receive, send_counting)
        except Exception as exc:
            agent.record_request()
            agent.record_error(exc)
            agent.record_latency((time.perf_counter() - started) * 1000.0)
            raise
        agent.record_request()
        if status is None or status >= 500:
            agent.record_error()
        agent.record_latency((time.perf_counter() - started) * 1000.0)
