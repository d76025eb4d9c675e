"""The database schema and the invariants the database itself holds (migrations/versions/
*_0002_invariants.py), checked with plain SQL the way an operator in psql would run it:
migrations up and down, the single ops_policy row and its audit trail, the append-only,
hash-chained attempt history, and the brief's runbook and monitoring SQL run verbatim."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from psycopg import errors

from app.cli import REPO_ROOT
from app.core.models import Base
from app.core.settings import libpq_url, normalize_database_url
from tests.support.api import serve
from tests.support.databases import create_database, drop_database
from tests.support.settings import APP_LOGIN

# --- the brief's SQL, verbatim (trailing spaces included) -------------------------------------

BRIEF_CANARY = (
    "-- Activer auto-patch (canary mode)\n"
    "UPDATE ops_policy \n"
    "SET autopatch_enabled = true,\n"
    '    autopatch_whitelist = \'["merchant-uuid-1", "merchant-uuid-2"]\',\n'
    "    autopatch_max_severity = 'medium'\n"
    "WHERE id = 1;"
)
BRIEF_KILL_SWITCH = (
    "-- Emergency disable\nUPDATE ops_policy SET autopatch_enabled = false WHERE id = 1;"
)
BRIEF_CANCEL_PENDING = (
    "-- Cancel pending patches\n"
    "UPDATE plugin_autopatch_attempts \n"
    "SET status = 'cancelled' \n"
    "WHERE status IN ('pending', 'staging', 'applying');"
)
BRIEF_ROLLBACK_ALL = (
    "-- Rollback all recent patches\n"
    "UPDATE plugin_autopatch_attempts \n"
    "SET status = 'rolled_back',\n"
    "    rollback_reason = 'Emergency rollback',\n"
    "    rolled_back_at = now()\n"
    "WHERE status = 'success' \n"
    "  AND executed_at > now() - interval '1 hour';"
)
BRIEF_SUCCESS_RATE = (
    "-- Success rate\n"
    "SELECT \n"
    "  COUNT(*) FILTER (WHERE status = 'success') * 100.0 / COUNT(*) as success_rate\n"
    "FROM plugin_autopatch_attempts\n"
    "WHERE executed_at > now() - interval '7 days';"
)
BRIEF_ROLLBACK_RATE = (
    "-- Rollback rate\n"
    "SELECT \n"
    "  COUNT(*) FILTER (WHERE status = 'rolled_back') * 100.0 / COUNT(*) as rollback_rate\n"
    "FROM plugin_autopatch_attempts\n"
    "WHERE executed_at > now() - interval '7 days';"
)
BRIEF_INCIDENTS_BY_SEVERITY = (
    "-- Incidents by severity\n"
    "SELECT severity, COUNT(*) \n"
    "FROM plugin_incidents \n"
    "WHERE detected_at > now() - interval '24 hours'\n"
    "GROUP BY severity;"
)

INVARIANT_TRIGGERS = {
    ("ops_policy", "ops_policy_touch"),
    ("ops_policy", "ops_policy_audit"),
    ("ops_policy", "ops_policy_no_delete"),
    ("ops_policy", "ops_policy_no_truncate"),
    ("audit_log", "audit_log_append_only"),
    ("audit_log", "audit_log_no_truncate"),
    ("plugin_autopatch_attempts", "attempts_guard_update"),
    ("plugin_autopatch_attempts", "attempts_event_log"),
    ("plugin_autopatch_attempts", "attempts_no_delete"),
    ("plugin_autopatch_attempts", "attempts_no_truncate"),
    ("plugin_autopatch_attempt_events", "attempt_events_insert_guard"),
    ("plugin_autopatch_attempt_events", "attempt_events_append_only"),
    ("plugin_autopatch_attempt_events", "attempt_events_no_truncate"),
}


# --- helpers ----------------------------------------------------------------------------------


@pytest.fixture
def psql(settings) -> Iterator[psycopg.Connection[Any]]:
    """A connection like an operator's psql session (autocommit, application_name=psql)."""
    with psycopg.connect(
        libpq_url(settings.migration_url), autocommit=True, application_name="psql"
    ) as conn:
        yield conn


@pytest.fixture
def replica(settings) -> Iterator[psycopg.Connection[Any]]:
    """A superuser session that asks PostgreSQL to skip ordinary triggers."""
    with psycopg.connect(
        libpq_url(settings.migration_url), autocommit=True, application_name="replica"
    ) as conn:
        conn.execute("SET session_replication_role = replica")
        yield conn


def rows(conn: psycopg.Connection[Any], sql: str, params: Any = None) -> list[dict[str, Any]]:
    cur = conn.execute(sql, params)
    names = [column.name for column in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def scalar(conn: psycopg.Connection[Any], sql: str, params: Any = None) -> Any:
    row = conn.execute(sql, params).fetchone()
    assert row is not None
    return row[0]


def session_user(conn: psycopg.Connection[Any]) -> str:
    return str(scalar(conn, "SELECT session_user"))


def make_installation(conn: psycopg.Connection[Any], tenant: str = "t1") -> uuid.UUID:
    conn.execute("INSERT INTO tenants (id) VALUES (%s) ON CONFLICT DO NOTHING", (tenant,))
    return scalar(
        conn,
        "INSERT INTO merchant_plugins (tenant_id, plugin_name, plugin_version)"
        " VALUES (%s, 'payments', '1.2.2') RETURNING id",
        (tenant,),
    )


def make_attempt(
    conn: psycopg.Connection[Any],
    installation: uuid.UUID,
    status: str = "pending",
    *,
    to_version: str | None = None,
    executed_ago: str | None = None,
) -> uuid.UUID:
    return scalar(
        conn,
        "INSERT INTO plugin_autopatch_attempts"
        " (installation_id, from_version, to_version, status, executed_at)"
        " VALUES (%s, '1.2.2', %s, %s,"
        "         CASE WHEN %s::interval IS NULL THEN NULL ELSE now() - %s::interval END)"
        " RETURNING id",
        (installation, to_version, status, executed_ago, executed_ago),
    )


def events(conn: psycopg.Connection[Any], attempt: uuid.UUID | None = None) -> list[dict[str, Any]]:
    if attempt is None:
        return rows(conn, "SELECT * FROM plugin_autopatch_attempt_events ORDER BY id")
    return rows(
        conn,
        "SELECT * FROM plugin_autopatch_attempt_events WHERE attempt_id = %s ORDER BY id",
        (attempt,),
    )


def event_count(conn: psycopg.Connection[Any]) -> int:
    return int(scalar(conn, "SELECT count(*) FROM plugin_autopatch_attempt_events"))


def verify_chain(conn: psycopg.Connection[Any]) -> int | None:
    return scalar(conn, "SELECT selfheal_verify_attempt_events()")


@contextlib.contextmanager
def empty_database(admin_url: str, database_url: Any) -> Iterator[str]:
    name = f"selfheal_mig_{uuid.uuid4().hex[:10]}"
    create_database(admin_url, name)
    try:
        yield database_url(name)
    finally:
        drop_database(admin_url, name)


def alembic_config(url: str) -> Config:
    """The Config app/core/migrations.py:run_migrations builds."""
    config = Config(str(REPO_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(REPO_ROOT / "migrations"))
    config.set_main_option("sqlalchemy.url", normalize_database_url(url).replace("%", "%%"))
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(
        alembic_config("postgresql://unused/none")
    ).get_current_head()
    assert head is not None
    return head


def public_objects(conn: psycopg.Connection[Any]) -> dict[str, set[str]]:
    return {
        # Tables, not the partitions of plugin_heartbeats (migration 0017), which come and go.
        "tables": {
            r[0]
            for r in conn.execute(
                "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND NOT c.relispartition"
            ).fetchall()
        },
        "relations": {
            r[0]
            for r in conn.execute(
                "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = 'public'"
            ).fetchall()
        },
        "functions": {
            r[0]
            for r in conn.execute(
                "SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
                " WHERE n.nspname = 'public'"
            ).fetchall()
        },
        "triggers": {
            r[0]
            for r in conn.execute(
                "SELECT t.tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
                " JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = 'public' AND NOT t.tgisinternal"
            ).fetchall()
        },
    }


# --- migrations -------------------------------------------------------------------------------


def test_migrations_upgrade_downgrade_upgrade_on_empty_database_without_drift(servers):
    model_tables = set(Base.metadata.tables)
    with empty_database(servers.admin_url, servers.database_url) as url:
        config = alembic_config(url)

        command.upgrade(config, "head")
        with psycopg.connect(url, autocommit=True) as conn:
            objects = public_objects(conn)
            assert objects["tables"] == model_tables | {"alembic_version"}
            assert {"selfheal_verify_attempt_events", "selfheal_refuse"} <= objects["functions"]
            assert {name for _, name in INVARIANT_TRIGGERS} <= objects["triggers"]
            assert scalar(conn, "SELECT version_num FROM alembic_version") == head_revision()
            # Leave some history behind: downgrade must cope with rows the triggers protect.
            conn.execute(BRIEF_CANARY)
            attempt = make_attempt(conn, make_installation(conn))
            conn.execute(
                "UPDATE plugin_autopatch_attempts SET status = 'staging' WHERE id = %s", (attempt,)
            )

        command.downgrade(config, "base")
        with psycopg.connect(url, autocommit=True) as conn:
            objects = public_objects(conn)
            assert objects["tables"] == {"alembic_version"}
            assert objects["relations"] == {"alembic_version", "alembic_version_pkc"}
            assert objects["functions"] == set()
            assert objects["triggers"] == set()
            assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == []

        command.upgrade(config, "head")
        with psycopg.connect(url, autocommit=True) as conn:
            assert public_objects(conn)["tables"] == model_tables | {"alembic_version"}
            assert conn.execute("SELECT id, autopatch_enabled FROM ops_policy").fetchall() == [
                (1, False)
            ]
            assert scalar(conn, "SELECT count(*) FROM plugin_autopatch_attempt_events") == 0

        # No drift between app/core/models.py and the migrations.
        command.check(config)


def test_invariant_triggers_fire_always_even_for_replication_sessions(db):
    found = {
        (table, name): enabled
        for table, name, enabled in db.execute(
            "SELECT c.relname, t.tgname, t.tgenabled FROM pg_trigger t"
            " JOIN pg_class c ON c.oid = t.tgrelid WHERE NOT t.tgisinternal"
        ).fetchall()
    }
    assert {key: found.get(key) for key in INVARIANT_TRIGGERS} == dict.fromkeys(
        INVARIANT_TRIGGERS, "A"
    )


# --- ops_policy -------------------------------------------------------------------------------


def test_ops_policy_has_exactly_one_row_with_autopatch_off_and_empty_whitelist(db):
    policy = rows(db, "SELECT * FROM ops_policy")
    assert len(policy) == 1
    (row,) = policy
    assert row["id"] == 1
    assert row["autopatch_enabled"] is False
    assert row["autopatch_whitelist"] == []
    assert row["autopatch_max_severity"] == "medium"
    assert row["canary_percent"] == 100
    assert row["min_confidence"] == Decimal("0.800")
    assert row["approvals_required"] == 2
    assert row["approval_min_severity"] == "high"


def test_ops_policy_refuses_a_second_row(db):
    with pytest.raises(errors.CheckViolation):
        db.execute("INSERT INTO ops_policy (id) VALUES (2)")
    with pytest.raises(errors.UniqueViolation):
        db.execute("INSERT INTO ops_policy (id) VALUES (1)")
    with pytest.raises(errors.UniqueViolation):
        db.execute("INSERT INTO ops_policy DEFAULT VALUES")
    with pytest.raises(errors.CheckViolation):
        db.execute("UPDATE ops_policy SET id = 2 WHERE id = 1")
    assert db.execute("SELECT id FROM ops_policy").fetchall() == [(1,)]


def test_ops_policy_row_cannot_be_deleted_or_truncated(db, replica):
    for conn in (db, replica):
        with pytest.raises(errors.InsufficientPrivilege, match="DELETE on ops_policy"):
            conn.execute("DELETE FROM ops_policy WHERE id = 1")
        with pytest.raises(errors.InsufficientPrivilege, match="TRUNCATE on ops_policy"):
            conn.execute("TRUNCATE ops_policy")
    assert db.execute("SELECT id FROM ops_policy").fetchall() == [(1,)]


def test_ops_policy_refuses_invalid_values(db):
    with pytest.raises(errors.CheckViolation):
        db.execute("UPDATE ops_policy SET autopatch_max_severity = 'extreme' WHERE id = 1")
    with pytest.raises(errors.CheckViolation):
        db.execute("UPDATE ops_policy SET autopatch_whitelist = '{\"a\": 1}' WHERE id = 1")
    with pytest.raises(errors.CheckViolation):
        db.execute("UPDATE ops_policy SET min_confidence = 1.5 WHERE id = 1")
    with pytest.raises(errors.NotNullViolation):
        db.execute("UPDATE ops_policy SET autopatch_enabled = NULL WHERE id = 1")


def test_brief_canary_and_kill_switch_statements_work_verbatim(psql):
    cur = psql.execute(BRIEF_CANARY)
    assert cur.rowcount == 1
    (row,) = rows(psql, "SELECT * FROM ops_policy")
    assert row["autopatch_enabled"] is True
    assert row["autopatch_whitelist"] == ["merchant-uuid-1", "merchant-uuid-2"]
    assert row["autopatch_max_severity"] == "medium"

    cur = psql.execute(BRIEF_KILL_SWITCH)
    assert cur.rowcount == 1
    (row,) = rows(psql, "SELECT * FROM ops_policy")
    assert row["autopatch_enabled"] is False
    # The kill switch touches only the switch.
    assert row["autopatch_whitelist"] == ["merchant-uuid-1", "merchant-uuid-2"]
    assert row["updated_by"] == session_user(psql)


# --- audit log --------------------------------------------------------------------------------


def test_psql_policy_change_is_audited_with_database_user_and_application_name(psql):
    before = scalar(psql, "SELECT coalesce(max(id), 0) FROM audit_log")
    psql.execute(BRIEF_CANARY)
    psql.execute(BRIEF_KILL_SWITCH)
    audit = rows(psql, "SELECT * FROM audit_log WHERE id > %s ORDER BY id", (before,))
    assert len(audit) == 2
    canary, kill = audit
    for entry in audit:
        assert entry["db_user"] == session_user(psql)
        assert entry["application_name"] == "psql"
        assert entry["actor"] is None
        assert entry["action"] == "update"
        assert entry["entity"] == "ops_policy"
        assert entry["entity_id"] == "1"
    assert canary["old"]["autopatch_enabled"] is False
    assert canary["old"]["autopatch_whitelist"] == []
    assert canary["new"]["autopatch_enabled"] is True
    assert canary["new"]["autopatch_whitelist"] == ["merchant-uuid-1", "merchant-uuid-2"]
    assert canary["new"]["updated_by"] == session_user(psql)
    assert kill["old"]["autopatch_enabled"] is True
    assert kill["new"]["autopatch_enabled"] is False
    assert canary["at"] <= kill["at"]


def test_policy_change_in_a_replication_session_is_still_audited(replica):
    before = scalar(replica, "SELECT coalesce(max(id), 0) FROM audit_log")
    assert replica.execute(BRIEF_CANARY).rowcount == 1
    (entry,) = rows(replica, "SELECT * FROM audit_log WHERE id > %s", (before,))
    assert entry["application_name"] == "replica"
    assert entry["db_user"] == session_user(replica)
    assert entry["new"]["autopatch_enabled"] is True


async def test_api_policy_change_is_audited_with_the_ops_user_as_actor(settings, db, admin):
    before = scalar(db, "SELECT coalesce(max(id), 0) FROM audit_log")
    async with serve(settings) as (_, client):
        response = await client.put(
            "/api/ops/policy", headers=admin.auth, json={"autopatch_max_severity": "high"}
        )
        assert response.status_code == 200, response.text
    (entry,) = rows(db, "SELECT * FROM audit_log WHERE id > %s ORDER BY id", (before,))
    assert entry["actor"] == "user:ada"
    assert entry["db_user"] == APP_LOGIN  # the application's login, not the owner
    assert entry["application_name"] == "selfheal-api"
    assert entry["action"] == "update"
    assert entry["entity"] == "ops_policy"
    assert entry["old"]["autopatch_max_severity"] == "medium"
    assert entry["new"]["autopatch_max_severity"] == "high"
    assert entry["new"]["updated_by"] == "user:ada"
    # The actor was transaction-local: a later plain SQL change is not attributed to ada.
    db.execute(BRIEF_KILL_SWITCH)
    (actor,) = db.execute("SELECT actor FROM audit_log ORDER BY id DESC LIMIT 1").fetchone()
    assert actor is None


def test_audit_log_refuses_update_delete_and_truncate(psql, replica):
    psql.execute(BRIEF_KILL_SWITCH)
    count = scalar(psql, "SELECT count(*) FROM audit_log")
    assert count >= 1
    for conn in (psql, replica):
        with pytest.raises(errors.InsufficientPrivilege, match="append-only"):
            conn.execute("UPDATE audit_log SET actor = 'someone-else'")
        with pytest.raises(errors.InsufficientPrivilege, match="append-only"):
            conn.execute("DELETE FROM audit_log")
        with pytest.raises(errors.InsufficientPrivilege, match="append-only"):
            conn.execute("TRUNCATE audit_log")
    assert scalar(psql, "SELECT count(*) FROM audit_log") == count
    assert scalar(psql, "SELECT count(*) FROM audit_log WHERE actor = 'someone-else'") == 0


def test_hand_written_audit_row_is_refused(psql, replica):
    for conn in (psql, replica):
        with pytest.raises(errors.InsufficientPrivilege, match="written by the database only"):
            conn.execute(
                "INSERT INTO audit_log (db_user, actor, action, entity)"
                " VALUES ('postgres', 'user:ada', 'update', 'ops_policy')"
            )
    assert scalar(psql, "SELECT count(*) FROM audit_log") == 0


# --- attempt history --------------------------------------------------------------------------


def test_each_attempt_change_appends_one_event_with_statuses_and_who(psql):
    attempt = make_attempt(psql, make_installation(psql))
    who = session_user(psql)
    path = ["staging", "applying", "verifying", "success"]
    for status in path:
        cur = psql.execute(
            "UPDATE plugin_autopatch_attempts SET status = %s,"
            " to_version = coalesce(to_version, '1.2.3'),"
            " executed_at = CASE WHEN %s = 'applying' THEN now() ELSE executed_at END"
            " WHERE id = %s",
            (status, status, attempt),
        )
        assert cur.rowcount == 1

    log = events(psql, attempt)
    assert [(e["operation"], e["old_status"], e["new_status"]) for e in log] == [
        ("insert", None, "pending"),
        ("update", "pending", "staging"),
        ("update", "staging", "applying"),
        ("update", "applying", "verifying"),
        ("update", "verifying", "success"),
    ]
    for event in log:
        assert event["db_user"] == who
        assert event["application_name"] == "psql"
        assert event["actor"] is None
        assert event["row_data"]["id"] == str(attempt)
        assert event["row_data"]["status"] == event["new_status"]
    assert [bytes(e["prev_hash"]) for e in log[1:]] == [bytes(e["hash"]) for e in log[:-1]]
    assert bytes(log[0]["prev_hash"]) == bytes(32)
    assert verify_chain(psql) is None
    # The check does not depend on the session's time zone or date style.
    psql.execute("SET TimeZone = 'Pacific/Chatham'")
    psql.execute("SET DateStyle = 'SQL, DMY'")
    assert verify_chain(psql) is None


def test_attempt_event_records_the_actor_named_by_the_application(psql):
    attempt = make_attempt(psql, make_installation(psql))
    with psql.transaction():
        psql.execute("SELECT set_config('selfheal.actor', 'user:ada', true)")
        psql.execute(
            "UPDATE plugin_autopatch_attempts SET status = 'cancelled' WHERE id = %s", (attempt,)
        )
    last = events(psql, attempt)[-1]
    assert (last["old_status"], last["new_status"], last["actor"]) == (
        "pending",
        "cancelled",
        "user:ada",
    )
    assert verify_chain(psql) is None


def test_an_update_that_matches_no_row_appends_no_event(psql):
    make_attempt(psql, make_installation(psql))
    before = event_count(psql)
    cur = psql.execute("UPDATE plugin_autopatch_attempts SET status = 'staging' WHERE false")
    assert cur.rowcount == 0
    assert event_count(psql) == before


def test_attempts_cannot_be_deleted_or_truncated(psql, replica):
    attempt = make_attempt(psql, make_installation(psql))
    for conn in (psql, replica):
        with pytest.raises(errors.InsufficientPrivilege, match="kept forever"):
            conn.execute("DELETE FROM plugin_autopatch_attempts WHERE id = %s", (attempt,))
        with pytest.raises(errors.InsufficientPrivilege, match="kept forever"):
            conn.execute("TRUNCATE plugin_autopatch_attempts CASCADE")
    assert scalar(psql, "SELECT count(*) FROM plugin_autopatch_attempts") == 1
    assert len(events(psql, attempt)) == 1


def test_attempt_events_cannot_be_updated_deleted_or_truncated(psql, replica):
    attempt = make_attempt(psql, make_installation(psql))
    psql.execute(
        "UPDATE plugin_autopatch_attempts SET status = 'staging' WHERE id = %s", (attempt,)
    )
    before = events(psql)
    for conn in (psql, replica):
        with pytest.raises(errors.InsufficientPrivilege, match="append-only"):
            conn.execute("UPDATE plugin_autopatch_attempt_events SET new_status = 'success'")
        with pytest.raises(errors.InsufficientPrivilege, match="append-only"):
            conn.execute("DELETE FROM plugin_autopatch_attempt_events")
        with pytest.raises(errors.InsufficientPrivilege, match="append-only"):
            conn.execute("TRUNCATE plugin_autopatch_attempt_events")
    assert events(psql) == before
    assert verify_chain(psql) is None


def test_hand_written_attempt_event_is_refused(psql, replica):
    attempt = make_attempt(psql, make_installation(psql))
    before = event_count(psql)
    forged = (
        "INSERT INTO plugin_autopatch_attempt_events"
        " (attempt_id, operation, old_status, new_status, db_user, row_data, prev_hash, hash)"
        " SELECT attempt_id, 'update', 'pending', 'success', db_user, row_data, hash,"
        "        sha256(hash)"
        " FROM plugin_autopatch_attempt_events ORDER BY id DESC LIMIT 1"
    )
    for conn in (psql, replica):
        with pytest.raises(errors.InsufficientPrivilege, match="written by the database only"):
            conn.execute(forged)
    with pytest.raises(errors.InsufficientPrivilege):
        psql.execute(
            "INSERT INTO plugin_autopatch_attempt_events"
            " (attempt_id, operation, new_status, db_user, row_data, prev_hash, hash)"
            " VALUES (%s, 'insert', 'success', 'postgres', '{}', '\\x00', '\\x01')",
            (attempt,),
        )
    assert event_count(psql) == before


def test_attempt_events_cannot_be_loaded_with_copy(psql):
    make_attempt(psql, make_installation(psql))
    before = event_count(psql)
    with pytest.raises(errors.InsufficientPrivilege, match="written by the database only"):
        with (
            psql.cursor() as cur,
            cur.copy(
                "COPY plugin_autopatch_attempt_events"
                " (attempt_id, operation, new_status, db_user, row_data, prev_hash, hash)"
                " FROM STDIN"
            ) as copy,
        ):
            copy.write_row(
                (str(uuid.uuid4()), "insert", "success", "postgres", "{}", b"\x00", b"\x01")
            )
    assert event_count(psql) == before


TERMINAL_REWRITES = [
    ("rolled_back", "status = 'success'"),
    ("rolled_back", "rollback_reason = 'rewritten'"),
    ("failed", "status = 'success'"),
    ("failed", "failure_reason = 'nothing happened'"),
    ("cancelled", "status = 'pending'"),
    ("success", "status = 'failed'"),
    ("success", "status = 'pending'"),
]


def test_terminal_attempt_cannot_be_rewritten(psql, replica):
    installation = make_installation(psql)
    attempts = {
        status: make_attempt(
            psql, installation, status, to_version="1.2.3", executed_ago="5 minutes"
        )
        for status in ("rolled_back", "failed", "cancelled", "success")
    }
    before = (rows(psql, "SELECT * FROM plugin_autopatch_attempts ORDER BY id"), events(psql))
    for start, change in TERMINAL_REWRITES:
        for conn in (psql, replica):
            with pytest.raises(errors.InsufficientPrivilege):
                conn.execute(
                    f"UPDATE plugin_autopatch_attempts SET {change} WHERE id = %s",
                    (attempts[start],),
                )
    after = (rows(psql, "SELECT * FROM plugin_autopatch_attempts ORDER BY id"), events(psql))
    assert after == before


IMMUTABLE_CHANGES = [
    "to_version = '9.9.9'",
    "to_version = NULL",
    "from_version = '0.0.1'",
    "executed_at = now() - interval '1 day'",
    "installation_id = NULL",
    "action = 'rollback'",
    "created_at = now() - interval '1 year'",
]


def test_attempt_versions_identity_and_execution_time_are_immutable_once_set(psql):
    attempt = make_attempt(
        psql, make_installation(psql), "applying", to_version="1.2.3", executed_ago="1 minute"
    )
    for change in IMMUTABLE_CHANGES:
        with pytest.raises(errors.InsufficientPrivilege, match="immutable"):
            psql.execute(f"UPDATE plugin_autopatch_attempts SET {change} WHERE id = %s", (attempt,))
    assert len(events(psql, attempt)) == 1


def test_attempt_status_cannot_move_backwards(psql):
    attempt = make_attempt(psql, make_installation(psql), "verifying", to_version="1.2.3")
    for earlier in ("applying", "staging", "pending"):
        with pytest.raises(errors.InsufficientPrivilege, match="cannot go back"):
            psql.execute(
                "UPDATE plugin_autopatch_attempts SET status = %s WHERE id = %s", (earlier, attempt)
            )
    psql.execute(
        "UPDATE plugin_autopatch_attempts SET status = 'success' WHERE id = %s", (attempt,)
    )
    assert [e["new_status"] for e in events(psql, attempt)] == ["verifying", "success"]


def test_decision_source_confidence_and_requester_are_immutable_once_set(psql):
    attempt = make_attempt(psql, make_installation(psql))
    psql.execute(
        "UPDATE plugin_autopatch_attempts SET decision_source = 'sira', confidence = 0.87,"
        " requested_by = 'worker' WHERE id = %s",
        (attempt,),
    )
    for change in (
        "decision_source = 'fallback'",
        "confidence = 0.99",
        "requested_by = 'user:eve'",
    ):
        with pytest.raises(errors.InsufficientPrivilege, match="immutable"):
            psql.execute(f"UPDATE plugin_autopatch_attempts SET {change} WHERE id = %s", (attempt,))
    assert len(events(psql, attempt)) == 2


def test_to_version_and_executed_at_can_be_set_once(psql):
    attempt = make_attempt(psql, make_installation(psql))
    psql.execute(
        "UPDATE plugin_autopatch_attempts SET to_version = '1.2.3', executed_at = now(),"
        " status = 'applying' WHERE id = %s",
        (attempt,),
    )
    (row,) = rows(psql, "SELECT * FROM plugin_autopatch_attempts WHERE id = %s", (attempt,))
    assert row["to_version"] == "1.2.3"
    assert row["executed_at"] is not None
    with pytest.raises(errors.InsufficientPrivilege):
        psql.execute(
            "UPDATE plugin_autopatch_attempts SET to_version = '1.2.4' WHERE id = %s", (attempt,)
        )


def test_brief_rollback_all_rolls_back_recent_successes_and_is_logged(psql):
    installation = make_installation(psql)
    recent = make_attempt(
        psql, installation, "success", to_version="1.2.3", executed_ago="10 minutes"
    )
    old = make_attempt(psql, installation, "success", to_version="1.2.3", executed_ago="2 hours")
    failed = make_attempt(
        psql, installation, "failed", to_version="1.2.3", executed_ago="5 minutes"
    )
    pending = make_attempt(psql, installation, "pending")
    before = event_count(psql)

    cur = psql.execute(BRIEF_ROLLBACK_ALL)
    assert cur.rowcount == 1

    status = dict(psql.execute("SELECT id, status FROM plugin_autopatch_attempts").fetchall())
    assert status == {recent: "rolled_back", old: "success", failed: "failed", pending: "pending"}
    (row,) = rows(psql, "SELECT * FROM plugin_autopatch_attempts WHERE id = %s", (recent,))
    assert row["rollback_reason"] == "Emergency rollback"
    assert row["rolled_back_at"] is not None

    assert event_count(psql) == before + 1
    last = events(psql, recent)[-1]
    assert (last["operation"], last["old_status"], last["new_status"]) == (
        "update",
        "success",
        "rolled_back",
    )
    assert last["db_user"] == session_user(psql)
    assert last["application_name"] == "psql"
    assert last["row_data"]["rollback_reason"] == "Emergency rollback"
    assert verify_chain(psql) is None

    # Rolled back is final: running the runbook again changes nothing.
    assert psql.execute(BRIEF_ROLLBACK_ALL).rowcount == 0
    with pytest.raises(errors.InsufficientPrivilege):
        psql.execute(
            "UPDATE plugin_autopatch_attempts SET status = 'success' WHERE id = %s", (recent,)
        )


def test_brief_cancel_pending_patches_works_verbatim_and_is_logged(psql):
    installation = make_installation(psql)
    attempts = {
        status: make_attempt(psql, installation, status)
        for status in ("pending", "staging", "applying", "verifying")
    }
    done = make_attempt(psql, installation, "success", to_version="1.2.3", executed_ago="1 day")
    before = event_count(psql)

    cur = psql.execute(BRIEF_CANCEL_PENDING)
    assert cur.rowcount == 3

    status = dict(psql.execute("SELECT id, status FROM plugin_autopatch_attempts").fetchall())
    assert status == {
        attempts["pending"]: "cancelled",
        attempts["staging"]: "cancelled",
        attempts["applying"]: "cancelled",
        attempts["verifying"]: "verifying",
        done: "success",
    }
    assert event_count(psql) == before + 3
    cancelled = rows(
        psql,
        "SELECT old_status, new_status, application_name FROM plugin_autopatch_attempt_events"
        " WHERE id > (SELECT max(id) - 3 FROM plugin_autopatch_attempt_events) ORDER BY id",
    )
    assert sorted(e["old_status"] for e in cancelled) == ["applying", "pending", "staging"]
    assert {e["new_status"] for e in cancelled} == {"cancelled"}
    assert {e["application_name"] for e in cancelled} == {"psql"}
    assert verify_chain(psql) is None
    # Cancelled is final.
    with pytest.raises(errors.InsufficientPrivilege):
        psql.execute(
            "UPDATE plugin_autopatch_attempts SET status = 'pending' WHERE id = %s",
            (attempts["pending"],),
        )


def test_superuser_rewrite_of_an_event_is_detected_by_the_chain_check(psql):
    attempt = make_attempt(psql, make_installation(psql))
    for status in ("staging", "applying", "failed"):
        psql.execute(
            "UPDATE plugin_autopatch_attempts SET status = %s WHERE id = %s", (status, attempt)
        )
    log = events(psql, attempt)
    assert [e["new_status"] for e in log] == ["pending", "staging", "applying", "failed"]
    assert verify_chain(psql) is None
    target = log[3]["id"]  # the event that recorded the failure

    # A superuser can switch the guards off; the hash chain still gives the rewrite away.
    psql.execute("ALTER TABLE plugin_autopatch_attempt_events DISABLE TRIGGER ALL")
    try:
        cur = psql.execute(
            "UPDATE plugin_autopatch_attempt_events SET new_status = 'success' WHERE id = %s",
            (target,),
        )
        assert cur.rowcount == 1
    finally:
        psql.execute("ALTER TABLE plugin_autopatch_attempt_events ENABLE TRIGGER ALL")

    assert verify_chain(psql) == target


def test_superuser_deletion_of_an_event_is_detected_by_the_chain_check(psql):
    attempt = make_attempt(psql, make_installation(psql))
    for status in ("staging", "applying", "verifying"):
        psql.execute(
            "UPDATE plugin_autopatch_attempts SET status = %s WHERE id = %s", (status, attempt)
        )
    log = events(psql, attempt)
    psql.execute("ALTER TABLE plugin_autopatch_attempt_events DISABLE TRIGGER ALL")
    try:
        psql.execute("DELETE FROM plugin_autopatch_attempt_events WHERE id = %s", (log[1]["id"],))
    finally:
        psql.execute("ALTER TABLE plugin_autopatch_attempt_events ENABLE TRIGGER ALL")
    # The event after the gap no longer links to its predecessor.
    assert verify_chain(psql) == log[2]["id"]


def test_concurrent_attempt_changes_append_to_one_unbroken_chain(settings, psql):
    installation = make_installation(psql)
    first = make_attempt(psql, installation)
    second = make_attempt(psql, installation)
    url = libpq_url(settings.migration_url)
    with psycopg.connect(url, application_name="worker-a") as a:
        a.execute("UPDATE plugin_autopatch_attempts SET status = 'staging' WHERE id = %s", (first,))
        # `a` holds the chain lock until it commits; `b` must wait and then link to a's event.
        failures: list[BaseException] = []

        def other_writer() -> None:
            try:
                with psycopg.connect(url, autocommit=True, application_name="worker-b") as b:
                    b.execute(
                        "UPDATE plugin_autopatch_attempts SET status = 'staging' WHERE id = %s",
                        (second,),
                    )
            except BaseException as exc:  # pragma: no cover - reported below
                failures.append(exc)

        thread = threading.Thread(target=other_writer)
        thread.start()
        time.sleep(0.3)
        assert thread.is_alive()  # waiting for the chain lock
        a.commit()
        thread.join(10)
        assert not thread.is_alive()
    assert failures == []
    log = events(psql)
    assert [(e["attempt_id"], e["new_status"], e["application_name"]) for e in log[-2:]] == [
        (first, "staging", "worker-a"),
        (second, "staging", "worker-b"),
    ]
    assert verify_chain(psql) is None


def test_repeatable_read_writer_racing_the_chain_fails_instead_of_forking_it(settings, psql):
    installation = make_installation(psql)
    first = make_attempt(psql, installation)
    second = make_attempt(psql, installation)
    url = libpq_url(settings.migration_url)
    with psycopg.connect(url) as a, psycopg.connect(url) as b:
        b.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        b.execute("SELECT 1")  # b's snapshot is taken now, before a's event exists
        a.execute("UPDATE plugin_autopatch_attempts SET status = 'staging' WHERE id = %s", (first,))
        a.commit()
        with pytest.raises((errors.UniqueViolation, errors.SerializationFailure)):
            b.execute(
                "UPDATE plugin_autopatch_attempts SET status = 'staging' WHERE id = %s", (second,)
            )
        b.rollback()
    assert verify_chain(psql) is None
    assert [e["new_status"] for e in events(psql, second)] == ["pending"]


# --- the brief's monitoring queries -----------------------------------------------------------


def test_brief_monitoring_queries_return_exact_figures(psql):
    installation = make_installation(psql)
    in_window = ["success"] * 6 + [
        "rolled_back",
        "failed",
    ]  # executed in the last 7 days: 8 attempts
    for index, status in enumerate(in_window):
        make_attempt(
            psql, installation, status, to_version="1.2.3", executed_ago=f"{index * 20 + 1} hours"
        )
    # Older than 7 days: must not count (they would change both rates if they did).
    make_attempt(psql, installation, "rolled_back", to_version="1.2.3", executed_ago="8 days")
    make_attempt(psql, installation, "rolled_back", to_version="1.2.3", executed_ago="30 days")
    # Never executed: executed_at is NULL, not in the window either.
    make_attempt(psql, installation, "pending")
    make_attempt(psql, installation, "cancelled")

    incidents = [
        ("critical", "1 hour"),
        ("high", "2 hours"),
        ("high", "23 hours"),
        ("medium", "5 minutes"),
        ("medium", "10 hours"),
        ("medium", "20 hours"),
        ("low", "25 hours"),
        ("low", "3 days"),
        ("critical", "2 days"),
    ]
    for severity, ago in incidents:
        psql.execute(
            "INSERT INTO plugin_incidents (installation_id, tenant_id, plugin_name, type,"
            " severity, status, detected_at)"
            " VALUES (NULL, 't1', 'payments', 'error_spike', %s, 'resolved', now() - %s::interval)",
            (severity, ago),
        )

    (success_rate,) = psql.execute(BRIEF_SUCCESS_RATE).fetchone()
    assert isinstance(success_rate, Decimal)
    assert success_rate == Decimal("75.0")
    (rollback_rate,) = psql.execute(BRIEF_ROLLBACK_RATE).fetchone()
    assert isinstance(rollback_rate, Decimal)
    assert rollback_rate == Decimal("12.5")
    by_severity = dict(psql.execute(BRIEF_INCIDENTS_BY_SEVERITY).fetchall())
    assert by_severity == {"critical": 1, "high": 2, "medium": 3}
