"""plugin_heartbeats partitioned by signed time (migration 0017, docs/partitioning.md): the replay
guard across partition boundaries, partitions made ahead from the application's role (which
still cannot create or drop a table itself), expired partitions dropped whole but never one the
detector has not read while heartbeats keep flowing, the detection scans reading the recent
partitions only, and an existing table migrated with its rows and ids."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from alembic import command
from psycopg import errors
from sqlalchemy import event

from app.core.db import create_engine, create_sessionmaker
from app.core.migrations import grant_app_login
from app.incidents.detection import detect_once
from app.plugins.retention import prune_heartbeats
from tests.support.api import serve
from tests.support.databases import connect
from tests.support.plugins import heartbeat_body, register, send_heartbeat
from tests.support.reads import add_heartbeat
from tests.support.settings import app_url, make_settings
from tests.test_schema import alembic_config, empty_database
from workers.main import prune

Row = tuple[str, datetime, datetime]


def partitions(db: psycopg.Connection[Any]) -> list[Row]:
    """(name, starts_at, ends_at) of every partition, oldest first."""
    return [tuple(r) for r in db.execute("SELECT * FROM selfheal_heartbeat_partitions()")]


def contiguous(rows: list[Row]) -> bool:
    return all(a[2] == b[1] for a, b in itertools.pairwise(rows))


def drop_all_partitions(db: psycopg.Connection[Any]) -> None:
    for name, _, _ in partitions(db):
        db.execute(f'DROP TABLE "{name}"')


def make_installation(db: psycopg.Connection[Any]) -> uuid.UUID:
    db.execute("INSERT INTO tenants (id) VALUES ('t1') ON CONFLICT DO NOTHING")
    row = db.execute(
        "INSERT INTO merchant_plugins (tenant_id, plugin_name, plugin_version)"
        " VALUES ('t1', 'payments', '1.2.2') RETURNING id"
    ).fetchone()
    assert row is not None
    return uuid.UUID(str(row[0]))


def sample_at(db: psycopg.Connection[Any], installation: uuid.UUID, at: str) -> int:
    """A sample signed and received at the SQL expression `at`; its id."""
    row = db.execute(
        "INSERT INTO plugin_heartbeats (installation_id, received_at, signed_at, plugin_version,"
        f" env, msg_digest) VALUES (%s, {at}, {at}, '1.2.2', 'prod', %s) RETURNING id",
        (installation, uuid.uuid4().bytes),
    ).fetchone()
    assert row is not None
    return int(row[0])


# --- the replay guard -----------------------------------------------------------------------


async def test_a_replay_is_refused_across_a_partition_boundary(settings, db):
    """Hourly partitions and an hour of tolerance: the heartbeat is signed on one side of an
    hour boundary and arrives (twice) on the other. It is stored in the partition of its signed
    time; the replay has the same signed time, meets the same unique index, and is refused."""
    settings = settings.model_copy(
        update={
            "signature_tolerance_s": 3600,
            "heartbeat_partition_hours": 1,
            "heartbeat_partitions_ahead_hours": 3,
        }
    )
    drop_all_partitions(db)  # the migration's daily ones (empty): the API makes hourly ones
    plugin = await register(settings)
    async with serve(settings) as (_, client):
        made = partitions(db)  # by the API as it started
        assert made and all(end - start == timedelta(hours=1) for _, start, end in made)
        assert contiguous(made)
        # The hour boundary nearest now; not one a few seconds ahead, which the request could
        # reach before it is stored.
        while 0 < round(time.time() / 3600) * 3600 - time.time() < 10:
            await asyncio.sleep(0.5)
        now = time.time()
        boundary = round(now / 3600) * 3600
        signed = boundary - 1 if boundary <= now else boundary
        body = heartbeat_body(uptime_s=4242)
        first = await send_heartbeat(client, plugin, body, timestamp=signed)
        assert first.status_code == 200, first.text
        stored_in, arrived_in = db.execute(
            "SELECT h.tableoid::regclass::text,"
            " (SELECT p.name FROM selfheal_heartbeat_partitions() p"
            "  WHERE h.received_at >= p.starts_at AND h.received_at < p.ends_at)"
            " FROM plugin_heartbeats h"
        ).fetchone()
        assert stored_in != arrived_in  # stored by signed time, not by arrival
        replay = await send_heartbeat(client, plugin, body, timestamp=signed)
        assert replay.status_code == 401
        assert replay.json()["error"]["code"] == "replay"
    assert db.execute("SELECT count(*) FROM plugin_heartbeats").fetchone() == (1,)


# --- partitions made ahead ------------------------------------------------------------------


def test_ensure_makes_exactly_the_missing_partitions_from_the_app_role(db, app_db):
    before = partitions(db)
    assert len(before) >= 8  # the migration's: an hour behind to a week ahead, daily
    assert contiguous(before)
    assert before[-1][2] >= datetime.now(UTC) + timedelta(hours=168)
    for name, _, _ in (before[3], before[5]):
        db.execute(f'DROP TABLE "{name}"')

    ensure = "SELECT selfheal_ensure_heartbeat_partitions(%s, %s)"
    assert app_db.execute(ensure, (24, 168)).fetchone() == (2,)
    assert partitions(db) == before
    assert app_db.execute(ensure, (24, 168)).fetchone() == (0,)  # idempotent

    # A new span: only the partitions made from now on get it, after the daily ones, no gap.
    assert app_db.execute(ensure, (6, 168 + 48)).fetchone()[0] >= 4
    after = partitions(db)
    assert after[: len(before)] == before
    assert contiguous(after)
    assert all(end - start == timedelta(hours=6) for _, start, end in after[len(before) :])
    assert after[-1][2] >= datetime.now(UTC) + timedelta(hours=168 + 48)

    # The owner made them; the application reaches them through the parent only.
    owned = db.execute(
        "SELECT count(*) FROM pg_class c JOIN pg_inherits i ON i.inhrelid = c.oid"
        " WHERE i.inhparent = 'plugin_heartbeats'::regclass"
        "   AND pg_get_userbyid(c.relowner) = current_user"
    ).fetchone()
    assert owned == (len(after),)
    assert app_db.execute(
        "SELECT has_table_privilege(%s, 'INSERT')", (after[-1][0],)
    ).fetchone() == (False,)


@pytest.mark.parametrize(
    "statement",
    [
        "CREATE TABLE plugin_heartbeats_p2099010100 (LIKE plugin_heartbeats)",
        "CREATE TABLE plugin_heartbeats_p2099010100 PARTITION OF plugin_heartbeats"
        " FOR VALUES FROM ('2099-01-01') TO ('2099-01-02')",
        "DROP TABLE {partition}",
        "ALTER TABLE plugin_heartbeats DETACH PARTITION {partition}",
        "SELECT selfheal_create_heartbeat_partitions(24, now(), now() + interval '1 day')",
    ],
)
def test_the_app_role_still_cannot_create_or_drop_tables_itself(db, app_db, statement):
    name = partitions(db)[-1][0]
    with pytest.raises(errors.InsufficientPrivilege):
        app_db.execute(statement.format(partition=name))


@pytest.mark.parametrize(
    "call",
    [
        "selfheal_ensure_heartbeat_partitions(5, 168)",  # 5 does not divide 24
        "selfheal_ensure_heartbeat_partitions(36, 168)",
        "selfheal_ensure_heartbeat_partitions(24, 0)",
        "selfheal_ensure_heartbeat_partitions(1, 2000)",  # 2,000 partitions ahead
        "selfheal_ensure_heartbeat_partitions(NULL, 168)",
        "selfheal_drop_heartbeat_partitions(0, NULL)",
        "selfheal_drop_heartbeat_partitions(-3, 10)",
    ],
)
def test_the_owner_run_functions_check_their_arguments(app_db, call):
    with pytest.raises(errors.InvalidParameterValue):
        app_db.execute(f"SELECT {call}")


# --- retention ------------------------------------------------------------------------------


async def test_drop_takes_only_expired_read_partitions_while_heartbeats_flow(settings, db, app_db):
    installation = make_installation(db)
    db.execute("SELECT selfheal_create_heartbeat_partitions(24, now() - interval '20 days', now())")
    read = [sample_at(db, installation, f"now() - interval '{d} days'") for d in (19, 17)]
    unread_old = sample_at(db, installation, "now() - interval '15 days'")
    recent = sample_at(db, installation, "now() - interval '13 days'")
    db.execute("UPDATE detector_watermarks SET last_id = %s WHERE name = 'samples'", (read[-1],))
    unread_partition = db.execute(
        "SELECT tableoid::regclass::text FROM plugin_heartbeats WHERE id = %s", (unread_old,)
    ).fetchone()[0]
    expired = {
        name for name, _, end in partitions(db) if end <= datetime.now(UTC) - timedelta(days=14)
    }
    assert len(expired) >= 5 and unread_partition in expired

    settings = settings.model_copy(update={"rate_per_installation": 0})  # 40 in a row
    plugin = await register(settings)
    engine = create_engine(settings, role="test")
    maker = create_sessionmaker(engine)
    try:
        async with serve(settings) as (_, client):

            async def flow() -> list[int]:
                return [(await send_heartbeat(client, plugin)).status_code for _ in range(40)]

            async def prunes() -> list[dict[str, int]]:
                ctx = {"settings": settings, "sessionmaker": maker}
                return [await prune(ctx) for _ in range(3)]

            statuses, results = await asyncio.gather(flow(), prunes())
            assert statuses == [200] * 40
            assert sum(r["dropped"] for r in results) == len(expired) - 1
            left = {name for name, _, _ in partitions(db)}
            assert left & expired == {unread_partition}
            ids = [r[0] for r in db.execute("SELECT id FROM plugin_heartbeats ORDER BY id")]
            assert ids[:2] == [unread_old, recent] and len(ids) == 42

            # A caller cannot push the watermark: the detector's own counts.
            assert app_db.execute(
                "SELECT selfheal_drop_heartbeat_partitions(14, %s)", (ids[-1],)
            ).fetchone() == ([],)

            # Read now: its partition goes at the next prune; heartbeats still come in.
            db.execute(
                "UPDATE detector_watermarks SET last_id = %s WHERE name = 'samples'", (ids[-1],)
            )
            upkeep = await prune_heartbeats(maker, settings)
            assert (upkeep.dropped, upkeep.busy) == ((unread_partition,), False)
            assert (await send_heartbeat(client, plugin)).status_code == 200
    finally:
        await engine.dispose()
    assert db.execute("SELECT count(*) FROM plugin_heartbeats").fetchone() == (42,)


async def test_a_busy_table_is_left_for_the_next_prune(settings, db):
    """The drop waits at most 3 s for its lock: a long reader makes it give up, not queue."""
    installation = make_installation(db)
    db.execute("SELECT selfheal_create_heartbeat_partitions(24, now() - interval '20 days', now())")
    sample_at(db, installation, "now() - interval '19 days'")
    engine = create_engine(settings, role="test")
    try:
        with connect(settings.migration_url) as reader, reader.transaction():
            reader.execute("LOCK TABLE plugin_heartbeats IN ACCESS SHARE MODE")
            reader.execute("SELECT count(*) FROM plugin_heartbeats")
            upkeep = await prune_heartbeats(create_sessionmaker(engine), settings)
        assert upkeep.busy and upkeep.dropped == ()
        upkeep = await prune_heartbeats(create_sessionmaker(engine), settings)
        assert not upkeep.busy and len(upkeep.dropped) >= 5
    finally:
        await engine.dispose()


# --- partition pruning of the detection scans -----------------------------------------------


def executed_partitions(plan: Any) -> set[str]:
    """The partitions an EXPLAIN (ANALYZE, FORMAT JSON) plan actually scanned."""
    found: set[str] = set()

    def walk(node: dict[str, Any]) -> None:
        name = node.get("Relation Name", "")
        if name.startswith("plugin_heartbeats_p") and node.get("Actual Loops", 0) > 0:
            found.add(name)
        for child in node.get("Plans", []):
            walk(child)

    walk(plan[0]["Plan"])
    return found


async def test_the_detection_scans_read_only_the_recent_partitions(settings, db):
    installation = make_installation(db)
    db.execute("SELECT selfheal_create_heartbeat_partitions(24, now() - interval '9 days', now())")
    for days in range(1, 9):
        add_heartbeat(db, str(installation), ago_s=days * 86400 + 600)
    add_heartbeat(db, str(installation), ago_s=5)
    every = partitions(db)
    assert len(every) >= 10
    engine = create_engine(settings, role="test")
    statements: list[tuple[str, Any]] = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        if "plugin_heartbeats" in statement:
            statements.append((statement, parameters))

    try:
        # The first tick reads everything and sets the watermark; the second is the one seen.
        await detect_once(create_sessionmaker(engine), settings)
        add_heartbeat(db, str(installation), ago_s=1)
        event.listen(engine.sync_engine, "before_cursor_execute", capture)
        await detect_once(create_sessionmaker(engine), settings)
    finally:
        await engine.dispose()

    assert len(statements) >= 3  # the claim, the samples, the watermark (and what else reads)
    now = datetime.now(UTC)
    recent = {
        name
        for name, start, end in every
        if end > now - timedelta(days=1, hours=4) and start < now + timedelta(hours=4)
    }
    for statement, parameters in statements:
        with db.transaction(force_rollback=True):
            plan = db.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + statement, parameters).fetchone()[
                0
            ]
        scanned = executed_partitions(plan if isinstance(plan, list) else json.loads(plan))
        assert scanned <= recent, (statement, scanned)
        assert len(scanned) <= 3


# --- migrating an existing table -------------------------------------------------------------


async def test_an_existing_table_is_migrated_with_its_rows_ids_and_guard(servers, redis_prefix):
    with empty_database(servers.admin_url, servers.database_url) as url:
        config = alembic_config(url)
        command.upgrade(config, "0016_tenant_scope")
        with connect(url) as db:
            installation = make_installation(db)
            for hours in range(1, 61):  # 60 samples over two and a half days
                db.execute(
                    "INSERT INTO plugin_heartbeats (installation_id, received_at, plugin_version,"
                    " env, requests, msg_digest)"
                    " VALUES (%s, now() - make_interval(hours => %s), '1.2.2', 'prod', %s, %s)",
                    (installation, hours, hours, uuid.uuid4().bytes),
                )
            # Ids used and gone (a deleted row, a rolled-back insert): the sequence is past them,
            # and so is the detector's watermark.
            db.execute("DELETE FROM plugin_heartbeats WHERE id > 58")
            db.execute("UPDATE detector_watermarks SET last_id = 60 WHERE name = 'samples'")
            before = db.execute(
                "SELECT id, installation_id, received_at, requests, msg_digest"
                " FROM plugin_heartbeats ORDER BY id"
            ).fetchall()

        command.upgrade(config, "head")
        with connect(url) as db:
            assert db.execute(
                "SELECT relkind FROM pg_class WHERE relname = 'plugin_heartbeats'"
            ).fetchone() == ("p",)
            after = db.execute(
                "SELECT id, installation_id, received_at, requests, msg_digest"
                " FROM plugin_heartbeats ORDER BY id"
            ).fetchall()
            assert after == before
            assert db.execute(
                "SELECT count(*) FROM plugin_heartbeats WHERE signed_at <> received_at"
            ).fetchone() == (0,)
            made = partitions(db)
            assert contiguous(made)
            assert made[0][1] <= min(r[2] for r in before)
            assert made[-1][2] >= datetime.now(UTC) + timedelta(hours=168)
            # The replay guard holds on the migrated rows.
            with pytest.raises(errors.UniqueViolation):
                db.execute(
                    "INSERT INTO plugin_heartbeats (installation_id, received_at, signed_at,"
                    " plugin_version, env, msg_digest)"
                    " SELECT installation_id, now(), signed_at, plugin_version, env, msg_digest"
                    " FROM plugin_heartbeats WHERE id = 1"
                )
            # The grants are the old table's.
            rights = db.execute(
                "SELECT has_table_privilege('selfheal_app', 'plugin_heartbeats',"
                "  'SELECT, INSERT, UPDATE, DELETE'),"
                " has_table_privilege('selfheal_ops', 'plugin_heartbeats', 'SELECT'),"
                " has_table_privilege('selfheal_ops', 'plugin_heartbeats', 'INSERT')"
            ).fetchone()
            assert rights == (True, True, False)

        # Ingest as the application: new ids go on after the old sequence, replays refused.
        grant_app_login(url, app_url(url))
        settings = make_settings(url, servers.redis_url, redis_prefix)
        plugin = await register(settings)
        async with serve(settings) as (_, client):
            body, stamp = heartbeat_body(uptime_s=777), int(time.time())
            assert (await send_heartbeat(client, plugin, body, timestamp=stamp)).status_code == 200
            replay = await send_heartbeat(client, plugin, body, timestamp=stamp)
            assert replay.status_code == 401
        with connect(url) as db:
            new = db.execute(
                "SELECT min(id) FROM plugin_heartbeats WHERE installation_id = %s", (plugin.id,)
            ).fetchone()
            assert new[0] > 60

        # And back: a plain table with the rows and their ids.
        command.downgrade(config, "0016_tenant_scope")
        with connect(url) as db:
            assert db.execute(
                "SELECT relkind FROM pg_class WHERE relname = 'plugin_heartbeats'"
            ).fetchone() == ("r",)
            back = db.execute(
                "SELECT id, installation_id, received_at, requests, msg_digest"
                " FROM plugin_heartbeats WHERE installation_id = %s ORDER BY id",
                (installation,),
            ).fetchall()
            assert back == before
            assert db.execute(
                "SELECT count(*) FROM pg_class WHERE relname LIKE 'plugin_heartbeats_p%'"
            ).fetchone() == (0,)
        command.upgrade(config, "head")


# --- a heartbeat with no partition for its time -----------------------------------------------


async def test_a_heartbeat_with_no_partition_makes_them_and_is_stored(settings, db, plugin):
    """Every worker down for longer than the partitions made ahead: the API makes them itself
    (as its start-up does) and stores the batch, instead of answering 503 until someone runs
    the ensure function by hand."""
    async with serve(settings) as (_, client):
        drop_all_partitions(db)  # after start-up, which would have made them again
        answer = await send_heartbeat(client, plugin)
        assert answer.status_code == 200, answer.text
    assert db.execute("SELECT count(*) FROM plugin_heartbeats").fetchone()[0] == 1
    rows = partitions(db)
    assert contiguous(rows)
    now = datetime.now(UTC)
    assert rows[0][1] < now - timedelta(minutes=59)  # the oldest time a signature may carry
    assert rows[-1][2] >= now + timedelta(hours=settings.heartbeat_partitions_ahead_hours - 1)


async def test_no_partition_and_none_can_be_made_is_a_503_that_says_so(settings, db, plugin):
    async with serve(settings) as (app, client):
        drop_all_partitions(db)

        async def cannot() -> bool:
            return False  # what make_partitions_ahead returns when the database refuses

        app.state.services.batcher.make_partitions = cannot
        answer = await send_heartbeat(client, plugin)
    assert answer.status_code == 503, answer.text
    assert answer.headers["retry-after"] == "5"
    assert answer.json()["error"] == {
        "code": "unavailable",
        "message": "no heartbeat partition for this time yet; retry later",
    }
    assert partitions(db) == []
