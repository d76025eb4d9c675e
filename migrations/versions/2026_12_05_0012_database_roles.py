"""Database roles (issue 10): whoever runs the migrations owns the tables; the API and the workers
connect as a login in `selfheal_app`, which owns nothing; ops in psql use a login in
`selfheal_ops`, which has the runbook's rights and nothing more.

- `selfheal_app` (NOLOGIN group): SELECT, INSERT, UPDATE, DELETE on the tables the application
  writes, read-only on the history (`audit_log`, `plugin_autopatch_attempt_events`, whose rows
  come from triggers), no DELETE of attempts, nothing on `alembic_version` but SELECT. Not the
  owner, so it cannot ALTER a table or DISABLE a trigger. Tables created by later migrations get
  the same DML rights through ALTER DEFAULT PRIVILEGES (a history table revokes them).
- `selfheal_ops` (NOLOGIN group): SELECT on everything but the secrets (plugin secrets, ops
  users, their tokens and sessions, webhook URLs and secrets); the runbook's statements: the
  kill switch and canary (`UPDATE ops_policy` of autopatch_enabled, autopatch_whitelist,
  autopatch_max_severity, canary_percent), cancel and emergency rollback (`UPDATE
  plugin_autopatch_attempts` of status, rollback_reason, rolled_back_at), re-sending dead notifications (`UPDATE outbox` of
  dead_at, attempts, next_attempt_at), maintenance windows (INSERT, UPDATE of ends_at), a
  tenant's severity floor; `selfheal_verify_attempt_events()`.
- Nobody but the owner creates objects in the schema (PostgreSQL 14 and older let PUBLIC).
- The trigger functions that write rows the caller may not write (the history, the commands a
  kill switch cancels) run as the owner: SECURITY DEFINER with a fixed search_path (pg_temp
  last), EXECUTE for the owner only; no temporary tables for PUBLIC.
- Ops may end an attempt by hand (cancelled or failed while under way, rolled back after a
  success), never move it through the loop (a trigger, for sessions other than the app's).
- Attribution: who a change is recorded under comes from the session's login role
  (`session_user`, which SET ROLE cannot change), never from settings a session chooses. The
  ops user the application names (`selfheal.actor`) and its `application_name` are recorded only
  for sessions of the application's role (members of `selfheal_app`; a superuser counts as one,
  since it could rewrite anything anyway); any other session is recorded as its login role.

The application's login (the user of DATABASE_URL) is created and granted `selfheal_app` by
`selfheal migrate` (`grant_app_login` in app/core/migrations.py), since only it knows that
login's password.

Revision ID: 0012_database_roles
Revises: 0011_audit_ops_users
Create Date: 2026-12-05 12:00:00+00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0012_database_roles"
down_revision: str | None = "0011_audit_ops_users"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ROLES = r"""
DO $$
BEGIN
    -- Roles are shared by every database of the server; several installs (or test databases)
    -- may run this at once, hence the duplicate_object handler.
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'selfheal_app') THEN
        BEGIN
            CREATE ROLE selfheal_app NOLOGIN;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
        END;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'selfheal_ops') THEN
        BEGIN
            CREATE ROLE selfheal_ops NOLOGIN;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
        END;
    END IF;
END $$;
"""

GRANTS = r"""
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
-- No temporary tables either: one would shadow a table of the same name for whoever made it.
DO $$ BEGIN
    EXECUTE format('REVOKE TEMPORARY ON DATABASE %I FROM PUBLIC', current_database());
END $$;
GRANT USAGE ON SCHEMA public TO selfheal_app, selfheal_ops;

GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO selfheal_app;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO selfheal_app;
REVOKE INSERT, UPDATE, DELETE ON audit_log, plugin_autopatch_attempt_events, alembic_version
    FROM selfheal_app;
REVOKE DELETE ON plugin_autopatch_attempts FROM selfheal_app;
ALTER DEFAULT PRIVILEGES IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO selfheal_app;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT USAGE, SELECT ON SEQUENCES TO selfheal_app;

GRANT SELECT ON ALL TABLES IN SCHEMA public TO selfheal_ops;
REVOKE SELECT ON plugin_secrets, ops_users, ops_api_tokens, ops_sessions FROM selfheal_ops;
GRANT UPDATE (autopatch_enabled, autopatch_whitelist, autopatch_max_severity, canary_percent)
    ON ops_policy TO selfheal_ops;
REVOKE SELECT ON notification_endpoints FROM selfheal_ops;
GRANT SELECT (id, tenant_id, events, created_at, disabled_at) ON notification_endpoints
    TO selfheal_ops;
GRANT UPDATE (status, rollback_reason, rolled_back_at) ON plugin_autopatch_attempts
    TO selfheal_ops;
GRANT UPDATE (dead_at, attempts, next_attempt_at) ON outbox TO selfheal_ops;
GRANT INSERT, UPDATE (ends_at) ON maintenance_windows TO selfheal_ops;
GRANT UPDATE (severity_floor) ON tenants TO selfheal_ops;
"""

HELPERS = r"""
-- Is this session the application (which names its ops users itself)? See the docstring.
CREATE FUNCTION selfheal_session_is_app() RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT pg_has_role(session_user, 'selfheal_app', 'MEMBER')
$$;

-- Who the history names: the application's ops user when the application says so, otherwise
-- the session's login role.
CREATE FUNCTION selfheal_actor() RETURNS text LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN selfheal_session_is_app()
                THEN nullif(current_setting('selfheal.actor', true), '')
                ELSE session_user::text END
$$;

-- The application's name for its connection (api, worker, cli), for its sessions only: any
-- other session could call itself anything.
CREATE FUNCTION selfheal_application_name() RETURNS text LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN selfheal_session_is_app()
                THEN nullif(current_setting('application_name', true), '') END
$$;
"""

FUNCTIONS = r"""
CREATE OR REPLACE FUNCTION selfheal_audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO audit_log (db_user, application_name, actor, action, entity, entity_id, old, new)
    VALUES (
        session_user,
        selfheal_application_name(),
        selfheal_actor(),
        lower(TG_OP),
        TG_TABLE_NAME,
        CASE WHEN TG_OP = 'DELETE' THEN OLD.id::text ELSE NEW.id::text END,
        CASE WHEN TG_OP = 'INSERT' THEN NULL ELSE to_jsonb(OLD) END,
        CASE WHEN TG_OP = 'DELETE' THEN NULL ELSE to_jsonb(NEW) END
    );
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION selfheal_audit_without_secrets() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO audit_log
        (db_user, application_name, actor, action, entity, entity_id, old, new)
    VALUES (
        session_user,
        selfheal_application_name(),
        selfheal_actor(),
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

CREATE OR REPLACE FUNCTION selfheal_touch_policy() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    NEW.updated_by := coalesce(selfheal_actor(), session_user);
    RETURN NEW;
END $$;

CREATE OR REPLACE FUNCTION selfheal_append_attempt_event() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    prev bytea;
    event_id bigint;
    stamp timestamptz := clock_timestamp();
    who text := session_user;
    app text := selfheal_application_name();
    actor text := selfheal_actor();
    old_status text := CASE WHEN TG_OP = 'UPDATE' THEN OLD.status END;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('plugin_autopatch_attempt_events'));
    SELECT e.hash INTO prev FROM plugin_autopatch_attempt_events e ORDER BY e.id DESC LIMIT 1;
    prev := coalesce(prev, '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea);
    event_id := nextval(pg_get_serial_sequence('plugin_autopatch_attempt_events', 'id'));
    INSERT INTO plugin_autopatch_attempt_events
        (id, attempt_id, at, operation, old_status, new_status, db_user, application_name,
         actor, row_data, prev_hash, hash)
    OVERRIDING SYSTEM VALUE
    VALUES (event_id, NEW.id, stamp, lower(TG_OP), old_status, NEW.status, who, app, actor,
            to_jsonb(NEW), prev,
            selfheal_attempt_event_hash(prev, event_id, NEW.id, stamp, lower(TG_OP), old_status,
                                        NEW.status, who, app, actor, to_jsonb(NEW)));
    RETURN NULL;
END $$;
"""

# Trigger functions that write rows the session itself may not write. A trigger function cannot
# be called directly, so running them as the owner gives nobody a way around the grants.
DEFINER = [
    "selfheal_audit()",
    "selfheal_audit_without_secrets()",
    "selfheal_append_attempt_event()",
    "selfheal_kill_switch_cancels_commands()",
    "selfheal_cancel_commands_of_cancelled_attempt()",
    "selfheal_incident_opened_ends_good_streak()",
    "selfheal_incident_closed_starts_good_streak()",
]


# The functions as 0002 and 0011 left them: what the session says it is, recorded as it says.
PREVIOUS_FUNCTIONS = FUNCTIONS.replace(
    "selfheal_application_name()", "nullif(current_setting('application_name', true), '')"
).replace("selfheal_actor()", "nullif(current_setting('selfheal.actor', true), '')")

# Ops end attempts by hand (the runbook's cancel and emergency rollback); only the application
# moves them through the loop. Without this, the column grant on `status` would let a psql
# session mark an attempt under way as a success.
MANUAL_GUARD = r"""
CREATE FUNCTION selfheal_guard_manual_attempt_update() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
    IF NEW.status IS NOT DISTINCT FROM OLD.status OR selfheal_session_is_app() THEN
        RETURN NEW;
    END IF;
    IF (NEW.status IN ('cancelled', 'failed')
        AND OLD.status IN ('pending', 'staging', 'applying', 'verifying'))
       OR (NEW.status = 'rolled_back' AND OLD.status = 'success') THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'attempt %: by hand an attempt under way is cancelled or failed, and a success'
        ' rolled back; % -> % is for selfheal to make', OLD.id, OLD.status, NEW.status
        USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE TRIGGER attempts_guard_manual_update BEFORE UPDATE ON plugin_autopatch_attempts
    FOR EACH ROW EXECUTE FUNCTION selfheal_guard_manual_attempt_update();
ALTER TABLE plugin_autopatch_attempts ENABLE ALWAYS TRIGGER attempts_guard_manual_update;
"""

UNGRANT = r"""
REVOKE ALL ON ALL TABLES IN SCHEMA public FROM selfheal_app, selfheal_ops;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM selfheal_app;
ALTER DEFAULT PRIVILEGES IN SCHEMA public
    REVOKE SELECT, INSERT, UPDATE, DELETE ON TABLES FROM selfheal_app;
ALTER DEFAULT PRIVILEGES IN SCHEMA public REVOKE USAGE, SELECT ON SEQUENCES FROM selfheal_app;
REVOKE USAGE ON SCHEMA public FROM selfheal_app, selfheal_ops;
"""


def upgrade() -> None:
    op.execute(ROLES)
    op.execute(GRANTS)
    op.execute(HELPERS)
    op.execute(FUNCTIONS)
    for function in (
        "selfheal_session_is_app()",
        "selfheal_actor()",
        "selfheal_application_name()",
    ):
        op.execute(f"ALTER FUNCTION {function} SET search_path = pg_catalog, public, pg_temp")
    for function in DEFINER:
        # pg_temp last: unlisted, it would be searched first, and a session's temporary table
        # named audit_log would take the history's rows. No EXECUTE for anyone but the owner:
        # nobody can attach these functions to a table of their own.
        op.execute(
            f"ALTER FUNCTION {function} SECURITY DEFINER"
            " SET search_path = pg_catalog, public, pg_temp"
        )
        op.execute(f"REVOKE EXECUTE ON FUNCTION {function} FROM PUBLIC")
    op.execute(MANUAL_GUARD)


def downgrade() -> None:
    # The roles stay: other databases of the server may use them. So does the schema's CREATE
    # revocation (PostgreSQL 15's own default).
    op.execute(
        "DROP TRIGGER attempts_guard_manual_update ON plugin_autopatch_attempts;"
        " DROP FUNCTION selfheal_guard_manual_attempt_update();"
    )
    for function in DEFINER:
        op.execute(f"ALTER FUNCTION {function} SECURITY INVOKER RESET search_path")
        op.execute(f"GRANT EXECUTE ON FUNCTION {function} TO PUBLIC")
    op.execute(PREVIOUS_FUNCTIONS)
    op.execute(
        "DROP FUNCTION selfheal_application_name(); DROP FUNCTION selfheal_actor();"
        " DROP FUNCTION selfheal_session_is_app();"
    )
    op.execute(UNGRANT)
