"""Test harness: real PostgreSQL and Redis, every test isolated.

- With DATABASE_URL / REDIS_URL set (CI sets them to the machine's services) the tests use
  those servers; otherwise they start the embedded ones under .selfheal-test/.
- The real migrations run once per test session into a template database; each test gets
  its own database copied from it (CREATE DATABASE ... TEMPLATE, ~0.1 s), so tests can commit,
  run several app instances, and still assert exact values.
- Each test gets its own Redis key prefix."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil
import psycopg
import pytest
from fastapi import FastAPI
from redis import Redis as SyncRedis

from app.cli import run_migrations
from app.core.crypto import SecretBox
from app.core.db import create_engine, create_sessionmaker
from app.core.settings import Settings, libpq_url, normalize_database_url
from app.main import create_app
from app.ops.security import add_user
from app.plugins.auth import sign
from app.plugins.service import register_installation

REPO = Path(__file__).resolve().parent.parent
TEST_SECRET_KEY = "test-secret-key-0123456789abcdef0123456789"


@dataclass(frozen=True)
class Servers:
    admin_url: str  # libpq URL of the server's maintenance database
    redis_url: str

    def database_url(self, name: str) -> str:
        base, _, _ = self.admin_url.rpartition("/")
        query = ""
        if "?" in self.admin_url:
            query = "?" + self.admin_url.split("?", 1)[1]
        return f"{base}/{name}{query}"


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    database_url = os.environ.get("DATABASE_URL")
    redis_url = os.environ.get("REDIS_URL")
    embedded = None
    if not database_url or not redis_url:
        from app.core.embedded import EmbeddedServices

        embedded = EmbeddedServices(
            REPO / ".selfheal-test", postgres=not database_url, redis=not redis_url
        )
        embedded.start()
        database_url = database_url or embedded.database_url
        redis_url = redis_url or embedded.redis_url
    assert database_url and redis_url
    try:
        yield Servers(libpq_url(normalize_database_url(database_url)), redis_url)
    finally:
        if embedded is not None:
            embedded.stop()


def _admin(servers: Servers) -> psycopg.Connection[Any]:
    return psycopg.connect(servers.admin_url, autocommit=True)


@pytest.fixture(scope="session")
def template_db(servers: Servers) -> Iterator[str]:
    """A database migrated with the real migrations once per test session."""
    name = f"selfheal_tpl_{uuid.uuid4().hex[:10]}"
    created: list[str] = []
    with _admin(servers) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    run_migrations(Settings(database_url=servers.database_url(name), redis_url=servers.redis_url))
    os.environ["SELFHEAL_TEST_TEMPLATE"] = name
    yield name
    with _admin(servers) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s OR datname = %s",
            (f"selfheal_t_{name[-10:]}_%", name),
        ).fetchall()
        created.extend(row[0] for row in rows)

    def drop(db: str) -> None:
        with _admin(servers) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')

    # Dropping a database waits for a checkpoint; a few at a time keeps teardown short.
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(drop, created))


@pytest.fixture
def database_url(servers: Servers, template_db: str) -> str:
    name = f"selfheal_t_{template_db[-10:]}_{uuid.uuid4().hex[:10]}"
    with _admin(servers) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    return servers.database_url(name)


@pytest.fixture
def redis_prefix(servers: Servers) -> Iterator[str]:
    prefix = f"selfheal-test:{uuid.uuid4().hex[:12]}:"
    yield prefix
    client = SyncRedis.from_url(servers.redis_url)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def make_settings(
    database_url: str, redis_url: str, redis_prefix: str, **overrides: Any
) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "redis_url": redis_url,
        "redis_prefix": redis_prefix,
        "secret_key": TEST_SECRET_KEY,
        "log_level": "warning",
        **overrides,
    }
    return Settings(**values)


@pytest.fixture
def settings(database_url: str, servers: Servers, redis_prefix: str) -> Settings:
    return make_settings(database_url, servers.redis_url, redis_prefix)


@contextlib.asynccontextmanager
async def serve(settings: Settings) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """One API instance, with its lifespan, behind an in-process HTTP client."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://selfheal.test"
        ) as client:
            yield app, client


@contextlib.asynccontextmanager
async def serve_http(settings: Settings) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """One API instance listening on settings.host:settings.port for real (uvicorn, in this
    event loop), for tests where another process must reach the API: the staging runner
    fetching an artifact from its pre-signed URL. The client talks to it over loopback."""
    import uvicorn

    app = create_app(settings)
    server = uvicorn.Server(
        uvicorn.Config(
            app, host=settings.host, port=settings.port, log_config=None, access_log=False
        )
    )
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 30
    while not server.started:
        assert not task.done(), f"the API did not start: {task.exception()!r}"
        assert time.monotonic() < deadline, "the API did not start within 30 s"
        await asyncio.sleep(0.02)
    try:
        async with httpx.AsyncClient(base_url=settings.api_base_url) as client:
            yield app, client
    finally:
        server.should_exit = True
        await task


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(settings) as (_, http):
        yield http


@pytest.fixture
def db(settings: Settings) -> Iterator[psycopg.Connection[Any]]:
    """A plain psycopg connection to the test database, as an operator in psql would use."""
    assert settings.database_url
    with psycopg.connect(libpq_url(settings.database_url), autocommit=True) as conn:
        yield conn


@dataclass
class Plugin:
    id: str
    secret: str
    tenant: str
    name: str

    def headers(
        self,
        body: bytes,
        path: str,
        *,
        method: str = "POST",
        timestamp: int | None = None,
        secret: str | None = None,
    ) -> dict[str, str]:
        ts = str(int(time.time()) if timestamp is None else timestamp)
        return {
            "X-Plugin-Id": self.id,
            "X-Timestamp": ts,
            "X-Signature": sign(secret or self.secret, ts, method, path, body),
            "Content-Type": "application/json",
        }


async def register(
    settings: Settings,
    *,
    tenant: str = "merchant-1",
    name: str = "payments",
    version: str = "1.2.2",
) -> Plugin:
    engine = create_engine(settings, role="test")
    try:
        async with create_sessionmaker(engine)() as session, session.begin():
            issued = await register_installation(
                session,
                SecretBox(settings.secret_key),
                tenant=tenant,
                name=name,
                version=version,
                env="prod",
            )
    finally:
        await engine.dispose()
    return Plugin(str(issued.plugin_id), issued.secret, tenant, name)


@pytest.fixture
async def plugin(settings: Settings) -> Plugin:
    return await register(settings)


@pytest.fixture
async def other_plugin(settings: Settings) -> Plugin:
    return await register(settings, tenant="merchant-2", name="payments")


def heartbeat_body(**overrides: Any) -> bytes:
    body: dict[str, Any] = {
        "plugin_version": "1.2.2",
        "env": "prod",
        "uptime_s": 3600,
        "sent_at": "2026-11-23T12:00:00+00:00",
        "telemetry": {
            "requests": 1200,
            "errors": 3,
            "webhook_attempts": 50,
            "webhook_failures": 1,
            "latency_p95_ms": 120,
            "errors_last_24h": 42,
        },
        "meta": {},
    }
    body.update(overrides)
    return orjson.dumps(body)


HEARTBEAT = "/api/plugins/heartbeat"
_uptime = itertools.count(1000)


async def send_heartbeat(
    client: httpx.AsyncClient, plugin: Plugin, body: bytes | None = None, **header_options: Any
) -> httpx.Response:
    # A distinct uptime makes each default body a distinct signed message (not a replay).
    body = heartbeat_body(uptime_s=next(_uptime)) if body is None else body
    return await client.post(
        HEARTBEAT, content=body, headers=plugin.headers(body, HEARTBEAT, **header_options)
    )


@dataclass
class Persona:
    username: str
    role: str
    token: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


async def make_user(settings: Settings, username: str, role: str) -> Persona:
    engine = create_engine(settings, role="test")
    try:
        async with create_sessionmaker(engine)() as session, session.begin():
            user = await add_user(session, username, role)
    finally:
        await engine.dispose()
    return Persona(user.username, user.role, user.token)


@pytest.fixture
async def viewer(settings: Settings) -> Persona:
    return await make_user(settings, "vera", "viewer")


@pytest.fixture
async def operator(settings: Settings) -> Persona:
    return await make_user(settings, "otto", "operator")


@pytest.fixture
async def admin(settings: Settings) -> Persona:
    return await make_user(settings, "ada", "admin")


def descendants(pid: int) -> list[tuple[psutil.Process, str]]:
    """The processes `pid` started, directly or not, with their command lines.

    A process that exits while we look (gone, or a zombie not yet reaped) is skipped:
    the tree of a running supervisor changes under us.
    """
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for child in children:
        try:
            found.append((child, " ".join(child.cmdline())))
        except psutil.NoSuchProcess:  # ZombieProcess included
            continue
    return found


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a child process these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELFHEAL_")}
    env.update(
        DATABASE_URL=libpq_url(settings.database_url or ""),
        REDIS_URL=settings.redis_url or "",
        SELFHEAL_REDIS_PREFIX=settings.redis_prefix,
        SELFHEAL_SECRET_KEY=settings.secret_key,
        SELFHEAL_HEARTBEAT_INTERVAL_S=str(settings.heartbeat_interval_s),
        SELFHEAL_HEARTBEAT_GRACE_S=str(settings.heartbeat_grace_s),
        SELFHEAL_DETECT_EVERY_S=str(settings.detect_every_s),
        SELFHEAL_RECOVERY_HEARTBEATS=str(settings.recovery_heartbeats),
        SELFHEAL_HOST=settings.host,
        PORT=str(settings.port),
        LOG_LEVEL="warning",
    )
    if settings.public_url:
        env["SELFHEAL_PUBLIC_URL"] = settings.public_url
    return env


@contextlib.asynccontextmanager
async def running_worker(settings: Settings) -> AsyncIterator[subprocess.Popen[bytes]]:
    """A real `selfheal worker` process on the test's database and Redis prefix; stopped with
    SIGTERM (its graceful shutdown) when the block ends."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "worker"], env=settings_env(settings), cwd=REPO
    )
    key = f"{settings.redis_prefix}arq:queue:health-check"
    client = SyncRedis.from_url(settings.redis_url or "")
    try:
        deadline = time.monotonic() + 20
        while not client.exists(key):
            assert proc.poll() is None, f"selfheal worker exited with {proc.returncode}"
            assert time.monotonic() < deadline, "selfheal worker did not report healthy"
            await asyncio.sleep(0.05)
        yield proc
    finally:
        client.close()
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, 20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError("selfheal worker did not stop within 20 s of SIGTERM") from None
        assert proc.returncode == 0, f"selfheal worker exited with {proc.returncode}"
