"""API instances to talk to: in process behind an ASGI transport (`serve`), or listening on a
port for real (`serve_http`)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI

from app.core.settings import Settings
from app.main import create_app


@contextlib.asynccontextmanager
async def serve(settings: Settings) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """One API instance, with its lifespan, behind an in-process HTTP client."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://selfheal.test"
        ) as client:
            yield app, client


@contextlib.asynccontextmanager
async def serve_http(settings: Settings) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """One API instance listening on settings.host:settings.port for real (uvicorn, in this
    event loop), for tests where another process must reach the API: the staging runner
    fetching an artifact from its pre-signed URL. The client talks to it over loopback."""
    import uvicorn

    app = create_app(settings)
    server = uvicorn.Server(
        uvicorn.Config(
            app, host=settings.host, port=settings.port, log_config=None, access_log=False
        )
    )
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 30
    while not server.started:
        assert not task.done(), f"the API did not start: {task.exception()!r}"
        assert time.monotonic() < deadline, "the API did not start within 30 s"
        await asyncio.sleep(0.02)
    try:
        async with httpx.AsyncClient(base_url=settings.api_base_url) as client:
            yield app, client
    finally:
        server.should_exit = True
        await task
