"""Keyed seals over the history (issue 10).

Placeholder: filled in by the change that needs it.

Revision ID: 0013_audit_seals
Revises: 0012_database_roles
Create Date: 2026-12-05 12:00:00+00:00
"""

from collections.abc import Sequence

revision: str = "0013_audit_seals"
down_revision: str | None = "0012_database_roles"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
