"""Dashboard sign-in sessions (issue 9): `ops_sessions`, one row per signed-in browser.

The row is keyed by the SHA-256 of the session id the cookie holds (never the id itself),
carries the session's CSRF token and a one-shot message for the page after a form's
redirect. Idle and absolute timeouts are checked against `last_seen_at` and `created_at`
(SELFHEAL_SESSION_IDLE_S, SELFHEAL_SESSION_MAX_S); logout deletes the row; a user's sessions
go with the user (ON DELETE CASCADE).

Revision ID: 0010_ops_sessions
Revises: 0009_incident_status_check
Create Date: 2026-12-05 08:00:00+00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0010_ops_sessions"
down_revision: str | None = "0009_incident_status_check"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE ops_sessions (
            id_hash bytea NOT NULL,
            user_id uuid NOT NULL,
            csrf_token text NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            last_seen_at timestamptz NOT NULL DEFAULT now(),
            flash text,
            CONSTRAINT pk_ops_sessions PRIMARY KEY (id_hash),
            CONSTRAINT fk_ops_sessions_user_id_ops_users FOREIGN KEY (user_id)
                REFERENCES ops_users (id) ON DELETE CASCADE
        );
        CREATE INDEX ix_ops_sessions_user_id ON ops_sessions (user_id);
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE ops_sessions")
