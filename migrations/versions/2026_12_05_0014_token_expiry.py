"""Ops API tokens expire (issue 10): `ops_api_tokens.expires_at`.

The application sets it when it issues a token (SELFHEAL_TOKEN_TTL_DAYS, or the command's
--days); the column default (90 days, the setting's default) covers a token inserted by hand.
Tokens issued before this migration expire 90 days after it, not at once: nobody is locked
out by the upgrade, and no token lives forever. A token is refused once `expires_at` has
passed (401, naming the expiry), as it is once `revoked_at` is set.

Revision ID: 0014_token_expiry
Revises: 0013_audit_seals
Create Date: 2026-12-05 12:00:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014_token_expiry"
down_revision: str | None = "0013_audit_seals"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # now() is stable, so the default is evaluated once: existing rows all get the same expiry
    # and the table is not rewritten.
    op.add_column(
        "ops_api_tokens",
        sa.Column(
            "expires_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("(now() + '90 days'::interval)"),
            nullable=False,
        ),
    )


def downgrade() -> None:
    op.drop_column("ops_api_tokens", "expires_at")
