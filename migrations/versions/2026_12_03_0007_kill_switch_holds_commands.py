"""The kill switch cancels queued automatic commands; an attempt that ends any way cancels its
undelivered commands.

- `UPDATE ops_policy SET autopatch_enabled = false` (from the API or typed in psql) cancels, in
  its own transaction, every automatic command not yet handed to a plugin. Its UPDATE waits for
  a heartbeat statement that is handing one out right now (row lock), and a heartbeat
  statement that comes after finds the command cancelled: no queued automatic command is
  handed out after the switch commits, whatever snapshot that statement started with.
- An attempt that moves to failed, rolled_back or cancelled (by the worker, or by the runbook's
  SQL) cancels its commands still pending: a failed attempt cannot still update the plugin.

Revision ID: 0007_kill_switch_holds_commands
Revises: 0006_fleet_index
Create Date: 2026-12-03 13:00:00+00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007_kill_switch_holds_commands"
down_revision: str | None = "0006_fleet_index"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UPGRADE = """
DROP TRIGGER plugin_autopatch_attempts_cancel_commands ON plugin_autopatch_attempts;
CREATE TRIGGER plugin_autopatch_attempts_cancel_commands
AFTER UPDATE OF status ON plugin_autopatch_attempts
FOR EACH ROW WHEN (NEW.status IN ('failed', 'rolled_back', 'cancelled')
                   AND OLD.status IS DISTINCT FROM NEW.status)
EXECUTE FUNCTION selfheal_cancel_commands_of_cancelled_attempt();
ALTER TABLE plugin_autopatch_attempts ENABLE ALWAYS TRIGGER plugin_autopatch_attempts_cancel_commands;

CREATE FUNCTION selfheal_kill_switch_cancels_commands() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE plugin_agent_commands SET status = 'cancelled'
    WHERE automatic AND status = 'pending';
    RETURN NULL;
END $$;
CREATE TRIGGER ops_policy_kill_switch_cancels_commands
AFTER UPDATE OF autopatch_enabled ON ops_policy
FOR EACH ROW WHEN (OLD.autopatch_enabled AND NOT NEW.autopatch_enabled)
EXECUTE FUNCTION selfheal_kill_switch_cancels_commands();
ALTER TABLE ops_policy ENABLE ALWAYS TRIGGER ops_policy_kill_switch_cancels_commands;
"""

DOWNGRADE = """
DROP TRIGGER ops_policy_kill_switch_cancels_commands ON ops_policy;
DROP FUNCTION selfheal_kill_switch_cancels_commands();
DROP TRIGGER plugin_autopatch_attempts_cancel_commands ON plugin_autopatch_attempts;
CREATE TRIGGER plugin_autopatch_attempts_cancel_commands
AFTER UPDATE OF status ON plugin_autopatch_attempts
FOR EACH ROW WHEN (NEW.status = 'cancelled' AND OLD.status IS DISTINCT FROM 'cancelled')
EXECUTE FUNCTION selfheal_cancel_commands_of_cancelled_attempt();
ALTER TABLE plugin_autopatch_attempts ENABLE ALWAYS TRIGGER plugin_autopatch_attempts_cancel_commands;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
