"""Test harness: real PostgreSQL and Redis, every test isolated.

- With DATABASE_URL / REDIS_URL set (CI sets them to the machine's services) the tests use
  those servers; otherwise they start the embedded ones under .selfheal-test/.
- The real migrations run once per test session into a template database; each test gets
  its own database copied from it (CREATE DATABASE ... TEMPLATE, ~0.1 s), so tests can commit,
  run several app instances, and still assert exact values.
- Each test gets its own Redis key prefix.

The fixtures live here; their building blocks, and the helpers test modules share, live in
tests/support (its __init__ says what is where)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

# The helpers' asserts explain their failures as the tests' own do.
pytest.register_assert_rewrite("tests.support")

import httpx  # noqa: E402
import psycopg  # noqa: E402

from app.cli import run_migrations  # noqa: E402
from app.core.settings import Settings, libpq_url, normalize_database_url  # noqa: E402
from tests.support.api import serve  # noqa: E402
from tests.support.databases import (  # noqa: E402
    Servers,
    clean_redis,
    connect,
    copy_name,
    create_database,
    create_ops_login,
    drop_databases,
    template_and_copies,
    template_name,
)
from tests.support.healing import healing_settings  # noqa: E402
from tests.support.personas import Persona, make_user  # noqa: E402
from tests.support.plugins import Plugin, register  # noqa: E402
from tests.support.services import RUNNER_TOKEN, SIRA_TOKEN, Server, running  # noqa: E402
from tests.support.settings import (  # noqa: E402
    OPS_LOGIN,
    OPS_PASSWORD,
    REPO,
    app_url,
    as_login,
    make_settings,
)


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    database_url = os.environ.get("DATABASE_URL")
    redis_url = os.environ.get("REDIS_URL")
    embedded = None
    if not database_url or not redis_url:
        from app.embedded import EmbeddedServices

        # Under pytest-xdist every worker process starts its own pair (.selfheal-test/gw0, ...).
        embedded = EmbeddedServices(
            REPO / ".selfheal-test" / os.environ.get("PYTEST_XDIST_WORKER", ""),
            postgres=not database_url,
            redis=not redis_url,
        )
        embedded.start()
        # The superuser's: the fixtures create databases and logins with it.
        database_url = database_url or embedded.database_owner_url
        redis_url = redis_url or embedded.redis_url
    assert database_url and redis_url
    try:
        yield Servers(libpq_url(normalize_database_url(database_url)), redis_url)
    finally:
        if embedded is not None:
            embedded.stop()


@pytest.fixture(scope="session")
def template_db(servers: Servers) -> Iterator[str]:
    """A database migrated with the real migrations once per test session."""
    name = template_name()
    create_database(servers.admin_url, name)
    owner_url = servers.database_url(name)
    # Roles are server-wide: pytest-xdist's workers, each migrating its own template on the
    # same server, take turns (the migrations tolerate a concurrent install, but a test run
    # should not depend on winning that race).
    with connect(servers.admin_url) as lock:
        lock.execute("SELECT pg_advisory_lock(hashtext('selfheal-test-templates'))")
        run_migrations(
            Settings(
                database_url=app_url(owner_url),
                database_owner_url=owner_url,
                redis_url=servers.redis_url,
            )
        )
        create_ops_login(servers.admin_url)
    os.environ["SELFHEAL_TEST_TEMPLATE"] = name
    yield name
    drop_databases(servers.admin_url, template_and_copies(servers.admin_url, name))


@pytest.fixture
def database_url(servers: Servers, template_db: str) -> str:
    return create_database(servers.admin_url, copy_name(template_db), template=template_db)


@pytest.fixture
def redis_prefix(servers: Servers) -> Iterator[str]:
    prefix = f"selfheal-test:{uuid.uuid4().hex[:12]}:"
    yield prefix
    clean_redis(servers.redis_url, prefix)


@pytest.fixture
def settings(database_url: str, servers: Servers, redis_prefix: str) -> Settings:
    return make_settings(database_url, servers.redis_url, redis_prefix)


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(settings) as (_, http):
        yield http


@pytest.fixture
def db(settings: Settings) -> Iterator[psycopg.Connection[Any]]:
    """A plain psycopg connection to the test database as the owner of the tables (the
    superuser that made it): to set up and read what a test needs. An ops engineer's psql is
    `ops_db`, the application's own login `app_db`."""
    assert settings.migration_url
    with connect(settings.migration_url) as conn:
        yield conn


@pytest.fixture
def ops_db(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    """A psql session of an ops engineer: a login in selfheal_ops (the runbook's rights)."""
    with connect(as_login(database_url, OPS_LOGIN, OPS_PASSWORD)) as conn:
        yield conn


@pytest.fixture
def app_db(settings: Settings) -> Iterator[psycopg.Connection[Any]]:
    """A session of the application's own login (what DATABASE_URL gives the API), used by hand."""
    assert settings.database_url
    with connect(libpq_url(settings.database_url)) as conn:
        yield conn


@pytest.fixture
async def plugin(settings: Settings) -> Plugin:
    return await register(settings)


@pytest.fixture
async def other_plugin(settings: Settings) -> Plugin:
    return await register(settings, tenant="merchant-2", name="payments")


@pytest.fixture
async def viewer(settings: Settings) -> Persona:
    return await make_user(settings, "vera", "viewer")


@pytest.fixture
async def operator(settings: Settings) -> Persona:
    return await make_user(settings, "otto", "operator")


@pytest.fixture
async def admin(settings: Settings) -> Persona:
    return await make_user(settings, "ada", "admin")


# --- the reference services and the in-process healing loop -------------------------------------
# One decision service and one staging runner per test module that asks for them. A module may
# define its own (tests/test_sim.py does, with other options): its fixtures win.


@pytest.fixture(scope="module")
def sira_server() -> Iterator[Server]:
    with running(["sim.decision_service"], SIRA_TOKEN) as server:
        yield server


@pytest.fixture(scope="module")
def runner_server() -> Iterator[Server]:
    with running(["sim", "staging-runner"], RUNNER_TOKEN) as server:
        yield server


@pytest.fixture
def sira(sira_server: Server) -> Server:
    sira_server.control(mode="normal", slow_s=30)
    return sira_server


@pytest.fixture
def runner(runner_server: Server) -> Server:
    runner_server.control(mode="normal", fail_versions=[], delay_s=0.1)
    return runner_server


@pytest.fixture
def loop_settings(settings: Settings, sira: Server, runner: Server, tmp_path: Path) -> Settings:
    return healing_settings(settings, sira, runner, tmp_path)
