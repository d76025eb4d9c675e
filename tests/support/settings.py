"""Where the repository is, the settings tests run with, and the environment that hands those
settings to a child process."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from app.core.settings import Settings, libpq_url

REPO = Path(__file__).resolve().parent.parent.parent
TEST_SECRET_KEY = "test-secret-key-0123456789abcdef0123456789"


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
