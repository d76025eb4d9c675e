"""The data model. Table and column names the brief's SQL runbook uses are kept as they are
(ops_policy, plugin_incidents, plugin_autopatch_attempts, ...). Invariants that must hold even
for SQL typed in psql (append-only history, audit of policy changes) live in database
triggers created by the migrations, not here.

Over 600 lines: the whole schema, one class per table; Alembic compares it with the
migrations as one metadata, and a reader looks up a table here rather than in a package."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal, get_args

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    ForeignKeyConstraint,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from app.core.states import (
    ATTEMPT_IN_FLIGHT_SQL,
    CHANGES,
    INCIDENT_CLOSED_SQL,
    AttemptStatus,
    IncidentStatus,
    sql_list,
)

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# The types for request and response schemas; the tuples for CHECK constraints and code.
Severity = Literal["low", "medium", "high", "critical"]
IncidentType = Literal[
    "heartbeat_missed", "error_spike", "webhook_fail_rate", "crash_loop", "regression"
]
SEVERITIES: tuple[str, ...] = get_args(Severity)
INCIDENT_TYPES: tuple[str, ...] = get_args(IncidentType)
ATTEMPT_STATUSES = tuple(AttemptStatus)
INCIDENT_STATUSES = tuple(IncidentStatus)
# Partial indexes of open incidents and in-flight attempts.
_OPEN_INCIDENT = f"status NOT IN {INCIDENT_CLOSED_SQL}"
_IN_FLIGHT_ATTEMPT = f"status IN {ATTEMPT_IN_FLIGHT_SQL}"
COMMAND_TYPES = ("update", "rollback", "config")
COMMAND_STATUSES = ("pending", "delivered", "acked", "failed", "expired", "cancelled")
ROLES = ("viewer", "operator", "admin")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN {sql_list(values)}"


def _uuid_pk() -> Mapped[uuid.UUID]:
    return mapped_column(
        UUID(as_uuid=True), primary_key=True, server_default=text("gen_random_uuid()")
    )


def _now() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Tenant(Base):
    """A merchant: identified by the id the operator gives at registration."""

    __tablename__ = "tenants"
    id: Mapped[str] = mapped_column(Text, primary_key=True)
    name: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _now()
    # Incidents of this tenant are at least this severe (an operator's statement of how much
    # the tenant matters); NULL: severity comes from the magnitude and blast radius alone.
    severity_floor: Mapped[str | None] = mapped_column(Text)
    __table_args__ = (
        CheckConstraint("length(id) BETWEEN 1 AND 200", name="id_length"),
        CheckConstraint(
            "severity_floor IS NULL OR severity_floor IN ('low', 'medium', 'high', 'critical')",
            name="severity_floor",
        ),
    )


class MerchantPlugin(Base):
    """A plugin installation, with its latest telemetry (written by heartbeat ingest)."""

    __tablename__ = "merchant_plugins"
    id: Mapped[uuid.UUID] = _uuid_pk()
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), nullable=False)
    plugin_name: Mapped[str] = mapped_column(Text, nullable=False)
    plugin_version: Mapped[str] = mapped_column(Text, nullable=False)
    previous_version: Mapped[str | None] = mapped_column(Text)
    version_changed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    env: Mapped[str] = mapped_column(Text, nullable=False, server_default="prod")
    status: Mapped[str] = mapped_column(Text, nullable=False, server_default="active")
    telemetry: Mapped[dict[str, Any]] = mapped_column(
        JSONB, nullable=False, server_default=text("'{}'::jsonb")
    )
    uptime_s: Mapped[int | None] = mapped_column(BigInteger)
    last_heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    next_expected_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Set by the detector when it opens a missed-heartbeat incident, cleared by the next
    # heartbeat: the detector looks only at overdue installations not yet flagged.
    missed_since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    heartbeat_count: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    # The last version that was healthy for a whole health window: rollbacks go back to it,
    # regression incidents name it (promoted by the worker, see migration 0008).
    known_good_version: Mapped[str | None] = mapped_column(Text)
    known_good_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Start of the current healthy streak on the current version; NULL while an incident is
    # open (triggers on plugin_incidents) and restarted by ingest when the version changes.
    good_since: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    created_at: Mapped[datetime] = _now()
    updated_at: Mapped[datetime] = _now()
    __table_args__ = (
        CheckConstraint("status IN ('active', 'disabled')", name="status"),
        Index(
            "ix_merchant_plugins_known_good_due",
            "good_since",
            postgresql_where=text(
                "good_since IS NOT NULL AND known_good_version IS DISTINCT FROM plugin_version"
            ),
        ),
        # The detector asks "whose deadline has passed?" every few seconds: an index, not a scan.
        Index("ix_merchant_plugins_next_expected_at", "next_expected_at"),
        Index("ix_merchant_plugins_tenant_id", "tenant_id"),
        Index("ix_merchant_plugins_plugin_name_version", "plugin_name", "plugin_version"),
    )


class PluginSecret(Base):
    """Signing secrets of an installation, encrypted at rest. Two may be valid during rotation."""

    __tablename__ = "plugin_secrets"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    installation_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("merchant_plugins.id", ondelete="CASCADE"), nullable=False
    )
    secret_enc: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    created_at: Mapped[datetime] = _now()
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    __table_args__ = (Index("ix_plugin_secrets_installation_id", "installation_id"),)


class PluginHeartbeat(Base):
    """One sample per accepted heartbeat. The unique (installation, digest, signed_at) triple is
    the replay guard shared by every API process: a replayed request cannot insert a second row.

    Range-partitioned by signed_at (migration 0017, docs/partitioning.md): the partitions are
    made ahead and dropped whole by the functions that migration creates, not by the ORM."""

    __tablename__ = "plugin_heartbeats"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    installation_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("merchant_plugins.id", ondelete="CASCADE"), nullable=False
    )
    received_at: Mapped[datetime] = _now()
    # The request's verified X-Timestamp, which its digest covers: a replay has the same one, so
    # it lands in the same partition and meets the same unique index. The partition key.
    signed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    plugin_version: Mapped[str] = mapped_column(Text, nullable=False)
    env: Mapped[str] = mapped_column(Text, nullable=False)
    uptime_s: Mapped[int | None] = mapped_column(BigInteger)
    requests: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    errors: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    webhook_attempts: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    webhook_failures: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    latency_p95_ms: Mapped[float | None] = mapped_column(Numeric)
    errors_last_24h: Mapped[int | None] = mapped_column(BigInteger)
    telemetry: Mapped[dict[str, Any]] = mapped_column(
        JSONB, nullable=False, server_default=text("'{}'::jsonb")
    )
    meta: Mapped[dict[str, Any]] = mapped_column(
        JSONB, nullable=False, server_default=text("'{}'::jsonb")
    )
    msg_digest: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    __table_args__ = (
        UniqueConstraint(
            "installation_id", "msg_digest", "signed_at", name="uq_plugin_heartbeats_replay"
        ),
        Index("ix_plugin_heartbeats_installation_received", "installation_id", "received_at"),
        {"postgresql_partition_by": "RANGE (signed_at)"},
    )


class PluginRelease(Base):
    __tablename__ = "plugin_releases"
    id: Mapped[uuid.UUID] = _uuid_pk()
    plugin_name: Mapped[str] = mapped_column(Text, nullable=False)
    version: Mapped[str] = mapped_column(Text, nullable=False)
    artifact_url: Mapped[str] = mapped_column(Text, nullable=False)
    sha256: Mapped[str] = mapped_column(Text, nullable=False)
    signature: Mapped[str] = mapped_column(Text, nullable=False)
    signed_statement: Mapped[str] = mapped_column(Text, nullable=False)
    created_at: Mapped[datetime] = _now()
    quarantined_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    quarantine_reason: Mapped[str | None] = mapped_column(Text)
    __table_args__ = (
        UniqueConstraint("plugin_name", "version", name="uq_plugin_releases_plugin_version"),
        CheckConstraint("sha256 ~ '^[0-9a-f]{64}$'", name="sha256_hex"),
    )


class PluginReleaseTenantBlock(Base):
    """A release the loop no longer proposes to one tenant's installations: that tenant's
    installations alone rolled it back often enough (fleet-wide quarantine needs several
    tenants: app/healing/engine.py, `_maybe_quarantine`)."""

    __tablename__ = "plugin_release_tenant_blocks"
    plugin_name: Mapped[str] = mapped_column(Text, primary_key=True)
    version: Mapped[str] = mapped_column(Text, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), primary_key=True, index=True)
    reason: Mapped[str] = mapped_column(Text, nullable=False)
    blocked_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), nullable=False
    )
    __table_args__ = (
        ForeignKeyConstraint(
            ["plugin_name", "version"],
            ["plugin_releases.plugin_name", "plugin_releases.version"],
        ),
    )


class PluginReleaseArtifact(Base):
    """The bytes of a release, served by the control plane to its plugins and to staging."""

    __tablename__ = "plugin_release_artifacts"
    plugin_name: Mapped[str] = mapped_column(Text, primary_key=True)
    version: Mapped[str] = mapped_column(Text, primary_key=True)
    sha256: Mapped[str] = mapped_column(Text, nullable=False)
    size_bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)
    content: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    created_at: Mapped[datetime] = _now()
    __table_args__ = (
        ForeignKeyConstraint(
            ["plugin_name", "version"],
            ["plugin_releases.plugin_name", "plugin_releases.version"],
        ),
        CheckConstraint("sha256 = encode(sha256(content), 'hex')", name="sha256_of_content"),
        CheckConstraint("size_bytes = octet_length(content)", name="size"),
    )


class PluginIncident(Base):
    __tablename__ = "plugin_incidents"
    id: Mapped[uuid.UUID] = _uuid_pk()
    installation_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("merchant_plugins.id"))
    tenant_id: Mapped[str | None] = mapped_column(ForeignKey("tenants.id"))
    plugin_name: Mapped[str] = mapped_column(Text, nullable=False)
    plugin_version: Mapped[str | None] = mapped_column(Text)
    type: Mapped[str] = mapped_column(Text, nullable=False)
    severity: Mapped[str] = mapped_column(Text, nullable=False)
    status: Mapped[str] = mapped_column(Text, nullable=False, server_default="detected")
    status_reason: Mapped[str | None] = mapped_column(Text)
    first_bad_signal_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    detected_at: Mapped[datetime] = _now()
    resolved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    telemetry_snapshot: Mapped[dict[str, Any]] = mapped_column(
        JSONB, nullable=False, server_default=text("'{}'::jsonb")
    )
    sira_decision: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    occurrences: Mapped[int] = mapped_column(Integer, nullable=False, server_default="1")
    updated_at: Mapped[datetime] = _now()
    # The healing loop looks at the incident again at this time (NULL: nothing to do). A
    # worker that takes the incident pushes it forward by a lease; a worker that dies leaves
    # it due, and another one resumes it: the reconciler is this column.
    next_check_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The action waiting for the policy gate (decided, or asked for by an operator).
    pending_action: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    decided_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    escalated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Set on the installations' incidents that a fleet incident (installation_id NULL) groups.
    fleet_incident_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("plugin_incidents.id"))
    # Set while the healing loop leaves the incident alone because its installation's
    # heartbeat_missed incident is open (migration 0018; app/healing/engine.py, `_muted`).
    muted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # A member's severity before its fleet incident raised it, kept up by its repeats; NULL
    # when not raised. Given back when the fleet incident closes (migration 0019's trigger).
    own_severity: Mapped[str | None] = mapped_column(Text)
    __table_args__ = (
        CheckConstraint(_in("severity", SEVERITIES), name="severity"),
        CheckConstraint(
            f"own_severity IS NULL OR {_in('own_severity', SEVERITIES)}", name="own_severity"
        ),
        CheckConstraint(_in("type", INCIDENT_TYPES), name="type"),
        CheckConstraint(_in("status", INCIDENT_STATUSES), name="status"),
        Index("ix_plugin_incidents_detected_at", "detected_at"),
        Index("ix_plugin_incidents_status", "status"),
        # Deduplication: one open incident per (installation, type).
        Index(
            "uq_plugin_incidents_open_per_type",
            "installation_id",
            "type",
            unique=True,
            postgresql_where=text(_OPEN_INCIDENT),
        ),
        Index(
            "uq_plugin_incidents_open_fleet",
            "plugin_name",
            "plugin_version",
            "type",
            unique=True,
            postgresql_where=text(f"installation_id IS NULL AND {_OPEN_INCIDENT}"),
        ),
        Index(
            "ix_plugin_incidents_due",
            "next_check_at",
            postgresql_where=text("next_check_at IS NOT NULL"),
        ),
        Index(
            "ix_plugin_incidents_fleet_incident_id",
            "fleet_incident_id",
            postgresql_where=text("fleet_incident_id IS NOT NULL"),
        ),
        # The fleet step of each detection tick (app/incidents/fleet.py): a group's open
        # incidents not yet grouped, and whether a fleet incident still has an open member,
        # each one index range instead of a scan of the open incidents.
        Index(
            "ix_plugin_incidents_open_members",
            "plugin_name",
            "plugin_version",
            "type",
            "fleet_incident_id",
            postgresql_where=text(f"installation_id IS NOT NULL AND {_OPEN_INCIDENT}"),
        ),
    )


class PluginIncidentRepeat(Base):
    """Repeats a detection tick could not record because a healing step held the incident:
    the next tick adds them (app/incidents/repository.py, `record_findings`)."""

    __tablename__ = "plugin_incident_repeats"
    # No foreign key: its check would wait on the incident row the healing step holds.
    incident_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    occurrences: Mapped[int] = mapped_column(Integer, nullable=False)
    severity: Mapped[str] = mapped_column(Text, nullable=False)
    deferred_at: Mapped[datetime] = _now()
    __table_args__ = (
        CheckConstraint("occurrences > 0", name="occurrences"),
        CheckConstraint(_in("severity", SEVERITIES), name="severity"),
    )


class PluginAutopatchAttempt(Base):
    """An attempt to heal an incident. Every change is appended to the event log by a trigger;
    DELETE is refused and past facts (ids, versions, terminal outcomes) cannot be rewritten."""

    __tablename__ = "plugin_autopatch_attempts"
    id: Mapped[uuid.UUID] = _uuid_pk()
    incident_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("plugin_incidents.id"))
    installation_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("merchant_plugins.id"))
    action: Mapped[str] = mapped_column(Text, nullable=False, server_default="patch")
    from_version: Mapped[str | None] = mapped_column(Text)
    to_version: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text, nullable=False, server_default="pending")
    decision_source: Mapped[str | None] = mapped_column(Text)
    confidence: Mapped[Decimal | None] = mapped_column(Numeric(4, 3))
    requested_by: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _now()
    executed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    failure_reason: Mapped[str | None] = mapped_column(Text)
    rollback_reason: Mapped[str | None] = mapped_column(Text)
    rolled_back_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = _now()
    automatic: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default="false")
    staging_run_id: Mapped[str | None] = mapped_column(Text)
    staging_report: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    staging_tries: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    verify_deadline_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    __table_args__ = (
        CheckConstraint(_in("status", ATTEMPT_STATUSES), name="status"),
        CheckConstraint(_in("action", tuple(CHANGES)), name="action"),
        CheckConstraint("confidence IS NULL OR confidence BETWEEN 0 AND 1", name="confidence"),
        Index("ix_plugin_autopatch_attempts_executed_at", "executed_at"),
        Index("ix_plugin_autopatch_attempts_incident_id", "incident_id"),
        Index("ix_plugin_autopatch_attempts_status", "status"),
        Index("ix_plugin_autopatch_attempts_installation_created", "installation_id", "created_at"),
        # One attempt in flight per incident: a job that runs twice cannot start a second.
        Index(
            "uq_plugin_autopatch_attempts_in_flight",
            "incident_id",
            unique=True,
            postgresql_where=text(_IN_FLIGHT_ATTEMPT),
        ),
    )


class AttemptEvent(Base):
    """Hash-chained, append-only log of every attempt change (written by a trigger)."""

    __tablename__ = "plugin_autopatch_attempt_events"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    attempt_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), nullable=False)
    at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=text("clock_timestamp()"), nullable=False
    )
    operation: Mapped[str] = mapped_column(Text, nullable=False)
    old_status: Mapped[str | None] = mapped_column(Text)
    new_status: Mapped[str] = mapped_column(Text, nullable=False)
    db_user: Mapped[str] = mapped_column(Text, nullable=False)
    application_name: Mapped[str | None] = mapped_column(Text)
    actor: Mapped[str | None] = mapped_column(Text)
    row_data: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    prev_hash: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    hash: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    __table_args__ = (
        Index("ix_plugin_autopatch_attempt_events_attempt_id", "attempt_id"),
        UniqueConstraint("hash", name="uq_plugin_autopatch_attempt_events_hash"),
        # Two transactions that both read the same chain head cannot both append: the second
        # fails here instead of forking the chain.
        UniqueConstraint("prev_hash", name="uq_plugin_autopatch_attempt_events_prev_hash"),
    )


class OpsPolicy(Base):
    """Exactly one row (id = 1), created by the migration. Safe defaults: autopatch off."""

    __tablename__ = "ops_policy"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, server_default="1")
    autopatch_enabled: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default="false")
    autopatch_whitelist: Mapped[list[str]] = mapped_column(
        JSONB, nullable=False, server_default=text("'[]'::jsonb")
    )
    autopatch_max_severity: Mapped[str] = mapped_column(
        Text, nullable=False, server_default="medium"
    )
    min_confidence: Mapped[Decimal] = mapped_column(
        Numeric(4, 3), nullable=False, server_default="0.8"
    )
    canary_percent: Mapped[int] = mapped_column(Integer, nullable=False, server_default="100")
    approvals_required: Mapped[int] = mapped_column(Integer, nullable=False, server_default="2")
    approval_min_severity: Mapped[str] = mapped_column(Text, nullable=False, server_default="high")
    approval_ttl_s: Mapped[int] = mapped_column(Integer, nullable=False, server_default="3600")
    max_concurrent_actions: Mapped[int] = mapped_column(
        Integer, nullable=False, server_default="10"
    )
    max_concurrent_actions_per_tenant: Mapped[int] = mapped_column(
        Integer, nullable=False, server_default="2"
    )
    cooldown_s: Mapped[int] = mapped_column(Integer, nullable=False, server_default="3600")
    updated_at: Mapped[datetime] = _now()
    updated_by: Mapped[str | None] = mapped_column(Text)
    __table_args__ = (
        CheckConstraint("id = 1", name="single_row"),
        CheckConstraint("jsonb_typeof(autopatch_whitelist) = 'array'", name="whitelist_array"),
        CheckConstraint(_in("autopatch_max_severity", SEVERITIES), name="max_severity"),
        CheckConstraint(_in("approval_min_severity", SEVERITIES), name="approval_min_severity"),
        CheckConstraint("min_confidence BETWEEN 0 AND 1", name="min_confidence"),
        CheckConstraint("canary_percent BETWEEN 0 AND 100", name="canary_percent"),
        CheckConstraint("approvals_required BETWEEN 1 AND 10", name="approvals_required"),
        CheckConstraint("approval_ttl_s > 0", name="approval_ttl"),
        CheckConstraint("max_concurrent_actions >= 0", name="max_concurrent"),
        CheckConstraint("max_concurrent_actions_per_tenant >= 0", name="max_concurrent_tenant"),
        CheckConstraint("cooldown_s >= 0", name="cooldown"),
    )


class SiraLearningFeedback(Base):
    __tablename__ = "sira_learning_feedback"
    id: Mapped[uuid.UUID] = _uuid_pk()
    incident_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("plugin_incidents.id"))
    attempt_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("plugin_autopatch_attempts.id"))
    incident_type: Mapped[str] = mapped_column(Text, nullable=False)
    plugin_name: Mapped[str] = mapped_column(Text, nullable=False)
    from_version: Mapped[str | None] = mapped_column(Text)
    to_version: Mapped[str | None] = mapped_column(Text)
    decision_source: Mapped[str] = mapped_column(Text, nullable=False)
    confidence: Mapped[Decimal | None] = mapped_column(Numeric(4, 3))
    outcome: Mapped[str] = mapped_column(Text, nullable=False)
    created_at: Mapped[datetime] = _now()
    # The installation's tenant (NULL on rows recorded before migration 0015).
    tenant_id: Mapped[str | None] = mapped_column(Text)
    __table_args__ = (UniqueConstraint("attempt_id", name="uq_sira_learning_feedback_attempt_id"),)


class PluginAgentCommand(Base):
    """The command queue plugins poll through their heartbeats."""

    __tablename__ = "plugin_agent_commands"
    id: Mapped[uuid.UUID] = _uuid_pk()
    installation_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("merchant_plugins.id", ondelete="CASCADE"), nullable=False
    )
    attempt_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("plugin_autopatch_attempts.id"))
    type: Mapped[str] = mapped_column(Text, nullable=False)
    payload: Mapped[dict[str, Any]] = mapped_column(
        JSONB, nullable=False, server_default=text("'{}'::jsonb")
    )
    automatic: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default="false")
    status: Mapped[str] = mapped_column(Text, nullable=False, server_default="pending")
    created_at: Mapped[datetime] = _now()
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    delivery_count: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    max_deliveries: Mapped[int] = mapped_column(Integer, nullable=False, server_default="5")
    acked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    failed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    error: Mapped[str | None] = mapped_column(Text)
    retryable: Mapped[bool | None] = mapped_column(Boolean)
    # An automatic command the plugin had when the kill switch was engaged: never handed out
    # again (migration 0018).
    held_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    __table_args__ = (
        CheckConstraint(_in("type", COMMAND_TYPES), name="type"),
        CheckConstraint(_in("status", COMMAND_STATUSES), name="status"),
        CheckConstraint("delivery_count >= 0", name="delivery_count"),
        # One command of each kind per attempt: a job that runs twice cannot queue two updates.
        UniqueConstraint("attempt_id", "type", name="uq_plugin_agent_commands_attempt_type"),
        # Ingest looks up deliverable commands of the plugins in a batch: only open ones indexed.
        Index(
            "ix_plugin_agent_commands_open",
            "installation_id",
            postgresql_where=text("status IN ('pending', 'delivered')"),
        ),
        Index(
            "ix_plugin_agent_commands_attempt_id",
            "attempt_id",
            postgresql_where=text("attempt_id IS NOT NULL"),
        ),
    )


class OpsUser(Base):
    __tablename__ = "ops_users"
    id: Mapped[uuid.UUID] = _uuid_pk()
    username: Mapped[str] = mapped_column(Text, nullable=False, unique=True)
    role: Mapped[str] = mapped_column(Text, nullable=False)
    password_hash: Mapped[str] = mapped_column(Text, nullable=False)
    created_at: Mapped[datetime] = _now()
    disabled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The tenants the user sees and acts on; NULL: every tenant (migration 0016). An admin is
    # never scoped: the policy and the ops users are global.
    tenants: Mapped[list[str] | None] = mapped_column(ARRAY(Text))
    __table_args__ = (
        CheckConstraint(_in("role", ROLES), name="role"),
        CheckConstraint("username ~ '^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$'", name="username"),
        CheckConstraint(
            "tenants IS NULL OR (cardinality(tenants) BETWEEN 1 AND 100"
            " AND array_position(tenants, NULL) IS NULL)",
            name="tenants",
        ),
        CheckConstraint("role <> 'admin' OR tenants IS NULL", name="admin_unscoped"),
    )


class ApiToken(Base):
    """Ops API tokens, stored as SHA-256 (they are 256-bit random, so a slow hash adds nothing
    but latency; the digest still lets us look a token up by index)."""

    __tablename__ = "ops_api_tokens"
    id: Mapped[uuid.UUID] = _uuid_pk()
    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("ops_users.id", ondelete="CASCADE"), nullable=False
    )
    token_hash: Mapped[bytes] = mapped_column(LargeBinary, nullable=False, unique=True)
    created_at: Mapped[datetime] = _now()
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Set by the application (SELFHEAL_TOKEN_TTL_DAYS or --days); the default covers a token
    # inserted by hand (migration 0014).
    expires_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True),
        nullable=False,
        server_default=text("(now() + '90 days'::interval)"),
    )


class OpsSession(Base):
    """A dashboard sign-in (app/dashboard/sessions.py). Only the SHA-256 of the session id is
    stored: the cookie's value is 256 random bits, so a slow hash adds nothing, and a
    database read does not hand out live sessions. Deleted at logout and when found expired
    (idle or absolute timeout)."""

    __tablename__ = "ops_sessions"
    id_hash: Mapped[bytes] = mapped_column(LargeBinary, primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("ops_users.id", ondelete="CASCADE"), nullable=False
    )
    # The session's CSRF token: every dashboard form carries it back.
    csrf_token: Mapped[str] = mapped_column(Text, nullable=False)
    created_at: Mapped[datetime] = _now()
    last_seen_at: Mapped[datetime] = _now()
    # A message for the next page (after a POST and its redirect), then cleared.
    flash: Mapped[str | None] = mapped_column(Text)
    __table_args__ = (Index("ix_ops_sessions_user_id", "user_id"),)


class Approval(Base):
    __tablename__ = "approvals"
    id: Mapped[uuid.UUID] = _uuid_pk()
    incident_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("plugin_incidents.id"), nullable=False
    )
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("ops_users.id"), nullable=False)
    action_key: Mapped[str] = mapped_column(Text, nullable=False)
    comment: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _now()
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    __table_args__ = (
        UniqueConstraint("incident_id", "user_id", "action_key", name="uq_approvals_vote"),
    )


class AuditLog(Base):
    """Who changed what, including changes made directly in SQL (written by triggers)."""

    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=text("clock_timestamp()"), nullable=False
    )
    db_user: Mapped[str] = mapped_column(Text, nullable=False, server_default=text("current_user"))
    application_name: Mapped[str | None] = mapped_column(Text)
    actor: Mapped[str | None] = mapped_column(Text)
    action: Mapped[str] = mapped_column(Text, nullable=False)
    entity: Mapped[str] = mapped_column(Text, nullable=False)
    entity_id: Mapped[str | None] = mapped_column(Text)
    old: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    new: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    # The tenant of the audited row (filled by a trigger, migration 0016); NULL: global.
    tenant_id: Mapped[str | None] = mapped_column(Text)
    __table_args__ = (
        Index("ix_audit_log_entity", "entity", "entity_id"),
        Index("ix_audit_log_tenant_id", "tenant_id"),
    )


class HistorySeal(Base):
    """A seal over one row of a history log (app/audit): an HMAC chain under a key the
    database does not hold. Append-only (migration 0013)."""

    __tablename__ = "history_seals"
    seq: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    log: Mapped[str] = mapped_column(Text, nullable=False)
    row_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    key_id: Mapped[str] = mapped_column(Text, nullable=False)
    mac: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    sealed_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=text("clock_timestamp()"), nullable=False
    )
    __table_args__ = (
        UniqueConstraint("log", "row_id", name="uq_history_seals_row"),
        CheckConstraint(
            "log IN ('audit_log', 'plugin_autopatch_attempt_events')",
            name="log",
        ),
    )


class NotificationEndpoint(Base):
    """A webhook that receives notifications: a tenant's (tenant_id set) or ops' (NULL).
    Deliveries are signed with the endpoint's secret, stored encrypted."""

    __tablename__ = "notification_endpoints"
    id: Mapped[uuid.UUID] = _uuid_pk()
    tenant_id: Mapped[str | None] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    url: Mapped[str] = mapped_column(Text, nullable=False)
    secret_enc: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    # Event names this endpoint wants; empty: all.
    events: Mapped[list[str]] = mapped_column(
        JSONB, nullable=False, server_default=text("'[]'::jsonb")
    )
    created_at: Mapped[datetime] = _now()
    disabled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    __table_args__ = (
        CheckConstraint("jsonb_typeof(events) = 'array'", name="events_array"),
        CheckConstraint("url ~ '^https?://'", name="url_http"),
        Index("ix_notification_endpoints_tenant_id", "tenant_id"),
    )


class Outbox(Base):
    """Notifications and decision-service feedback waiting for delivery."""

    __tablename__ = "outbox"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    kind: Mapped[str] = mapped_column(Text, nullable=False)
    topic: Mapped[str] = mapped_column(Text, nullable=False)
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    created_at: Mapped[datetime] = _now()
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    next_attempt_at: Mapped[datetime] = _now()
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(Text)
    # Notifications: the endpoint this row goes to (one row per endpoint).
    endpoint_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("notification_endpoints.id", ondelete="CASCADE")
    )
    # Set when delivery was given up (too many attempts, or refused for good).
    dead_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    __table_args__ = (
        CheckConstraint("kind IN ('notification', 'feedback')", name="kind"),
        Index(
            "ix_outbox_due",
            "next_attempt_at",
            postgresql_where=text("delivered_at IS NULL AND dead_at IS NULL"),
        ),
    )


class MaintenanceWindow(Base):
    """While a window is open, no new incident is opened for its installation or tenant (one
    of the two is set). Windows are kept after they end: they are the record of why nothing
    was detected."""

    __tablename__ = "maintenance_windows"
    id: Mapped[uuid.UUID] = _uuid_pk()
    tenant_id: Mapped[str | None] = mapped_column(ForeignKey("tenants.id"))
    installation_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("merchant_plugins.id"))
    starts_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    ends_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    reason: Mapped[str] = mapped_column(Text, nullable=False)
    created_by: Mapped[str] = mapped_column(Text, nullable=False)
    created_at: Mapped[datetime] = _now()
    __table_args__ = (
        CheckConstraint("(tenant_id IS NULL) <> (installation_id IS NULL)", name="one_target"),
        CheckConstraint("ends_at > starts_at", name="ends_after_start"),
        Index("ix_maintenance_windows_ends_at", "ends_at"),
    )


class DetectorWatermark(Base):
    """How far the threshold detector has read plugin_heartbeats (by id). The row lock also
    makes ticks run one at a time, whatever the number of workers."""

    __tablename__ = "detector_watermarks"
    name: Mapped[str] = mapped_column(Text, primary_key=True)
    last_id: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    # The signed_at of the last sample read: bounds the next scan's signed_at, so it reads the
    # recent partitions only (app/incidents/repository.py, SIGNED_AT_SLACK; migration 0017).
    last_signed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = _now()
