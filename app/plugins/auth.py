"""Plugin authentication: who signed a request, from the installation's cached secrets
(docs/contracts.md, "Plugin authentication"). The signature format and its computation are
app/plugins/signatures.py; this module verifies a request's headers against the credentials,
and keeps those credentials.

Secrets are decrypted once and cached per process for SELFHEAL_AUTH_CACHE_TTL_S seconds, so the
heartbeat path does no database read. Any change of an installation's secrets or status (from
the CLI or from psql) is announced by a database trigger with NOTIFY selfheal_auth, and every
API process drops that entry when the change commits; should a notification be missed (the
listening connection was down), the TTL bounds how long an entry lives. A signature that fails
against an entry older than a second also reloads it once. Each secret carries its own expiry,
checked at use, so an old secret stops working exactly when its grace period ends.

The replay key is the SHA-256 of the signed message, not of the signature: during rotation a
request may carry two valid signatures, and replaying it with only one of them must still be
recognised as the same request."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
import structlog

from app.core.crypto import SecretBox
from app.core.db import bounded, connect_raw
from app.core.errors import ApiError
from app.plugins.signatures import (
    MalformedSignature,
    SigningKey,
    matching_secret,
    parse_signatures,
    response_signature,
    signed_message,
)

log = structlog.get_logger("selfheal.auth")

_RELOAD_AFTER_S = 1.0
_NEGATIVE_TTL_S = 2.0
_UNANNOUNCED_TTL_S = 5.0
_RETRY = {"Retry-After": "5"}


class AuthFailed(ApiError):
    def __init__(
        self,
        reason: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        request: str | None = None,
    ) -> None:
        super().__init__(401, reason, message, headers=headers, request=request)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Credentials:
    installation_id: uuid.UUID
    tenant_id: str
    plugin_name: str
    active: bool
    keys: tuple[SigningKey, ...]
    loaded_at: float


@dataclass(frozen=True, slots=True)
class VerifiedRequest:
    installation_id: uuid.UUID
    tenant_id: str
    plugin_name: str
    digest: bytes  # SHA-256 of the signed message: the replay key
    timestamp: int
    # The secret whose signature matched: the response is signed with it, so a plugin in the
    # middle of a rotation verifies our answer with the secret it signs with.
    secret: bytes = field(default=b"", repr=False)

    def response_headers(self, status: int, path: str, body: bytes) -> dict[str, str]:
        return response_signature(self.secret, status, path, body)

    @property
    def signed_at(self) -> datetime:
        """X-Timestamp as an aware datetime: a stored heartbeat's partition key (migration
        0017). The digest covers it, so a replay has the same one."""
        return datetime.fromtimestamp(self.timestamp, UTC)


class PluginAuthenticator:
    def __init__(
        self,
        loader: CredentialLoader,
        *,
        tolerance_s: int,
        cache_ttl_s: float,
    ) -> None:
        self._loader = loader
        self._tolerance_s = tolerance_s
        self._cache_ttl_s = cache_ttl_s
        self._cache: dict[uuid.UUID, Credentials] = {}
        self._unknown: dict[uuid.UUID, float] = {}
        # Bumped by every invalidation: a load that was in flight when a change was announced
        # may have read the old row, and must not be cached.
        self._generation = 0
        # Set by follow_credential_changes while its LISTEN connection is up. Without it,
        # changes are not announced, so entries live only _UNANNOUNCED_TTL_S.
        self._listening = asyncio.Event()

    def forget(self, installation_id: uuid.UUID) -> None:
        self._generation += 1
        self._cache.pop(installation_id, None)
        self._unknown.pop(installation_id, None)

    def forget_all(self) -> None:
        self._generation += 1
        self._cache.clear()
        self._unknown.clear()

    @property
    def listening(self) -> bool:
        return self._listening.is_set()

    @listening.setter
    def listening(self, value: bool) -> None:
        if value:
            self._listening.set()
        else:
            self._listening.clear()

    async def wait_until_listening(self, *, timeout_s: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._listening.wait(), timeout_s)
        return self.listening

    @property
    def cache_ttl_s(self) -> float:
        return self._cache_ttl_s if self.listening else min(self._cache_ttl_s, _UNANNOUNCED_TTL_S)

    async def verify(
        self,
        *,
        plugin_id: str | None,
        timestamp: str | None,
        signature: str | None,
        method: str,
        path: str,
        body: bytes,
    ) -> VerifiedRequest:
        if not plugin_id:
            raise AuthFailed("missing_header", "X-Plugin-Id header is required")
        if not timestamp:
            raise AuthFailed("missing_header", "X-Timestamp header is required")
        if not signature:
            raise AuthFailed("missing_header", "X-Signature header is required")
        try:
            installation_id = uuid.UUID(plugin_id)
        except ValueError:
            raise AuthFailed("unknown_plugin", "X-Plugin-Id is not a known installation") from None
        if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12):
            raise AuthFailed("bad_timestamp", "X-Timestamp must be unix seconds")
        now = time.time()
        if abs(now - int(timestamp)) > self._tolerance_s:
            raise AuthFailed(
                "stale_timestamp",
                f"X-Timestamp is more than {self._tolerance_s} s away from server time",
            )
        try:
            sigs = parse_signatures(signature)
        except MalformedSignature as malformed:
            raise AuthFailed("bad_signature", str(malformed)) from None
        message = signed_message(timestamp, method, path, body)

        creds = await self._credentials(installation_id, now)
        matched = matching_secret(creds.keys, message, sigs, now)
        if matched is None and now - creds.loaded_at > _RELOAD_AFTER_S:
            creds = await self._credentials(installation_id, now, reload=True)
            matched = matching_secret(creds.keys, message, sigs, now)
        if matched is None:
            raise AuthFailed("bad_signature", "signature does not match")
        if not creds.active:
            raise AuthFailed("plugin_disabled", "this installation is disabled")
        return VerifiedRequest(
            installation_id=installation_id,
            tenant_id=creds.tenant_id,
            plugin_name=creds.plugin_name,
            digest=hashlib.sha256(message).digest(),
            timestamp=int(timestamp),
            secret=matched,
        )

    async def _credentials(
        self, installation_id: uuid.UUID, now: float, *, reload: bool = False
    ) -> Credentials:
        cached = self._cache.get(installation_id)
        if cached is not None and not reload and now - cached.loaded_at < self.cache_ttl_s:
            return cached
        unknown_at = self._unknown.get(installation_id)
        if unknown_at is not None and now - unknown_at < _NEGATIVE_TTL_S:
            raise AuthFailed("unknown_plugin", "X-Plugin-Id is not a known installation")
        for _ in range(2):
            generation = self._generation
            creds = await self._loader.load(installation_id)
            if generation == self._generation:
                break
            # A change was announced while we read: what we read may predate it. Read again.
        else:
            raise ApiError(503, "unavailable", "credentials are changing; retry", headers=_RETRY)
        if creds is None:
            if len(self._unknown) > 100_000:
                self._unknown.clear()
            self._unknown[installation_id] = now
            self._cache.pop(installation_id, None)
            raise AuthFailed("unknown_plugin", "X-Plugin-Id is not a known installation")
        self._cache[installation_id] = creds
        return creds


class CredentialLoader:
    """Loads credentials for cache misses, many installations per query: misses that arrive
    while a query runs are answered by the next one (an API process restarting in front of a
    large fleet sees a miss for every plugin in its first heartbeat interval). One dedicated
    autocommit connection: one round trip per query, no pool churn."""

    def __init__(
        self, conninfo: str, box: SecretBox, *, timeout_s: float, pooled: bool = False
    ) -> None:
        self._conninfo = conninfo
        # Behind a transaction pooler (SELFHEAL_DB_POOLER): see connect_raw.
        self._pooled = pooled
        self._box = box
        self._timeout_s = timeout_s
        self._waiting: dict[uuid.UUID, list[asyncio.Future[Credentials | None]]] = {}
        self._wakeup = asyncio.Event()
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._runner: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._runner = asyncio.create_task(self._run(), name="credential-loader")

    async def close(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
            await asyncio.gather(self._runner, return_exceptions=True)
        if self._conn is not None:
            await self._conn.close()

    async def load(self, installation_id: uuid.UUID) -> Credentials | None:
        future: asyncio.Future[Credentials | None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(installation_id, []).append(future)
        self._wakeup.set()
        try:
            return await asyncio.wait_for(future, 3 * self._timeout_s + 2)
        except TimeoutError:
            raise _unavailable() from None

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            waiting, self._waiting = self._waiting, {}
            try:
                found = await self._query_with_retry(list(waiting))
            except Exception as exc:
                # This batch fails (503, the plugins retry); the loader itself must live on.
                log.warning("credential_load_failed", error=f"{type(exc).__name__}: {exc}"[:300])
                for futures in waiting.values():
                    for future in futures:
                        if not future.done():
                            future.set_exception(_unavailable())
                continue
            for installation_id, futures in waiting.items():
                for future in futures:
                    if not future.done():
                        future.set_result(found.get(installation_id))

    async def _query_with_retry(self, ids: list[uuid.UUID]) -> dict[uuid.UUID, Credentials]:
        # A read can be repeated safely: after a PostgreSQL restart the first attempt finds
        # the old connection dead, the second opens a new one.
        try:
            return await self._query(ids)
        except (psycopg.OperationalError, OSError, TimeoutError):
            await self._drop_connection()
            return await self._query(ids)

    async def _drop_connection(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def _query(self, ids: list[uuid.UUID]) -> dict[uuid.UUID, Credentials]:
        if self._conn is None or self._conn.closed:
            self._conn = await connect_raw(
                self._conninfo,
                "api-auth",
                connect_timeout_s=self._timeout_s,
                statement_timeout_s=self._timeout_s,
                pooled=self._pooled,
            )
        conn = self._conn
        try:
            fetched = await bounded(conn, _fetch(conn, ids), self._timeout_s + 1)
        except BaseException:
            await self._drop_connection()
            raise
        now = time.time()
        rows: dict[uuid.UUID, list[tuple[Any, ...]]] = {}
        for row in fetched:
            rows.setdefault(row[0], []).append(row)
        return {
            installation_id: self._credentials_from(installation_id, group, now)
            for installation_id, group in rows.items()
        }

    def _credentials_from(
        self, installation_id: uuid.UUID, group: list[tuple[Any, ...]], now: float
    ) -> Credentials:
        _, tenant_id, plugin_name, status, _, _ = group[0]
        keys = []
        for *_, sealed, expires_at in group:
            if sealed is None:
                continue
            try:
                secret = self._box.open(bytes(sealed), bound_to=str(installation_id))
            except Exception as exc:
                # Sealed under another SELFHEAL_SECRET_KEY, or damaged: this key cannot sign,
                # the installation's other keys still can.
                log.error(
                    "plugin_secret_unreadable",
                    plugin_id=str(installation_id),
                    error=type(exc).__name__,
                )
                continue
            keys.append(SigningKey(secret=secret.encode(), expires_at=_unix(expires_at)))
        return Credentials(
            installation_id=installation_id,
            tenant_id=tenant_id,
            plugin_name=plugin_name,
            active=status == "active",
            keys=tuple(keys),
            loaded_at=now,
        )


_CREDENTIALS_SQL = (
    "SELECT m.id, m.tenant_id, m.plugin_name, m.status, s.secret_enc, s.expires_at"
    " FROM merchant_plugins m"
    " LEFT JOIN plugin_secrets s ON s.installation_id = m.id"
    "  AND (s.expires_at IS NULL OR s.expires_at > now())"
    " WHERE m.id = ANY(%s)"
)


async def _fetch(conn: psycopg.AsyncConnection[Any], ids: list[uuid.UUID]) -> list[tuple[Any, ...]]:
    cursor = await conn.execute(_CREDENTIALS_SQL, (ids,))
    return await cursor.fetchall()


def _unavailable() -> ApiError:
    return ApiError(503, "unavailable", "database unavailable; retry later", headers=_RETRY)


def _unix(moment: datetime | None) -> float | None:
    if moment is None:
        return None
    return moment.replace(tzinfo=moment.tzinfo or UTC).timestamp()


AUTH_CHANNEL = "selfheal_auth"


async def follow_credential_changes(
    conninfo: str, authenticator: PluginAuthenticator, *, reconnect_after_s: float = 1.0
) -> None:
    """LISTEN for credential changes and drop the matching cache entries; runs for the life of
    the process. While the connection is down the cache keeps entries only briefly (see
    PluginAuthenticator.cache_ttl_s); after it comes back the whole cache is dropped, since
    notifications sent meanwhile are gone. `conninfo` must reach PostgreSQL itself
    (Settings.listen_url): through a transaction pooler LISTEN succeeds but its server
    connection goes back to the pool, and no notification would ever arrive."""
    while True:
        try:
            # No statement timeout: the connection waits for notifications.
            async with await connect_raw(
                conninfo, "api-listen", connect_timeout_s=10, statement_timeout_s=None
            ) as conn:
                await conn.execute(f"LISTEN {AUTH_CHANNEL}")
                authenticator.forget_all()
                authenticator.listening = True
                async for notice in conn.notifies():
                    try:
                        authenticator.forget(uuid.UUID(notice.payload))
                    except ValueError:  # '*': a TRUNCATE, everything may have changed
                        authenticator.forget_all()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("auth_listener_down", error=f"{type(exc).__name__}: {exc}"[:300])
        finally:
            authenticator.listening = False
        await asyncio.sleep(reconnect_after_s)
