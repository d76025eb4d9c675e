"""Heartbeat retention: samples older than SELFHEAL_HEARTBEAT_RETENTION_DAYS are deleted.

In batches of `batch` rows, each its own short transaction, oldest first through the
received_at index, so pruning a backlog never holds long locks or bloats one transaction; the
samples the detector has not read yet (beyond its watermark) are never deleted, whatever
their age (the statement: `delete_old_heartbeats`, app/plugins/repository.py)."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.plugins.repository import delete_old_heartbeats


async def prune_heartbeats(
    maker: async_sessionmaker[AsyncSession],
    *,
    retention_days: int,
    batch: int = 10_000,
    max_batches: int = 20,
) -> int:
    deleted = 0
    for _ in range(max_batches):
        async with maker() as session, session.begin():
            count = await delete_old_heartbeats(session, retention_days=retention_days, batch=batch)
        deleted += count
        if count < batch:
            break
    return deleted
