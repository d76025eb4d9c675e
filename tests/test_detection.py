"""Missed-heartbeat detection: who is missing, when, once, and when it is over. Also the real
arq worker running it on its own schedule, alone and two at a time."""

from __future__ import annotations

import asyncio
import time

from app.core.db import create_engine, create_sessionmaker
from app.incidents.detection import detect_once
from tests.conftest import make_settings, register, running_worker, send_heartbeat, serve


async def tick(settings):
    engine = create_engine(settings, role="test")
    try:
        return await detect_once(create_sessionmaker(engine), settings)
    finally:
        await engine.dispose()


def incidents(db):
    return db.execute(
        "SELECT type, severity, status, installation_id::text,"
        " first_bad_signal_at = (telemetry_snapshot->>'next_expected_at')::timestamptz"
        "   + make_interval(secs => 60),"
        " detected_at >= first_bad_signal_at"
        " FROM plugin_incidents ORDER BY detected_at"
    ).fetchall()


def overdue_by(db, plugin, seconds: int) -> None:
    db.execute(
        "UPDATE merchant_plugins SET next_expected_at = now() - make_interval(secs => %s)"
        " WHERE id = %s",
        (seconds, plugin.id),
    )


async def test_installation_that_never_sent_a_heartbeat_is_new_not_missing(settings, plugin, db):
    assert (await tick(settings)).opened == 0
    assert incidents(db) == []


async def test_late_within_the_grace_period_is_not_missing(settings, client, plugin, db):
    assert (await send_heartbeat(client, plugin)).status_code == 200
    overdue_by(db, plugin, settings.heartbeat_grace_s - 5)
    assert (await tick(settings)).opened == 0


async def test_missed_heartbeat_opens_one_incident_with_honest_times(settings, client, plugin, db):
    assert (await send_heartbeat(client, plugin)).status_code == 200
    overdue_by(db, plugin, settings.heartbeat_grace_s + 5)
    assert (await tick(settings)).opened == 1
    assert incidents(db) == [("heartbeat_missed", "medium", "detected", plugin.id, True, True)]
    # The next ticks see the open incident: deduplicated, not repeated.
    assert (await tick(settings)).opened == 0
    assert len(incidents(db)) == 1


async def test_disabled_installation_is_not_reported_missing(settings, client, plugin, db):
    assert (await send_heartbeat(client, plugin)).status_code == 200
    overdue_by(db, plugin, 3600)
    db.execute("UPDATE merchant_plugins SET status = 'disabled' WHERE id = %s", (plugin.id,))
    assert (await tick(settings)).opened == 0


async def test_missed_heartbeat_incident_resolves_after_enough_healthy_heartbeats(
    settings, client, plugin, db
):
    assert (await send_heartbeat(client, plugin)).status_code == 200
    overdue_by(db, plugin, 3600)
    assert (await tick(settings)).opened == 1
    for sent in range(1, settings.recovery_heartbeats + 1):
        assert (await send_heartbeat(client, plugin)).status_code == 200
        result = await tick(settings)
        expected = 1 if sent == settings.recovery_heartbeats else 0
        assert result.resolved == expected, sent
    status, reason = db.execute("SELECT status, status_reason FROM plugin_incidents").fetchone()
    assert (status, reason) == ("resolved", "heartbeats resumed")
    # Missing again later: a new incident, the old one stays resolved.
    overdue_by(db, plugin, 3600)
    assert (await tick(settings)).opened == 1
    assert db.execute(
        "SELECT status, count(*) FROM plugin_incidents GROUP BY 1 ORDER BY 1"
    ).fetchall() == [("detected", 1), ("resolved", 1)]


async def test_many_missing_installations_open_one_incident_each(settings, client, db):
    plugins = [await register(settings, tenant=f"m{i}") for i in range(25)]
    for p in plugins:
        assert (await send_heartbeat(client, p)).status_code == 200
    db.execute("UPDATE merchant_plugins SET next_expected_at = now() - interval '1 hour'")
    assert (await tick(settings)).opened == 25
    assert (await tick(settings)).opened == 0


async def test_two_workers_detect_a_silent_plugin_once_on_their_own_schedule(
    database_url, servers, redis_prefix, db
):
    settings = make_settings(
        database_url,
        servers.redis_url,
        redis_prefix,
        heartbeat_interval_s=1,
        heartbeat_grace_s=0,
        detect_every_s=0.2,
    )
    plugin = await register(settings)
    async with serve(settings) as (_, client), running_worker(settings), running_worker(settings):
        assert (await send_heartbeat(client, plugin)).status_code == 200
        sent_at = time.monotonic()
        while not db.execute("SELECT count(*) FROM plugin_incidents").fetchone()[0]:
            assert time.monotonic() - sent_at < 5, "no incident 5 s after a 1 s deadline"
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # more ticks, on both workers
    row = db.execute(
        "SELECT count(*), min(type), extract(epoch FROM max(detected_at - first_bad_signal_at))"
        " FROM plugin_incidents"
    ).fetchone()
    assert row[0] == 1 and row[1] == "heartbeat_missed"
    assert 0 <= float(row[2]) < 1.0  # detected within a tick or so of the deadline
