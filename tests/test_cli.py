"""The `selfheal` console script, run as a real subprocess the way an operator runs it, against
the per-test database."""

from __future__ import annotations

import os
import uuid

import pytest
from alembic.config import Config
from alembic.script import ScriptDirectory

from app.cli import REPO_ROOT
from tests.support.api import serve
from tests.support.cli import one_json_object, runner
from tests.support.databases import libpq
from tests.support.plugins import Plugin, send_heartbeat
from tests.support.settings import TEST_SECRET_KEY

# Variables the settings read: none may leak in from the shell running the tests.
_CLEARED = ("DATABASE_URL", "REDIS_URL", "PORT", "LOG_LEVEL", "SIRA_API_URL", "STAGING_RUNNER_URL")


@pytest.fixture
def base_env(servers) -> dict[str, str]:
    """The test environment without a database of its own: for commands that must stop before
    connecting anywhere."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("SELFHEAL_") and key not in _CLEARED
    }
    env.update(
        DATABASE_URL="postgresql://postgres@127.0.0.1:1/unreachable",
        REDIS_URL=servers.redis_url,
        SELFHEAL_SECRET_KEY=TEST_SECRET_KEY,
        SELFHEAL_DATA_DIR="selfheal-data",
    )
    return env


@pytest.fixture
def cli_env(base_env, settings) -> dict[str, str]:
    return {
        **base_env,
        "DATABASE_URL": libpq(settings.database_url),
        "REDIS_URL": settings.redis_url,
        "SELFHEAL_REDIS_PREFIX": settings.redis_prefix,
    }


@pytest.fixture
def run(cli_env, tmp_path):
    return runner(cli_env, tmp_path)


@pytest.fixture
def run_bare(base_env, tmp_path):
    return runner(base_env, tmp_path)


def head_revision() -> str:
    config = Config(str(REPO_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(REPO_ROOT / "migrations"))
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head


# --- plugin register / rotate-secret ----------------------------------------------------------


async def test_plugin_register_json_issues_a_working_secret_stored_only_encrypted(
    run, settings, db
):
    result = run(
        "plugin", "register", "--tenant", "t1", "--name", "payments", "--version", "1.2.2", "--json"
    )
    assert result.returncode == 0, result.stderr
    data = one_json_object(result.stdout)
    assert data["tenant"] == "t1"
    assert data["name"] == "payments"
    assert data["version"] == "1.2.2"
    assert data["env"] == "prod"
    plugin_id = str(uuid.UUID(data["plugin_id"]))
    secret = data["secret"]
    assert isinstance(secret, str)
    assert len(secret) >= 32

    row = db.execute(
        "SELECT tenant_id, plugin_name, plugin_version, env FROM merchant_plugins WHERE id = %s",
        (plugin_id,),
    ).fetchone()
    assert row == ("t1", "payments", "1.2.2", "prod")
    assert db.execute("SELECT id FROM tenants").fetchall() == [("t1",)]

    stored = db.execute(
        "SELECT secret_enc FROM plugin_secrets WHERE installation_id = %s", (plugin_id,)
    ).fetchall()
    assert len(stored) == 1
    sealed = bytes(stored[0][0])
    assert secret.encode() not in sealed
    # Nowhere else either, in any text column of any row of the table.
    (hits,) = db.execute(
        "SELECT count(*) FROM plugin_secrets s WHERE strpos(s::text, %s) > 0"
        " OR position(convert_to(%s, 'UTF8') in s.secret_enc) > 0",
        (secret, secret),
    ).fetchone()
    assert hits == 0

    # An API on the same database accepts heartbeats signed with the printed secret.
    plugin = Plugin(plugin_id, secret, "t1", "payments")
    async with serve(settings) as (_, client):
        response = await send_heartbeat(client, plugin)
        assert response.status_code == 200, response.text
        forged = Plugin(plugin_id, secret + "x", "t1", "payments")
        assert (await send_heartbeat(client, forged)).status_code == 401
    assert db.execute(
        "SELECT count(*) FROM plugin_heartbeats WHERE installation_id = %s", (plugin_id,)
    ).fetchone() == (1,)


async def test_plugin_register_without_json_prints_a_table_and_a_warning(run):
    result = run("plugin", "register", "--tenant", "t1", "--name", "payments", "--version", "1.2.2")
    assert result.returncode == 0, result.stderr
    keys = [line.split()[0] for line in result.stdout.splitlines()]
    assert keys == ["plugin_id", "secret", "tenant", "name", "version", "env"]
    assert "not shown again" in result.stderr


async def test_plugin_register_rejects_an_invalid_version_before_connecting(run_bare):
    result = run_bare(
        "plugin", "register", "--tenant", "t1", "--name", "payments", "--version", "not a version"
    )
    assert result.returncode != 0
    assert result.stdout == ""
    assert "--version" in result.stderr
    assert "Traceback" not in result.stderr


async def test_rotate_secret_issues_a_new_secret_and_both_sign_during_grace(run, settings, db):
    registered = one_json_object(
        run(
            "plugin",
            "register",
            "--tenant",
            "t1",
            "--name",
            "payments",
            "--version",
            "1.2.2",
            "--json",
        ).stdout
    )
    result = run("plugin", "rotate-secret", registered["plugin_id"], "--json")
    assert result.returncode == 0, result.stderr
    rotated = one_json_object(result.stdout)
    assert rotated["plugin_id"] == registered["plugin_id"]
    # SELFHEAL_SECRET_GRACE_S defaults to 1 h: a leaked old secret does not live for a day.
    assert rotated["old_secret_valid_for_s"] == 3600
    assert rotated["secret"] != registered["secret"]
    assert db.execute(
        "SELECT count(*), count(expires_at) FROM plugin_secrets WHERE installation_id = %s",
        (registered["plugin_id"],),
    ).fetchone() == (2, 1)

    new = Plugin(registered["plugin_id"], rotated["secret"], "t1", "payments")
    old = Plugin(registered["plugin_id"], registered["secret"], "t1", "payments")
    async with serve(settings) as (_, client):
        assert (await send_heartbeat(client, new)).status_code == 200
        assert (await send_heartbeat(client, old)).status_code == 200


async def test_rotate_secret_of_unknown_installation_fails_naming_it(run):
    missing = str(uuid.uuid4())
    result = run("plugin", "rotate-secret", missing, "--json")
    assert result.returncode == 1
    assert result.stdout == ""
    assert missing in result.stderr


async def test_rotate_secret_of_a_non_uuid_fails(run_bare):
    result = run_bare("plugin", "rotate-secret", "not-a-uuid", "--json")
    assert result.returncode != 0
    assert "not-a-uuid" in result.stderr


# --- user add ---------------------------------------------------------------------------------


async def test_user_add_json_prints_credentials_and_the_token_works(run, settings, db):
    result = run("user", "add", "alice", "--role", "operator", "--json")
    assert result.returncode == 0, result.stderr
    data = one_json_object(result.stdout)
    assert data["username"] == "alice"
    assert data["role"] == "operator"
    assert data["password"]
    assert data["token"]

    row = db.execute(
        "SELECT role, password_hash FROM ops_users WHERE username = 'alice'"
    ).fetchone()
    assert row[0] == "operator"
    assert row[1].startswith("$argon2id$")
    assert data["password"] not in row[1]

    async with serve(settings) as (_, client):
        response = await client.get(
            "/api/ops/policy", headers={"Authorization": f"Bearer {data['token']}"}
        )
        assert response.status_code == 200, response.text
        assert response.json()["autopatch_enabled"] is False
        # An operator cannot change the policy.
        response = await client.put(
            "/api/ops/policy",
            headers={"Authorization": f"Bearer {data['token']}"},
            json={"autopatch_enabled": True},
        )
        assert response.status_code == 403


async def test_user_add_twice_fails_with_a_clear_message(run, db):
    assert run("user", "add", "alice", "--role", "operator", "--json").returncode == 0
    result = run("user", "add", "alice", "--role", "admin", "--json")
    assert result.returncode != 0
    assert result.stdout == ""
    assert result.stderr.strip() == "selfheal: user 'alice' already exists"
    assert "Traceback" not in result.stderr
    # The first user is untouched.
    assert db.execute("SELECT role FROM ops_users WHERE username = 'alice'").fetchall() == [
        ("operator",)
    ]
    assert db.execute("SELECT count(*) FROM ops_api_tokens").fetchone() == (1,)


async def test_user_add_with_invalid_role_fails_before_connecting(run_bare):
    result = run_bare("user", "add", "mallory", "--role", "root", "--json")
    assert result.returncode != 0
    assert result.stdout == ""
    assert "--role must be one of viewer, operator, admin" in result.stderr
    assert "Traceback" not in result.stderr


async def test_user_add_with_invalid_name_fails_without_traceback(run, db):
    result = run("user", "add", "bad name!", "--role", "viewer", "--json")
    assert result.returncode != 0
    assert "not a valid user name" in result.stderr
    assert "Traceback" not in result.stderr
    assert db.execute("SELECT count(*) FROM ops_users").fetchone() == (0,)


# --- settings errors --------------------------------------------------------------------------


async def test_prod_without_secret_key_refuses_to_start_naming_the_variable(run_bare):
    result = run_bare("migrate", SELFHEAL_ENV="prod", SELFHEAL_SECRET_KEY=None)
    assert result.returncode != 0
    assert "SELFHEAL_SECRET_KEY" in result.stderr
    assert "Traceback" not in result.stderr


async def test_prod_with_placeholder_secret_key_refuses_to_start(run_bare):
    result = run_bare("migrate", SELFHEAL_ENV="prod", SELFHEAL_SECRET_KEY="changeme")
    assert result.returncode != 0
    assert "SELFHEAL_SECRET_KEY" in result.stderr


async def test_non_numeric_port_refuses_to_start_naming_port(run_bare):
    result = run_bare("migrate", PORT="abc")
    assert result.returncode != 0
    assert "PORT" in result.stderr
    assert "Traceback" not in result.stderr


async def test_database_url_with_other_scheme_is_refused_naming_it(run_bare):
    result = run_bare("migrate", DATABASE_URL="mysql://root@127.0.0.1/selfheal")
    assert result.returncode != 0
    assert "DATABASE_URL" in result.stderr
    assert "Traceback" not in result.stderr


# --- migrate ----------------------------------------------------------------------------------


async def test_migrate_accepts_a_postgres_scheme_url_and_leaves_an_up_to_date_schema(
    run, settings, db
):
    postgres_scheme = "postgres://" + libpq(settings.database_url).removeprefix("postgresql://")
    result = run("migrate", DATABASE_URL=postgres_scheme)
    assert result.returncode == 0, result.stderr
    assert "database schema is up to date" in result.stderr
    assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [(head_revision(),)]
    assert db.execute("SELECT id FROM ops_policy").fetchall() == [(1,)]
    # Other commands accept the same URL, and reach the same database.
    result = run("user", "add", "bob", "--role", "viewer", "--json", DATABASE_URL=postgres_scheme)
    assert result.returncode == 0, result.stderr
    assert one_json_object(result.stdout)["username"] == "bob"
    assert db.execute("SELECT username, role FROM ops_users").fetchall() == [("bob", "viewer")]


async def test_unreachable_database_is_a_clear_error_not_a_traceback(run_bare):
    # base_env points DATABASE_URL at a closed port.
    for args in (("migrate",), ("user", "add", "bob", "--role", "admin")):
        result = run_bare(*args)
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr
        assert "cannot use PostgreSQL at postgresql://postgres@127.0.0.1:1/unreachable" in (
            result.stderr
        )
