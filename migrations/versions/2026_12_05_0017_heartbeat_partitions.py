"""Time-partitioned plugin_heartbeats (issue 11, item 1; docs/partitioning.md).

At thousands of heartbeats a second, 14 days of samples are billions of rows: batched DELETEs
and VACUUM cannot keep up. The table becomes range-partitioned, and retention drops whole
partitions.

The partition key is `signed_at`, a new column: the request's verified X-Timestamp. The replay
guard is a unique index, and on a partitioned table a unique index must include the partition
key. The message digest covers X-Timestamp, so the same signed message always has the same
signed_at and lands in the same partition: UNIQUE (installation_id, msg_digest, signed_at)
refuses every replay, as UNIQUE (installation_id, msg_digest) did. Partitioning by received_at
would let a replay that straddles a partition boundary in (the original in one partition, the
replay in the next). The primary key becomes (id, signed_at); (installation_id, received_at)
stays for the per-installation reads; the lone received_at index served only the row-by-row
retention and goes.

Partitions: `plugin_heartbeats_pYYYYMMDDHH` (the start of its range, UTC), ranges of
SELFHEAL_HEARTBEAT_PARTITION_HOURS (dividing 24 or a multiple of it) aligned on UTC midnight.
No DEFAULT partition: attaching a partition would then have to scan it, and fail when it held
rows of the new range. Partitions are created ahead instead, by functions that run as the owner
(the application's role owns nothing and cannot CREATE, migration 0012):

- `selfheal_ensure_heartbeat_partitions(span_hours, ahead_hours)`: the missing partitions from
  an hour behind now (the largest signature tolerance) to `ahead_hours` ahead, the nearest
  first and at most 24 a call (a call stays far below the statement timeout); how many it made.
  Each is created as a plain table and then ATTACHed: ATTACH takes SHARE UPDATE EXCLUSIVE on the
  parent, which inserts and reads do not wait for, where CREATE TABLE ... PARTITION OF takes
  ACCESS EXCLUSIVE (measured on PostgreSQL 15; the brief assumed otherwise). Both also take a
  SHARE ROW EXCLUSIVE lock on merchant_plugins for the cloned foreign key, for milliseconds.
- `selfheal_drop_heartbeat_partitions(keep_days, watermark)`: drops the partitions whose whole
  range is older than keep_days, except one holding a row the detector has not read yet (an
  id beyond the watermark, the smaller of the argument and detector_watermarks), at most 8 a
  call (the parent's lock is held until the call commits). DROP TABLE of
  the partition, not DETACH then DROP: both take ACCESS EXCLUSIVE on the parent for a moment,
  but DETACH turns the inherited foreign key into the partition's own (new triggers on
  merchant_plugins, SHARE ROW EXCLUSIVE) and dropping that table then takes ACCESS EXCLUSIVE on
  merchant_plugins, the table every heartbeat updates and every request reads.
- Both validate their arguments (they run with the owner's rights), serialise on an advisory
  lock, and wait for a table lock at most 3 s (lock_timeout): a busy moment is "try again at the
  next prune", never a queue of heartbeats stuck behind the DDL. Partition names come from
  computed timestamps only (format %I), never from text a caller passes. SECURITY DEFINER with
  a fixed search_path (pg_temp last), EXECUTE for selfheal_app only.
- `selfheal_heartbeat_partitions()` lists the partitions with their ranges (operators, tests).
- `selfheal_create_heartbeat_partitions(span_hours, from, to)`: the owner's building block
  (this migration covers the old rows with it); nobody else may run it.

The existing table is migrated: it is renamed, the partitioned table created, partitions made
for its rows' range and the week ahead, the rows copied with their ids (and the identity
sequence moved to where it was, so the detector's watermark over ids stays valid), then it is
dropped. Old rows get signed_at := received_at: their X-Timestamp is not stored, and received_at
is within the signature tolerance of it. A replay of an old row would carry its original
X-Timestamp; once that is older than the tolerance the API refuses it before any insert, so only
a heartbeat received in the last SELFHEAL_SIGNATURE_TOLERANCE_S before the upgrade, replayed
within that time after it, could be stored twice (upgrade with the API stopped, as the ingest
statement of the previous version cannot insert into this table anyway: it has no signed_at).
The grants are the old table's (selfheal_app: SELECT, INSERT, UPDATE, DELETE; selfheal_ops:
SELECT), copied from it; partitions are reached through the parent only.

`detector_watermarks.last_signed_at`: the signed_at of the last sample the threshold detector
read, so its scan of new ids also bounds signed_at and touches only the recent partitions
(app/incidents/repository.py, SIGNED_AT_SLACK).

Downgrade: back to the plain table, with its rows and ids.

Revision ID: 0017_heartbeat_partitions
Revises: 0016_tenant_scope
Create Date: 2026-12-05 16:00:00+00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0017_heartbeat_partitions"
down_revision: str | None = "0016_tenant_scope"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# What the migration creates ahead, whatever the settings say: the workers' prune job (and the
# API at start-up) carry on with SELFHEAL_HEARTBEAT_PARTITION_HOURS and _AHEAD_HOURS.
INITIAL_SPAN_HOURS = 24
INITIAL_AHEAD_HOURS = 168

COLUMNS = """
    id bigint GENERATED BY DEFAULT AS IDENTITY,
    installation_id uuid NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    {signed_at}
    sent_at timestamptz,
    plugin_version text NOT NULL,
    env text NOT NULL,
    uptime_s bigint,
    requests bigint NOT NULL DEFAULT '0',
    errors bigint NOT NULL DEFAULT '0',
    webhook_attempts bigint NOT NULL DEFAULT '0',
    webhook_failures bigint NOT NULL DEFAULT '0',
    latency_p95_ms numeric,
    errors_last_24h bigint,
    telemetry jsonb NOT NULL DEFAULT '{{}}'::jsonb,
    meta jsonb NOT NULL DEFAULT '{{}}'::jsonb,
    msg_digest bytea NOT NULL,
    CONSTRAINT fk_plugin_heartbeats_installation_id_merchant_plugins
        FOREIGN KEY (installation_id) REFERENCES merchant_plugins (id) ON DELETE CASCADE,
"""

COPIED = (
    "installation_id, received_at, sent_at, plugin_version, env, uptime_s, requests, errors,"
    " webhook_attempts, webhook_failures, latency_p95_ms, errors_last_24h, telemetry, meta,"
    " msg_digest"
)


def _step_aside(table: str, indexes: list[str]) -> str:
    """The current plugin_heartbeats renamed to `table`, without the constraints, indexes and
    sequence name the new one takes (the rows are only read once more, by the copy)."""
    drops = "; ".join(f"DROP INDEX {name}" for name in indexes)
    return f"""
ALTER TABLE plugin_heartbeats RENAME TO {table};
ALTER TABLE {table}
    DROP CONSTRAINT pk_plugin_heartbeats,
    DROP CONSTRAINT uq_plugin_heartbeats_replay,
    DROP CONSTRAINT fk_plugin_heartbeats_installation_id_merchant_plugins;
{drops};
DO $$ BEGIN
    EXECUTE format('ALTER SEQUENCE %s RENAME TO {table}_id_seq',
                   pg_get_serial_sequence('{table}', 'id'));
END $$;
"""


def _take_over(old: str) -> str:
    """plugin_heartbeats gets the grants and the identity sequence position of `old`."""
    return f"""
DO $$
DECLARE
    g record;
    seq_last bigint;
    seq_called boolean;
    top_id bigint;
BEGIN
    -- The new table's rights are exactly the old one's (a fresh table gets the owner's default
    -- privileges, migration 0012: those go first).
    FOR g IN SELECT DISTINCT a.grantee FROM pg_class c, aclexplode(c.relacl) a
             WHERE c.oid = 'plugin_heartbeats'::regclass AND a.grantee <> c.relowner LOOP
        EXECUTE format('REVOKE ALL ON plugin_heartbeats FROM %s',
                       CASE WHEN g.grantee = 0 THEN 'PUBLIC'
                            ELSE quote_ident(pg_get_userbyid(g.grantee)) END);
    END LOOP;
    FOR g IN SELECT a.grantee, a.privilege_type FROM pg_class c, aclexplode(c.relacl) a
             WHERE c.oid = '{old}'::regclass AND a.grantee <> c.relowner LOOP
        EXECUTE format('GRANT %s ON plugin_heartbeats TO %s', g.privilege_type,
                       CASE WHEN g.grantee = 0 THEN 'PUBLIC'
                            ELSE quote_ident(pg_get_userbyid(g.grantee)) END);
    END LOOP;
    -- Ids go on from where they were (not from the highest id left: the detector's watermark
    -- may be past it), so no new sample gets an id the detector takes as read.
    SELECT s.last_value, s.is_called INTO seq_last, seq_called FROM {old}_id_seq s;
    SELECT max(id) INTO top_id FROM {old};
    IF top_id > seq_last THEN
        seq_last := top_id;
        seq_called := true;
    END IF;
    PERFORM setval(pg_get_serial_sequence('plugin_heartbeats', 'id'), seq_last, seq_called);
END $$;
"""


PARTITIONED = f"""
CREATE TABLE plugin_heartbeats (
{COLUMNS.format(signed_at="signed_at timestamptz NOT NULL,")}
    CONSTRAINT pk_plugin_heartbeats PRIMARY KEY (id, signed_at),
    CONSTRAINT uq_plugin_heartbeats_replay UNIQUE (installation_id, msg_digest, signed_at)
) PARTITION BY RANGE (signed_at);
CREATE INDEX ix_plugin_heartbeats_installation_received
    ON plugin_heartbeats (installation_id, received_at);
"""

PLAIN = f"""
CREATE TABLE plugin_heartbeats (
{COLUMNS.format(signed_at="")}
    CONSTRAINT pk_plugin_heartbeats PRIMARY KEY (id),
    CONSTRAINT uq_plugin_heartbeats_replay UNIQUE (installation_id, msg_digest)
);
CREATE INDEX ix_plugin_heartbeats_installation_received
    ON plugin_heartbeats (installation_id, received_at);
CREATE INDEX ix_plugin_heartbeats_received_at ON plugin_heartbeats (received_at);
"""

# Every function pins search_path (pg_temp last: a session's temporary table must never stand
# in for ours), TimeZone and DateStyle (partition bounds go through text: pg_get_expr, %L).
_FIXED = (
    "SET search_path = pg_catalog, public, pg_temp SET TimeZone = 'UTC' SET DateStyle = 'ISO, YMD'"
)

FUNCTIONS = rf"""
CREATE FUNCTION selfheal_heartbeat_partitions()
RETURNS TABLE (name text, starts_at timestamptz, ends_at timestamptz)
LANGUAGE sql STABLE {_FIXED} AS $$
    SELECT c.relname::text,
           CASE WHEN b.m[1] = 'MINVALUE' THEN '-infinity'::timestamptz
                ELSE btrim(b.m[1], '''')::timestamptz END,
           CASE WHEN b.m[2] = 'MAXVALUE' THEN 'infinity'::timestamptz
                ELSE btrim(b.m[2], '''')::timestamptz END
    FROM pg_inherits i
    JOIN pg_class c ON c.oid = i.inhrelid
    CROSS JOIN LATERAL (
        SELECT regexp_match(pg_get_expr(c.relpartbound, c.oid),
                            '^FOR VALUES FROM \((.*)\) TO \((.*)\)$') AS m) b
    WHERE i.inhparent = 'public.plugin_heartbeats'::regclass AND b.m IS NOT NULL
    ORDER BY 2
$$;

CREATE FUNCTION selfheal_create_heartbeat_partitions(
    span_hours int, from_at timestamptz, to_at timestamptz, at_most int DEFAULT NULL)
RETURNS int LANGUAGE plpgsql {_FIXED} AS $$
DECLARE
    span_s bigint;
    slot_start timestamptz;
    slot_end timestamptz;
    starts timestamptz[];
    ends timestamptz[];
    i int := 1;
    n int;
    part text;
    created int := 0;
BEGIN
    IF span_hours IS NULL OR NOT (span_hours IN (1, 2, 3, 4, 6, 8, 12)
                                  OR (span_hours % 24 = 0 AND span_hours BETWEEN 24 AND 720)) THEN
        RAISE EXCEPTION 'span_hours must divide 24 or be a multiple of 24 up to 720, not %',
            span_hours USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF from_at IS NULL OR to_at IS NULL OR NOT isfinite(from_at) OR NOT isfinite(to_at)
       OR to_at - from_at > interval '3700 days' THEN
        RAISE EXCEPTION 'partitions from % to %: not a range this function makes', from_at, to_at
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    span_s := span_hours::bigint * 3600;
    -- Aligned on the epoch, hence on UTC midnight (a day is a whole number of spans, or a span
    -- a whole number of days).
    slot_start := to_timestamp(floor(extract(epoch FROM from_at) / span_s) * span_s);
    -- The existing ranges, read once (sorted, never overlapping), walked with slot_start.
    SELECT array_agg(p.starts_at ORDER BY p.starts_at), array_agg(p.ends_at ORDER BY p.starts_at)
    INTO starts, ends FROM public.selfheal_heartbeat_partitions() p;
    n := coalesce(array_length(starts, 1), 0);
    WHILE slot_start < to_at AND (at_most IS NULL OR created < at_most) LOOP
        WHILE i <= n AND ends[i] <= slot_start LOOP
            i := i + 1;
        END LOOP;
        IF i <= n AND starts[i] <= slot_start THEN
            slot_start := ends[i];  -- covered already
            CONTINUE;
        END IF;
        -- Up to the next span boundary, or to the next partition when one starts before it
        -- (partitions of an earlier span setting stay as they are: only new ones get the new
        -- span).
        slot_end := to_timestamp((floor(extract(epoch FROM slot_start) / span_s) + 1) * span_s);
        IF i <= n AND starts[i] < slot_end THEN
            slot_end := starts[i];
        END IF;
        part := 'plugin_heartbeats_p' || to_char(slot_start, 'YYYYMMDDHH24');
        -- A plain table, then ATTACH: SHARE UPDATE EXCLUSIVE on the parent, so heartbeats keep
        -- flowing (CREATE TABLE ... PARTITION OF would take ACCESS EXCLUSIVE).
        EXECUTE format('CREATE TABLE public.%I (LIKE public.plugin_heartbeats)', part);
        EXECUTE format('ALTER TABLE public.plugin_heartbeats ATTACH PARTITION public.%I'
                       ' FOR VALUES FROM (%L) TO (%L)', part, slot_start, slot_end);
        -- Reached through the parent only (the owner's default privileges gave it DML).
        EXECUTE format('REVOKE ALL ON public.%I FROM selfheal_app', part);
        created := created + 1;
        slot_start := slot_end;
    END LOOP;
    RETURN created;
END $$;

CREATE FUNCTION selfheal_ensure_heartbeat_partitions(span_hours int, ahead_hours int)
RETURNS int LANGUAGE plpgsql SECURITY DEFINER {_FIXED} SET lock_timeout = '3s' AS $$
BEGIN
    IF ahead_hours IS NULL OR ahead_hours < 1 OR ahead_hours > 2160
       OR ahead_hours > 500 * coalesce(span_hours, 0) THEN
        RAISE EXCEPTION 'ahead_hours must be 1 to 2160, and at most 500 partitions ahead, not %',
            ahead_hours USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('selfheal-heartbeat-partitions'));
    -- An hour behind: X-Timestamp may be SELFHEAL_SIGNATURE_TOLERANCE_S (at most 3600) old.
    -- At most 24 a call, the nearest first: each takes a few ms, and the call must end well
    -- within the application's statement timeout; the next calls make the rest.
    RETURN public.selfheal_create_heartbeat_partitions(
        span_hours, now() - interval '1 hour', now() + make_interval(hours => ahead_hours), 24);
END $$;

CREATE FUNCTION selfheal_drop_heartbeat_partitions(keep_days int, watermark bigint)
RETURNS text[] LANGUAGE plpgsql SECURITY DEFINER {_FIXED} SET lock_timeout = '3s' AS $$
DECLARE
    read_up_to bigint;
    p record;
    newest bigint;
    dropped text[] := '{{}}';
BEGIN
    IF keep_days IS NULL OR keep_days < 1 OR keep_days > 3650 THEN
        RAISE EXCEPTION 'keep_days must be 1 to 3650, not %', keep_days
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- The caller cannot push the detector's watermark: the smaller of the two counts.
    SELECT least(watermark, w.last_id) INTO read_up_to
    FROM public.detector_watermarks w WHERE w.name = 'samples';
    read_up_to := coalesce(read_up_to, 0);
    PERFORM pg_advisory_xact_lock(hashtext('selfheal-heartbeat-partitions'));
    FOR p IN SELECT h.name FROM public.selfheal_heartbeat_partitions() h
             WHERE h.name ~ '^plugin_heartbeats_p[0-9]{{10}}$'
               AND h.ends_at <= now() - make_interval(days => keep_days)
             ORDER BY h.starts_at LOOP
        -- At most 8 a call: the first DROP holds ACCESS EXCLUSIVE on plugin_heartbeats until
        -- the call commits, and heartbeats wait meanwhile; the next calls drop the rest.
        EXIT WHEN cardinality(dropped) >= 8;
        -- SHARE: nothing can be written into it between this look and the drop.
        EXECUTE format('LOCK TABLE public.%I IN SHARE MODE', p.name);
        EXECUTE format('SELECT max(id) FROM public.%I', p.name) INTO newest;
        CONTINUE WHEN newest > read_up_to;
        EXECUTE format('DROP TABLE public.%I', p.name);
        dropped := dropped || p.name;
    END LOOP;
    RETURN dropped;
END $$;

REVOKE EXECUTE ON FUNCTION
    selfheal_create_heartbeat_partitions(int, timestamptz, timestamptz, int) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION selfheal_ensure_heartbeat_partitions(int, int) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION selfheal_drop_heartbeat_partitions(int, bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION selfheal_ensure_heartbeat_partitions(int, int) TO selfheal_app;
GRANT EXECUTE ON FUNCTION selfheal_drop_heartbeat_partitions(int, bigint) TO selfheal_app;
"""

DROP_FUNCTIONS = """
DROP FUNCTION selfheal_drop_heartbeat_partitions(int, bigint);
DROP FUNCTION selfheal_ensure_heartbeat_partitions(int, int);
DROP FUNCTION selfheal_create_heartbeat_partitions(int, timestamptz, timestamptz, int);
DROP FUNCTION selfheal_heartbeat_partitions();
"""


def upgrade() -> None:
    old = "plugin_heartbeats_unpartitioned"
    op.execute(
        _step_aside(
            old, ["ix_plugin_heartbeats_installation_received", "ix_plugin_heartbeats_received_at"]
        )
    )
    op.execute(PARTITIONED)
    op.execute(_take_over(old))
    op.execute(FUNCTIONS)
    # Partitions for the old rows' range, then from a day behind (samples written by hand with
    # a past signed_at, as tests and the simulator do, find one; retention drops it) to the
    # week ahead.
    op.execute(
        f"SELECT selfheal_create_heartbeat_partitions({INITIAL_SPAN_HOURS}, min(received_at),"
        f" max(received_at) + interval '1 second') FROM {old} HAVING count(*) > 0"
    )
    op.execute(
        f"SELECT selfheal_create_heartbeat_partitions({INITIAL_SPAN_HOURS},"
        f" now() - interval '1 day', now() + interval '{INITIAL_AHEAD_HOURS} hours')"
    )
    op.execute(
        f"INSERT INTO plugin_heartbeats (id, signed_at, {COPIED})"
        f" SELECT id, received_at, {COPIED} FROM {old}"
    )
    op.execute(f"DROP TABLE {old}")
    op.execute("ALTER TABLE detector_watermarks ADD COLUMN last_signed_at timestamptz")


def downgrade() -> None:
    old = "plugin_heartbeats_partitioned"
    op.execute("ALTER TABLE detector_watermarks DROP COLUMN last_signed_at")
    op.execute(DROP_FUNCTIONS)
    op.execute(_step_aside(old, ["ix_plugin_heartbeats_installation_received"]))
    op.execute(PLAIN)
    op.execute(_take_over(old))
    # The same signed message has one signed_at, so (installation, digest) stays unique.
    op.execute(
        f"INSERT INTO plugin_heartbeats (id, {COPIED}) SELECT id, {COPIED} FROM {old}"
        " ORDER BY id ON CONFLICT DO NOTHING"
    )
    op.execute(f"DROP TABLE {old}")
