"""Missed-heartbeat detection: who is missing, when, once, and when it is over. Also the real
arq worker running it on its own schedule, alone and two at a time."""

from __future__ import annotations

import asyncio
import time

from tests.support.api import serve
from tests.support.detection import beat, tick
from tests.support.plugins import register, send_heartbeat
from tests.support.processes import running_worker
from tests.support.settings import make_settings


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


# --- threshold rules -----------------------------------------------------------------------


def open_incidents(db):
    return db.execute(
        "SELECT type, severity, occurrences FROM plugin_incidents"
        " WHERE status = 'detected' ORDER BY type"
    ).fetchall()


async def test_brief_webhook_failure_rate_of_0_6_opens_a_medium_incident(
    settings, client, plugin, db
):
    await beat(client, plugin, webhook_attempts=50, webhook_failures=30)
    result = await tick(settings)
    assert result.opened == 1
    assert open_incidents(db) == [("webhook_fail_rate", "medium", 1)]
    evidence = db.execute(
        "SELECT telemetry_snapshot->'evidence'->>'webhook_fail_rate' FROM plugin_incidents"
    ).fetchone()
    assert evidence == ("0.6",)


async def test_webhook_failures_below_the_rate_or_the_minimum_attempts_open_nothing(
    settings, client, plugin, db
):
    await beat(client, plugin, webhook_attempts=50, webhook_failures=20)  # 0.4
    await beat(client, plugin, webhook_attempts=5, webhook_failures=5)  # too few attempts
    assert (await tick(settings)).opened == 0
    assert open_incidents(db) == []


async def test_repeats_update_the_open_incident_instead_of_opening_another(
    settings, client, plugin, db
):
    await beat(client, plugin, webhook_attempts=50, webhook_failures=30)
    assert (await tick(settings)).opened == 1
    await beat(client, plugin, webhook_attempts=50, webhook_failures=48)  # worse: 0.96
    result = await tick(settings)
    assert (result.opened, result.repeated) == (0, 1)
    assert open_incidents(db) == [("webhook_fail_rate", "high", 2)]


async def test_rule_needs_n_consecutive_samples(database_url, servers, redis_prefix, db):
    settings = make_settings(
        database_url, servers.redis_url, redis_prefix, detect_consecutive_samples=3
    )
    plugin = await register(settings)
    async with serve(settings) as (_, client):
        for count in range(1, 4):
            await beat(client, plugin, webhook_attempts=50, webhook_failures=40)
            assert (await tick(settings)).opened == (1 if count == 3 else 0), count
    assert open_incidents(db) == [("webhook_fail_rate", "medium", 1)]


async def test_error_spike_is_relative_to_the_installations_own_baseline(
    settings, client, plugin, other_plugin, db
):
    for _ in range(10):
        await beat(client, plugin, requests=1000, errors=10)  # 1 % baseline
        await beat(client, other_plugin, requests=1000, errors=150)  # chronic 15 %
    assert (await tick(settings)).opened == 0
    await beat(client, plugin, requests=1000, errors=200)  # 20 %: > 5 % and > 3 x 1 %
    await beat(client, other_plugin, requests=1000, errors=200)  # 20 % < 3 x 15 %
    assert (await tick(settings)).opened == 1
    assert db.execute(
        "SELECT installation_id::text, type, severity FROM plugin_incidents"
    ).fetchall() == [(plugin.id, "error_spike", "medium")]


async def test_uptime_resetting_again_and_again_is_a_crash_loop(settings, client, plugin, db):
    for uptime in (500, 10, 400, 5, 300, 2):
        await beat(client, plugin, uptime=uptime)
    assert (await tick(settings)).opened == 1
    assert open_incidents(db) == [("crash_loop", "high", 1)]


async def test_trouble_soon_after_a_version_change_is_a_regression(settings, client, plugin, db):
    await beat(client, plugin, version="1.2.2")
    await beat(client, plugin, version="1.3.0", webhook_attempts=50, webhook_failures=30)
    assert (await tick(settings)).opened == 1
    row = db.execute(
        "SELECT type, severity, telemetry_snapshot->'evidence'->>'previous_version',"
        " telemetry_snapshot->'evidence'->>'signal' FROM plugin_incidents"
    ).fetchone()
    assert row == ("regression", "high", "1.2.2", "webhook_fail_rate")


async def test_threshold_incident_resolves_after_enough_healthy_samples(
    settings, client, plugin, db
):
    await beat(client, plugin, webhook_attempts=50, webhook_failures=30)
    assert (await tick(settings)).opened == 1
    for healthy in range(1, settings.recovery_heartbeats + 1):
        await beat(client, plugin, webhook_attempts=50, webhook_failures=1)
        expected = 1 if healthy == settings.recovery_heartbeats else 0
        assert (await tick(settings)).resolved == expected, healthy
    assert db.execute("SELECT status, status_reason FROM plugin_incidents").fetchone() == (
        "resolved",
        "healthy heartbeats",
    )


async def test_maintenance_window_suppresses_new_incidents_of_its_tenant(
    settings, client, plugin, other_plugin, db
):
    db.execute(
        "INSERT INTO maintenance_windows (tenant_id, starts_at, ends_at, reason, created_by)"
        " VALUES (%s, now() - interval '1 minute', now() + interval '1 hour',"
        " 'planned upgrade', 'user:otto')",
        (plugin.tenant,),
    )
    await beat(client, plugin, webhook_attempts=50, webhook_failures=40)
    await beat(client, other_plugin, webhook_attempts=50, webhook_failures=40)
    assert (await tick(settings)).opened == 1
    assert db.execute("SELECT installation_id::text FROM plugin_incidents").fetchall() == [
        (other_plugin.id,)
    ]


async def test_open_missed_heartbeat_incident_mutes_the_other_rules(settings, client, plugin, db):
    await beat(client, plugin)
    overdue_by(db, plugin, 3600)
    assert (await tick(settings)).opened == 1  # heartbeat_missed
    db.execute(
        "UPDATE merchant_plugins SET heartbeat_count = heartbeat_count - 10 WHERE id = %s",
        (plugin.id,),
    )  # keep it from resolving on the next heartbeat
    await beat(client, plugin, webhook_attempts=50, webhook_failures=45)
    assert (await tick(settings)).opened == 0
    assert [r[0] for r in open_incidents(db)] == ["heartbeat_missed"]


async def test_two_ticks_at_once_read_each_sample_once(settings, client, plugin, db):
    await beat(client, plugin, webhook_attempts=50, webhook_failures=30)
    first, second = await asyncio.gather(tick(settings), tick(settings))
    assert first.opened + second.opened == 1
    assert first.repeated + second.repeated == 0


# --- severity: the tenant's floor ----------------------------------------------------------


def set_floor(db, tenant: str, floor: str | None) -> None:
    db.execute("UPDATE tenants SET severity_floor = %s WHERE id = %s", (floor, tenant))


async def test_tenant_floor_raises_a_missed_heartbeat_incident(
    settings, client, plugin, other_plugin, db
):
    set_floor(db, plugin.tenant, "critical")
    set_floor(db, other_plugin.tenant, "low")  # below the rule's medium: changes nothing
    for p in (plugin, other_plugin):
        assert (await send_heartbeat(client, p)).status_code == 200
        overdue_by(db, p, 3600)
    assert (await tick(settings)).opened == 2
    assert db.execute(
        "SELECT tenant_id, severity FROM plugin_incidents ORDER BY tenant_id"
    ).fetchall() == [(plugin.tenant, "critical"), (other_plugin.tenant, "medium")]


async def test_tenant_floor_raises_a_threshold_incident_and_its_repeats(
    settings, client, plugin, other_plugin, db
):
    set_floor(db, plugin.tenant, "high")
    await beat(client, plugin, webhook_attempts=50, webhook_failures=30)  # medium by magnitude
    await beat(client, other_plugin, webhook_attempts=50, webhook_failures=30)
    assert (await tick(settings)).opened == 2
    await beat(client, plugin, webhook_attempts=50, webhook_failures=30)
    assert (await tick(settings)).repeated == 1
    assert db.execute(
        "SELECT tenant_id, severity, occurrences FROM plugin_incidents ORDER BY tenant_id"
    ).fetchall() == [(plugin.tenant, "high", 2), (other_plugin.tenant, "medium", 1)]


async def test_tenant_floor_applies_after_the_regression_step(settings, client, plugin, db):
    set_floor(db, plugin.tenant, "medium")  # regression of a medium signal is already high
    await beat(client, plugin, version="1.2.2")
    await beat(client, plugin, version="1.3.0", webhook_attempts=50, webhook_failures=30)
    assert (await tick(settings)).opened == 1
    assert open_incidents(db) == [("regression", "high", 1)]


def test_a_few_requests_say_nothing_about_an_error_rate():
    from datetime import UTC, datetime

    from app.incidents.rules import Sample, Thresholds, error_spiking, looks_unhealthy

    now = datetime.now(UTC)
    t = Thresholds()
    assert t.error_min_requests == 20
    one_in_seventeen = Sample(now, 17, 1, 0, 0, 100)
    assert error_spiking([one_in_seventeen], t) is None
    assert not looks_unhealthy(t, requests=17, errors=1, webhook_attempts=0, webhook_failures=0)
    enough = Sample(now, 20, 2, 0, 0, 100)
    assert error_spiking([enough], t) is not None
    assert looks_unhealthy(t, requests=20, errors=2, webhook_attempts=0, webhook_failures=0)


def test_restarts_count_on_the_running_version_only():
    """An update restarts the plugin, and a crash loop a patch healed is not the new
    version's: the restarts on the version before do not count."""
    from datetime import UTC, datetime, timedelta

    from app.incidents.rules import Sample, Thresholds, crash_looping

    t0 = datetime.now(UTC)

    def sample(n: int, uptime: int, version: str) -> Sample:
        return Sample(t0 - timedelta(seconds=10 * n), 100, 0, 0, 0, uptime, version)

    # Newest first: two samples on 1.2.3 (no restart), then a crash loop on 1.2.2.
    samples = [sample(0, 20, "1.2.3"), sample(1, 10, "1.2.3")] + [
        sample(n, 5 if n % 2 else 50, "1.2.2") for n in range(2, 10)
    ]
    assert crash_looping(samples, Thresholds()) is None
    assert crash_looping(samples[2:], Thresholds()) is not None


def test_a_plugin_crashing_on_start_shows_restarts_in_its_startup_heartbeats():
    """A crash-looping plugin's agent beats as it starts: every heartbeat says an uptime of
    about 0 s, sometimes a little more than the one before. The plugin's own clock (sent_at)
    shows that it started again in between; a plugin that ran on never looks restarted."""
    from datetime import UTC, datetime, timedelta

    from app.incidents.rules import Sample, Thresholds, crash_looping, restarted

    t0 = datetime.now(UTC)

    def sample(at_s: float, uptime: int, *, sent: bool = True) -> Sample:
        at = t0 + timedelta(seconds=at_s)
        return Sample(at, 10, 0, 0, 0, uptime, "1.2.2", at if sent else None)

    # Starts 4 s apart, uptime 0 or 1 each time: only one of them has a lower uptime.
    startups = [sample(12, 1), sample(8, 0), sample(4, 1), sample(0, 0)]
    assert crash_looping(startups, Thresholds()) is not None
    unsent = [sample(12, 1, sent=False), sample(8, 0, sent=False), sample(4, 1, sent=False)]
    assert crash_looping([*unsent, sample(0, 0, sent=False)], Thresholds()) is None
    # Running on: uptime grows with the clock (whole seconds, truncated), even when the
    # heartbeats come in late or early.
    assert not restarted(sample(10, 3609), sample(0, 3600))
    assert not restarted(sample(10.9, 10), sample(0, 0))
    assert restarted(sample(10, 7), sample(0, 3600))
    assert restarted(sample(10, 5), sample(0, 0))
