"""Tenant-scoped ops users and the tenant in the audit log (issue 10).

Placeholder: filled in by the change that needs it.

Revision ID: 0016_tenant_scope
Revises: 0015_vote_binding
Create Date: 2026-12-05 12:00:00+00:00
"""

from collections.abc import Sequence

revision: str = "0016_tenant_scope"
down_revision: str | None = "0015_vote_binding"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
