"""The one settings class. Names come from the brief (DATABASE_URL, SIRA_API_URL, ...) and
SELFHEAL_* for the rest; a `.env` file in the working directory is read too."""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Values that mean "nobody chose a secret yet". Refused when SELFHEAL_ENV=prod.
PLACEHOLDER_SECRETS = frozenset(
    {"", "changeme", "change-me", "changethis", "secret", "dev", "dev-secret", "selfheal-dev"}
)
DEV_SECRET_KEY = "selfheal-dev"  # noqa: S105 - the former default, public: refused as a key
MIN_SECRET_KEY_BYTES = 32


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _env(name: str) -> AliasChoices:
    return AliasChoices(name)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=True)

    env: Literal["dev", "prod"] = Field("dev", validation_alias=_env("SELFHEAL_ENV"))
    # Seals the plugin and webhook secrets stored in the database. Unset: the embedded
    # PostgreSQL's generated key file (app/embedded/secret_key.py); a process that uses
    # secrets refuses a missing, public or short key (secret_key_problem).
    secret_key: str = Field("", validation_alias=_env("SELFHEAL_SECRET_KEY"))
    # Former keys, comma-separated, still opened (never sealed with) during a key rotation.
    secret_key_previous: str = Field("", validation_alias=_env("SELFHEAL_SECRET_KEY_PREVIOUS"))
    data_dir: Path = Field(Path(".selfheal"), validation_alias=_env("SELFHEAL_DATA_DIR"))
    # The release signing key (Ed25519, PEM PKCS8); default: data_dir/keys/release-signing.pem.
    # Only `selfheal keys generate` and `selfheal release add` read it: API and workers never do.
    signing_key_file: Path | None = Field(None, validation_alias=_env("SELFHEAL_SIGNING_KEY_FILE"))

    # The seals over the history (app/audit): their key (else derived from the secret key),
    # how often the workers seal, and where they export the head (default data_dir/audit/).
    audit_key: str | None = Field(None, validation_alias=_env("SELFHEAL_AUDIT_KEY"))
    audit_seal_every_s: float = Field(
        60.0, ge=1.0, le=3600.0, validation_alias=_env("SELFHEAL_AUDIT_SEAL_EVERY_S")
    )
    audit_head_file: Path | None = Field(None, validation_alias=_env("SELFHEAL_AUDIT_HEAD_FILE"))
    database_url: str | None = Field(None, validation_alias=_env("DATABASE_URL"))
    # The login that owns the tables and runs the migrations; DATABASE_URL (the API's and the
    # workers' login, a member of `selfheal_app`) when unset.
    database_owner_url: str | None = Field(None, validation_alias=_env("DATABASE_OWNER_URL"))
    # `transaction` when DATABASE_URL is a transaction-pooling PgBouncer (docs/scaling.md,
    # "PgBouncer"): no prepared statements, no startup options, the statement timeout set per
    # transaction. DATABASE_DIRECT_URL then reaches PostgreSQL itself, for what needs a session
    # of its own: the API's LISTEN for credential changes (and the migrations, without
    # DATABASE_OWNER_URL).
    db_pooler: Literal["none", "transaction"] = Field(
        "none", validation_alias=_env("SELFHEAL_DB_POOLER")
    )
    database_direct_url: str | None = Field(None, validation_alias=_env("DATABASE_DIRECT_URL"))
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
        3600, ge=0, le=30 * 86400, validation_alias=_env("SELFHEAL_SECRET_GRACE_S")
    )
    # Lifetime of a new ops API token (`selfheal user add` and `user issue-token` take --days).
    token_ttl_days: int = Field(90, ge=1, le=3650, validation_alias=_env("SELFHEAL_TOKEN_TTL_DAYS"))
    auth_cache_ttl_s: float = Field(
        600.0, ge=0, le=86400, validation_alias=_env("SELFHEAL_AUTH_CACHE_TTL_S")
    )
    max_body_bytes: int = Field(
        65536, ge=1024, le=10 * 1024 * 1024, validation_alias=_env("SELFHEAL_MAX_BODY_BYTES")
    )
    # Request bodies of the other route classes (app/core/bodylimit.py): 413 before any read.
    ops_max_body_bytes: int = Field(
        1024 * 1024,
        ge=1024,
        le=64 * 1024 * 1024,
        validation_alias=_env("SELFHEAL_OPS_MAX_BODY_BYTES"),
    )
    form_max_body_bytes: int = Field(
        65536, ge=1024, le=16 * 1024 * 1024, validation_alias=_env("SELFHEAL_FORM_MAX_BODY_BYTES")
    )
    # Answers of the decision service and the staging runner are read no further than this.
    service_answer_max_bytes: int = Field(
        65536,
        ge=1024,
        le=64 * 1024 * 1024,
        validation_alias=_env("SELFHEAL_SERVICE_ANSWER_MAX_BYTES"),
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
    # plugin_heartbeats is range-partitioned by signed time (docs/partitioning.md): the span of
    # one partition (divides 24 or is a multiple of 24; only partitions made from then on get a
    # new span), and how far ahead of now the workers keep partitions ready.
    heartbeat_partition_hours: int = Field(
        24, ge=1, le=720, validation_alias=_env("SELFHEAL_HEARTBEAT_PARTITION_HOURS")
    )
    heartbeat_partitions_ahead_hours: int = Field(
        168, ge=1, le=2160, validation_alias=_env("SELFHEAL_HEARTBEAT_PARTITIONS_AHEAD_HOURS")
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
    # Webhook destinations allowed although not public (app/notifications/egress.py):
    # comma-separated networks (10.1.2.0/24, ::1) and host names (hooks.internal, *.corp.example).
    webhook_allow: str = Field("", validation_alias=_env("SELFHEAL_WEBHOOK_ALLOW"))

    # Rate limits (app/core/ratelimit.py): requests per SELFHEAL_RATE_WINDOW_S, bursts up to
    # the count; 0 turns that limit off.
    rate_window_s: float = Field(
        10.0, gt=0, le=3600, validation_alias=_env("SELFHEAL_RATE_WINDOW_S")
    )
    rate_per_installation: int = Field(
        20, ge=0, le=1_000_000, validation_alias=_env("SELFHEAL_RATE_PER_INSTALLATION")
    )
    rate_per_tenant: int = Field(
        5000, ge=0, le=10_000_000, validation_alias=_env("SELFHEAL_RATE_PER_TENANT")
    )
    rate_per_ops_token: int = Field(
        100, ge=0, le=1_000_000, validation_alias=_env("SELFHEAL_RATE_PER_OPS_TOKEN")
    )

    db_pool_size: int = Field(10, ge=1, le=200, validation_alias=_env("SELFHEAL_DB_POOL_SIZE"))
    db_timeout_s: float = Field(5.0, gt=0, le=120, validation_alias=_env("SELFHEAL_DB_TIMEOUT_S"))
    redis_timeout_s: float = Field(
        2.0, gt=0, le=60, validation_alias=_env("SELFHEAL_REDIS_TIMEOUT_S")
    )
    ingest_batch_max: int = Field(
        256, ge=1, le=5000, validation_alias=_env("SELFHEAL_INGEST_BATCH_MAX")
    )
    # Batches each API process may have in the database at once; fewer means larger batches
    # (less PostgreSQL CPU per heartbeat), more means a slow batch holds up fewer heartbeats.
    # Measured both ways in bench/README.md.
    ingest_connections: int = Field(
        2, ge=1, le=16, validation_alias=_env("SELFHEAL_INGEST_CONNECTIONS")
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
    # Each worker serves its own Prometheus metrics here (workers/metrics.py); 0: off. A
    # second worker on the same machine needs a port of its own (it warns and runs without).
    worker_metrics_host: str = Field(
        "127.0.0.1", validation_alias=_env("SELFHEAL_WORKER_METRICS_HOST")
    )
    worker_metrics_port: int = Field(
        9112, ge=0, le=65535, validation_alias=_env("SELFHEAL_WORKER_METRICS_PORT")
    )
    blocked_recheck_s: float = Field(
        10.0, gt=0, le=3600, validation_alias=_env("SELFHEAL_BLOCKED_RECHECK_S")
    )
    missed_decide_after_s: int = Field(
        300, ge=0, le=86400, validation_alias=_env("SELFHEAL_MISSED_DECIDE_AFTER_S")
    )
    quarantine_after_rollbacks: int = Field(
        3, ge=1, le=1000, validation_alias=_env("SELFHEAL_QUARANTINE_AFTER_ROLLBACKS")
    )
    # ...from installations of at least this many distinct tenants; a tenant alone that
    # reaches the count gets the release blocked for its own installations only.
    quarantine_min_tenants: int = Field(
        2, ge=1, le=1000, validation_alias=_env("SELFHEAL_QUARANTINE_MIN_TENANTS")
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

    @field_validator("audit_key")
    @classmethod
    def _strong_audit_key(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if (
            len(value.encode()) < MIN_SECRET_KEY_BYTES
            or value.strip().lower() in PLACEHOLDER_SECRETS
        ):
            raise ValueError(
                f"SELFHEAL_AUDIT_KEY needs at least {MIN_SECRET_KEY_BYTES} random bytes, e.g."
                " `python3 -c 'import secrets; print(secrets.token_urlsafe(48))'`; or leave it"
                " unset to derive the seals' key from SELFHEAL_SECRET_KEY"
            )
        return value

    @field_validator("database_url", "database_owner_url", "database_direct_url")
    @classmethod
    def _psycopg_driver(cls, value: str | None) -> str | None:
        return normalize_database_url(value) if value else None

    @field_validator("heartbeat_partition_hours")
    @classmethod
    def _partition_span(cls, value: int) -> int:
        # Partitions are aligned on UTC midnight: a day holds a whole number of them, or one
        # holds a whole number of days.
        if 24 % value and value % 24:
            raise ValueError(
                "SELFHEAL_HEARTBEAT_PARTITION_HOURS must divide 24 (1, 2, 3, 4, 6, 8, 12) or be"
                " a multiple of 24 (24, 48, ... 720)"
            )
        return value

    @model_validator(mode="after")
    def _partitions_ahead(self) -> Settings:
        # What selfheal_ensure_heartbeat_partitions accepts (migration 0017).
        if self.heartbeat_partitions_ahead_hours > 500 * self.heartbeat_partition_hours:
            raise ValueError(
                "SELFHEAL_HEARTBEAT_PARTITIONS_AHEAD_HOURS may cover at most 500 partitions of"
                " SELFHEAL_HEARTBEAT_PARTITION_HOURS"
            )
        return self

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("webhook_allow")
    @classmethod
    def _webhook_allow(cls, value: str) -> str:
        webhook_allow_entries(value)  # raises ValueError naming the entry
        return value

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
    def audit_head_path(self) -> Path:
        """Where the workers export the head of the seals, and `audit verify` reads it."""
        return self.audit_head_file or self.data_dir / "audit" / "head.json"

    @property
    def migration_url(self) -> str | None:
        """The URL migrations run with: DATABASE_OWNER_URL, else DATABASE_DIRECT_URL, else
        DATABASE_URL. Never a transaction pooler when another URL is given: migrations/env.py
        holds a session advisory lock across transactions."""
        return self.database_owner_url or self.database_direct_url or self.database_url

    @property
    def transaction_pooling(self) -> bool:
        """Whether DATABASE_URL goes through a transaction pooler (SELFHEAL_DB_POOLER)."""
        return self.db_pooler == "transaction"

    @property
    def listen_url(self) -> str | None:
        """Where the API LISTENs for credential changes: DATABASE_DIRECT_URL, else DATABASE_URL
        unless that is a transaction pooler, where LISTEN is accepted but its notifications
        never reach us (the server connection goes back to the pool after the statement).
        None: nobody listens, and the API keeps credentials 5 s at most (app/plugins/auth.py)."""
        if self.database_direct_url:
            return self.database_direct_url
        return None if self.transaction_pooling else self.database_url

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

    @property
    def previous_secret_keys(self) -> tuple[str, ...]:
        """SELFHEAL_SECRET_KEY_PREVIOUS as a list (comma-separated, blanks ignored)."""
        return tuple(k.strip() for k in self.secret_key_previous.split(",") if k.strip())

    @model_validator(mode="after")
    def _refuse_weak_secret_in_prod(self) -> Settings:
        # In prod, at once, whatever the command. Elsewhere every process that uses the key
        # refuses a weak one as it starts (app/startup.py, app/main.py, workers/main.py).
        problem = secret_key_problem(self.secret_key) if self.env == "prod" else None
        if problem is not None:
            raise ValueError(problem)
        return self


def secret_key_problem(key: str) -> str | None:
    """What is wrong with `key` as SELFHEAL_SECRET_KEY, and what to do; None when it is fine
    (at least MIN_SECRET_KEY_BYTES bytes, not a published placeholder)."""
    if not key.strip():
        what = "is not set"
    elif key.strip().lower() in PLACEHOLDER_SECRETS:
        what = f"is {key!r}, a published placeholder"
    elif len(key.encode()) < MIN_SECRET_KEY_BYTES:
        what = f"is {len(key.encode())} bytes long; it needs at least {MIN_SECRET_KEY_BYTES}"
    else:
        return None
    return (
        f"SELFHEAL_SECRET_KEY {what}. It encrypts the plugin and webhook secrets stored in"
        " the database, whatever SELFHEAL_ENV says. Generate one with"
        " `python3 -c 'import secrets; print(secrets.token_urlsafe(48))'` and set"
        " SELFHEAL_SECRET_KEY to it (keep it safe: the stored secrets need it). Secrets"
        " already stored under the old key: put the old key in SELFHEAL_SECRET_KEY_PREVIOUS"
        " and run `selfheal secrets rotate-key`. Without DATABASE_URL, leave"
        " SELFHEAL_SECRET_KEY unset: the embedded PostgreSQL uses a generated key file."
    )


def webhook_allow_entries(raw: str) -> tuple[tuple[IPNetwork, ...], frozenset[str]]:
    """SELFHEAL_WEBHOOK_ALLOW: its networks, and its host names (lower case, `*.x` kept)."""
    networks: list[IPNetwork] = []
    hosts: set[str] = set()
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
            continue
        except ValueError:
            pass
        name = item.lower().rstrip(".")
        label = name.removeprefix("*.")
        if not label or not all(c.isalnum() or c in "-." for c in label):
            raise ValueError(
                f"SELFHEAL_WEBHOOK_ALLOW: {item!r} is neither a network (10.0.0.0/8, ::1)"
                " nor a host name (hooks.internal, *.corp.example)"
            )
        hosts.add(name)
    return tuple(networks), frozenset(hosts)


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
