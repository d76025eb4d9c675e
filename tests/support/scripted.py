"""A scripted HTTP peer for clients under test through httpx.MockTransport: each request takes
the next step (the last one repeats), a step being a response, a handler or an exception to
raise (a transport error, a timeout). Used for the decision-service and staging-runner
clients' unit tests; end-to-end tests use the real reference services (sim/)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import httpx

Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]


class ScriptedPeer:
    def __init__(self, *steps: httpx.Response | Handler | Exception) -> None:
        self.steps = list(steps)
        self.requests: list[httpx.Request] = []

    @property
    def calls(self) -> int:
        return len(self.requests)

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        step = self.steps[min(len(self.requests), len(self.steps)) - 1]
        if isinstance(step, Exception):
            raise step
        if isinstance(step, httpx.Response):
            return step
        return await step(request)
