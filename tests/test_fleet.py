"""Fleet incidents: many installations of one version with the same problem are one incident
of that version, more severe than each of them; its members are linked and raised. Real
PostgreSQL; installations are rows made here (no API needed: detection reads the tables)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import psycopg
import pytest
from pydantic import ValidationError

from app.core.db import create_engine, create_sessionmaker
from app.core.settings import Settings, libpq_url
from app.incidents.detection import TickResult, detect_once
from app.incidents.repository import Group, open_fleet_incidents


async def tick(settings: Settings) -> TickResult:
    engine = create_engine(settings, role="test")
    try:
        return await detect_once(create_sessionmaker(engine), settings)
    finally:
        await engine.dispose()


def installations(
    db: Any, count: int, *, version: str = "1.2.2", name: str = "payments", prefix: str = "m"
) -> list[str]:
    """`count` healthy installations (heartbeat just now, next one due in 10 minutes), each
    of its own tenant."""
    tag = uuid.uuid4().hex[:6]
    tenants = [f"{prefix}-{tag}-{n}" for n in range(count)]
    for tenant in tenants:
        db.execute("INSERT INTO tenants (id) VALUES (%s)", (tenant,))
    return [
        str(
            db.execute(
                "INSERT INTO merchant_plugins (tenant_id, plugin_name, plugin_version,"
                " last_heartbeat_at, next_expected_at, heartbeat_count)"
                " VALUES (%s, %s, %s, now(), now() + interval '10 minutes', 1) RETURNING id",
                (tenant, name, version),
            ).fetchone()[0]
        )
        for tenant in tenants
    ]


def go_silent(db: Any, ids: list[str], *, minutes: int = 60) -> None:
    db.execute(
        "UPDATE merchant_plugins SET next_expected_at = now() - make_interval(mins => %s)"
        " WHERE id = ANY(%s::uuid[])",
        (minutes, ids),
    )


def fleets(db: Any) -> list[dict[str, Any]]:
    rows = db.execute(
        "SELECT id, plugin_name, plugin_version, type, severity, status, tenant_id,"
        " telemetry_snapshot, occurrences, first_bad_signal_at, detected_at, status_reason,"
        " resolved_at, next_check_at"
        " FROM plugin_incidents WHERE installation_id IS NULL ORDER BY detected_at"
    )
    names = [c.name for c in rows.description]
    return [dict(zip(names, row, strict=True)) for row in rows.fetchall()]


def members(db: Any) -> list[tuple[str, str, Any]]:
    """(installation, severity, fleet incident) of every installation incident."""
    return db.execute(
        "SELECT installation_id::text, severity, fleet_incident_id FROM plugin_incidents"
        " WHERE installation_id IS NOT NULL ORDER BY installation_id"
    ).fetchall()


async def test_fleet_incident_opens_at_the_installation_count_and_not_below(settings, db):
    fleet = installations(db, 10)
    go_silent(db, fleet[:4])
    result = await tick(settings)
    assert (result.opened, result.fleet_opened) == (4, 0)
    assert fleets(db) == []
    assert all(f is None and s == "medium" for _, s, f in members(db))

    go_silent(db, fleet[4:5])  # the fifth
    result = await tick(settings)
    assert (result.opened, result.fleet_opened, result.fleet_linked) == (1, 1, 5)
    [incident] = fleets(db)
    assert incident["plugin_name"] == "payments" and incident["plugin_version"] == "1.2.2"
    assert incident["type"] == "heartbeat_missed"
    assert incident["status"] == "detected" and incident["tenant_id"] is None
    assert incident["severity"] == "high"  # one level above its members' medium
    assert incident["telemetry_snapshot"] == {
        "members": 5,
        "active_installations": 10,
        "share": 0.5,
        "tenants": 5,
        "min_installations": 5,
        "min_share": 0.2,
    }
    assert incident["occurrences"] == 5
    # Every member linked and raised to high (blast radius).
    assert sorted(members(db)) == sorted((i, "high", incident["id"]) for i in fleet[:5])
    # first_bad_signal_at is the earliest member's; detected now.
    earliest = db.execute(
        "SELECT min(first_bad_signal_at) FROM plugin_incidents WHERE installation_id IS NOT NULL"
    ).fetchone()[0]
    assert incident["first_bad_signal_at"] == earliest
    assert incident["detected_at"] > earliest


async def test_fleet_incident_needs_its_share_of_the_active_installations(settings, db):
    fleet = installations(db, 30)
    installations(db, 5, version="1.2.3")  # another version: not in the denominator
    db.execute(
        "UPDATE merchant_plugins SET status = 'disabled' WHERE id = %s", (fleet[-1],)
    )  # nor are disabled installations: 29 active
    go_silent(db, fleet[:5])  # 5 of 29 = 0.17 < 0.2
    result = await tick(settings)
    assert (result.opened, result.fleet_opened) == (5, 0)
    go_silent(db, fleet[5:6])  # 6 of 29 = 0.207
    result = await tick(settings)
    assert (result.opened, result.fleet_opened, result.fleet_linked) == (1, 1, 6)
    [incident] = fleets(db)
    assert incident["telemetry_snapshot"]["share"] == pytest.approx(6 / 29, abs=1e-4)
    assert incident["telemetry_snapshot"]["active_installations"] == 29


async def test_share_exactly_at_the_threshold_opens_one(settings, db):
    fleet = installations(db, 25)
    go_silent(db, fleet[:5])  # 5 of 25 = 0.2 exactly
    assert (await tick(settings)).fleet_opened == 1


async def test_groups_are_per_version_and_per_type(settings, db):
    old = installations(db, 4, version="1.2.2")
    new = installations(db, 4, version="1.2.3")
    go_silent(db, old + new)  # 8 missing, but 4 of each version
    assert (await tick(settings)).opened == 8
    assert fleets(db) == []


async def test_fleet_severity_is_one_above_the_worst_member_capped_at_critical(settings, db):
    fleet = installations(db, 5)
    tenant = db.execute(
        "SELECT tenant_id FROM merchant_plugins WHERE id = %s", (fleet[0],)
    ).fetchone()[0]
    db.execute("UPDATE tenants SET severity_floor = 'critical' WHERE id = %s", (tenant,))
    go_silent(db, fleet)
    assert (await tick(settings)).fleet_opened == 1
    [incident] = fleets(db)
    assert incident["severity"] == "critical"
    # Linking only raises: the critical member stays critical, the others become high.
    assert sorted(s for _, s, _ in members(db)) == ["critical", "high", "high", "high", "high"]


async def test_member_opened_later_is_linked_raised_and_counted(settings, db):
    fleet = installations(db, 10)
    go_silent(db, fleet[:5])
    await tick(settings)
    [before] = fleets(db)
    go_silent(db, fleet[5:6], minutes=120)  # late since longer: an earlier first bad signal
    result = await tick(settings)
    assert (result.opened, result.fleet_opened, result.fleet_linked) == (1, 0, 1)
    [after] = fleets(db)
    assert after["id"] == before["id"]
    assert (fleet[5], "high", after["id"]) in members(db)
    assert after["occurrences"] == 6
    assert after["telemetry_snapshot"]["members"] == 6
    assert after["telemetry_snapshot"]["tenants"] == 6
    assert after["telemetry_snapshot"]["share"] == 0.6
    assert after["first_bad_signal_at"] < before["first_bad_signal_at"]
    assert after["severity"] == "high"  # the new member was medium: one above is high


async def test_member_no_tick_grouped_is_linked_by_a_later_tick(settings, db):
    """An incident the fleet step never saw (its tick died after committing it, or another
    path opened it) joins the open fleet incident of its group on the next tick."""
    fleet = installations(db, 10)
    go_silent(db, fleet[:5])
    await tick(settings)
    db.execute(
        "INSERT INTO plugin_incidents (installation_id, tenant_id, plugin_name, plugin_version,"
        " type, severity, first_bad_signal_at)"
        " SELECT id, tenant_id, plugin_name, plugin_version, 'heartbeat_missed', 'low', now()"
        " FROM merchant_plugins WHERE id = %s",
        (fleet[9],),
    )
    result = await tick(settings)
    assert (result.opened, result.fleet_linked) == (0, 1)
    [incident] = fleets(db)
    assert (fleet[9], "high", incident["id"]) in members(db)


async def test_repeated_ticks_open_no_second_fleet_incident(settings, db):
    fleet = installations(db, 10)
    go_silent(db, fleet[:6])
    assert (await tick(settings)).fleet_opened == 1
    for _ in range(3):
        result = await tick(settings)
        assert (result.fleet_opened, result.fleet_linked, result.fleet_resolved) == (0, 0, 0)
    assert len(fleets(db)) == 1


async def test_threshold_incidents_of_one_version_make_a_fleet_incident_too(settings, db):
    fleet = installations(db, 6)
    for installation in fleet[:5]:
        db.execute(
            "INSERT INTO plugin_heartbeats (installation_id, signed_at, plugin_version, env,"
            " requests, webhook_attempts, webhook_failures, msg_digest)"
            " VALUES (%s, now(), '1.2.2', 'prod', 100, 50, 30, %s)",
            (installation, uuid.uuid4().bytes),
        )
    result = await tick(settings)
    assert (result.opened, result.fleet_opened, result.fleet_linked) == (5, 1, 5)
    [incident] = fleets(db)
    assert (incident["type"], incident["severity"]) == ("webhook_fail_rate", "high")


async def test_two_ticks_at_once_open_one_fleet_incident(settings, db):
    fleet = installations(db, 12)
    go_silent(db, fleet)
    results = await asyncio.gather(tick(settings), tick(settings), tick(settings))
    assert sum(r.opened for r in results) == 12
    assert sum(r.fleet_opened for r in results) == 1
    [incident] = fleets(db)
    assert all(f == incident["id"] for _, _, f in members(db))
    assert incident["occurrences"] == 12


async def test_concurrent_openers_of_one_group_insert_once(settings, db):
    """The second opener waits on the first's uncommitted insert (the partial unique index),
    then inserts nothing."""
    fleet = installations(db, 5)
    go_silent(db, fleet)
    settings_no_fleet = settings.model_copy(update={"fleet_min_installations": 100})
    assert (await tick(settings_no_fleet)).opened == 5  # incidents, no fleet yet
    group = [Group("payments", "1.2.2", "heartbeat_missed")]
    engine = create_engine(settings, role="test")
    try:
        maker = create_sessionmaker(engine)
        async with maker() as first, maker() as second:
            await first.begin()
            await second.begin()
            opened = await open_fleet_incidents(first, group, min_installations=5, min_share=0.2)
            racing = asyncio.create_task(
                open_fleet_incidents(second, group, min_installations=5, min_share=0.2)
            )
            await asyncio.sleep(0.3)
            assert not racing.done()  # waiting on the first one's row
            await first.commit()
            assert len(opened) == 1
            assert await racing == []
            await second.commit()
    finally:
        await engine.dispose()
    assert len(fleets(db)) == 1


async def test_fleet_incident_resolves_when_every_member_is_closed(settings, db):
    fleet = installations(db, 10)
    go_silent(db, fleet[:5])
    await tick(settings)
    # The healing loop escalates the fleet incident itself; ops and the loop close members.
    db.execute("UPDATE plugin_incidents SET status = 'escalated' WHERE installation_id IS NULL")
    for status, installation in zip(
        ("resolved", "rolled_back", "failed", "ignored"), fleet, strict=False
    ):
        db.execute(
            "UPDATE plugin_incidents SET status = %s WHERE installation_id = %s",
            (status, installation),
        )
    assert (await tick(settings)).fleet_resolved == 0  # one member is still open
    assert fleets(db)[0]["status"] == "escalated"
    db.execute(
        "UPDATE plugin_incidents SET status = 'cancelled' WHERE installation_id = %s",
        (fleet[4],),
    )
    assert (await tick(settings)).fleet_resolved == 1
    [incident] = fleets(db)
    assert incident["status"] == "resolved"
    assert incident["status_reason"] == "every member incident is closed"
    assert incident["resolved_at"] is not None and incident["next_check_at"] is None


async def test_fleet_incident_resolves_in_the_tick_its_last_member_recovers(settings, db):
    fleet = installations(db, 5)
    go_silent(db, fleet)
    assert (await tick(settings)).fleet_opened == 1
    # Heartbeats resume: the ingest stores their samples, clears missed_since and counts them
    # (recovery is looked at for the installations that sent samples since the last tick).
    for installation in fleet:
        for _ in range(settings.recovery_heartbeats):
            db.execute(
                "INSERT INTO plugin_heartbeats (installation_id, signed_at, plugin_version, env,"
                " requests, msg_digest) VALUES (%s, now(), '1.2.2', 'prod', 100, %s)",
                (installation, uuid.uuid4().bytes),
            )
    db.execute(
        "UPDATE merchant_plugins SET heartbeat_count = heartbeat_count + %s,"
        " missed_since = NULL, next_expected_at = now() + interval '10 minutes'",
        (settings.recovery_heartbeats,),
    )
    result = await tick(settings)
    assert (result.resolved, result.fleet_resolved) == (5, 1)
    assert fleets(db)[0]["status"] == "resolved"
    # Later trouble of the same version is a new fleet incident.
    go_silent(db, fleet)
    assert (await tick(settings)).fleet_opened == 1
    assert [f["status"] for f in fleets(db)] == ["resolved", "detected"]


async def test_fleet_incident_waits_for_members_not_yet_linked(settings, db):
    """Resolution needs every open incident of the group closed, linked or not: here a new
    one is held by someone else (a healing step, say) while its tick runs, so the fleet step
    skips it instead of waiting, and must not resolve the fleet incident meanwhile."""
    fleet = installations(db, 10)
    go_silent(db, fleet[:5])
    await tick(settings)
    db.execute("UPDATE plugin_incidents SET status = 'resolved' WHERE installation_id IS NOT NULL")
    late = db.execute(
        "INSERT INTO plugin_incidents (installation_id, tenant_id, plugin_name, plugin_version,"
        " type, severity) SELECT id, tenant_id, plugin_name, plugin_version,"
        " 'heartbeat_missed', 'medium' FROM merchant_plugins WHERE id = %s RETURNING id",
        (fleet[9],),
    ).fetchone()[0]
    assert settings.database_url
    with psycopg.connect(libpq_url(settings.database_url)) as holder:
        holder.execute("SELECT 1 FROM plugin_incidents WHERE id = %s FOR UPDATE", (late,))
        result = await tick(settings)
        assert (result.fleet_linked, result.fleet_resolved) == (0, 0)
        holder.rollback()
    result = await tick(settings)
    assert (result.fleet_linked, result.fleet_resolved) == (1, 0)
    assert fleets(db)[0]["status"] == "detected"


def test_fleet_settings_are_validated():
    assert Settings(database_url=None).fleet_min_installations == 5
    assert Settings(database_url=None).fleet_min_share == 0.2
    with pytest.raises(ValidationError, match="greater than or equal to 2"):
        Settings(fleet_min_installations=1)
    # As an operator sets it: the error names the variable.
    with pytest.raises(ValidationError, match="SELFHEAL_FLEET_MIN_SHARE"):
        Settings(SELFHEAL_FLEET_MIN_SHARE="1.5")


async def test_ops_api_shows_the_fleet_incident_with_its_members(settings, client, viewer, db):
    fleet = installations(db, 5)
    go_silent(db, fleet)
    await tick(settings)
    [incident] = fleets(db)
    detail = (
        await client.get(f"/api/ops/plugin-incidents/{incident['id']}", headers=viewer.auth)
    ).json()
    assert detail["installation_id"] is None and detail["tenant_id"] is None
    assert detail["telemetry_snapshot"]["members"] == 5
    assert sorted(m["installation_id"] for m in detail["members"]) == sorted(fleet)
    assert {m["fleet_incident_id"] for m in detail["members"]} == {str(incident["id"])}
    listed = (
        await client.get("/api/ops/plugin-incidents", params={"limit": 10}, headers=viewer.auth)
    ).json()["items"]
    assert len(listed) == 6


async def test_incidents_of_disabled_installations_neither_make_nor_hold_a_fleet_incident(
    settings, db
):
    fleet = installations(db, 10)
    go_silent(db, fleet[:4])
    assert (await tick(settings)).opened == 4
    # Three of them are disabled (an operator's decision; their incidents stay as they are).
    db.execute(
        "UPDATE merchant_plugins SET status = 'disabled' WHERE id = ANY(%s::uuid[])", (fleet[:3],)
    )
    go_silent(db, fleet[4:6])
    result = await tick(settings)
    # 3 open incidents of active installations out of 7 active: no fleet incident (5 needed).
    assert (result.opened, result.fleet_opened) == (2, 0)
    go_silent(db, fleet[6:8])
    result = await tick(settings)
    assert (result.opened, result.fleet_opened, result.fleet_linked) == (2, 1, 5)
    [incident] = fleets(db)
    assert incident["telemetry_snapshot"]["members"] == 5
    assert incident["telemetry_snapshot"]["active_installations"] == 7
