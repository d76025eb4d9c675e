"""Tenant-scoped ops users and the tenant in the audit log (issue 10, item 9).

- `ops_users.tenants text[]`: the tenants the user sees and acts on; NULL: every tenant. An
  array rather than a join table: the scope is read with the token or session on every request
  (one row, no aggregation), it is set and shown as one value, and `tenant_id = ANY(:tenants)`
  is how every read filters. No foreign key (an array cannot have one): the application checks
  that each tenant exists when the scope is set, and a tenant deleted later only leaves a name
  that matches nothing. An empty list is refused (it would be a user who sees nothing, or
  worse, be mistaken for "all"), and so is a scoped admin: the admin role is global (the
  policy, the kill switch and the ops users are the whole fleet's), so an admin is never scoped.
- Changes of a user's scope land in audit_log like their role (ops_users_audit also fires on
  `tenants`).
- `audit_log.tenant_id`: the tenant of the audited row, filled by a BEFORE INSERT trigger on
  audit_log from the row's own `tenant_id`, else its `installation_id` or `incident_id` looked
  up (a tenants row is its own tenant); NULL for global changes (policy, ops users) and fleet
  incidents. It composes with whatever writes audit rows (selfheal_audit and
  selfheal_audit_without_secrets, which migration 0012 redefines): they need not know the
  column. The trigger's name sorts first among audit_log's BEFORE INSERT triggers, so anything
  computed over the row later sees the tenant.
- The ops actions on a tenant's things now land in audit_log (until now only the policy and the
  ops users did): votes (`approvals`), maintenance windows, tenants, installations (created,
  deleted, moved, disabled: not the telemetry every heartbeat writes), and the changes of an
  incident's status or pending action that an ops user makes (the healing loop's own moves are
  recorded by the attempts' event log and would flood the audit log: the trigger fires only
  when the change has an actor, i.e. the application named its ops user, or the session is not
  the application's).

The attempts' event log (plugin_autopatch_attempt_events) gets no tenant column: its hashed
fields are the chain's, and the tenant is derivable from `row_data ->> 'installation_id'`.

Revision ID: 0016_tenant_scope
Revises: 0015_vote_binding
Create Date: 2026-12-05 12:00:00+00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0016_tenant_scope"
down_revision: str | None = "0015_vote_binding"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UPGRADE = r"""
ALTER TABLE ops_users ADD COLUMN tenants text[];
ALTER TABLE ops_users ADD CONSTRAINT ck_ops_users_tenants CHECK (
    tenants IS NULL
    OR (cardinality(tenants) BETWEEN 1 AND 100 AND array_position(tenants, NULL) IS NULL)
);
ALTER TABLE ops_users ADD CONSTRAINT ck_ops_users_admin_unscoped
    CHECK (role <> 'admin' OR tenants IS NULL);

DROP TRIGGER ops_users_audit ON ops_users;
CREATE TRIGGER ops_users_audit
    AFTER INSERT OR DELETE OR UPDATE OF username, role, disabled_at, password_hash, tenants
    ON ops_users
    FOR EACH ROW EXECUTE FUNCTION selfheal_audit_without_secrets();

ALTER TABLE audit_log ADD COLUMN tenant_id text;
CREATE INDEX ix_audit_log_tenant_id ON audit_log (tenant_id);

-- The tenant of an audited row: its tenant_id, else its installation's or incident's.
CREATE FUNCTION selfheal_audit_tenant() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
    subject jsonb := coalesce(NEW.new, NEW.old);
    ref text;
BEGIN
    IF NEW.tenant_id IS NOT NULL OR jsonb_typeof(subject) IS DISTINCT FROM 'object' THEN
        RETURN NEW;
    END IF;
    IF NEW.entity = 'tenants' THEN
        NEW.tenant_id := subject ->> 'id';
    ELSIF subject ->> 'tenant_id' IS NOT NULL THEN
        NEW.tenant_id := subject ->> 'tenant_id';
    ELSIF subject ->> 'installation_id' IS NOT NULL THEN
        ref := subject ->> 'installation_id';
        IF ref ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN
            NEW.tenant_id := (SELECT m.tenant_id FROM merchant_plugins m WHERE m.id = ref::uuid);
        END IF;
    ELSIF subject ->> 'incident_id' IS NOT NULL THEN
        ref := subject ->> 'incident_id';
        IF ref ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN
            NEW.tenant_id := (SELECT i.tenant_id FROM plugin_incidents i WHERE i.id = ref::uuid);
        END IF;
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER audit_log_add_tenant BEFORE INSERT ON audit_log
    FOR EACH ROW EXECUTE FUNCTION selfheal_audit_tenant();

CREATE TRIGGER approvals_audit AFTER INSERT OR UPDATE OR DELETE ON approvals
    FOR EACH ROW EXECUTE FUNCTION selfheal_audit();
CREATE TRIGGER maintenance_windows_audit AFTER INSERT OR UPDATE OR DELETE ON maintenance_windows
    FOR EACH ROW EXECUTE FUNCTION selfheal_audit();
CREATE TRIGGER tenants_audit AFTER INSERT OR UPDATE OR DELETE ON tenants
    FOR EACH ROW EXECUTE FUNCTION selfheal_audit();
-- Not what every heartbeat writes (ingest sets the version, env, telemetry... of the row):
-- only an installation added, removed, moved to another tenant, disabled or enabled.
CREATE TRIGGER merchant_plugins_audit AFTER INSERT OR DELETE ON merchant_plugins
    FOR EACH ROW EXECUTE FUNCTION selfheal_audit();
CREATE TRIGGER merchant_plugins_audit_update AFTER UPDATE OF tenant_id, status ON merchant_plugins
    FOR EACH ROW
    WHEN (OLD.tenant_id IS DISTINCT FROM NEW.tenant_id OR OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION selfheal_audit();
CREATE TRIGGER plugin_incidents_audit
    AFTER UPDATE OF status, pending_action ON plugin_incidents
    FOR EACH ROW
    WHEN (selfheal_actor() IS NOT NULL
          AND (OLD.status IS DISTINCT FROM NEW.status
               OR OLD.pending_action IS DISTINCT FROM NEW.pending_action))
    EXECUTE FUNCTION selfheal_audit();
"""

ALWAYS = {
    "audit_log": ["audit_log_add_tenant"],
    "approvals": ["approvals_audit"],
    "maintenance_windows": ["maintenance_windows_audit"],
    "tenants": ["tenants_audit"],
    "merchant_plugins": ["merchant_plugins_audit", "merchant_plugins_audit_update"],
    "plugin_incidents": ["plugin_incidents_audit"],
}

DOWNGRADE = r"""
DROP FUNCTION selfheal_audit_tenant();
DROP INDEX ix_audit_log_tenant_id;
ALTER TABLE audit_log DROP COLUMN tenant_id;

DROP TRIGGER ops_users_audit ON ops_users;
CREATE TRIGGER ops_users_audit
    AFTER INSERT OR DELETE OR UPDATE OF username, role, disabled_at, password_hash
    ON ops_users
    FOR EACH ROW EXECUTE FUNCTION selfheal_audit_without_secrets();

ALTER TABLE ops_users DROP CONSTRAINT ck_ops_users_admin_unscoped;
ALTER TABLE ops_users DROP CONSTRAINT ck_ops_users_tenants;
ALTER TABLE ops_users DROP COLUMN tenants;
"""


def upgrade() -> None:
    op.execute(UPGRADE)
    for table, triggers in ALWAYS.items():
        for trigger in triggers:
            op.execute(f"ALTER TABLE {table} ENABLE ALWAYS TRIGGER {trigger}")


def downgrade() -> None:
    for table, triggers in ALWAYS.items():
        for trigger in triggers:
            op.execute(f"DROP TRIGGER {trigger} ON {table}")
    op.execute(DOWNGRADE)
