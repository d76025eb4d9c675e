"""Heartbeat retention: samples older than SELFHEAL_HEARTBEAT_RETENTION_DAYS are deleted.

In batches of `batch` rows, each its own short transaction, oldest first through the
received_at index, so pruning a backlog never holds long locks or bloats one transaction; the
samples the detector has not read yet (beyond its watermark) are never deleted, whatever
their age."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker


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
            result = await session.execute(
                text(
                    """
                    DELETE FROM plugin_heartbeats WHERE id IN (
                        SELECT id FROM plugin_heartbeats
                        WHERE received_at < now() - make_interval(days => :days)
                          AND id <= (SELECT last_id FROM detector_watermarks
                                     WHERE name = 'samples')
                        ORDER BY received_at
                        LIMIT :batch
                        FOR UPDATE SKIP LOCKED)
                    """
                ),
                {"days": retention_days, "batch": batch},
            )
            count = int(result.rowcount or 0)  # type: ignore[attr-defined]
        deleted += count
        if count < batch:
            break
    return deleted
