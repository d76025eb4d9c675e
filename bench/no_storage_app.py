"""A measuring instrument for `bench/heartbeats.py --breakdown`, never a way to run selfheal:
the real API (`app.main.create_app`, the same heartbeat fast path, authentication from the
database, signed answers) with its heartbeat batcher swapped for one that stores nothing and
answers every heartbeat "accepted, no command". Run with the rate limits off
(SELFHEAL_RATE_PER_INSTALLATION=0, SELFHEAL_RATE_PER_TENANT=0), what it costs per heartbeat
is selfheal's floor: HTTP, validation, signature check and signed answer, with no database
and no Redis on the path. The difference to the shipped API is what storing and counting
cost.

    uvicorn bench.no_storage_app:create_app --factory --workers 2 --loop uvloop --http httptools
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import datetime

from fastapi import FastAPI

from app.main import create_app as create_selfheal_app
from app.plugins.ingest import IngestResult
from app.plugins.schemas import Heartbeat
from app.services import Services

_STORED = IngestResult(accepted=True, commands=[], urgent=False)


class StoreNothing:
    """Stands in for HeartbeatBatcher.submit: every heartbeat "stored", nothing written."""

    async def submit(
        self,
        installation_id: uuid.UUID,
        digest: bytes,
        heartbeat: Heartbeat,
        signed_at: datetime,
    ) -> IngestResult:
        return _STORED


def create_app() -> FastAPI:
    app = create_selfheal_app()
    selfheal_lifespan = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(instance: FastAPI) -> AsyncIterator[None]:
        async with selfheal_lifespan(instance):
            svc: Services = instance.state.services
            svc.batcher = StoreNothing()  # type: ignore[assignment]
            yield

    app.router.lifespan_context = lifespan
    return app
