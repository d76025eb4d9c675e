"""Heartbeat retention (app/plugins/retention.py): the partitions whose whole range is older than
the retention are dropped whole by the workers' prune job, except one holding samples the
detector has not read; recent ones stay, and partitions are made ahead at the same time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from app.core.db import create_engine, create_sessionmaker
from tests.support.plugins import send_heartbeat
from workers.main import prune


async def test_old_partitions_are_dropped_unread_and_recent_samples_are_kept(
    settings, client, plugin, db
):
    for _ in range(3):
        assert (await send_heartbeat(client, plugin)).status_code == 200
    recent = [r[0] for r in db.execute("SELECT id FROM plugin_heartbeats ORDER BY id").fetchall()]
    # Thirty days of partitions behind; samples 30, 25 and 20 days old, as the API stored them
    # then. The detector has read up to the 25-day-old one.
    db.execute("SELECT selfheal_create_heartbeat_partitions(24, now() - interval '30 days', now())")
    old = []
    for days in (30, 25, 20):
        row = db.execute(
            "INSERT INTO plugin_heartbeats (installation_id, received_at, signed_at,"
            " plugin_version, env, msg_digest)"
            " VALUES (%s, now() - make_interval(days => %s), now() - make_interval(days => %s),"
            "  '1.2.2', 'prod', gen_random_uuid()::text::bytea) RETURNING id",
            (plugin.id, days, days),
        ).fetchone()
        old.append(row[0])
    db.execute("UPDATE detector_watermarks SET last_id = %s WHERE name = 'samples'", (old[1],))
    expired = [
        name
        for name, _, end in db.execute("SELECT * FROM selfheal_heartbeat_partitions()")
        if end <= datetime.now(UTC) - timedelta(days=settings.heartbeat_retention_days)
    ]
    unread = db.execute(
        "SELECT tableoid::regclass::text FROM plugin_heartbeats WHERE id = %s", (old[2],)
    ).fetchone()[0]

    # At most 8 partitions a run (each run holds the table's lock briefly): a backlog of 30
    # days takes a few runs, one a minute.
    engine = create_engine(settings, role="test")
    ctx = {"settings": settings, "sessionmaker": create_sessionmaker(engine)}
    try:
        runs = [await prune(ctx) for _ in range(4)]
    finally:
        await engine.dispose()

    dropped = [r["dropped"] for r in runs]
    assert len(expired) > 9 and dropped[0] == 8 and dropped[-1] == 0
    assert sum(dropped) == len(expired) - 1
    left = [r[0] for r in db.execute("SELECT id FROM plugin_heartbeats ORDER BY id").fetchall()]
    assert left == [*recent, old[2]]
    names = {r[0] for r in db.execute("SELECT name FROM selfheal_heartbeat_partitions()")}
    assert names & set(expired) == {unread}
