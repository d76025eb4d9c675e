"""Least-privilege database roles (migration 0012, app/core/migrations.py): the application's
login owns nothing and cannot change the history or the schema; the ops role has the
runbook's rights and nothing more; who the history names comes from the session's login, not
from what a session says about itself."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import errors, sql

from app.core.db import create_engine, privilege_warnings
from app.core.settings import Settings, libpq_url
from tests.support.cli import runner
from tests.support.databases import connect, create_database, drop_database, with_database
from tests.support.settings import APP_LOGIN, OPS_LOGIN, as_login, settings_env

# The README runbook's statements, as an ops engineer types them in psql.
KILL_SWITCH = "UPDATE ops_policy SET autopatch_enabled = false WHERE id = 1"
CANARY = (
    "UPDATE ops_policy SET autopatch_enabled = true,"
    " autopatch_whitelist = '[\"merchant-uuid-1\"]', autopatch_max_severity = 'medium'"
    " WHERE id = 1"
)
CANCEL = (
    "UPDATE plugin_autopatch_attempts SET status = 'cancelled'"
    " WHERE status IN ('pending', 'staging', 'applying')"
)
ROLLBACK_ALL = (
    "UPDATE plugin_autopatch_attempts SET status = 'rolled_back',"
    " rollback_reason = 'Emergency rollback', rolled_back_at = now()"
    " WHERE status = 'success' AND executed_at > now() - interval '1 hour'"
)
RESEND = (
    "UPDATE outbox SET dead_at = NULL, attempts = 0, next_attempt_at = now()"
    " WHERE dead_at IS NOT NULL AND dead_at > now() - interval '1 day'"
)
WINDOW = (
    "INSERT INTO maintenance_windows (tenant_id, starts_at, ends_at, reason, created_by)"
    " VALUES ('t1', now(), now() + interval '2 hours', 'database migration', 'alice')"
    " RETURNING id"
)


def make_installation(db: psycopg.Connection[Any], tenant: str = "t1") -> uuid.UUID:
    db.execute("INSERT INTO tenants (id) VALUES (%s) ON CONFLICT DO NOTHING", (tenant,))
    row = db.execute(
        "INSERT INTO merchant_plugins (tenant_id, plugin_name, plugin_version)"
        " VALUES (%s, 'payments', '1.2.2') RETURNING id",
        (tenant,),
    ).fetchone()
    assert row is not None
    return uuid.UUID(str(row[0]))


def make_attempt(db: psycopg.Connection[Any], installation: uuid.UUID, status: str) -> uuid.UUID:
    row = db.execute(
        "INSERT INTO plugin_autopatch_attempts"
        " (installation_id, from_version, to_version, status, executed_at)"
        " VALUES (%s, '1.2.2', '1.2.3', %s, CASE WHEN %s = 'success' THEN now() END)"
        " RETURNING id",
        (installation, status, status),
    ).fetchone()
    assert row is not None
    return uuid.UUID(str(row[0]))


def last_audit(db: psycopg.Connection[Any]) -> dict[str, Any]:
    with db.cursor(row_factory=psycopg.rows.dict_row) as cur:
        row = cur.execute("SELECT * FROM audit_log ORDER BY id DESC LIMIT 1").fetchone()
    assert row is not None
    return row


def refused(conn: psycopg.Connection[Any], statement: str) -> str:
    """The error a statement gets (it must get one)."""
    with pytest.raises(errors.InsufficientPrivilege) as caught:
        conn.execute(statement)
    return str(caught.value)


# --- the application's login ----------------------------------------------------------------


@pytest.mark.parametrize(
    "statement",
    [
        "ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only",
        "ALTER TABLE plugin_autopatch_attempt_events DISABLE TRIGGER ALL",
        "ALTER TABLE plugin_autopatch_attempts DISABLE TRIGGER attempts_guard_update",
        "ALTER TABLE ops_policy ADD COLUMN sneaky boolean",
        "DROP TRIGGER attempts_event_log ON plugin_autopatch_attempts",
        "UPDATE plugin_autopatch_attempt_events SET new_status = 'success'",
        "DELETE FROM plugin_autopatch_attempt_events",
        "UPDATE audit_log SET actor = 'someone else'",
        "DELETE FROM audit_log",
        "INSERT INTO audit_log (db_user, action, entity) VALUES ('x', 'update', 'ops_policy')",
        "DELETE FROM plugin_autopatch_attempts",
        "TRUNCATE history_seals",
        "UPDATE history_seals SET mac = '\\x00'",
        "CREATE TABLE mine (id int)",
        "CREATE OR REPLACE FUNCTION selfheal_verify_attempt_events() RETURNS bigint"
        " LANGUAGE sql AS 'SELECT NULL::bigint'",
        "SET session_replication_role = replica",
        "UPDATE alembic_version SET version_num = 'x'",
    ],
)
def test_the_application_login_cannot_touch_the_history_or_the_schema(app_db, statement):
    with pytest.raises((errors.InsufficientPrivilege, errors.WrongObjectType)):
        app_db.execute(statement)


def test_the_application_login_owns_nothing(app_db):
    owned = app_db.execute(
        "SELECT count(*) FROM pg_class c WHERE pg_get_userbyid(c.relowner) = current_user"
    ).fetchone()
    assert owned == (0,)
    assert app_db.execute("SELECT current_user").fetchone() == (APP_LOGIN,)


async def test_privilege_warnings_name_a_superuser_and_spare_the_application(settings):
    owner = create_engine(
        settings.model_copy(update={"database_url": settings.migration_url}), role="test"
    )
    app = create_engine(settings, role="test")
    try:
        assert any("superuser" in w for w in await privilege_warnings(owner))
        assert await privilege_warnings(app) == []
    finally:
        await owner.dispose()
        await app.dispose()


# --- the ops role ---------------------------------------------------------------------------


def test_ops_run_the_runbook(db, ops_db):
    installation = make_installation(db)
    pending = make_attempt(db, installation, "pending")
    succeeded = make_attempt(db, installation, "success")
    for statement in (KILL_SWITCH, CANARY, CANCEL, ROLLBACK_ALL, RESEND):
        ops_db.execute(statement)
    window = ops_db.execute(WINDOW).fetchone()
    assert window is not None
    ops_db.execute("UPDATE maintenance_windows SET ends_at = now() WHERE id = %s", (window[0],))
    ops_db.execute("UPDATE tenants SET severity_floor = 'high' WHERE id = 't1'")
    assert ops_db.execute("SELECT selfheal_verify_attempt_events()").fetchone() == (None,)
    statuses = dict(
        db.execute(
            "SELECT id, status FROM plugin_autopatch_attempts WHERE id IN (%s, %s)",
            (pending, succeeded),
        ).fetchall()
    )
    assert statuses == {pending: "cancelled", succeeded: "rolled_back"}
    # The monitoring queries read what they need.
    ops_db.execute("SELECT severity, count(*) FROM plugin_incidents GROUP BY severity")


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT * FROM plugin_secrets",
        "SELECT * FROM ops_users",
        "SELECT * FROM ops_api_tokens",
        "SELECT * FROM ops_sessions",
        "UPDATE audit_log SET actor = 'x'",
        "DELETE FROM plugin_incidents",
        "DELETE FROM plugin_autopatch_attempts",
        "UPDATE plugin_autopatch_attempts SET to_version = '9.9.9'",
        "UPDATE merchant_plugins SET plugin_version = '0.0.1'",
        "INSERT INTO plugin_agent_commands (installation_id, type, payload) VALUES"
        " (gen_random_uuid(), 'update', '{}')",
        "ALTER TABLE ops_policy DISABLE TRIGGER ops_policy_audit",
        "INSERT INTO history_seals (log, row_id, key_id, mac) VALUES ('audit_log', 1, 'x', '\\x00')",
        "UPDATE ops_policy SET approvals_required = 0 WHERE id = 1",
        "UPDATE ops_policy SET min_confidence = 0 WHERE id = 1",
        "SELECT url FROM notification_endpoints",
        "SELECT secret_enc FROM notification_endpoints",
    ],
)
def test_ops_have_nothing_beyond_the_runbook(ops_db, statement):
    refused(ops_db, statement)


def test_ops_end_attempts_by_hand_but_never_move_them_through_the_loop(db, ops_db):
    installation = make_installation(db)
    under_way = make_attempt(db, installation, "applying")
    for status in ("success", "verifying", "pending"):
        with pytest.raises(errors.InsufficientPrivilege, match="for selfheal to make"):
            ops_db.execute(
                "UPDATE plugin_autopatch_attempts SET status = %s WHERE id = %s",
                (status, under_way),
            )
    ops_db.execute(
        "UPDATE plugin_autopatch_attempts SET status = 'failed' WHERE id = %s", (under_way,)
    )


def test_a_temporary_table_cannot_take_the_historys_rows(db, ops_db):
    """Unlisted in a function's search_path, pg_temp is searched first: a session's temporary
    audit_log or attempt event log would take the rows the owner-run triggers write."""
    installation = make_installation(db)
    attempt = make_attempt(db, installation, "pending")
    try:
        ops_db.execute("CREATE TEMP TABLE audit_log (LIKE public.audit_log INCLUDING ALL)")
        ops_db.execute(
            "CREATE TEMP TABLE plugin_autopatch_attempt_events"
            " (LIKE public.plugin_autopatch_attempt_events INCLUDING ALL)"
        )
    except errors.InsufficientPrivilege:
        return  # no temporary tables at all (migration 0012 on a database it made): fine too
    before = db.execute("SELECT count(*) FROM audit_log").fetchone()
    ops_db.execute(KILL_SWITCH)
    ops_db.execute(CANCEL)
    assert db.execute("SELECT count(*) FROM audit_log").fetchone() != before
    assert db.execute(
        "SELECT new_status FROM plugin_autopatch_attempt_events WHERE attempt_id = %s"
        " ORDER BY id DESC LIMIT 1",
        (attempt,),
    ).fetchone() == ("cancelled",)
    assert ops_db.execute("SELECT count(*) FROM pg_temp.audit_log").fetchone() == (0,)


@pytest.mark.parametrize(
    "function",
    ["selfheal_append_attempt_event()", "selfheal_audit()", "selfheal_audit_without_secrets()"],
)
def test_the_owner_run_trigger_functions_cannot_be_attached_elsewhere(app_db, function):
    """Attached to a table of one's own, they would write forged rows into the history."""
    if not _can_temp(app_db):
        pytest.skip("no temporary tables here, so no table of one's own to attach to")
    app_db.execute("CREATE TEMP TABLE mine (id uuid, status text)")
    with pytest.raises(errors.InsufficientPrivilege, match="permission denied for function"):
        app_db.execute(
            f"CREATE TRIGGER forged AFTER INSERT ON mine FOR EACH ROW EXECUTE FUNCTION public.{function}"
        )


def _can_temp(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute("SELECT has_database_privilege(current_database(), 'TEMPORARY')").fetchone()
    return bool(row and row[0])


def _has(conn: psycopg.Connection[Any], table: str) -> bool:
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()
    return bool(row and row[0])


def test_migrate_takes_temporary_tables_from_public(fresh_login, settings, tmp_path: Path):
    owner_url, login = fresh_login
    env = settings_env(settings) | {
        "DATABASE_URL": as_login(owner_url, login, "a-long-random-password"),
        "DATABASE_OWNER_URL": owner_url,
    }
    done = runner(env, tmp_path)("migrate")
    assert done.returncode == 0, done.stderr
    with connect(as_login(owner_url, login, "a-long-random-password")) as conn:
        assert not _can_temp(conn)
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("CREATE TEMP TABLE audit_log (id int)")


# --- attribution ------------------------------------------------------------------------------


def test_a_session_cannot_choose_who_the_audit_log_names(database_url):
    url = as_login(database_url, OPS_LOGIN, "selfheal-test-ops-password")
    with psycopg.connect(libpq_url(url), autocommit=True, application_name="selfheal-api") as psql:
        psql.execute("SELECT set_config('selfheal.actor', 'user:ada', false)")
        psql.execute(KILL_SWITCH)
        entry = last_audit(psql_owner := connect(database_url))
        psql_owner.close()
    assert entry["entity"] == "ops_policy"
    assert entry["db_user"] == OPS_LOGIN
    assert entry["actor"] == OPS_LOGIN  # not the user:ada the session claimed
    assert entry["application_name"] is None  # nor the selfheal-api it called itself


def test_the_attempt_history_names_the_login_not_the_claim(db, database_url):
    installation = make_installation(db)
    attempt = make_attempt(db, installation, "pending")
    url = as_login(database_url, OPS_LOGIN, "selfheal-test-ops-password")
    with psycopg.connect(
        libpq_url(url), autocommit=True, application_name="selfheal-worker"
    ) as psql:
        psql.execute("SELECT set_config('selfheal.actor', 'user:ada', false)")
        psql.execute(CANCEL)
    row = db.execute(
        "SELECT db_user, actor, application_name FROM plugin_autopatch_attempt_events"
        " WHERE attempt_id = %s ORDER BY id DESC LIMIT 1",
        (attempt,),
    ).fetchone()
    assert row == (OPS_LOGIN, OPS_LOGIN, None)
    assert db.execute("SELECT selfheal_verify_attempt_events()").fetchone() == (None,)


async def test_the_application_still_names_its_ops_user(settings, db, admin):
    from tests.support.api import serve

    async with serve(settings) as (_, client):
        response = await client.put(
            "/api/ops/policy", headers=admin.auth, json={"autopatch_max_severity": "high"}
        )
        assert response.status_code == 200, response.text
    entry = last_audit(db)
    assert (entry["db_user"], entry["actor"], entry["application_name"]) == (
        APP_LOGIN,
        "user:ada",
        "selfheal-api",
    )


# --- `selfheal migrate` makes the roles ---------------------------------------------------------


@pytest.fixture
def fresh_login(servers) -> Iterator[tuple[str, str]]:
    """An empty database and a login name nobody has made yet; both gone afterwards."""
    name = f"selfheal_roles_{uuid.uuid4().hex[:10]}"
    login = f"app_{uuid.uuid4().hex[:10]}"
    url = create_database(servers.admin_url, name)
    try:
        yield url, login
    finally:
        drop_database(servers.admin_url, name)
        with connect(servers.admin_url) as admin:
            admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(login)))


def test_migrate_creates_the_application_login_and_grants_it_idempotently(
    fresh_login, settings, tmp_path: Path
):
    owner_url, login = fresh_login
    app = as_login(owner_url, login, "a-long-random-password")
    env = settings_env(settings) | {"DATABASE_URL": app, "DATABASE_OWNER_URL": owner_url}
    run = runner(env, tmp_path)
    for _ in range(2):
        done = run("migrate")
        assert done.returncode == 0, done.stderr
    with connect(app) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (login,)
        assert conn.execute(
            "SELECT pg_has_role(current_user, 'selfheal_app', 'MEMBER')"
        ).fetchone() == (True,)
        conn.execute("SELECT count(*) FROM ops_policy")
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("ALTER TABLE audit_log DISABLE TRIGGER ALL")


def test_settings_default_the_owner_url_to_the_database_url():
    settings = Settings(database_url="postgresql://app@db/selfheal")
    assert settings.migration_url == settings.database_url
    split = Settings(
        database_url="postgresql://app@db/selfheal",
        database_owner_url="postgres://owner@db/selfheal",
    )
    assert split.migration_url == "postgresql+psycopg://owner@db/selfheal"


def test_with_database_keeps_the_query_string():
    # Sanity of the harness this module relies on: the login swap keeps host and database.
    url = as_login(with_database("postgresql://postgres@127.0.0.1:5432/x", "y"), "a", "b")
    assert url == "postgresql://a:b@127.0.0.1:5432/y"
