"""Set-based detection (issue 11, item 3): a tick records all its findings in one statement,
never waits for an incident row a healing step holds (the repeat is counted by the next tick),
opens each incident once however many ticks run at once; recovery of missed heartbeats looks
only at the installations that sent heartbeats; fleet members get their own severity back
when their fleet incident closes. Real PostgreSQL; installations and samples are rows made
here, heartbeats through the API where the ingest's side effects matter."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from sqlalchemy import event

from app.core.db import create_engine, create_sessionmaker
from app.core.settings import Settings, libpq_url
from app.healing.repository import load_state
from app.incidents.detection import TickResult, detect_once
from tests.support.detection import tick

# Generous: a tick takes milliseconds; this only bounds a tick that waits on a lock.
TICK_DEADLINE_S = 30.0


def no_fleet(settings: Settings) -> Settings:
    """These tests look at installation incidents: no fleet incident raising them."""
    return settings.model_copy(update={"fleet_min_installations": 10_000})


def installations(db: Any, count: int, *, version: str = "1.2.2") -> list[str]:
    """`count` healthy installations, each of its own tenant, due again in 10 minutes."""
    tag = uuid.uuid4().hex[:6]
    ids = []
    for n in range(count):
        tenant = f"t-{tag}-{n}"
        db.execute("INSERT INTO tenants (id) VALUES (%s)", (tenant,))
        ids.append(
            str(
                db.execute(
                    "INSERT INTO merchant_plugins (tenant_id, plugin_name, plugin_version,"
                    " last_heartbeat_at, next_expected_at, heartbeat_count)"
                    " VALUES (%s, 'payments', %s, now(), now() + interval '10 minutes', 1)"
                    " RETURNING id",
                    (tenant, version),
                ).fetchone()[0]
            )
        )
    return ids


def failing_sample(db: Any, installation: str, *, failures: int = 30) -> None:
    """A stored sample with `failures` of 50 webhook deliveries failed (30: a medium
    webhook_fail_rate incident, 48: a high one)."""
    db.execute(
        "INSERT INTO plugin_heartbeats (installation_id, signed_at, plugin_version, env,"
        " requests, webhook_attempts, webhook_failures, msg_digest)"
        " VALUES (%s, now(), '1.2.2', 'prod', 100, 50, %s, %s)",
        (installation, failures, uuid.uuid4().bytes),
    )


def heartbeats_resume(db: Any, installation: str, count: int) -> None:
    """`count` healthy heartbeats as the ingest stores them: a sample each, counted on the
    installation, which is no longer missing and due again in 10 minutes."""
    for _ in range(count):
        failing_sample(db, installation, failures=0)
    db.execute(
        "UPDATE merchant_plugins SET heartbeat_count = heartbeat_count + %s, missed_since = NULL,"
        " last_heartbeat_at = now(), next_expected_at = now() + interval '10 minutes'"
        " WHERE id = %s",
        (count, installation),
    )


def go_silent(db: Any, ids: list[str]) -> None:
    db.execute(
        "UPDATE merchant_plugins SET next_expected_at = now() - interval '1 hour'"
        " WHERE id = ANY(%s::uuid[])",
        (ids,),
    )


def incident_rows(db: Any) -> list[tuple[Any, ...]]:
    return db.execute(
        "SELECT installation_id::text, type, severity, occurrences, status"
        " FROM plugin_incidents WHERE installation_id IS NOT NULL ORDER BY installation_id, type"
    ).fetchall()


@contextmanager
def holding(settings: Settings, sql: str, params: tuple[Any, ...]) -> Iterator[None]:
    """Another session (a healing step, another worker) holds the rows `sql` locks until the
    block ends."""
    assert settings.database_url
    with psycopg.connect(libpq_url(settings.database_url)) as holder:
        assert holder.execute(sql, params).fetchall(), "nothing locked"
        try:
            yield
        finally:
            holder.rollback()


async def counted_tick(settings: Settings) -> tuple[TickResult, int]:
    """One tick, and how many statements it executed."""
    engine = create_engine(settings, role="test")
    executed = 0

    def count(*_args: Any) -> None:
        nonlocal executed
        executed += 1

    event.listen(engine.sync_engine, "before_cursor_execute", count)
    try:
        return await detect_once(create_sessionmaker(engine), settings), executed
    finally:
        await engine.dispose()


# --- one statement per tick ---------------------------------------------------------------


async def test_a_burst_of_findings_is_written_in_one_statement_per_tick(settings, db):
    """A tick executes as many statements for 40 sick installations as for one: their
    incidents are opened, then repeated, by one statement."""
    settings = no_fleet(settings)
    lone, *burst = installations(db, 41)
    failing_sample(db, lone)
    result, one = await counted_tick(settings)
    assert (result.opened, result.repeated) == (1, 0)

    for installation in burst:
        failing_sample(db, installation)
    result, statements = await counted_tick(settings)
    assert (result.opened, result.repeated, statements) == (40, 0, one)

    # Worse now, on every installation: 41 repeats.
    for installation in [lone, *burst]:
        failing_sample(db, installation, failures=48)
    result, statements = await counted_tick(settings)
    assert (result.opened, result.repeated, result.deferred, statements) == (0, 41, 0, one)
    assert incident_rows(db) == [
        (installation, "webhook_fail_rate", "high", 2, "detected")
        for installation in sorted([lone, *burst])
    ]


async def test_repeats_keep_the_tenant_floor_and_only_raise_the_severity(settings, db):
    settings = no_fleet(settings)
    floored, plain = installations(db, 2)
    db.execute(
        "UPDATE tenants SET severity_floor = 'critical'"
        " WHERE id = (SELECT tenant_id FROM merchant_plugins WHERE id = %s)",
        (floored,),
    )
    for installation in (floored, plain):
        failing_sample(db, installation, failures=48)  # high
    assert (await tick(settings)).opened == 2
    for installation in (floored, plain):
        failing_sample(db, installation, failures=30)  # medium: does not lower anything
    assert (await tick(settings)).repeated == 2
    assert dict((r[0], r[2:4]) for r in incident_rows(db)) == {
        floored: ("critical", 2),
        plain: ("high", 2),
    }


# --- short lock holds ------------------------------------------------------------------------


async def test_a_repeat_on_an_incident_a_healing_step_holds_is_counted_by_the_next_tick(
    settings, db
):
    settings = no_fleet(settings)
    held, other, new = installations(db, 3)
    for installation in (held, other):
        failing_sample(db, installation)
    assert (await tick(settings)).opened == 2
    held_incident = db.execute(
        "SELECT id FROM plugin_incidents WHERE installation_id = %s", (held,)
    ).fetchone()[0]

    for installation in (held, other):
        failing_sample(db, installation, failures=48)
    failing_sample(db, new)
    with holding(
        settings, "SELECT id FROM plugin_incidents WHERE id = %s FOR UPDATE", (held_incident,)
    ):
        # The tick completes while the row is held: it skips that repeat, records the others.
        result = await asyncio.wait_for(tick(settings), TICK_DEADLINE_S)
        assert (result.opened, result.repeated, result.deferred) == (1, 1, 1)
        assert dict((r[0], r[2:4]) for r in incident_rows(db)) == {
            held: ("medium", 1),
            other: ("high", 2),
            new: ("medium", 1),
        }
        # Held still: the next tick (no new samples) defers it again, without waiting.
        result = await asyncio.wait_for(tick(settings), TICK_DEADLINE_S)
        assert (result.repeated, result.deferred) == (0, 1)

    # Released: the next tick, with nothing new to read, records the deferred repeat.
    result = await tick(settings)
    assert (result.opened, result.repeated, result.deferred) == (0, 1, 0)
    assert dict((r[0], r[2:4]) for r in incident_rows(db))[held] == ("high", 2)
    assert db.execute("SELECT count(*) FROM plugin_incident_repeats").fetchone()[0] == 0
    assert (await tick(settings)).repeated == 0  # counted once


async def test_a_deferred_repeat_of_an_incident_closed_meanwhile_is_dropped(settings, db):
    settings = no_fleet(settings)
    [installation] = installations(db, 1)
    failing_sample(db, installation)
    assert (await tick(settings)).opened == 1
    incident = db.execute("SELECT id FROM plugin_incidents").fetchone()[0]
    failing_sample(db, installation)
    with holding(settings, "SELECT id FROM plugin_incidents WHERE id = %s FOR UPDATE", (incident,)):
        assert (await asyncio.wait_for(tick(settings), TICK_DEADLINE_S)).deferred == 1
    db.execute("UPDATE plugin_incidents SET status = 'resolved' WHERE id = %s", (incident,))
    result = await tick(settings)
    assert (result.opened, result.repeated, result.deferred) == (0, 0, 0)
    assert db.execute("SELECT count(*) FROM plugin_incident_repeats").fetchone()[0] == 0
    assert incident_rows(db) == [(installation, "webhook_fail_rate", "medium", 1, "resolved")]


async def test_resolving_an_incident_a_healing_step_holds_waits_for_the_next_heartbeat(
    settings, db
):
    settings = no_fleet(settings)
    [installation] = installations(db, 1)
    failing_sample(db, installation)
    assert (await tick(settings)).opened == 1
    incident = db.execute("SELECT id FROM plugin_incidents").fetchone()[0]
    for _ in range(settings.recovery_heartbeats):
        failing_sample(db, installation, failures=0)
    with holding(settings, "SELECT id FROM plugin_incidents WHERE id = %s FOR UPDATE", (incident,)):
        assert (await asyncio.wait_for(tick(settings), TICK_DEADLINE_S)).resolved == 0
    failing_sample(db, installation, failures=0)
    assert (await tick(settings)).resolved == 1


# --- two ticks at once ---------------------------------------------------------------------


async def test_concurrent_ticks_open_each_incident_once_and_count_each_repeat_once(settings, db):
    settings = no_fleet(settings)
    sick = installations(db, 20)
    for installation in sick:
        failing_sample(db, installation)
    results = await asyncio.gather(*(tick(settings) for _ in range(3)))
    assert sum(r.opened for r in results) == 20
    for installation in sick:
        failing_sample(db, installation)
    results = await asyncio.gather(*(tick(settings) for _ in range(3)))
    assert (sum(r.opened for r in results), sum(r.repeated for r in results)) == (0, 20)
    assert incident_rows(db) == [
        (installation, "webhook_fail_rate", "medium", 2, "detected")
        for installation in sorted(sick)
    ]


# --- recovery of missed heartbeats -----------------------------------------------------------


async def test_missed_heartbeat_recovery_looks_only_at_installations_that_sent_heartbeats(
    settings, db
):
    settings = no_fleet(settings)
    back, silent = installations(db, 2)
    go_silent(db, [back, silent])
    assert (await tick(settings)).opened == 2
    # The silent one's heartbeat_count moves without a heartbeat (no sample): not a recovery
    # this tick can see, and not a row it looks at.
    db.execute(
        "UPDATE merchant_plugins SET heartbeat_count = heartbeat_count + 100 WHERE id = %s",
        (silent,),
    )
    heartbeats_resume(db, back, settings.recovery_heartbeats)
    assert (await tick(settings)).resolved == 1
    assert db.execute(
        "SELECT installation_id::text, status FROM plugin_incidents ORDER BY status"
    ).fetchall() == [(silent, "detected"), (back, "resolved")]
    assert (await tick(settings)).resolved == 0
    # Its next heartbeat (a sample) lets the tick look at it: it has sent enough.
    heartbeats_resume(db, silent, 1)
    assert (await tick(settings)).resolved == 1


async def test_missed_heartbeat_recovery_skipped_by_a_tick_is_made_by_the_watermark_holder(
    settings, db
):
    """A tick that finds the watermark held (another worker is reading) skips recovery too;
    the samples it did not read are read, and the recovery made, by the next one."""
    settings = no_fleet(settings)
    [installation] = installations(db, 1)
    go_silent(db, [installation])
    assert (await tick(settings)).opened == 1
    heartbeats_resume(db, installation, settings.recovery_heartbeats)
    with holding(
        settings, "SELECT name FROM detector_watermarks WHERE name = 'samples' FOR UPDATE", ()
    ):
        assert (await asyncio.wait_for(tick(settings), TICK_DEADLINE_S)).resolved == 0
    assert (await tick(settings)).resolved == 1


# --- fleet members' severity -----------------------------------------------------------------


async def test_fleet_members_get_their_own_severity_back_when_the_fleet_incident_closes(
    settings, client, operator, db
):
    fleet = installations(db, 6)
    repeated, floored, escalated, plain, closed = fleet[:5]
    for installation in fleet[:5]:
        failing_sample(db, installation)  # medium each; 5 of 6: a fleet incident
    result = await tick(settings)
    assert (result.opened, result.fleet_opened, result.fleet_linked) == (5, 1, 5)
    fleet_id = db.execute(
        "SELECT id FROM plugin_incidents WHERE installation_id IS NULL"
    ).fetchone()[0]
    assert {r[2] for r in incident_rows(db)} == {"high"}  # raised by the blast radius

    # While linked: a repeat raises what the member is on its own too (high), a tenant floor
    # raised meanwhile comes with its repeat (critical), the healing loop escalates one to
    # critical, one member closes.
    db.execute(
        "UPDATE tenants SET severity_floor = 'critical'"
        " WHERE id = (SELECT tenant_id FROM merchant_plugins WHERE id = %s)",
        (floored,),
    )
    failing_sample(db, repeated, failures=48)
    failing_sample(db, floored)
    assert (await tick(settings)).repeated == 2
    db.execute(
        "UPDATE plugin_incidents SET status = 'escalated', severity = 'critical'"
        " WHERE installation_id = %s",
        (escalated,),
    )
    db.execute(
        "UPDATE plugin_incidents SET status = 'resolved' WHERE installation_id = %s", (closed,)
    )

    # An operator resolves the fleet incident while members are still open.
    response = await client.post(
        f"/api/ops/plugin-incidents/{fleet_id}/manual-action",
        json={"action": "resolve"},
        headers=operator.auth,
    )
    assert response.status_code == 200, response.text
    assert {r[0]: r[2] for r in incident_rows(db)} == {
        repeated: "high",  # its own, after its repeat
        floored: "critical",
        escalated: "critical",  # the loop's escalation is not the fleet's to undo
        plain: "medium",  # its rule's
        closed: "high",  # closed members are history: left as they were
    }
    # Only the closed member still says what it was before the raise.
    kept = db.execute("SELECT count(*) FROM plugin_incidents WHERE own_severity IS NOT NULL")
    assert kept.fetchone()[0] == 1

    # The healing loop (and its policy gate, which it feeds) reads the lowered severity.
    plain_id = db.execute(
        "SELECT id FROM plugin_incidents WHERE installation_id = %s", (plain,)
    ).fetchone()[0]
    engine = create_engine(settings, role="test")
    try:
        async with create_sessionmaker(engine)() as session:
            state = await load_state(session, plain_id)
    finally:
        await engine.dispose()
    assert state is not None and state.severity == "medium"


async def test_members_get_their_own_severity_back_when_the_tick_resolves_the_fleet_incident(
    settings, db
):
    """The fleet step resolves a fleet incident once no member of an active installation is
    open: a member of a disabled installation, still open, drops its raise then."""
    fleet = installations(db, 5)
    for installation in fleet:
        failing_sample(db, installation)
    assert (await tick(settings)).fleet_opened == 1
    db.execute("UPDATE merchant_plugins SET status = 'disabled' WHERE id = %s", (fleet[0],))
    db.execute(
        "UPDATE plugin_incidents SET status = 'resolved' WHERE installation_id = ANY(%s::uuid[])",
        (fleet[1:],),
    )
    assert (await tick(settings)).fleet_resolved == 1
    assert db.execute(
        "SELECT severity, status, own_severity FROM plugin_incidents WHERE installation_id = %s",
        (fleet[0],),
    ).fetchone() == ("medium", "detected", None)
