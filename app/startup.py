"""What a `selfheal` process does around its work: settings from the environment (or a clean
exit naming the variable), the services it needs (embedded when no URLs are set), migrations,
database errors worded for an operator, SIGTERM handled like Ctrl-C.

Shared by the command line (app/cli/) and the simulation runner it drives (app/simulation/).
It lives outside both so that the dependency goes one way: app.cli imports app.simulation,
and app.simulation imports this module, never app.cli.

A failure prints `selfheal: ...` on stderr and ends the process through `typer.Exit` (see
`fail`), exactly as the commands do."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from typing import Any

import typer
from pydantic import ValidationError

from app.core.migrations import run_migrations
from app.core.settings import Settings, libpq_url, secret_key_problem


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print `selfheal: message` on stderr; the caller raises the returned exit (code 2: the
    command line was wrong; 1: the world was)."""
    typer.echo(f"selfheal: {message}", err=True)
    return typer.Exit(code)


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment; a bad value stops here with the variable's name."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"]) or "settings"
            lines.append(f"{where}: {error['msg'].removeprefix('Value error, ')}")
        raise fail("invalid settings:\n  " + "\n  ".join(lines)) from None


@contextlib.contextmanager
def running_services(
    settings: Settings, *, redis: bool = True, secret_key: bool = True
) -> Iterator[Settings]:
    """With DATABASE_URL (and, when `redis`, REDIS_URL) set, use them. Otherwise start (or
    join, when `selfheal up` already runs them) the embedded PostgreSQL and Redis under
    SELFHEAL_DATA_DIR; the ones this process started are stopped when it leaves. Commands that
    only touch the database pass redis=False and never start a Redis.

    The embedded PostgreSQL without SELFHEAL_SECRET_KEY uses the data folder's generated key
    file. Unless `secret_key` is False (commands that never seal nor open a stored secret:
    migrations, ops users, releases), a missing, public or short key stops the command
    here, whatever SELFHEAL_ENV says."""
    need_postgres = settings.database_url is None
    need_redis = redis and settings.redis_url is None
    if need_postgres and not settings.secret_key.strip():
        adopt_embedded_secret_key(settings)
    if not (need_postgres or need_redis):
        if secret_key:
            require_secret_key(settings)
        yield settings
        return
    # Imported here, not at the top: psycopg and redis (~0.25 s) are only needed when a
    # service is embedded, which the commands run with URLs set never pay for.
    from app.embedded import EmbeddedServices

    embedded = EmbeddedServices(
        settings.data_dir,
        postgres=need_postgres,
        redis=need_redis,
    )
    try:
        embedded.start()
    except Exception as exc:
        raise fail(f"could not start the embedded services: {exc}") from exc
    try:
        updates: dict[str, str] = {}
        if embedded.database_url and embedded.database_owner_url:
            updates["DATABASE_URL"] = embedded.database_url
            updates["DATABASE_OWNER_URL"] = embedded.database_owner_url
        if embedded.redis_url:
            updates["REDIS_URL"] = embedded.redis_url
        # Child processes (uvicorn workers) read their settings from the environment.
        os.environ.update(updates)
        settled = load_settings()
        if secret_key:
            require_secret_key(settled)
        yield settled
    finally:
        embedded.stop()


def adopt_embedded_secret_key(settings: Settings) -> None:
    """SELFHEAL_SECRET_KEY from the data folder's key file (created on first start), for this
    process and its children. The former public default is not kept readable behind the
    operator's back (it would also verify history seals made with it): an embedded install
    from before the key file runs `SELFHEAL_SECRET_KEY_PREVIOUS=selfheal-dev selfheal secrets
    rotate-key` once (README, Security)."""
    from app.embedded.secret_key import SecretKeyFileError, load_or_create_secret_key

    try:
        key = load_or_create_secret_key(settings.data_dir)
    except (SecretKeyFileError, OSError) as exc:
        raise fail(str(exc), code=1) from None
    os.environ["SELFHEAL_SECRET_KEY"] = key


def require_secret_key(settings: Settings) -> None:
    """Stop (exit 2, saying what to do) when SELFHEAL_SECRET_KEY is missing, public or short."""
    problem = secret_key_problem(settings.secret_key)
    if problem is not None:
        raise fail(problem)


@contextlib.contextmanager
def reporting_database_errors(settings: Settings) -> Iterator[None]:
    """An unreachable database is an operator's problem to fix, not a traceback to read."""
    # Imported here, not at the top: SQLAlchemy costs ~0.3 s that `selfheal --help` and the
    # commands without a database (keys generate) should not pay.
    from sqlalchemy.exc import InterfaceError, OperationalError

    try:
        yield
    except (OperationalError, InterfaceError) as exc:
        where = redact(libpq_url(settings.database_url or ""))
        first_line = str(exc.orig or exc).strip().splitlines()[0]
        raise fail(f"cannot use PostgreSQL at {where}: {first_line}", code=1) from None


def migrate_database(settings: Settings) -> None:
    """`run_migrations`, an unreachable database reported as `reporting_database_errors`
    does."""
    with reporting_database_errors(settings):
        run_migrations(settings)


def terminate_on_sigterm() -> None:
    """SIGTERM ends the process like Ctrl-C, so context managers stop embedded services."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def describe(settings: Settings) -> None:
    """The PostgreSQL and Redis a process uses, passwords masked, on stderr."""
    typer.echo(f"PostgreSQL: {redact(libpq_url(settings.database_url or ''))}", err=True)
    typer.echo(f"Redis: {redact(settings.redis_url or '')}", err=True)


def redact(url: str) -> str:
    """`url` with the password (if any) replaced by `***`."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    return f"{scheme}{sep}{userinfo}{at}{host}"
