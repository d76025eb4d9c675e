"""PostgreSQL databases and Redis key prefixes for tests and benchmarks: which servers a test
session uses, raw psycopg connections (as an operator's psql would have), databases created
and dropped on a server, the per-test copies of the session's template database, and a Redis
prefix cleaned up."""

from __future__ import annotations

import contextlib
import urllib.parse
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from redis import Redis

from app.core.settings import libpq_url


def with_database(url: str, name: str) -> str:
    """The same server's URL, pointing at database `name` (its query string kept)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))


def libpq(url: str) -> str:
    """A Settings database URL (postgresql+psycopg://) in the form libpq understands."""
    assert url.startswith("postgresql+psycopg://")
    return "postgresql://" + url.removeprefix("postgresql+psycopg://")


def connect(url: str, **options: Any) -> psycopg.Connection[Any]:
    """A plain autocommit psycopg connection to `url` (either URL form)."""
    return psycopg.connect(libpq_url(url), autocommit=True, **options)


def create_database(admin_url: str, name: str, *, template: str | None = None) -> str:
    """CREATE DATABASE `name` (a copy of `template`, if given) on the server of `admin_url`;
    its URL."""
    copy = f' TEMPLATE "{template}"' if template else ""
    with connect(admin_url) as conn:
        conn.execute(f'CREATE DATABASE "{name}"{copy}')
    return with_database(admin_url, name)


def create_ops_login(admin_url: str) -> None:
    """The tests' ops login (a member of selfheal_ops), made once per server."""
    from tests.support.settings import OPS_LOGIN, OPS_PASSWORD

    with connect(admin_url) as conn:
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (OPS_LOGIN,)).fetchone():
            return
        with contextlib.suppress(psycopg.errors.DuplicateObject, psycopg.errors.UniqueViolation):
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE selfheal_ops").format(
                    sql.Identifier(OPS_LOGIN), sql.Literal(OPS_PASSWORD)
                )
            )


def drop_database(admin_url: str, name: str) -> None:
    with connect(admin_url) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def drop_databases(admin_url: str, names: Iterable[str]) -> None:
    # Dropping a database waits for a checkpoint; a few at a time keeps teardown short.
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda name: drop_database(admin_url, name), names))


@dataclass(frozen=True)
class Servers:
    """The PostgreSQL and Redis servers of a test session."""

    admin_url: str  # libpq URL of the server's maintenance database
    redis_url: str

    def database_url(self, name: str) -> str:
        return with_database(self.admin_url, name)


# --- the session's template and its per-test copies ---------------------------------------------


def template_name() -> str:
    return f"selfheal_tpl_{uuid.uuid4().hex[:10]}"


def copy_name(template: str) -> str:
    """A name for one test's copy of `template`, which template_and_copies finds again."""
    return f"selfheal_t_{template[-10:]}_{uuid.uuid4().hex[:10]}"


def template_and_copies(admin_url: str, template: str) -> list[str]:
    """`template` and every copy of it still on the server."""
    with connect(admin_url) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s OR datname = %s",
            (f"selfheal_t_{template[-10:]}_%", template),
        ).fetchall()
    return [row[0] for row in rows]


# --- Redis --------------------------------------------------------------------------------------


def clean_redis(url: str, prefix: str) -> None:
    """Delete every key under `prefix`."""
    client = Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()
