"""Changes to ops users and their API tokens land in audit_log, as policy changes do (issue 9:
"every action lands in the audit log with the user"): who added, re-roled, disabled or
enabled a user, and which tokens were issued or revoked, from the dashboard, the CLI or psql.

The rows are written without the secrets' hashes (password_hash, token_hash): audit_log is
read by more people than the users table. A token's `last_used_at`, touched by every API
request, is not a change worth a row: the token trigger fires on insert, delete and
`revoked_at` only.

Revision ID: 0011_audit_ops_users
Revises: 0010_ops_sessions
Create Date: 2026-12-05 09:00:00+00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0011_audit_ops_users"
down_revision: str | None = "0010_ops_sessions"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
        CREATE FUNCTION selfheal_audit_without_secrets() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO audit_log
                (db_user, application_name, actor, action, entity, entity_id, old, new)
            VALUES (
                session_user,
                nullif(current_setting('application_name', true), ''),
                nullif(current_setting('selfheal.actor', true), ''),
                lower(TG_OP),
                TG_TABLE_NAME,
                CASE WHEN TG_OP = 'DELETE' THEN OLD.id::text ELSE NEW.id::text END,
                CASE WHEN TG_OP = 'INSERT' THEN NULL
                     ELSE to_jsonb(OLD) - 'password_hash' - 'token_hash' END,
                CASE WHEN TG_OP = 'DELETE' THEN NULL
                     ELSE to_jsonb(NEW) - 'password_hash' - 'token_hash' END
            );
            RETURN NULL;
        END $$;

        CREATE TRIGGER ops_users_audit
            AFTER INSERT OR DELETE OR UPDATE OF username, role, disabled_at, password_hash
            ON ops_users
            FOR EACH ROW EXECUTE FUNCTION selfheal_audit_without_secrets();
        CREATE TRIGGER ops_api_tokens_audit
            AFTER INSERT OR DELETE OR UPDATE OF revoked_at ON ops_api_tokens
            FOR EACH ROW EXECUTE FUNCTION selfheal_audit_without_secrets();
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DROP TRIGGER IF EXISTS ops_api_tokens_audit ON ops_api_tokens;
        DROP TRIGGER IF EXISTS ops_users_audit ON ops_users;
        DROP FUNCTION IF EXISTS selfheal_audit_without_secrets();
        """
    )
