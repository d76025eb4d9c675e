"""The one settings class. Names come from the brief (DATABASE_URL, SIRA_API_URL, ...) and
SELFHEAL_* for the rest; a `.env` file in the working directory is read too."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Values that mean "nobody chose a secret yet". Refused when SELFHEAL_ENV=prod.
PLACEHOLDER_SECRETS = frozenset(
    {"", "changeme", "change-me", "changethis", "secret", "dev", "dev-secret", "selfheal-dev"}
)
DEV_SECRET_KEY = "selfheal-dev"  # noqa: S105 - the documented development placeholder


def _env(name: str) -> AliasChoices:
    return AliasChoices(name)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=True)

    env: Literal["dev", "prod"] = Field("dev", validation_alias=_env("SELFHEAL_ENV"))
    secret_key: str = Field(DEV_SECRET_KEY, validation_alias=_env("SELFHEAL_SECRET_KEY"))
    data_dir: Path = Field(Path(".selfheal"), validation_alias=_env("SELFHEAL_DATA_DIR"))
    # The release signing key (Ed25519, PEM PKCS8); default: data_dir/keys/release-signing.pem.
    # Only `selfheal keys generate` and `selfheal release add` read it: API and workers never do.
    signing_key_file: Path | None = Field(None, validation_alias=_env("SELFHEAL_SIGNING_KEY_FILE"))

    database_url: str | None = Field(None, validation_alias=_env("DATABASE_URL"))
    redis_url: str | None = Field(None, validation_alias=_env("REDIS_URL"))
    redis_prefix: str = Field("selfheal:", validation_alias=_env("SELFHEAL_REDIS_PREFIX"))

    sira_api_url: str | None = Field(None, validation_alias=_env("SIRA_API_URL"))
    sira_api_token: str | None = Field(None, validation_alias=_env("SIRA_API_TOKEN"))
    staging_runner_url: str | None = Field(None, validation_alias=_env("STAGING_RUNNER_URL"))
    staging_runner_token: str | None = Field(None, validation_alias=_env("STAGING_RUNNER_TOKEN"))

    host: str = Field("127.0.0.1", validation_alias=_env("SELFHEAL_HOST"))
    port: int = Field(8112, ge=1, le=65535, validation_alias=_env("PORT"))
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", validation_alias=_env("LOG_LEVEL")
    )

    heartbeat_interval_s: int = Field(
        120, ge=1, le=86400, validation_alias=_env("SELFHEAL_HEARTBEAT_INTERVAL_S")
    )
    heartbeat_grace_s: int = Field(
        60, ge=0, le=86400, validation_alias=_env("SELFHEAL_HEARTBEAT_GRACE_S")
    )
    detect_every_s: float = Field(
        0.5, gt=0, le=3600, validation_alias=_env("SELFHEAL_DETECT_EVERY_S")
    )
    health_window_s: int = Field(
        90, ge=1, le=86400, validation_alias=_env("SELFHEAL_HEALTH_WINDOW_S")
    )
    # The interval plugins are told while they have an open incident, a command waiting or a
    # change being verified (docs/contracts.md, adaptive next_heartbeat_s).
    heartbeat_fast_s: int = Field(
        5, ge=1, le=3600, validation_alias=_env("SELFHEAL_HEARTBEAT_FAST_S")
    )
    # Where plugins and the staging runner reach this API (behind a load balancer: its URL);
    # artifact URLs in commands are built from it. Default: http://SELFHEAL_HOST:PORT.
    public_url: str | None = Field(None, validation_alias=_env("SELFHEAL_PUBLIC_URL"))
    artifact_max_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1024,
        le=1024 * 1024 * 1024,
        validation_alias=_env("SELFHEAL_ARTIFACT_MAX_BYTES"),
    )
    # Lifetime of the artifact URL handed to the staging runner (a capability, no other auth).
    artifact_url_ttl_s: int = Field(
        900, ge=10, le=86400, validation_alias=_env("SELFHEAL_ARTIFACT_URL_TTL_S")
    )

    detect_consecutive_samples: int = Field(
        1, ge=1, le=50, validation_alias=_env("SELFHEAL_DETECT_CONSECUTIVE_SAMPLES")
    )
    webhook_fail_rate_threshold: float = Field(
        0.5, ge=0, le=1, validation_alias=_env("SELFHEAL_WEBHOOK_FAIL_RATE_THRESHOLD")
    )
    webhook_min_attempts: int = Field(
        10, ge=1, le=1_000_000, validation_alias=_env("SELFHEAL_WEBHOOK_MIN_ATTEMPTS")
    )
    error_rate_threshold: float = Field(
        0.05, ge=0, le=1, validation_alias=_env("SELFHEAL_ERROR_RATE_THRESHOLD")
    )
    error_min_requests: int = Field(
        20, ge=1, le=1_000_000, validation_alias=_env("SELFHEAL_ERROR_MIN_REQUESTS")
    )
    error_spike_factor: float = Field(
        3.0, ge=1, le=1000, validation_alias=_env("SELFHEAL_ERROR_SPIKE_FACTOR")
    )
    crash_loop_restarts: int = Field(
        3, ge=1, le=100, validation_alias=_env("SELFHEAL_CRASH_LOOP_RESTARTS")
    )
    regression_window_s: int = Field(
        3600, ge=60, le=30 * 86400, validation_alias=_env("SELFHEAL_REGRESSION_WINDOW_S")
    )
    recovery_heartbeats: int = Field(
        3, ge=1, le=1000, validation_alias=_env("SELFHEAL_RECOVERY_HEARTBEATS")
    )
    # Blast radius: this many open incidents of one type on one plugin version, making up at
    # least this share of its active installations, are one fleet incident.
    fleet_min_installations: int = Field(
        5, ge=2, le=1_000_000, validation_alias=_env("SELFHEAL_FLEET_MIN_INSTALLATIONS")
    )
    fleet_min_share: float = Field(
        0.2, ge=0, le=1, validation_alias=_env("SELFHEAL_FLEET_MIN_SHARE")
    )

    signature_tolerance_s: int = Field(
        300, ge=1, le=3600, validation_alias=_env("SELFHEAL_SIGNATURE_TOLERANCE_S")
    )
    secret_grace_s: int = Field(
        86400, ge=0, le=30 * 86400, validation_alias=_env("SELFHEAL_SECRET_GRACE_S")
    )
    auth_cache_ttl_s: float = Field(
        600.0, ge=0, le=86400, validation_alias=_env("SELFHEAL_AUTH_CACHE_TTL_S")
    )
    max_body_bytes: int = Field(
        65536, ge=1024, le=10 * 1024 * 1024, validation_alias=_env("SELFHEAL_MAX_BODY_BYTES")
    )
    command_lease_s: int = Field(
        60, ge=1, le=86400, validation_alias=_env("SELFHEAL_COMMAND_LEASE_S")
    )
    command_ttl_s: int = Field(
        3600, ge=60, le=30 * 86400, validation_alias=_env("SELFHEAL_COMMAND_TTL_S")
    )
    command_max_deliveries: int = Field(
        5, ge=1, le=100, validation_alias=_env("SELFHEAL_COMMAND_MAX_DELIVERIES")
    )
    heartbeat_retention_days: int = Field(
        14, ge=1, le=3650, validation_alias=_env("SELFHEAL_HEARTBEAT_RETENTION_DAYS")
    )

    # The outbox (app/notifications/): webhooks and decision-service feedback.
    outbox_max_attempts: int = Field(
        12, ge=1, le=100, validation_alias=_env("SELFHEAL_OUTBOX_MAX_ATTEMPTS")
    )
    outbox_backoff_max_s: float = Field(
        600.0, gt=0, le=86400, validation_alias=_env("SELFHEAL_OUTBOX_BACKOFF_MAX_S")
    )
    webhook_timeout_s: float = Field(
        5.0, gt=0, le=60, validation_alias=_env("SELFHEAL_WEBHOOK_TIMEOUT_S")
    )

    db_pool_size: int = Field(10, ge=1, le=200, validation_alias=_env("SELFHEAL_DB_POOL_SIZE"))
    db_timeout_s: float = Field(5.0, gt=0, le=120, validation_alias=_env("SELFHEAL_DB_TIMEOUT_S"))
    redis_timeout_s: float = Field(
        2.0, gt=0, le=60, validation_alias=_env("SELFHEAL_REDIS_TIMEOUT_S")
    )
    ingest_batch_max: int = Field(
        256, ge=1, le=5000, validation_alias=_env("SELFHEAL_INGEST_BATCH_MAX")
    )

    # The healing loop (app/healing/).
    decision_deadline_s: float = Field(
        3.0, gt=0, le=60, validation_alias=_env("SELFHEAL_DECISION_DEADLINE_S")
    )
    decision_max_attempts: int = Field(
        3, ge=1, le=10, validation_alias=_env("SELFHEAL_DECISION_MAX_ATTEMPTS")
    )
    decision_breaker_failures: int = Field(
        5, ge=1, le=100, validation_alias=_env("SELFHEAL_DECISION_BREAKER_FAILURES")
    )
    decision_breaker_cool_down_s: float = Field(
        30.0, gt=0, le=3600, validation_alias=_env("SELFHEAL_DECISION_BREAKER_COOL_DOWN_S")
    )
    fallback_min_samples: int = Field(
        3, ge=1, le=1000, validation_alias=_env("SELFHEAL_FALLBACK_MIN_SAMPLES")
    )
    fallback_min_success_rate: float = Field(
        0.5, ge=0, le=1, validation_alias=_env("SELFHEAL_FALLBACK_MIN_SUCCESS_RATE")
    )
    staging_deadline_s: float = Field(
        5.0, gt=0, le=120, validation_alias=_env("SELFHEAL_STAGING_DEADLINE_S")
    )
    staging_max_tries: int = Field(
        3, ge=1, le=50, validation_alias=_env("SELFHEAL_STAGING_MAX_TRIES")
    )
    staging_timeout_s: int = Field(
        900, ge=1, le=86400, validation_alias=_env("SELFHEAL_STAGING_TIMEOUT_S")
    )
    heal_lease_s: int = Field(30, ge=5, le=3600, validation_alias=_env("SELFHEAL_HEAL_LEASE_S"))
    heal_poll_s: float = Field(1.0, gt=0, le=600, validation_alias=_env("SELFHEAL_HEAL_POLL_S"))
    heal_batch: int = Field(200, ge=1, le=10_000, validation_alias=_env("SELFHEAL_HEAL_BATCH"))
    blocked_recheck_s: float = Field(
        10.0, gt=0, le=3600, validation_alias=_env("SELFHEAL_BLOCKED_RECHECK_S")
    )
    missed_decide_after_s: int = Field(
        300, ge=0, le=86400, validation_alias=_env("SELFHEAL_MISSED_DECIDE_AFTER_S")
    )
    quarantine_after_rollbacks: int = Field(
        3, ge=1, le=1000, validation_alias=_env("SELFHEAL_QUARANTINE_AFTER_ROLLBACKS")
    )

    # The ops dashboard (/ops/): its sign-in sessions and the slowing of failed sign-ins.
    # Secure cookies: unset means yes when SELFHEAL_ENV=prod or SELFHEAL_PUBLIC_URL is https.
    cookie_secure: bool | None = Field(None, validation_alias=_env("SELFHEAL_COOKIE_SECURE"))
    session_idle_s: int = Field(
        1800, ge=60, le=7 * 86400, validation_alias=_env("SELFHEAL_SESSION_IDLE_S")
    )
    session_max_s: int = Field(
        12 * 3600, ge=60, le=30 * 86400, validation_alias=_env("SELFHEAL_SESSION_MAX_S")
    )
    login_failures_per_account: int = Field(
        5, ge=1, le=1000, validation_alias=_env("SELFHEAL_LOGIN_FAILURES_PER_ACCOUNT")
    )
    login_failures_per_address: int = Field(
        20, ge=1, le=100_000, validation_alias=_env("SELFHEAL_LOGIN_FAILURES_PER_ADDRESS")
    )
    login_lockout_s: int = Field(
        900, ge=1, le=86400, validation_alias=_env("SELFHEAL_LOGIN_LOCKOUT_S")
    )

    @field_validator("database_url")
    @classmethod
    def _psycopg_driver(cls, value: str | None) -> str | None:
        return normalize_database_url(value) if value else None

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("public_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip().rstrip("/")
        if not value.startswith(("http://", "https://")):
            raise ValueError("SELFHEAL_PUBLIC_URL must start with http:// or https://")
        return value

    @property
    def api_base_url(self) -> str:
        """The API as plugins and the staging runner reach it (SELFHEAL_PUBLIC_URL, else the
        address the API binds; 0.0.0.0 and :: are answered on loopback)."""
        if self.public_url:
            return self.public_url
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host  # noqa: S104
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def secure_cookies(self) -> bool:
        """Whether the dashboard's cookies carry Secure (SELFHEAL_COOKIE_SECURE, else: in prod
        or behind an https public URL)."""
        if self.cookie_secure is not None:
            return self.cookie_secure
        return self.env == "prod" or (self.public_url or "").startswith("https://")

    @model_validator(mode="after")
    def _refuse_placeholder_secret_in_prod(self) -> Settings:
        if self.env == "prod" and self.secret_key.strip().lower() in PLACEHOLDER_SECRETS:
            raise ValueError(
                "SELFHEAL_SECRET_KEY is missing or a placeholder while SELFHEAL_ENV=prod: "
                "set SELFHEAL_SECRET_KEY to a long random value, e.g. the output of "
                "`python -c 'import secrets; print(secrets.token_urlsafe(48))'`"
            )
        if self.env == "prod" and len(self.secret_key) < 32:
            raise ValueError(
                "SELFHEAL_SECRET_KEY must be at least 32 characters when SELFHEAL_ENV=prod"
            )
        return self


def normalize_database_url(url: str) -> str:
    """Accept postgres://, postgresql:// and postgresql+psycopg:// alike; we always use psycopg 3."""
    for prefix in (
        "postgres://",
        "postgresql://",
        "postgresql+psycopg2://",
        "postgresql+asyncpg://",
    ):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    if url.startswith("postgresql+psycopg://"):
        return url
    raise ValueError("DATABASE_URL must be a postgres:// or postgresql:// URL")


def libpq_url(url: str) -> str:
    """The same URL in the form libpq (psql, psycopg.connect) understands."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


@lru_cache
def get_settings() -> Settings:
    return Settings()
