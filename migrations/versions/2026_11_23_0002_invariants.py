"""Invariants held by the database itself, so they hold for psql users too:
the single ops_policy row and its audit trail, the append-only audit log, and the
tamper-evident (hash-chained, append-only) history of autopatch attempts.

Triggers are ENABLE ALWAYS so `SET session_replication_role = replica` does not skip them.

Revision ID: 0002_invariants
Revises: 0001_initial
Create Date: 2026-11-23 18:45:00+00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002_invariants"
down_revision: str | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UPGRADE = r"""
INSERT INTO ops_policy (id) VALUES (1);

-- Refuse a statement outright, whoever runs it (table owner and superuser included).
CREATE FUNCTION selfheal_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% on % is not allowed: %', TG_OP, TG_TABLE_NAME, TG_ARGV[0]
        USING ERRCODE = 'insufficient_privilege';
END $$;

-- Who is acting: the database user, the connection's application_name, and the ops user the
-- application names with `SET LOCAL selfheal.actor = '...'` (NULL for plain SQL).
CREATE FUNCTION selfheal_audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO audit_log (db_user, application_name, actor, action, entity, entity_id, old, new)
    VALUES (
        session_user,
        nullif(current_setting('application_name', true), ''),
        nullif(current_setting('selfheal.actor', true), ''),
        lower(TG_OP),
        TG_TABLE_NAME,
        CASE WHEN TG_OP = 'DELETE' THEN OLD.id::text ELSE NEW.id::text END,
        CASE WHEN TG_OP = 'INSERT' THEN NULL ELSE to_jsonb(OLD) END,
        CASE WHEN TG_OP = 'DELETE' THEN NULL ELSE to_jsonb(NEW) END
    );
    RETURN NULL;
END $$;

CREATE FUNCTION selfheal_touch_policy() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    NEW.updated_by := coalesce(nullif(current_setting('selfheal.actor', true), ''), session_user);
    RETURN NEW;
END $$;

CREATE TRIGGER ops_policy_touch BEFORE UPDATE ON ops_policy
    FOR EACH ROW EXECUTE FUNCTION selfheal_touch_policy();
CREATE TRIGGER ops_policy_audit AFTER INSERT OR UPDATE OR DELETE ON ops_policy
    FOR EACH ROW EXECUTE FUNCTION selfheal_audit();
CREATE TRIGGER ops_policy_no_delete BEFORE DELETE ON ops_policy
    FOR EACH ROW EXECUTE FUNCTION selfheal_refuse('the policy row is permanent; set autopatch_enabled = false instead');
CREATE TRIGGER ops_policy_no_truncate BEFORE TRUNCATE ON ops_policy
    FOR EACH STATEMENT EXECUTE FUNCTION selfheal_refuse('the policy row is permanent');

-- Audit rows come only from the audit trigger: nobody can write a row claiming to be someone.
CREATE FUNCTION selfheal_audit_from_trigger_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF pg_trigger_depth() < 2 THEN
        RAISE EXCEPTION 'audit_log is written by the database only'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER audit_log_insert_guard BEFORE INSERT ON audit_log
    FOR EACH ROW EXECUTE FUNCTION selfheal_audit_from_trigger_only();
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION selfheal_refuse('the audit log is append-only');
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION selfheal_refuse('the audit log is append-only');

-- Attempts: status moves forward (pending, staging, applying, verifying, then an outcome);
-- what was decided, by whom, and how it ended is never rewritten.
-- The one move out of a terminal state is success -> rolled_back (the runbook's emergency
-- rollback), and it is recorded like every other change.
CREATE FUNCTION selfheal_guard_attempt_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.id IS DISTINCT FROM OLD.id
       OR NEW.incident_id IS DISTINCT FROM OLD.incident_id
       OR NEW.installation_id IS DISTINCT FROM OLD.installation_id
       OR NEW.action IS DISTINCT FROM OLD.action
       OR NEW.created_at IS DISTINCT FROM OLD.created_at
       OR NEW.from_version IS DISTINCT FROM OLD.from_version
       OR (OLD.to_version IS NOT NULL AND NEW.to_version IS DISTINCT FROM OLD.to_version)
       OR (OLD.executed_at IS NOT NULL AND NEW.executed_at IS DISTINCT FROM OLD.executed_at)
    THEN
        RAISE EXCEPTION 'attempt %: identity, versions and execution time are immutable', OLD.id
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF (OLD.decision_source IS NOT NULL AND NEW.decision_source IS DISTINCT FROM OLD.decision_source)
       OR (OLD.confidence IS NOT NULL AND NEW.confidence IS DISTINCT FROM OLD.confidence)
       OR (OLD.requested_by IS NOT NULL AND NEW.requested_by IS DISTINCT FROM OLD.requested_by)
    THEN
        RAISE EXCEPTION 'attempt %: who decided it, and with what confidence, is immutable', OLD.id
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF array_position(ARRAY['pending', 'staging', 'applying', 'verifying'], NEW.status)
       < array_position(ARRAY['pending', 'staging', 'applying', 'verifying'], OLD.status) THEN
        RAISE EXCEPTION 'attempt %: status cannot go back from % to %', OLD.id, OLD.status, NEW.status
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF OLD.status IN ('failed', 'rolled_back', 'cancelled')
       AND NEW IS DISTINCT FROM OLD THEN
        RAISE EXCEPTION 'attempt % ended as %: its history cannot be rewritten', OLD.id, OLD.status
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF OLD.status = 'success' AND NEW.status NOT IN ('success', 'rolled_back') THEN
        RAISE EXCEPTION 'attempt % succeeded: it can only be rolled back', OLD.id
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    NEW.updated_at := now();
    RETURN NEW;
END $$;

-- Append one event per attempt change to a single hash chain:
--   hash = sha256(prev_hash || json [id, attempt_id, at, operation, statuses, who, row])
-- The advisory lock serialises appends so each event links to the one before it.
CREATE FUNCTION selfheal_attempt_event_hash(
    prev bytea, event_id bigint, attempt uuid, at timestamptz, operation text,
    old_status text, new_status text, db_user text, application_name text, actor text,
    row_data jsonb
) RETURNS bytea LANGUAGE sql IMMUTABLE AS $$
    -- A JSON array is an unambiguous encoding: no text can slide from one field to the next.
    SELECT sha256(prev || convert_to(jsonb_build_array(
        event_id, attempt::text, to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US'),
        operation, old_status, new_status, db_user, application_name, actor, row_data
    )::text, 'UTF8'))
$$;

CREATE FUNCTION selfheal_append_attempt_event() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    prev bytea;
    event_id bigint;
    stamp timestamptz := clock_timestamp();
    who text := session_user;
    app text := nullif(current_setting('application_name', true), '');
    actor text := nullif(current_setting('selfheal.actor', true), '');
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

-- Events come only from the trigger above: a hand-written INSERT is refused.
CREATE FUNCTION selfheal_events_from_trigger_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF pg_trigger_depth() < 2 THEN
        RAISE EXCEPTION 'plugin_autopatch_attempt_events is written by the database only'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END $$;

-- First event id whose link or hash does not match, or NULL when the chain is intact.
CREATE FUNCTION selfheal_verify_attempt_events() RETURNS bigint LANGUAGE plpgsql STABLE AS $$
DECLARE
    e record;
    expected_prev bytea := '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea;
BEGIN
    FOR e IN SELECT * FROM plugin_autopatch_attempt_events ORDER BY id LOOP
        IF e.prev_hash IS DISTINCT FROM expected_prev
           OR e.hash IS DISTINCT FROM selfheal_attempt_event_hash(
                e.prev_hash, e.id, e.attempt_id, e.at, e.operation, e.old_status, e.new_status,
                e.db_user, e.application_name, e.actor, e.row_data) THEN
            RETURN e.id;
        END IF;
        expected_prev := e.hash;
    END LOOP;
    RETURN NULL;
END $$;

CREATE TRIGGER attempts_guard_update BEFORE UPDATE ON plugin_autopatch_attempts
    FOR EACH ROW EXECUTE FUNCTION selfheal_guard_attempt_update();
CREATE TRIGGER attempts_event_log AFTER INSERT OR UPDATE ON plugin_autopatch_attempts
    FOR EACH ROW EXECUTE FUNCTION selfheal_append_attempt_event();
CREATE TRIGGER attempts_no_delete BEFORE DELETE ON plugin_autopatch_attempts
    FOR EACH ROW EXECUTE FUNCTION selfheal_refuse('attempt history is kept forever');
CREATE TRIGGER attempts_no_truncate BEFORE TRUNCATE ON plugin_autopatch_attempts
    FOR EACH STATEMENT EXECUTE FUNCTION selfheal_refuse('attempt history is kept forever');

CREATE TRIGGER attempt_events_insert_guard BEFORE INSERT ON plugin_autopatch_attempt_events
    FOR EACH ROW EXECUTE FUNCTION selfheal_events_from_trigger_only();
CREATE TRIGGER attempt_events_append_only BEFORE UPDATE OR DELETE ON plugin_autopatch_attempt_events
    FOR EACH ROW EXECUTE FUNCTION selfheal_refuse('the attempt event log is append-only');
CREATE TRIGGER attempt_events_no_truncate BEFORE TRUNCATE ON plugin_autopatch_attempt_events
    FOR EACH STATEMENT EXECUTE FUNCTION selfheal_refuse('the attempt event log is append-only');
"""

ALWAYS = {
    "ops_policy": [
        "ops_policy_touch",
        "ops_policy_audit",
        "ops_policy_no_delete",
        "ops_policy_no_truncate",
    ],
    "audit_log": ["audit_log_insert_guard", "audit_log_append_only", "audit_log_no_truncate"],
    "plugin_autopatch_attempts": [
        "attempts_guard_update",
        "attempts_event_log",
        "attempts_no_delete",
        "attempts_no_truncate",
    ],
    "plugin_autopatch_attempt_events": [
        "attempt_events_insert_guard",
        "attempt_events_append_only",
        "attempt_events_no_truncate",
    ],
}

FUNCTIONS = [
    "selfheal_verify_attempt_events()",
    "selfheal_events_from_trigger_only()",
    "selfheal_audit_from_trigger_only()",
    "selfheal_append_attempt_event()",
    "selfheal_attempt_event_hash(bytea, bigint, uuid, timestamptz, text, text, text, text, text, text, jsonb)",
    "selfheal_guard_attempt_update()",
    "selfheal_touch_policy()",
    "selfheal_audit()",
    "selfheal_refuse()",
]


def upgrade() -> None:
    op.execute(UPGRADE)
    for table, triggers in ALWAYS.items():
        for trigger in triggers:
            op.execute(f"ALTER TABLE {table} ENABLE ALWAYS TRIGGER {trigger}")


def downgrade() -> None:
    for table, triggers in ALWAYS.items():
        for trigger in triggers:
            op.execute(f"DROP TRIGGER {trigger} ON {table}")
    for function in FUNCTIONS:
        op.execute(f"DROP FUNCTION {function}")
    # The policy row is part of this revision; the audit rows its creation wrote go with the
    # tables when 0001 is downgraded.
    op.execute("DELETE FROM ops_policy WHERE id = 1")
