"""What the lifespan creates and hands to request handlers, typed. Above the domain packages
(it holds their authenticator and batcher), beside main.py, so that app/core stays a leaf."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from starlette.requests import Request

from app.core.crypto import SecretBox
from app.core.ratelimit import RateLimiter
from app.core.settings import Settings

if TYPE_CHECKING:  # names only: main.py creates them; every route package imports this module
    from app.plugins.auth import PluginAuthenticator
    from app.plugins.ingest import HeartbeatBatcher


@dataclass(slots=True)
class Services:
    settings: Settings
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    redis: Redis
    box: SecretBox
    authenticator: PluginAuthenticator
    batcher: HeartbeatBatcher
    limiter: RateLimiter


def services(request: Request) -> Services:
    found: Services = request.app.state.services
    return found


@contextlib.asynccontextmanager
async def transaction(request: Request) -> AsyncIterator[AsyncSession]:
    """One session in one transaction, for a request handler: committed when the block ends,
    rolled back if it raises. Explicit rather than a FastAPI dependency with `yield`, so the
    commit happens (and can fail with a 503) before the answer is sent."""
    async with services(request).sessionmaker() as session, session.begin():
        yield session
