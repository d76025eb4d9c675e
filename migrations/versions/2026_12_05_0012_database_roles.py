"""Database roles: an owner, the application, ops (issue 10).

Placeholder: filled in by the change that needs it.

Revision ID: 0012_database_roles
Revises: 0011_audit_ops_users
Create Date: 2026-12-05 12:00:00+00:00
"""

from collections.abc import Sequence

revision: str = "0012_database_roles"
down_revision: str | None = "0011_audit_ops_users"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
