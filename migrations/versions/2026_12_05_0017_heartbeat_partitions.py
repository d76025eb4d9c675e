"""Time-partitioned plugin_heartbeats (issue 11).

Placeholder: filled in by the change that needs it.

Revision ID: 0017_heartbeat_partitions
Revises: 0016_tenant_scope
Create Date: 2026-12-05 16:00:00+00:00
"""

from collections.abc import Sequence

revision: str = "0017_heartbeat_partitions"
down_revision: str | None = "0016_tenant_scope"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
