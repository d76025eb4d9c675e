"""Fleet incidents: open installation incidents by plugin version, type and fleet incident.

The fleet step of every detection tick counts a group's open, not yet grouped incidents, links
them to their open fleet incident, and checks whether a fleet incident still has an open
member. Without this index each of those is a scan of all open incidents; with it, each is one
index range. Partial: only open installation incidents are in it, so it stays small.

Revision ID: 0006_fleet_index
Revises: 0005_healing_loop
Create Date: 2026-12-03 18:00:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_fleet_index"
down_revision: str | None = "0005_healing_loop"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OPEN_MEMBER = (
    "installation_id IS NOT NULL"
    " AND status NOT IN ('resolved', 'rolled_back', 'failed', 'cancelled', 'ignored')"
)


def upgrade() -> None:
    op.create_index(
        "ix_plugin_incidents_open_members",
        "plugin_incidents",
        ["plugin_name", "plugin_version", "type", "fleet_incident_id"],
        unique=False,
        postgresql_where=sa.text(OPEN_MEMBER),
    )


def downgrade() -> None:
    op.drop_index(
        "ix_plugin_incidents_open_members",
        table_name="plugin_incidents",
        postgresql_where=sa.text(OPEN_MEMBER),
    )
