"""Healing loop state: when an incident is next looked at, the action it waits to take,
staging and verification of attempts, one attempt in flight per incident, fleet incidents,
and cancelling an attempt (also from psql) cancels its undelivered commands.

Revision ID: 0005_healing_loop
Revises: 0004_detection_state
Create Date: 2026-12-03 12:10:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005_healing_loop"
down_revision: str | None = "0004_detection_state"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

IN_FLIGHT = "status IN ('pending', 'staging', 'applying', 'verifying')"
CLOSED = "status NOT IN ('resolved', 'rolled_back', 'failed', 'cancelled', 'ignored')"

CANCEL_COMMANDS = """
CREATE FUNCTION selfheal_cancel_commands_of_cancelled_attempt() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- A command already handed to the plugin cannot be recalled; one still waiting can.
    UPDATE plugin_agent_commands SET status = 'cancelled'
    WHERE attempt_id = NEW.id AND status = 'pending';
    RETURN NULL;
END $$;
CREATE TRIGGER plugin_autopatch_attempts_cancel_commands
AFTER UPDATE OF status ON plugin_autopatch_attempts
FOR EACH ROW WHEN (NEW.status = 'cancelled' AND OLD.status IS DISTINCT FROM 'cancelled')
EXECUTE FUNCTION selfheal_cancel_commands_of_cancelled_attempt();
ALTER TABLE plugin_autopatch_attempts ENABLE ALWAYS TRIGGER plugin_autopatch_attempts_cancel_commands;
"""


def upgrade() -> None:
    op.add_column(
        "plugin_incidents", sa.Column("next_check_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column(
        "plugin_incidents",
        sa.Column("pending_action", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    )
    op.add_column(
        "plugin_incidents", sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column(
        "plugin_incidents", sa.Column("escalated_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column("plugin_incidents", sa.Column("fleet_incident_id", sa.UUID(), nullable=True))
    op.create_foreign_key(
        op.f("fk_plugin_incidents_fleet_incident_id_plugin_incidents"),
        "plugin_incidents",
        "plugin_incidents",
        ["fleet_incident_id"],
        ["id"],
    )
    op.create_index(
        "ix_plugin_incidents_due",
        "plugin_incidents",
        ["next_check_at"],
        unique=False,
        postgresql_where=sa.text("next_check_at IS NOT NULL"),
    )
    op.create_index(
        "uq_plugin_incidents_open_fleet",
        "plugin_incidents",
        ["plugin_name", "plugin_version", "type"],
        unique=True,
        postgresql_where=sa.text(f"installation_id IS NULL AND {CLOSED}"),
    )
    op.create_index(
        "ix_plugin_incidents_fleet_incident_id",
        "plugin_incidents",
        ["fleet_incident_id"],
        unique=False,
        postgresql_where=sa.text("fleet_incident_id IS NOT NULL"),
    )

    op.add_column(
        "plugin_autopatch_attempts",
        sa.Column("automatic", sa.Boolean(), server_default="false", nullable=False),
    )
    op.add_column("plugin_autopatch_attempts", sa.Column("staging_run_id", sa.Text()))
    op.add_column(
        "plugin_autopatch_attempts",
        sa.Column("staging_report", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    )
    op.add_column(
        "plugin_autopatch_attempts",
        sa.Column("staging_tries", sa.Integer(), server_default="0", nullable=False),
    )
    op.add_column(
        "plugin_autopatch_attempts",
        sa.Column("verify_deadline_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index(
        "ix_plugin_autopatch_attempts_installation_created",
        "plugin_autopatch_attempts",
        ["installation_id", "created_at"],
        unique=False,
    )
    op.create_index(
        "uq_plugin_autopatch_attempts_in_flight",
        "plugin_autopatch_attempts",
        ["incident_id"],
        unique=True,
        postgresql_where=sa.text(IN_FLIGHT),
    )
    op.create_index(
        "ix_plugin_agent_commands_attempt_id",
        "plugin_agent_commands",
        ["attempt_id"],
        unique=False,
        postgresql_where=sa.text("attempt_id IS NOT NULL"),
    )
    op.execute(CANCEL_COMMANDS)

    op.add_column("tenants", sa.Column("severity_floor", sa.Text(), nullable=True))
    op.create_check_constraint(
        op.f("ck_tenants_severity_floor"),
        "tenants",
        "severity_floor IS NULL OR severity_floor IN ('low', 'medium', 'high', 'critical')",
    )
    op.create_table(
        "notification_endpoints",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("tenant_id", sa.Text(), nullable=True),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("secret_enc", sa.LargeBinary(), nullable=False),
        sa.Column(
            "events",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'[]'::jsonb"),
            nullable=False,
        ),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "jsonb_typeof(events) = 'array'", name=op.f("ck_notification_endpoints_events_array")
        ),
        sa.CheckConstraint("url ~ '^https?://'", name=op.f("ck_notification_endpoints_url_http")),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_notification_endpoints_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_notification_endpoints")),
    )
    op.create_index("ix_notification_endpoints_tenant_id", "notification_endpoints", ["tenant_id"])
    op.add_column("outbox", sa.Column("endpoint_id", sa.UUID(), nullable=True))
    op.add_column("outbox", sa.Column("dead_at", sa.DateTime(timezone=True), nullable=True))
    op.create_foreign_key(
        op.f("fk_outbox_endpoint_id_notification_endpoints"),
        "outbox",
        "notification_endpoints",
        ["endpoint_id"],
        ["id"],
        ondelete="CASCADE",
    )


def downgrade() -> None:
    op.drop_constraint(
        op.f("fk_outbox_endpoint_id_notification_endpoints"), "outbox", type_="foreignkey"
    )
    op.drop_column("outbox", "dead_at")
    op.drop_column("outbox", "endpoint_id")
    op.drop_index("ix_notification_endpoints_tenant_id", table_name="notification_endpoints")
    op.drop_table("notification_endpoints")
    op.drop_constraint(op.f("ck_tenants_severity_floor"), "tenants", type_="check")
    op.drop_column("tenants", "severity_floor")
    op.execute(
        "DROP TRIGGER plugin_autopatch_attempts_cancel_commands ON plugin_autopatch_attempts"
    )
    op.execute("DROP FUNCTION selfheal_cancel_commands_of_cancelled_attempt()")
    op.drop_index(
        "ix_plugin_agent_commands_attempt_id",
        table_name="plugin_agent_commands",
        postgresql_where=sa.text("attempt_id IS NOT NULL"),
    )
    op.drop_index(
        "uq_plugin_autopatch_attempts_in_flight",
        table_name="plugin_autopatch_attempts",
        postgresql_where=sa.text(IN_FLIGHT),
    )
    op.drop_index(
        "ix_plugin_autopatch_attempts_installation_created",
        table_name="plugin_autopatch_attempts",
    )
    for column in ("verify_deadline_at", "staging_tries", "staging_report", "staging_run_id"):
        op.drop_column("plugin_autopatch_attempts", column)
    op.drop_column("plugin_autopatch_attempts", "automatic")
    op.drop_index(
        "ix_plugin_incidents_fleet_incident_id",
        table_name="plugin_incidents",
        postgresql_where=sa.text("fleet_incident_id IS NOT NULL"),
    )
    op.drop_index(
        "uq_plugin_incidents_open_fleet",
        table_name="plugin_incidents",
        postgresql_where=sa.text(f"installation_id IS NULL AND {CLOSED}"),
    )
    op.drop_index(
        "ix_plugin_incidents_due",
        table_name="plugin_incidents",
        postgresql_where=sa.text("next_check_at IS NOT NULL"),
    )
    op.drop_constraint(
        op.f("fk_plugin_incidents_fleet_incident_id_plugin_incidents"),
        "plugin_incidents",
        type_="foreignkey",
    )
    for column in ("fleet_incident_id", "escalated_at", "decided_at", "pending_action"):
        op.drop_column("plugin_incidents", column)
    op.drop_column("plugin_incidents", "next_check_at")
