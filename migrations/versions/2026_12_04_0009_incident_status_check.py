"""The incident statuses, checked by the database (issue 8): `plugin_incidents.status` takes
only the values of app/core/states.py's IncidentStatus, as `plugin_autopatch_attempts.status`
already did for AttemptStatus. An UPDATE typed in psql with a misspelt status used to leave
an incident in a status no code handles (neither open work nor closed); it is now refused.
tests/test_state_machine.py proves that this list and the enum stay equal.

Added NOT VALID, then validated: validation takes only a SHARE UPDATE EXCLUSIVE lock, so
heartbeats and the healing loop keep writing while the existing rows are checked.

Revision ID: 0009_incident_status_check
Revises: 0008_known_good_and_artifacts
Create Date: 2026-12-04 19:30:00+00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0009_incident_status_check"
down_revision: str | None = "0008_known_good_and_artifacts"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATUSES = (
    "('detected', 'deciding', 'awaiting_approval', 'blocked_by_policy', 'staging', 'applying',"
    " 'verifying', 'rolling_back', 'escalated', 'resolved', 'rolled_back', 'failed',"
    " 'cancelled', 'ignored')"
)


def upgrade() -> None:
    op.execute(
        "ALTER TABLE plugin_incidents ADD CONSTRAINT ck_plugin_incidents_status"
        f" CHECK (status IN {STATUSES}) NOT VALID"
    )
    op.execute("ALTER TABLE plugin_incidents VALIDATE CONSTRAINT ck_plugin_incidents_status")


def downgrade() -> None:
    op.execute("ALTER TABLE plugin_incidents DROP CONSTRAINT ck_plugin_incidents_status")
