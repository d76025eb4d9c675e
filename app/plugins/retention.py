"""Heartbeat retention: plugin_heartbeats is range-partitioned by signed_at (migration 0017,
docs/partitioning.md), and old samples go a whole partition at a time.

Once a minute the workers' `prune` job (prune_heartbeats):
1. makes sure the partitions up to SELFHEAL_HEARTBEAT_PARTITIONS_AHEAD_HOURS ahead exist, of
   SELFHEAL_HEARTBEAT_PARTITION_HOURS each (selfheal_ensure_heartbeat_partitions);
2. drops the partitions whose whole range is older than SELFHEAL_HEARTBEAT_RETENTION_DAYS,
   except one holding a sample the detector has not read yet, an id beyond its watermark
   (selfheal_drop_heartbeat_partitions). A sample is kept for the retention and at most one
   span more.
Dropping a partition is a catalog change, not a DELETE: no dead rows, no VACUUM, the same cost
at 10 or 10,000 heartbeats a second. The application's role owns nothing (migration 0012): both
steps run as the owner through those SECURITY DEFINER functions, which check their arguments and
take turns on an advisory lock, so any number of workers may run them. Each step is its own
short transaction. A table lock they cannot get within 3 s (lock_timeout) ends the step with
nothing done: the next minute tries again, and heartbeats never queue behind it for longer.

The API runs step 1 once as it starts (make_partitions_ahead), so a fresh install with no
worker yet can still ingest after the migration's first week of partitions has passed, and
again when a batch of heartbeats finds no partition for its time."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import structlog
from psycopg import errors as pg_errors
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.core.settings import Settings
from app.plugins.repository import drop_expired_partitions, ensure_partitions

log = structlog.get_logger("selfheal.retention")


@dataclass(frozen=True, slots=True)
class PartitionUpkeep:
    created: int = 0  # partitions made ahead
    dropped: tuple[str, ...] = ()  # partitions dropped, by name
    busy: bool = False  # a step found its lock taken for 3 s: the next run does it


async def prune_heartbeats(
    maker: async_sessionmaker[AsyncSession], settings: Settings
) -> PartitionUpkeep:
    """Partitions ahead, then expired ones dropped (the module docstring)."""
    created = 0
    dropped: list[str] = []
    busy = False
    try:
        async with maker() as session, session.begin():
            created = await ensure_partitions(
                session,
                span_hours=settings.heartbeat_partition_hours,
                ahead_hours=settings.heartbeat_partitions_ahead_hours,
            )
    except DBAPIError as exc:
        if not _lock_not_available(exc):
            raise
        busy = True
    try:
        async with maker() as session, session.begin():
            dropped = await drop_expired_partitions(
                session, keep_days=settings.heartbeat_retention_days
            )
    except DBAPIError as exc:
        if not _lock_not_available(exc):
            raise
        busy = True
    return PartitionUpkeep(created, tuple(dropped), busy)


async def make_partitions_ahead(
    maker: async_sessionmaker[AsyncSession], settings: Settings, *, why: str
) -> bool:
    """Step 1 within SELFHEAL_DB_TIMEOUT_S, for the API: as it starts, and when a heartbeat
    finds no partition for its time (every worker down for longer than the partitions ahead;
    app/plugins/ingest.py). A failure (database down, not migrated yet, lock busy) is logged
    and returns False: the workers do it every minute, and the migration made a week of
    partitions."""
    try:
        async with asyncio.timeout(settings.db_timeout_s):
            async with maker() as session, session.begin():
                created = await ensure_partitions(
                    session,
                    span_hours=settings.heartbeat_partition_hours,
                    ahead_hours=settings.heartbeat_partitions_ahead_hours,
                )
    except Exception as exc:  # a chore of start-up or of a request: never their failure
        log.warning(
            "heartbeat_partitions_not_ensured",
            why=why,
            error=f"{type(exc).__name__}: {exc}"[:300],
        )
        return False
    if created:
        log.info("heartbeat_partitions_created", created=created, why=why)
    return True


def _lock_not_available(exc: DBAPIError) -> bool:
    return isinstance(exc.orig, pg_errors.LockNotAvailable)
