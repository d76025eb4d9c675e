"""Set-based detection: deferred repeats, and fleet-raised severities undone (issue 11, item 3).

`plugin_incident_repeats`: the repeats a detection tick could not record because a healing
step held the incident's row (the tick locks the incidents it repeats FOR UPDATE SKIP LOCKED,
app/incidents/repository.py, `record_findings`). One row per incident: how many repeats and the
highest severity they carried. The next tick adds them to the incident in its own repeat
statement and deletes the row; a row whose incident closed (or is gone) meanwhile is dropped.
Only the tick holding the samples watermark writes it, so its rows are never contended. No
foreign key to the incident on purpose: its check takes a KEY SHARE lock on the incident row,
which waits for the healing step's FOR UPDATE, the very wait the table is there to avoid.

`plugin_incidents.own_severity`: set when linking to a fleet incident raises a member (app/
incidents/fleet.py), to the severity the member had on its own (its rule's, at least its
tenant's floor); the repeat statement raises it as it raises `severity`. NULL: the member was
not raised (or is not a member), its severity is its own.

When a fleet incident closes, however it closes (the tick's fleet step once every member is
closed, an operator's `resolve` or `ignore` through the API, psql), a trigger gives its members
that are still open their own severity back, provided their severity is still the one linking
gave them (`high`): a member the healing loop has since escalated to critical keeps critical.
A trigger, like 0008's good-streak triggers, so that no way of closing a fleet incident forgets
it. Members linked before this migration have no own_severity and keep their severity. The
trigger's UPDATE waits for a member row a healing step holds (the loop's transactions are
short); the tick's fleet step resolves a fleet incident only once no member of an active
installation is open, so there it has at most the members of disabled installations to lower.
Members stay linked to the closed fleet incident (its history, and the API's member list).

Revision ID: 0019_set_detection
Revises: 0018_loose_ends
Create Date: 2026-12-05 16:00:00+00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0019_set_detection"
down_revision: str | None = "0018_loose_ends"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CLOSED = "('resolved', 'rolled_back', 'failed', 'cancelled', 'ignored')"
SEVERITIES = "('low', 'medium', 'high', 'critical')"
# The severity linking raises a member to (app/incidents/repository.py, FLEET_MEMBER_FLOOR).
RAISED = "'high'"

UPGRADE = f"""
ALTER TABLE plugin_incidents ADD COLUMN own_severity text,
    ADD CONSTRAINT ck_plugin_incidents_own_severity
        CHECK (own_severity IS NULL OR own_severity IN {SEVERITIES});

CREATE TABLE plugin_incident_repeats (
    incident_id uuid NOT NULL,
    occurrences integer NOT NULL,
    severity text NOT NULL,
    deferred_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT pk_plugin_incident_repeats PRIMARY KEY (incident_id),
    CONSTRAINT ck_plugin_incident_repeats_occurrences CHECK (occurrences > 0),
    CONSTRAINT ck_plugin_incident_repeats_severity CHECK (severity IN {SEVERITIES})
);
GRANT SELECT ON plugin_incident_repeats TO selfheal_ops;

CREATE FUNCTION selfheal_fleet_closed_restores_members() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE plugin_incidents m
    SET severity = CASE WHEN m.severity = {RAISED} THEN m.own_severity ELSE m.severity END,
        own_severity = NULL, updated_at = now()
    WHERE m.fleet_incident_id = NEW.id AND m.own_severity IS NOT NULL
      AND m.status NOT IN {CLOSED};
    RETURN NULL;
END $$;
CREATE TRIGGER plugin_incidents_fleet_closed_restores_members
AFTER UPDATE OF status ON plugin_incidents
FOR EACH ROW WHEN (NEW.installation_id IS NULL
                   AND OLD.status NOT IN {CLOSED} AND NEW.status IN {CLOSED})
EXECUTE FUNCTION selfheal_fleet_closed_restores_members();
ALTER TABLE plugin_incidents ENABLE ALWAYS TRIGGER plugin_incidents_fleet_closed_restores_members;
"""

DOWNGRADE = """
DROP TRIGGER plugin_incidents_fleet_closed_restores_members ON plugin_incidents;
DROP FUNCTION selfheal_fleet_closed_restores_members();
DROP TABLE plugin_incident_repeats;
ALTER TABLE plugin_incidents DROP CONSTRAINT ck_plugin_incidents_own_severity,
    DROP COLUMN own_severity;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
