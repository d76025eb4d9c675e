"""Alembic environment: the URL comes from the settings (or -x url=... / config option), never
from alembic.ini, so the same migrations run against the embedded and the real PostgreSQL."""

from __future__ import annotations

import re

from alembic import context
from sqlalchemy import create_engine, pool, text

from app.core.models import Base
from app.core.settings import get_settings, normalize_database_url

config = context.config
target_metadata = Base.metadata

# The heartbeat partitions (migration 0017) are made ahead and dropped at run time by the
# workers, not described by the models: autogenerate and `alembic check` leave them alone.
_HEARTBEAT_PARTITION = re.compile(r"plugin_heartbeats_p\d{10}")


def _include_name(name: str | None, type_: str, parent_names: object) -> bool:
    return not (type_ == "table" and name is not None and _HEARTBEAT_PARTITION.fullmatch(name))


def _database_url() -> str:
    url = config.get_main_option("sqlalchemy.url") or context.get_x_argument(
        as_dictionary=True
    ).get("url")
    if not url:
        url = get_settings().database_url
    if not url:
        raise SystemExit(
            "DATABASE_URL is not set: run `selfheal migrate` (which starts the embedded "
            "PostgreSQL) or set DATABASE_URL"
        )
    return normalize_database_url(url)


def run_migrations_offline() -> None:
    context.configure(url=_database_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(
        _database_url(),
        poolclass=pool.NullPool,
        connect_args={"application_name": "selfheal-migrate", "connect_timeout": 10},
    )
    with engine.connect() as connection:
        # Many API processes may start at once: one migrates, the others wait, then find
        # nothing left to do.
        connection.execute(text("SELECT pg_advisory_lock(hashtext('selfheal-migrations'))"))
        connection.commit()
        try:
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                include_name=_include_name,
            )
            with context.begin_transaction():
                context.run_migrations()
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(hashtext('selfheal-migrations'))"))
            connection.commit()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
