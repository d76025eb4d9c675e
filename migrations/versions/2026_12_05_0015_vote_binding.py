"""Approvals bound to the action they approved, and tenants weighed in outcomes (issue 10).

- Votes: `approvals.action_key` now hashes the attempt generation too (app/policy/gate.py,
  `key_of`, "v2"): the same change tried again after a failed attempt is another action.
  No column changes; votes stored under v1 keys match no action any more and are left as
  they were (they expire by themselves), so a vote given before the upgrade must be given
  again.
- `plugin_release_tenant_blocks`: a release blocked for one tenant's installations (the
  loop proposes it to no installation of that tenant) after that tenant's installations
  alone rolled it back SELFHEAL_QUARANTINE_AFTER_ROLLBACKS times; the fleet-wide quarantine
  (`plugin_releases.quarantined_at`) needs rollbacks from SELFHEAL_QUARANTINE_MIN_TENANTS
  tenants, so that one tenant's installations cannot quarantine a release for everyone.
  `selfheal release unquarantine` lifts both.
- `sira_learning_feedback.tenant_id`: the tenant of the installation an outcome was seen on,
  so that the learning feedback and outcome statistics can count tenants (NULL on the rows
  recorded before).

Revision ID: 0015_vote_binding
Revises: 0014_token_expiry
Create Date: 2026-12-05 12:00:00+00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0015_vote_binding"
down_revision: str | None = "0014_token_expiry"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UPGRADE = """
CREATE TABLE plugin_release_tenant_blocks (
    plugin_name text NOT NULL,
    version text NOT NULL,
    tenant_id text NOT NULL,
    reason text NOT NULL,
    blocked_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT pk_plugin_release_tenant_blocks PRIMARY KEY (plugin_name, version, tenant_id),
    CONSTRAINT fk_plugin_release_tenant_blocks_plugin_name_plugin_releases
        FOREIGN KEY (plugin_name, version) REFERENCES plugin_releases (plugin_name, version),
    CONSTRAINT fk_plugin_release_tenant_blocks_tenant_id_tenants
        FOREIGN KEY (tenant_id) REFERENCES tenants (id)
);
CREATE INDEX ix_plugin_release_tenant_blocks_tenant_id
    ON plugin_release_tenant_blocks (tenant_id);

ALTER TABLE sira_learning_feedback ADD COLUMN tenant_id text;
GRANT SELECT, INSERT, UPDATE, DELETE ON plugin_release_tenant_blocks TO selfheal_app;
GRANT SELECT ON plugin_release_tenant_blocks TO selfheal_ops;
"""

DOWNGRADE = """
ALTER TABLE sira_learning_feedback DROP COLUMN tenant_id;
DROP TABLE plugin_release_tenant_blocks;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
