"""Heartbeat retention: old samples go, recent ones and those the detector has not read stay."""

from __future__ import annotations

from app.core.db import create_engine, create_sessionmaker
from app.plugins.retention import prune_heartbeats
from tests.support.plugins import send_heartbeat


async def test_old_samples_are_pruned_in_batches_unread_ones_are_kept(settings, client, plugin, db):
    for _ in range(7):
        assert (await send_heartbeat(client, plugin)).status_code == 200
    ids = [r[0] for r in db.execute("SELECT id FROM plugin_heartbeats ORDER BY id").fetchall()]
    # Five samples are 30 days old; the detector has read up to the fourth of them.
    db.execute(
        "UPDATE plugin_heartbeats SET received_at = now() - interval '30 days' WHERE id <= %s",
        (ids[4],),
    )
    db.execute("UPDATE detector_watermarks SET last_id = %s WHERE name = 'samples'", (ids[3],))
    engine = create_engine(settings, role="test")
    try:
        deleted = await prune_heartbeats(
            create_sessionmaker(engine), retention_days=14, batch=2, max_batches=10
        )
    finally:
        await engine.dispose()
    assert deleted == 4
    left = [r[0] for r in db.execute("SELECT id FROM plugin_heartbeats ORDER BY id").fetchall()]
    assert left == ids[4:]
