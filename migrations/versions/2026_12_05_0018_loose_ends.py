"""Loose ends of the healing loop: held commands, outbox due index, release audit (issue 11).

Placeholder: filled in by the change that needs it.

Revision ID: 0018_loose_ends
Revises: 0017_heartbeat_partitions
Create Date: 2026-12-05 16:00:00+00:00
"""

from collections.abc import Sequence

revision: str = "0018_loose_ends"
down_revision: str | None = "0017_heartbeat_partitions"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
