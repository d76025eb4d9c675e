"""Rotating SELFHEAL_SECRET_KEY: every stored secret sealed again under the current key.

Safe beside running API processes and workers, and safe to run again:
- pages of `batch_size` rows in id order, each page in its own short transaction, so no lock
  is held for long and a large fleet is not one giant transaction;
- only rows not already sealed under the current key are read (the key id at the start of
  each ciphertext says so), so a second run has nothing to do;
- each row is written back only if it still holds what was read (compare-and-swap): a secret
  rotated or removed meanwhile is left as its writer left it;
- the plaintext does not change, so the plugins notice nothing; each change is announced to
  the API processes, which reload the installation's secrets.

A row no configured key opens is left alone and reported. `remaining` counts, after the run,
the secrets that can still be used (plugin secrets not past their grace period, notification
endpoints) and are not under the current key: SELFHEAL_SECRET_KEY_PREVIOUS may be dropped
when it is 0."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.core.crypto import SecretBox, UnreadableSecret
from app.keyring import repository
from app.keyring.repository import Sealed
from app.notifications.service import secret_binding

log = structlog.get_logger("selfheal.keyring")

DEFAULT_BATCH = 500

Fetch = Callable[[AsyncSession, bytes, Any, int], Awaitable[list[Sealed]]]
Swap = Callable[[AsyncSession, list[tuple[Any, bytes, bytes]]], Awaitable[int]]


@dataclass
class Rotation:
    key_id: str
    plugin_secrets: int = 0
    endpoint_secrets: int = 0
    # Rows no configured key opens: "plugin_secrets:<id>" / "notification_endpoints:<id>",
    # those that can still be used only (an unreadable, expired plugin secret is harmless).
    unreadable: list[str] = field(default_factory=list)
    remaining: int = 0


async def _plugin_page(
    session: AsyncSession, prefix: bytes, after: Any, limit: int
) -> list[Sealed]:
    return await repository.plugin_secrets_not_under(session, prefix, after=after, limit=limit)


async def _endpoint_page(
    session: AsyncSession, prefix: bytes, after: Any, limit: int
) -> list[Sealed]:
    found = await repository.endpoint_secrets_not_under(session, prefix, after=after, limit=limit)
    return [Sealed(s.id, secret_binding(s.id), s.sealed, s.live) for s in found]


async def rotate_key(
    sessionmaker: async_sessionmaker[AsyncSession],
    box: SecretBox,
    *,
    batch_size: int = DEFAULT_BATCH,
) -> Rotation:
    """Seal every stored secret under `box`'s current key (see the module docstring)."""
    rotation = Rotation(key_id=box.key_id.hex())
    rotation.plugin_secrets = await _rotate_table(
        sessionmaker,
        box,
        "plugin_secrets",
        _plugin_page,
        repository.swap_plugin_secrets,
        start=0,
        batch_size=batch_size,
        unreadable=rotation.unreadable,
    )
    rotation.endpoint_secrets = await _rotate_table(
        sessionmaker,
        box,
        "notification_endpoints",
        _endpoint_page,
        repository.swap_endpoint_secrets,
        start=uuid.UUID(int=0),
        batch_size=batch_size,
        unreadable=rotation.unreadable,
    )
    async with sessionmaker() as session, session.begin():
        plugins, endpoints = await repository.count_not_under(session, box.prefix)
    rotation.remaining = plugins + endpoints
    log.info(
        "secret_key_rotated",
        key_id=rotation.key_id,
        plugin_secrets=rotation.plugin_secrets,
        endpoint_secrets=rotation.endpoint_secrets,
        unreadable=len(rotation.unreadable),
        remaining=rotation.remaining,
    )
    return rotation


async def _rotate_table(
    sessionmaker: async_sessionmaker[AsyncSession],
    box: SecretBox,
    table: str,
    fetch: Fetch,
    swap: Swap,
    *,
    start: Any,
    batch_size: int,
    unreadable: list[str],
) -> int:
    after, resealed = start, 0
    while True:
        async with sessionmaker() as session, session.begin():
            page = await fetch(session, box.prefix, after, batch_size)
            changes: list[tuple[Any, bytes, bytes]] = []
            for row in page:
                try:
                    changes.append(
                        (row.id, row.sealed, box.reseal(row.sealed, bound_to=row.bound_to))
                    )
                except UnreadableSecret as exc:
                    if row.live:
                        unreadable.append(f"{table}:{row.id}")
                        log.error(
                            "stored_secret_unreadable", table=table, id=str(row.id), error=str(exc)
                        )
            resealed += await swap(session, changes)
        if len(page) < batch_size:
            return resealed
        after = page[-1].id
