"""Tell API processes when an installation's credentials change.

Each API process caches decrypted plugin secrets. A change of plugin_secrets (rotation, revocation)
or of merchant_plugins.status (disable), from the CLI or typed in psql, sends
`NOTIFY selfheal_auth, '<installation id>'`, delivered when the change commits; the processes
drop that cache entry. The cache TTL still bounds staleness if a notification is missed.

Revision ID: 0003_auth_notify
Revises: 0002_invariants
Create Date: 2026-11-23 19:00:00+00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003_auth_notify"
down_revision: str | None = "0002_invariants"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
        CREATE FUNCTION selfheal_notify_auth_change() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_TABLE_NAME = 'plugin_secrets' THEN
                PERFORM pg_notify('selfheal_auth',
                    CASE WHEN TG_OP = 'DELETE' THEN OLD.installation_id ELSE NEW.installation_id END::text);
            ELSE
                PERFORM pg_notify('selfheal_auth',
                    CASE WHEN TG_OP = 'DELETE' THEN OLD.id ELSE NEW.id END::text);
            END IF;
            RETURN NULL;
        END $$;

        CREATE TRIGGER plugin_secrets_notify AFTER INSERT OR UPDATE OR DELETE ON plugin_secrets
            FOR EACH ROW EXECUTE FUNCTION selfheal_notify_auth_change();
        -- Only status changes: heartbeats update these rows all the time and must not notify.
        CREATE TRIGGER merchant_plugins_status_notify AFTER UPDATE OF status ON merchant_plugins
            FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
            EXECUTE FUNCTION selfheal_notify_auth_change();
        CREATE TRIGGER merchant_plugins_delete_notify AFTER DELETE ON merchant_plugins
            FOR EACH ROW EXECUTE FUNCTION selfheal_notify_auth_change();

        -- TRUNCATE names no rows: '*' tells every process to drop its whole cache.
        CREATE FUNCTION selfheal_notify_auth_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('selfheal_auth', '*');
            RETURN NULL;
        END $$;
        CREATE TRIGGER plugin_secrets_truncate_notify AFTER TRUNCATE ON plugin_secrets
            FOR EACH STATEMENT EXECUTE FUNCTION selfheal_notify_auth_truncate();
        CREATE TRIGGER merchant_plugins_truncate_notify AFTER TRUNCATE ON merchant_plugins
            FOR EACH STATEMENT EXECUTE FUNCTION selfheal_notify_auth_truncate();
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DROP TRIGGER merchant_plugins_truncate_notify ON merchant_plugins;
        DROP TRIGGER plugin_secrets_truncate_notify ON plugin_secrets;
        DROP FUNCTION selfheal_notify_auth_truncate();
        DROP TRIGGER merchant_plugins_delete_notify ON merchant_plugins;
        DROP TRIGGER merchant_plugins_status_notify ON merchant_plugins;
        DROP TRIGGER plugin_secrets_notify ON plugin_secrets;
        DROP FUNCTION selfheal_notify_auth_change();
        """
    )
