"""Set-based detection: fleet-raised severities (issue 11).

Placeholder: filled in by the change that needs it.

Revision ID: 0019_set_detection
Revises: 0018_loose_ends
Create Date: 2026-12-05 16:00:00+00:00
"""

from collections.abc import Sequence

revision: str = "0019_set_detection"
down_revision: str | None = "0018_loose_ends"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
