"""API token expiry (issue 10).

Placeholder: filled in by the change that needs it.

Revision ID: 0014_token_expiry
Revises: 0013_audit_seals
Create Date: 2026-12-05 12:00:00+00:00
"""

from collections.abc import Sequence

revision: str = "0014_token_expiry"
down_revision: str | None = "0013_audit_seals"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
