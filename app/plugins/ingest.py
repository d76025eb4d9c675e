"""Heartbeat ingest: micro-batching of concurrent heartbeats into one statement and one commit.

A request hands its verified heartbeat to the batcher and waits. The batcher takes everything
queued at that moment (up to SELFHEAL_INGEST_BATCH_MAX), and runs one statement that, in a
single round trip and transaction:
  1. inserts one sample per heartbeat; the unique (installation, message digest, signed time)
     index drops replays, which is our replay guard shared by every API process;
  2. updates the installation's latest telemetry, version and next_expected_at;
  3. hands out the installation's deliverable commands (pending, or delivered with an expired
     lease), marking them delivered with a new lease and a higher delivery count; automatic
     commands are held back while the kill switch is off, and one the plugin had when the
     switch was engaged (held) is never handed out again.
While one batch is in the database the next one fills up, so under load batches grow and the
cost per heartbeat falls; with a single plugin the batch is one heartbeat and no wait is added.
The reply is sent only after the commit: every 200 is durable.

Raw psycopg, not the ORM: this is the hot path (docs/decisions.md, "Heartbeat ingest")."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
import psycopg
import structlog
from psycopg import errors as pg_errors

from app.core.db import bounded, connect_raw
from app.core.metrics import COMMANDS_DELIVERED, INGEST_BATCH_SIZE
from app.core.pgjson import UnstorableValue, json_for_postgres
from app.core.states import INCIDENT_CLOSED_SQL
from app.plugins.schemas import Heartbeat
from app.policy.repository import KILL_SWITCH_OFF_SQL

log = structlog.get_logger("selfheal.ingest")

INGEST_SQL = """
WITH input AS (
    -- One JSON document carries the whole batch: PostgreSQL parses it in C, where binding
    -- fifteen arrays element by element would cost the API process more than the insert.
    SELECT idx, installation_id, decode(digest, 'hex') AS msg_digest, signed_at, sent_at,
           plugin_version, env, uptime_s, requests, errors, webhook_attempts, webhook_failures,
           latency_p95_ms, errors_last_24h, telemetry, meta
    FROM json_to_recordset(%(batch)s::json) AS t(
        idx int, installation_id uuid, digest text, signed_at timestamptz, sent_at timestamptz,
        plugin_version text,
        env text, uptime_s bigint, requests bigint, errors bigint, webhook_attempts bigint,
        webhook_failures bigint, latency_p95_ms numeric, errors_last_24h bigint,
        telemetry jsonb, meta jsonb)
),
ins AS (
    -- signed_at (the verified X-Timestamp) routes the row to its partition; the replay guard
    -- is unique on (installation_id, msg_digest, signed_at), and the digest covers the
    -- timestamp: a replay has the same signed_at, meets the same partition's index (0017).
    INSERT INTO plugin_heartbeats (installation_id, msg_digest, signed_at, sent_at,
        plugin_version, env, uptime_s, requests, errors, webhook_attempts, webhook_failures,
        latency_p95_ms, errors_last_24h, telemetry, meta)
    SELECT installation_id, msg_digest, signed_at, sent_at, plugin_version, env, uptime_s,
        requests, errors, webhook_attempts, webhook_failures, latency_p95_ms, errors_last_24h,
        telemetry, meta
    FROM input
    ON CONFLICT ON CONSTRAINT uq_plugin_heartbeats_replay DO NOTHING
    RETURNING installation_id, msg_digest
),
accepted AS (
    SELECT input.* FROM input JOIN ins USING (installation_id, msg_digest)
),
latest AS (
    SELECT DISTINCT ON (installation_id) *, count(*) OVER (PARTITION BY installation_id) AS n
    FROM accepted ORDER BY installation_id, idx DESC
),
touched AS (
    UPDATE merchant_plugins m SET
        previous_version = CASE WHEN m.plugin_version <> l.plugin_version
                                THEN m.plugin_version ELSE m.previous_version END,
        version_changed_at = CASE WHEN m.plugin_version <> l.plugin_version
                                  THEN now() ELSE m.version_changed_at END,
        -- A new version starts a new healthy streak, unless an incident is open (then the
        -- incident's closing starts it: migration 0008's triggers).
        good_since = CASE WHEN m.plugin_version = l.plugin_version THEN m.good_since
                          WHEN EXISTS (SELECT 1 FROM plugin_incidents i
                                       WHERE i.installation_id = m.id
                                         AND i.status NOT IN {closed}) THEN NULL
                          ELSE now() END,
        plugin_version = l.plugin_version,
        env = l.env,
        uptime_s = l.uptime_s,
        telemetry = l.telemetry,
        last_heartbeat_at = now(),
        missed_since = NULL,
        next_expected_at = now() + make_interval(secs => %(interval_s)s),
        heartbeat_count = m.heartbeat_count + l.n,
        updated_at = now()
    FROM latest l
    WHERE m.id = l.installation_id
    RETURNING m.id
),
handed_out AS (
    UPDATE plugin_agent_commands c SET
        status = 'delivered',
        delivered_at = now(),
        lease_expires_at = now() + make_interval(secs => %(lease_s)s),
        delivery_count = c.delivery_count + 1
    FROM latest l
    WHERE c.installation_id = l.installation_id
      AND c.status IN ('pending', 'delivered')
      AND (c.status = 'pending' OR c.lease_expires_at <= now())
      AND c.expires_at > now()
      AND c.delivery_count < c.max_deliveries
      AND (NOT c.automatic OR {kill_switch_off})
      -- Held: the plugin had it when the kill switch was engaged; never handed out again,
      -- even once the switch is back on (migration 0018).
      AND c.held_at IS NULL
    RETURNING c.installation_id, c.id, c.type, c.payload, c.expires_at, c.created_at
),
-- Installations that should come back soon (docs/contracts.md, adaptive next_heartbeat_s): an open
-- incident (which includes a change being applied or verified) or a command waiting for them.
-- Both lookups are index ranges on partial indexes of open rows.
urgent AS (
    SELECT l.installation_id FROM latest l
    -- Every part of the statement reads the same snapshot: m is the row before this
    -- heartbeat's update, so an uptime lower than before, or shorter than the time since the
    -- last heartbeat, is a restart (a crash loop shows in a few heartbeats at the short
    -- interval, not in a few intervals; rules.restarted judges it on the plugin's clock).
    JOIN merchant_plugins m ON m.id = l.installation_id
    WHERE l.uptime_s < m.uptime_s
       OR l.uptime_s + 2 < extract(epoch FROM now() - m.last_heartbeat_at)
       OR EXISTS (SELECT 1 FROM plugin_incidents i
                  WHERE i.installation_id = l.installation_id AND i.status NOT IN {closed})
       OR EXISTS (SELECT 1 FROM plugin_agent_commands c
                  WHERE c.installation_id = l.installation_id
                    AND c.status IN ('pending', 'delivered'))
)
SELECT 0 AS kind, installation_id, msg_digest, NULL::uuid AS command_id, NULL::text AS type,
       NULL::jsonb AS payload, NULL::timestamptz AS expires_at, NULL::timestamptz AS created_at
FROM ins
UNION ALL
SELECT 1, installation_id, NULL, id, type, payload, expires_at, created_at FROM handed_out
UNION ALL
SELECT 2, installation_id, NULL, NULL, NULL, NULL, NULL, NULL FROM urgent
""".replace("{closed}", INCIDENT_CLOSED_SQL).replace("{kill_switch_off}", KILL_SWITCH_OFF_SQL)

# Transient conflicts between two batches touching the same installations in another order.
_RETRYABLE = (pg_errors.DeadlockDetected, pg_errors.SerializationFailure)


class IngestUnavailable(Exception):
    """The database could not take the batch; nothing of it was stored."""


class InstallationGone(Exception):
    """The installation was deleted after this request was authenticated."""


class IngestRejected(Exception):
    """This heartbeat (only this one) cannot be stored as sent."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(slots=True)
class PendingHeartbeat:
    installation_id: uuid.UUID
    digest: bytes
    row_json: bytes  # one element of the batch document, without its idx
    future: asyncio.Future[IngestResult] = field(repr=False)


@dataclass(frozen=True, slots=True)
class IngestResult:
    accepted: bool  # False: the same signed message was stored before (a replay)
    commands: list[dict[str, Any]]
    # An open incident or a waiting command: the plugin is asked to come back soon.
    urgent: bool = False


def batch_row(
    installation_id: uuid.UUID, digest: bytes, hb: Heartbeat, signed_at: datetime
) -> bytes:
    """One heartbeat of the batch document. `signed_at`: its verified X-Timestamp (aware),
    the partition key."""
    t = hb.telemetry
    return orjson.dumps(
        {
            "installation_id": str(installation_id),
            "digest": digest.hex(),
            "signed_at": signed_at,
            "sent_at": hb.sent_at,
            "plugin_version": hb.plugin_version,
            "env": hb.env,
            "uptime_s": hb.uptime_s,
            "requests": t.requests,
            "errors": t.errors,
            "webhook_attempts": t.webhook_attempts,
            "webhook_failures": t.webhook_failures,
            "latency_p95_ms": t.latency_p95_ms,
            "errors_last_24h": t.errors_last_24h,
            "telemetry": orjson.Fragment(json_for_postgres("telemetry", telemetry_document(hb))),
            "meta": orjson.Fragment(json_for_postgres("meta", hb.meta)),
        }
    )


def batch_document(rows: list[bytes]) -> str:
    """INGEST_SQL's %(batch)s: the rows of `batch_row`, each given its position (idx)."""
    return (
        b"["
        + b",".join(
            row[:-1] + b',"idx":' + str(idx).encode() + b"}" for idx, row in enumerate(rows)
        )
        + b"]"
    ).decode()


def telemetry_document(hb: Heartbeat) -> dict[str, Any]:
    """The latest telemetry as stored on the installation: what the plugin sent, plus the
    ratios the brief's SQL users look for (webhook_fail_rate, error_rate)."""
    doc: dict[str, Any] = hb.telemetry.model_dump(exclude_none=True)
    t = hb.telemetry
    doc.setdefault(
        "webhook_fail_rate",
        round(t.webhook_failures / t.webhook_attempts, 6) if t.webhook_attempts else 0.0,
    )
    doc.setdefault("error_rate", round(t.errors / t.requests, 6) if t.requests else 0.0)
    return doc


class HeartbeatBatcher:
    def __init__(
        self,
        conninfo: str,
        *,
        interval_s: int,
        lease_s: int,
        batch_max: int,
        connections: int = 2,
        connect_timeout_s: float = 5.0,
        statement_timeout_s: float = 5.0,
        pooled: bool = False,
        make_partitions: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        self._conninfo = conninfo
        # Called when a batch finds no partition for its time (every worker down for longer
        # than the partitions made ahead): makes them, then the batch is sent once more.
        self.make_partitions = make_partitions
        # Behind a transaction pooler (SELFHEAL_DB_POOLER): nothing prepared, no startup
        # options (app/core/db.py, connect_raw).
        self._pooled = pooled
        self._interval_s = interval_s
        self._lease_s = lease_s
        self._batch_max = batch_max
        self._connect_timeout_s = connect_timeout_s
        self._statement_timeout_s = statement_timeout_s
        self._wait_bound_s = 2 * connect_timeout_s + 2 * statement_timeout_s
        self._queue: asyncio.Queue[PendingHeartbeat] = asyncio.Queue()
        self._idle: asyncio.Queue[psycopg.AsyncConnection[Any] | None] = asyncio.Queue()
        for _ in range(connections):
            self._idle.put_nowait(None)  # connected lazily
        self._runner: asyncio.Task[None] | None = None
        self._flushes: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._runner = asyncio.create_task(self._run(), name="heartbeat-batcher")

    async def close(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
            await asyncio.gather(self._runner, return_exceptions=True)
        if self._flushes:
            await asyncio.gather(*self._flushes, return_exceptions=True)
        while not self._queue.empty():
            _fail(self._queue.get_nowait(), IngestUnavailable("server shutting down"))
        while not self._idle.empty():
            conn = self._idle.get_nowait()
            if conn is not None:
                await conn.close()

    async def submit(
        self,
        installation_id: uuid.UUID,
        digest: bytes,
        heartbeat: Heartbeat,
        signed_at: datetime,
    ) -> IngestResult:
        # Serialised here, in the caller's request: a value PostgreSQL would refuse fails this
        # heartbeat alone, never the batch it would have joined.
        try:
            row_json = batch_row(installation_id, digest, heartbeat, signed_at)
        except UnstorableValue as exc:
            raise IngestRejected(exc.field, str(exc)) from None
        future: asyncio.Future[IngestResult] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(PendingHeartbeat(installation_id, digest, row_json, future))
        try:
            # Bounded: connect and statement timeouts end a stuck batch well before this.
            return await asyncio.wait_for(future, self._wait_bound_s)
        except TimeoutError:
            raise IngestUnavailable("database did not answer in time") from None

    async def _run(self) -> None:
        while True:
            first = await self._queue.get()
            conn = await self._idle.get()
            # Everything that arrived while we waited for a free connection rides along.
            batch = [first]
            while len(batch) < self._batch_max and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            batch = [item for item in batch if not item.future.done()]  # timed out meanwhile
            if not batch:
                self._idle.put_nowait(conn)
                continue
            task = asyncio.create_task(self._flush(conn, batch))
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    async def _flush(
        self, conn: psycopg.AsyncConnection[Any] | None, batch: list[PendingHeartbeat]
    ) -> None:
        try:
            INGEST_BATCH_SIZE.observe(len(batch))
            conn, results = await self._store_with_retries(conn, _unique(batch))
        except Exception as exc:
            for item in batch:
                _fail(
                    item, exc if isinstance(exc, IngestUnavailable) else IngestUnavailable(str(exc))
                )
            conn = None if conn is None or conn.closed else conn
        else:
            for item in batch:
                if not item.future.done():
                    item.future.set_result(
                        results.get((item.installation_id, item.digest), _REPLAY)
                    )
        finally:
            self._idle.put_nowait(conn)

    async def _store_with_retries(
        self, conn: psycopg.AsyncConnection[Any] | None, batch: list[PendingHeartbeat]
    ) -> tuple[psycopg.AsyncConnection[Any] | None, dict[tuple[uuid.UUID, bytes], IngestResult]]:
        """Store the batch, or raise IngestUnavailable with the connection closed.

        A connection found dead (PostgreSQL restarted, a failover, an idle connection cut) is
        replaced and the batch sent once more. The first statement may have committed before
        the link broke; then the second finds those heartbeats stored, and answers them as
        accepted, not as replays. (A genuine replay inside such a retried batch also gets a 200,
        with nothing stored and no command: the unique index still holds.)"""
        lost_connection = False
        made_partitions = False
        try:
            for attempt in range(3):
                if conn is None or conn.closed:
                    conn = await self._connect()
                try:
                    return conn, await self._store(conn, batch, after_lost=lost_connection)
                except (psycopg.OperationalError, OSError, TimeoutError) as exc:
                    if lost_connection or isinstance(exc, psycopg.errors.QueryCanceled):
                        raise
                    lost_connection = True
                    log.info("ingest_connection_replaced", error=f"{type(exc).__name__}"[:100])
                    await conn.close()
                    conn = None
                    await self._drop_idle_connections()
                except _RETRYABLE:
                    # Two batches touched the same installations in opposite orders.
                    await asyncio.sleep(0.005 * (attempt + 1))
                except pg_errors.CheckViolation as exc:
                    if not _no_partition(exc) or made_partitions or self.make_partitions is None:
                        raise
                    made_partitions = True
                    log.warning(
                        "ingest_partition_missing",
                        action="making the heartbeat partitions ahead, then storing the batch",
                    )
                    await self.make_partitions()
                except (pg_errors.ForeignKeyViolation, psycopg.DataError):
                    # One heartbeat the database refuses (an installation deleted after its
                    # request was authenticated, a value out of range): store the others one
                    # by one rather than fail the whole batch.
                    return conn, await self._store_one_by_one(conn, batch)
            raise IngestUnavailable("database kept aborting the batch (deadlocks)")
        except BaseException as exc:
            if conn is not None:
                await conn.close()
            if isinstance(exc, IngestUnavailable | asyncio.CancelledError):
                raise
            if isinstance(exc, psycopg.OperationalError | OSError | TimeoutError):
                log.warning(
                    "ingest_database_unavailable", error=f"{type(exc).__name__}: {exc}"[:300]
                )
                # Whatever killed this connection (a restart, a failover) most likely killed
                # the idle ones too: replace them now rather than fail one batch on each.
                await self._drop_idle_connections()
                raise IngestUnavailable("database unavailable") from exc
            if isinstance(exc, pg_errors.CheckViolation) and _no_partition(exc):
                log.error(
                    "ingest_partition_missing",
                    error=str(exc)[:300],
                    action="as the owner: SELECT selfheal_ensure_heartbeat_partitions(24, 168);"
                    " (docs/partitioning.md)",
                )
                raise IngestUnavailable("no heartbeat partition for this time yet") from exc
            # Not the plugins' fault: say so in the log, answer 503 so they retry.
            log.exception("ingest_failed", error=type(exc).__name__)
            raise IngestUnavailable("heartbeat could not be stored") from exc

    async def _drop_idle_connections(self) -> None:
        for _ in range(self._idle.qsize()):
            conn = self._idle.get_nowait()
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
            self._idle.put_nowait(None)

    async def _store_one_by_one(
        self, conn: psycopg.AsyncConnection[Any] | None, batch: list[PendingHeartbeat]
    ) -> dict[tuple[uuid.UUID, bytes], IngestResult]:
        assert conn is not None
        results: dict[tuple[uuid.UUID, bytes], IngestResult] = {}
        for item in batch:
            try:
                results.update(await self._store(conn, [item]))
            except pg_errors.ForeignKeyViolation:
                _fail(item, InstallationGone("installation no longer exists"))
            except psycopg.DataError as exc:
                message = (exc.diag.message_primary or "value refused by the database")[:200]
                _fail(item, IngestRejected("body", message))
        return results

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        return await connect_raw(
            self._conninfo,
            "api-ingest",
            connect_timeout_s=self._connect_timeout_s,
            statement_timeout_s=self._statement_timeout_s,
            prepare_threshold=1,
            pooled=self._pooled,
        )

    async def _store(
        self,
        conn: psycopg.AsyncConnection[Any],
        batch: list[PendingHeartbeat],
        *,
        after_lost: bool = False,
    ) -> dict[tuple[uuid.UUID, bytes], IngestResult]:
        params = self._parameters(batch)
        # Autocommit: the one statement is its own transaction (one round trip, no BEGIN and
        # COMMIT); its data-modifying parts commit together or not at all.
        rows = await bounded(
            conn, _fetch_all(conn, INGEST_SQL, params), self._statement_timeout_s + 1
        )
        stored: set[tuple[uuid.UUID, bytes]] = set()
        commands: dict[uuid.UUID, list[dict[str, Any]]] = {}
        urgent: set[uuid.UUID] = set()
        for (
            kind,
            installation_id,
            digest,
            command_id,
            ctype,
            payload,
            expires_at,
            created_at,
        ) in rows:
            if kind == 0:
                stored.add((installation_id, bytes(digest)))
            elif kind == 2:
                urgent.add(installation_id)
            else:
                commands.setdefault(installation_id, []).append(
                    {
                        "id": str(command_id),
                        "type": ctype,
                        "payload": payload,
                        "expires_at": _iso(expires_at),
                        "_created_at": created_at,
                    }
                )
        results: dict[tuple[uuid.UUID, bytes], IngestResult] = {}
        # Commands go with the last heartbeat of each installation in the batch.
        last: dict[uuid.UUID, tuple[uuid.UUID, bytes]] = {}
        for item in batch:
            key = (item.installation_id, item.digest)
            if key in stored:
                results[key] = IngestResult(True, [], item.installation_id in urgent)
                last[item.installation_id] = key
            elif after_lost:
                results[key] = _STORED_BEFORE
        for installation_id, key in last.items():
            handed = sorted(commands.get(installation_id, []), key=lambda c: c.pop("_created_at"))
            if handed:
                COMMANDS_DELIVERED.inc(len(handed))
                results[key] = IngestResult(True, handed, True)
        return results

    def _parameters(self, batch: list[PendingHeartbeat]) -> dict[str, Any]:
        return {
            "batch": batch_document([item.row_json for item in batch]),
            "interval_s": self._interval_s,
            "lease_s": self._lease_s,
        }


_REPLAY = IngestResult(False, [])
_STORED_BEFORE = IngestResult(True, [])


def _unique(batch: list[PendingHeartbeat]) -> list[PendingHeartbeat]:
    """The same signed message twice in one batch: the second is a replay of the first."""
    seen: set[tuple[uuid.UUID, bytes]] = set()
    unique = []
    for item in batch:
        key = (item.installation_id, item.digest)
        if key in seen:
            if not item.future.done():
                item.future.set_result(_REPLAY)
        else:
            seen.add(key)
            unique.append(item)
    return unique


async def _fetch_all(
    conn: psycopg.AsyncConnection[Any], sql: str, params: dict[str, Any]
) -> list[tuple[Any, ...]]:
    cursor = await conn.execute(sql, params)
    return await cursor.fetchall()


def _no_partition(exc: pg_errors.CheckViolation) -> bool:
    """PostgreSQL's answer to a row no partition of plugin_heartbeats covers."""
    return (exc.diag.message_primary or "").startswith("no partition of relation")


def _fail(item: PendingHeartbeat, exc: Exception) -> None:
    if not item.future.done():  # its request may have timed out meanwhile
        item.future.set_exception(exc)


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None
