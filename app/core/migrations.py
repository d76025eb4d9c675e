"""The database schema brought to the latest Alembic revision (migrations/ at the repository
root). Used by `selfheal up`, `selfheal migrate`, the simulator, and the tests and benchmarks
that build their own databases."""

from __future__ import annotations

from pathlib import Path

from app.core.settings import Settings

# The checkout: alembic.ini and migrations/ live beside app/.
REPO_ROOT = Path(__file__).resolve().parents[2]


def run_migrations(settings: Settings) -> None:
    """`alembic upgrade head` against DATABASE_URL (safe from many processes at once:
    migrations/env.py holds an advisory lock). Database errors propagate as SQLAlchemy raises them;
    the command line words them for an operator (app/startup.py, `migrate_database`)."""
    # Imported here, not at the top: Alembic costs ~0.4 s, and `app.cli` imports this module
    # at start-up, so `selfheal --help` and the commands that never migrate would pay it.
    from alembic import command
    from alembic.config import Config

    assert settings.database_url is not None
    config = Config(str(REPO_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(REPO_ROOT / "migrations"))
    config.set_main_option("sqlalchemy.url", settings.database_url.replace("%", "%%"))
    command.upgrade(config, "head")
