"""Loose ends of the healing loop: held commands, outbox due index, release audit, muted
incidents (issue 11, item 4).

Held commands. `plugin_agent_commands.held_at`: an automatic command the plugin already had
(status `delivered`) when the kill switch was engaged. The ingest statement never hands a held
command out again (app/plugins/ingest.py, `handed_out`), not when its lease runs out, not after
the switch is back on; the plugin may still ack or fail it (it has it). The flag is set by the
kill switch itself, in the transaction of the switch, by the trigger 0007 added (which cancels
the pending ones in the same function). Why there and not in the heartbeat statement that
would re-deliver it:
- with many API processes, the heartbeat statement reads ops_policy in its own snapshot: one
  that started before the switch committed still sees it on. Here the switch's UPDATE takes
  the row lock of each delivered command; a heartbeat statement handing one out right now
  holds that lock, so the switch waits for it and then marks the command as it left it (its
  new lease included); a heartbeat statement that comes later waits for the switch, and
  PostgreSQL re-checks its WHERE on the updated row, `held_at IS NULL` included, so it skips
  the command whatever its snapshot said about ops_policy (as 0007 argues for `cancelled`);
- a plugin silent for the whole time the switch was off would otherwise get its command again
  at its first heartbeat after the switch came back on: the heartbeat statement would never have
  run while the switch was off, so it could not have marked anything.
What happens next is the healing loop's (app/healing/engine.py, `_applying`): once the held
command's lease has run out unacknowledged, the command is expired and the attempt ends
`cancelled` and the incident waits in `blocked_by_policy` with its pending action, as 0007's
cancelled pending commands do: the gate decides again once autopatch is on (and decides again
from scratch if the installation meanwhile runs another version). A held rollback command
fails its attempt as an automatic rollback under the kill switch already does (critical,
roll back by hand).

Outbox due index: `ix_outbox_due` also leaves out dead rows (dead_at set), which the due query
skips anyway: a receiver that was down for a week no longer bloats the index every claim
walks.

Release audit: every change of a `plugin_releases` row (added, quarantined, unquarantined,
removed) and of a `plugin_release_tenant_blocks` row (a release blocked for one tenant, lifted
with the quarantine) lands in audit_log through the audit machinery of 0012 and 0016: who
(the login, the application's ops user), and for a tenant block the tenant (audit_log.tenant_id
from the row's tenant_id). Tenant blocks have no `id` column: their audit function names the
row `plugin/version/tenant`.

Muted incidents: `plugin_incidents.muted_at`, set by the healing loop on an incident it does
not move on because its installation's heartbeat_missed incident is open, cleared when it
resumes (app/healing/engine.py, `_muted`).

Revision ID: 0018_loose_ends
Revises: 0017_heartbeat_partitions
Create Date: 2026-12-05 16:00:00+00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0018_loose_ends"
down_revision: str | None = "0017_heartbeat_partitions"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UPGRADE = r"""
ALTER TABLE plugin_agent_commands ADD COLUMN held_at timestamptz;
ALTER TABLE plugin_incidents ADD COLUMN muted_at timestamptz;

CREATE OR REPLACE FUNCTION selfheal_kill_switch_cancels_commands() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
    UPDATE plugin_agent_commands SET status = 'cancelled'
    WHERE automatic AND status = 'pending';
    UPDATE plugin_agent_commands SET held_at = now()
    WHERE automatic AND status = 'delivered' AND held_at IS NULL;
    RETURN NULL;
END $$;

DROP INDEX ix_outbox_due;
CREATE INDEX ix_outbox_due ON outbox (next_attempt_at)
    WHERE delivered_at IS NULL AND dead_at IS NULL;

CREATE TRIGGER plugin_releases_audit AFTER INSERT OR UPDATE OR DELETE ON plugin_releases
    FOR EACH ROW EXECUTE FUNCTION selfheal_audit();

CREATE FUNCTION selfheal_audit_release_block() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
    subject plugin_release_tenant_blocks;
BEGIN
    IF TG_OP = 'DELETE' THEN subject := OLD; ELSE subject := NEW; END IF;
    INSERT INTO audit_log (db_user, application_name, actor, action, entity, entity_id, old, new)
    VALUES (
        session_user,
        selfheal_application_name(),
        selfheal_actor(),
        lower(TG_OP),
        TG_TABLE_NAME,
        subject.plugin_name || '/' || subject.version || '/' || subject.tenant_id,
        CASE WHEN TG_OP = 'INSERT' THEN NULL ELSE to_jsonb(OLD) END,
        CASE WHEN TG_OP = 'DELETE' THEN NULL ELSE to_jsonb(NEW) END
    );
    RETURN NULL;
END $$;
REVOKE EXECUTE ON FUNCTION selfheal_audit_release_block() FROM PUBLIC;
CREATE TRIGGER plugin_release_tenant_blocks_audit
    AFTER INSERT OR UPDATE OR DELETE ON plugin_release_tenant_blocks
    FOR EACH ROW EXECUTE FUNCTION selfheal_audit_release_block();
"""

ALWAYS = {
    "plugin_releases": "plugin_releases_audit",
    "plugin_release_tenant_blocks": "plugin_release_tenant_blocks_audit",
}

DOWNGRADE = r"""
DROP TRIGGER plugin_release_tenant_blocks_audit ON plugin_release_tenant_blocks;
DROP FUNCTION selfheal_audit_release_block();
DROP TRIGGER plugin_releases_audit ON plugin_releases;

DROP INDEX ix_outbox_due;
CREATE INDEX ix_outbox_due ON outbox (next_attempt_at) WHERE delivered_at IS NULL;

CREATE OR REPLACE FUNCTION selfheal_kill_switch_cancels_commands() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
    UPDATE plugin_agent_commands SET status = 'cancelled'
    WHERE automatic AND status = 'pending';
    RETURN NULL;
END $$;

ALTER TABLE plugin_incidents DROP COLUMN muted_at;
ALTER TABLE plugin_agent_commands DROP COLUMN held_at;
"""


def upgrade() -> None:
    op.execute(UPGRADE)
    for table, trigger in ALWAYS.items():
        op.execute(f"ALTER TABLE {table} ENABLE ALWAYS TRIGGER {trigger}")


def downgrade() -> None:
    op.execute(DOWNGRADE)
