"""Where the repository is, the settings tests run with, and the environment that hands those
settings to a child process."""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import quote

from app.core.settings import Settings, libpq_url

REPO = Path(__file__).resolve().parent.parent.parent
# As a real install has it: a strong random key (never a fixed one in the source), new each
# test session; the processes a test starts get it through settings_env.
TEST_SECRET_KEY = secrets.token_urlsafe(48)
TEST_WEBHOOK_ALLOW = "127.0.0.1"
# The tests' processes log in as production's do: as a member of selfheal_app that owns nothing
# (migration 0012), never as the superuser that owns the tables and runs the migrations.
APP_LOGIN = "selfheal_test_app"
APP_PASSWORD = "selfheal-test-app-password"
# And ops in psql, as a member of selfheal_ops.
OPS_LOGIN = "selfheal_test_ops"
OPS_PASSWORD = "selfheal-test-ops-password"


def as_login(database_url: str, user: str, password: str) -> str:
    """`database_url` logging in as `user` instead."""
    scheme, sep, rest = database_url.partition("://")
    host = rest.rpartition("@")[2]
    return f"{scheme}{sep}{quote(user, safe='')}:{quote(password, safe='')}@{host}"


HEADS = Path(tempfile.gettempdir()) / "selfheal-test-heads"


def app_url(database_url: str) -> str:
    """The application's login to the database of `database_url` (a superuser's URL)."""
    return as_login(database_url, APP_LOGIN, APP_PASSWORD)


def make_settings(
    database_url: str, redis_url: str, redis_prefix: str, **overrides: Any
) -> Settings:
    """Settings as a production install has them: `database_url` (the owner's, as the fixtures
    create databases) runs the migrations, and the processes log in as the application."""
    values: dict[str, Any] = {
        "database_url": app_url(database_url),
        "database_owner_url": database_url,
        "redis_url": redis_url,
        "redis_prefix": redis_prefix,
        "secret_key": TEST_SECRET_KEY,
        "log_level": "warning",
        # The webhook receivers of the tests listen on loopback: allowed here, as an
        # operator allows an internal endpoint (the SSRF tests build their policy without it).
        "webhook_allow": TEST_WEBHOOK_ALLOW,
        # Each test's workers export the head of the seals to a file of their own.
        "audit_head_file": HEADS / f"{redis_prefix.strip(':').replace(':', '-')}.json",
        # Many tests' workers run at once on this machine: each would fight for the default
        # metrics port (tests/test_worker_lanes.py serves them on a port of its own).
        "worker_metrics_port": 0,
        **overrides,
    }
    return Settings(**values)


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a child process these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELFHEAL_")}
    env.update(
        DATABASE_URL=libpq_url(settings.database_url or ""),
        DATABASE_OWNER_URL=libpq_url(settings.migration_url or ""),
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
        SELFHEAL_WEBHOOK_ALLOW=settings.webhook_allow,
        SELFHEAL_WORKER_METRICS_PORT=str(settings.worker_metrics_port),
    )
    if settings.public_url:
        env["SELFHEAL_PUBLIC_URL"] = settings.public_url
    if settings.db_pooler != "none":
        env["SELFHEAL_DB_POOLER"] = settings.db_pooler
    if settings.database_direct_url:
        env["DATABASE_DIRECT_URL"] = libpq_url(settings.database_direct_url)
    if settings.audit_head_file:
        env["SELFHEAL_AUDIT_HEAD_FILE"] = str(settings.audit_head_file)
    return env
