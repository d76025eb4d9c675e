"""Database engine and sessions, and the raw psycopg connections of the heartbeat path. One
request = one session = one transaction: the handler's `transaction(request)` (app/services.py)
commits or rolls back; services and repositories only flush."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import psycopg
import structlog
from sqlalchemy import Connection, event, text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from app.core.settings import Settings, libpq_url

T = TypeVar("T")


def connection_liveness(timeout_s: float) -> dict[str, Any]:
    """libpq options that notice a dead peer (a failover, a dropped link) in seconds rather than
    the kernel's quarter of an hour: TCP keepalives, and a cap on unacknowledged writes."""
    return {
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 5,
        "keepalives_count": 3,
        "tcp_user_timeout": int(max(timeout_s, 1) * 2000),
    }


def create_engine(settings: Settings, *, role: str) -> AsyncEngine:
    """`role` becomes the connection's application_name (api, worker, cli), so
    pg_stat_activity and the audit log say which process made a change."""
    if not settings.database_url:
        raise RuntimeError("DATABASE_URL is not set and no embedded PostgreSQL was started")
    pooled = settings.transaction_pooling
    engine = create_async_engine(
        settings.database_url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_pool_size,
        pool_timeout=settings.db_timeout_s,
        pool_pre_ping=False,
        pool_recycle=1800,
        connect_args=connection_options(
            role,
            connect_timeout_s=settings.db_timeout_s,
            statement_timeout_s=settings.db_timeout_s,
            pooled=pooled,
        )
        | {"prepare_threshold": prepare_threshold_for(5, pooled=pooled)},
    )
    if pooled:
        timeout_per_transaction(engine, settings.db_timeout_s)
    return engine


def prepare_threshold_for(wanted: int | None, *, pooled: bool) -> int | None:
    """psycopg's prepare_threshold for a connection: `wanted` (5 is psycopg's default), or None
    (never prepare) behind a transaction pooler. A statement psycopg prepared lives on one
    server connection, and PgBouncer before 1.21 hands each transaction any server connection:
    the next run of it would find "prepared statement _pg3_0 does not exist" (or a name
    already taken by another client's)."""
    return None if pooled else wanted


def timeout_per_transaction(engine: AsyncEngine, timeout_s: float) -> None:
    """The statement timeout as the first statement of every transaction (SET LOCAL: it ends
    with the transaction), for connections that cannot carry it as a startup option: PgBouncer
    refuses the `options` startup parameter, and a plain SET would outlive our transaction on a
    server connection that other clients get next. Costs one round trip per transaction, so
    it is done only behind a pooler."""
    setting = f"SET LOCAL statement_timeout = {int(timeout_s * 1000)}"

    @event.listens_for(engine.sync_engine, "begin")
    def _set_timeout(conn: Connection) -> None:
        conn.exec_driver_sql(setting)


async def connect_raw(
    url: str,
    role: str,
    *,
    connect_timeout_s: float,
    statement_timeout_s: float | None,
    prepare_threshold: int | None = 5,
    pooled: bool = False,
) -> psycopg.AsyncConnection[Any]:
    """A raw autocommit psycopg connection, outside the engine's pool: for the heartbeat path
    (ingest, credential loads), where the ORM's cost shows, and for LISTEN. `url` in either
    form (SQLAlchemy's or libpq's); the options are `connection_options`'s.
    `prepare_threshold` is psycopg's (5 is its default; 1 prepares a statement at its first
    run, None never); `pooled` (behind a transaction pooler, SELFHEAL_DB_POOLER) prepares
    nothing and sends no startup options: each statement of such a connection is its own
    transaction, bounded by the caller (`bounded`) rather than by a server-side timeout."""
    return await psycopg.AsyncConnection.connect(
        libpq_url(url),
        autocommit=True,
        prepare_threshold=prepare_threshold_for(prepare_threshold, pooled=pooled),
        **connection_options(
            role,
            connect_timeout_s=connect_timeout_s,
            statement_timeout_s=statement_timeout_s,
            pooled=pooled,
        ),
    )


def connection_options(
    role: str,
    *,
    connect_timeout_s: float,
    statement_timeout_s: float | None,
    pooled: bool = False,
) -> dict[str, Any]:
    """The libpq options of every connection of ours, pooled or raw. `role` becomes the
    application_name (selfheal-<role>). A statement that hangs (lock wait, dead server) fails
    after `statement_timeout_s` instead of holding a request; None sets no statement timeout,
    for a connection that only waits (LISTEN). Liveness checks (`connection_liveness`) give a
    silent peer about twice the statement timeout, or the connect timeout without one.
    `pooled`: the connection goes to a transaction pooler (PgBouncer), which refuses the
    `options` startup parameter; the timeout is then set per transaction
    (`timeout_per_transaction`) or enforced by the caller (`bounded`)."""
    options: dict[str, Any] = {
        "application_name": f"selfheal-{role}",
        "connect_timeout": max(1, int(connect_timeout_s)),
    }
    if statement_timeout_s is not None and not pooled:
        options["options"] = f"-c statement_timeout={int(statement_timeout_s * 1000)}"
    liveness_s = connect_timeout_s if statement_timeout_s is None else statement_timeout_s
    return options | connection_liveness(liveness_s)


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)


async def privilege_warnings(engine: AsyncEngine) -> list[str]:
    """What is wrong with the rights DATABASE_URL's login has (empty when nothing): a superuser,
    or the tables' owner, can disable the triggers that keep the history and rewrite it; the
    application should log in as a member of `selfheal_app` that owns nothing (migration 0012,
    DATABASE_OWNER_URL for the migrations)."""
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                text(
                    "SELECT r.rolsuper,"
                    " EXISTS (SELECT 1 FROM pg_tables t WHERE t.schemaname = 'public'"
                    "         AND t.tableowner = current_user) AS owns,"
                    " pg_has_role(current_user, 'selfheal_app', 'MEMBER') AS app"
                    " FROM pg_roles r WHERE r.rolname = current_user"
                )
            )
        ).one()
    warnings = []
    if row.rolsuper:
        warnings.append("DATABASE_URL logs in as a PostgreSQL superuser")
    elif row.owns:
        warnings.append("DATABASE_URL logs in as the owner of the tables")
    elif not row.app:
        warnings.append("DATABASE_URL's login is not a member of selfheal_app")
    return [
        w + ": it can disable the triggers that keep the history; give the application its"
        " own login (README, 'Database roles') and set DATABASE_OWNER_URL for migrations"
        for w in warnings
    ]


async def warn_about_privileges(engine: AsyncEngine, timeout_s: float) -> None:
    """Log `privilege_warnings` at start-up; a database that is down (or not migrated yet) is
    for /health and the migrations to report, not this check."""
    try:
        problems = await asyncio.wait_for(privilege_warnings(engine), timeout_s)
    except Exception:  # a start-up hint must never stop a start-up
        return
    for problem in problems:
        structlog.get_logger(__name__).warning("database_privileges", problem=problem)


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


async def bounded(
    conn: psycopg.AsyncConnection[Any], work: Coroutine[Any, Any, T], timeout_s: float
) -> T:
    """Run `work` on `conn`, giving up after `timeout_s` with the connection closed.

    statement_timeout is enforced by the server, so it cannot help when the server is not heard
    at all (a silently dropped link); and a cancelled psycopg query waits for the server to
    confirm the cancel. So on timeout the socket is shut down under the query, which fails it at
    once, and only then closed: closing the descriptor while the event loop still watches it
    would let the next connection reuse its number and confuse the loop."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.wait_for(asyncio.shield(task), timeout_s)
    except TimeoutError:
        with contextlib.suppress(OSError, psycopg.Error):
            fd = conn.fileno()
            # A dup of the descriptor: shutdown acts on the socket itself.
            with socket.socket(fileno=os.dup(fd)) as sock:
                sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(task, 1.0)
        await conn.close()
        raise
