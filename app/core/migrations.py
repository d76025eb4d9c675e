"""The database schema brought to the latest Alembic revision (migrations/ at the repository
root). Used by `selfheal up`, `selfheal migrate`, the simulator, and the tests and benchmarks
that build their own databases."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

from app.core.settings import Settings, libpq_url

# The checkout: alembic.ini and migrations/ live beside app/.
REPO_ROOT = Path(__file__).resolve().parents[2]


# The group role migration 0012 gives the application's rights to.
APP_ROLE = "selfheal_app"


def run_migrations(settings: Settings) -> None:
    """`alembic upgrade head` as the owner (DATABASE_OWNER_URL, else DATABASE_URL; safe from
    many processes at once: migrations/env.py holds an advisory lock), then the application's
    login (the user of DATABASE_URL) made a member of `selfheal_app` (`grant_app_login`).
    Database errors propagate as SQLAlchemy and psycopg raise them; the command line words them
    for an operator (app/startup.py, `migrate_database`)."""
    # Imported here, not at the top: Alembic costs ~0.4 s, and `app.cli` imports this module
    # at start-up, so `selfheal --help` and the commands that never migrate would pay it.
    from alembic import command
    from alembic.config import Config

    owner_url = settings.migration_url
    assert owner_url is not None and settings.database_url is not None
    config = Config(str(REPO_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(REPO_ROOT / "migrations"))
    config.set_main_option("sqlalchemy.url", owner_url.replace("%", "%%"))
    command.upgrade(config, "head")
    grant_app_login(owner_url, settings.database_url)


def login_of(url: str) -> tuple[str | None, str | None]:
    """The user name and password a database URL logs in with (None when it does not say)."""
    parts = urlsplit(libpq_url(url))
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    return user, password


def grant_app_login(owner_url: str, app_url: str) -> None:
    """Make the login of `app_url` a member of `selfheal_app`, creating it (with the URL's
    password) when it does not exist; an existing login's password is left to whoever made it.
    Nothing to do when the application logs in as the owner itself (a single DATABASE_URL): that setup
    works, but the application can then rewrite the history (`privilege_warnings` says so).
    Idempotent; roles are server-wide, so several installs may run it at once."""
    # Imported here for the reason given in run_migrations.
    import psycopg
    from psycopg import errors, sql

    app_user, password = login_of(app_url)
    owner_user, _ = login_of(owner_url)
    if app_user is None or app_user == owner_user:
        return
    role = sql.Identifier(app_user)
    with psycopg.connect(libpq_url(owner_url), autocommit=True, connect_timeout=10) as conn:
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (app_user,)).fetchone()
        if not exists:
            create = sql.SQL("CREATE ROLE {} LOGIN").format(role)
            if password is not None:
                create = sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    role, sql.Literal(password)
                )
            try:
                conn.execute(create)
            except (errors.DuplicateObject, errors.UniqueViolation):
                pass  # another migrate created it meanwhile
        member = conn.execute(
            "SELECT 1 FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid"
            " JOIN pg_roles u ON u.oid = m.member WHERE g.rolname = %s AND u.rolname = %s",
            (APP_ROLE, app_user),
        ).fetchone()
        if not member:
            try:
                conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(APP_ROLE), role))
            except errors.InternalError_:
                # "tuple concurrently updated": another migrate granted it at the same moment.
                pass
