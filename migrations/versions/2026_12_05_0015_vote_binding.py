"""Approvals bound to the action they approved (issue 10).

Placeholder: filled in by the change that needs it.

Revision ID: 0015_vote_binding
Revises: 0014_token_expiry
Create Date: 2026-12-05 12:00:00+00:00
"""

from collections.abc import Sequence

revision: str = "0015_vote_binding"
down_revision: str | None = "0014_token_expiry"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
