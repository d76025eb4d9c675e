"""Database engine and sessions. One request = one session = one transaction: the request
dependency commits or rolls back; services and repositories only flush."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy import text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from app.core.settings import Settings


def create_engine(settings: Settings, *, role: str) -> AsyncEngine:
    """`role` becomes the connection's application_name (api, worker, cli), so
    pg_stat_activity and the audit log say which process made a change."""
    if not settings.database_url:
        raise RuntimeError("DATABASE_URL is not set and no embedded PostgreSQL was started")
    return create_async_engine(
        settings.database_url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_pool_size,
        pool_timeout=settings.db_timeout_s,
        pool_pre_ping=False,
        pool_recycle=1800,
        connect_args={
            "application_name": f"selfheal-{role}",
            "connect_timeout": max(1, int(settings.db_timeout_s)),
            # A statement that hangs (lock wait, dead server) fails instead of holding a request.
            "options": f"-c statement_timeout={int(settings.db_timeout_s * 1000)}",
        },
    )


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)


async def set_actor(session: AsyncSession, actor: str) -> None:
    """Name the ops user for the database triggers (audit log, attempt events) of this
    transaction only."""
    await session.execute(
        text("SELECT set_config('selfheal.actor', :actor, true)"), {"actor": actor}
    )


@asynccontextmanager
async def transaction(maker: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    async with maker() as session, session.begin():
        yield session
