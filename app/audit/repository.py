"""The SQL of the seals: reading the sealed logs and appending to `history_seals` (migration
0013), which the application may only read and append to."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from app.audit.seals import LOGS

# A row committed after rows with higher ids (transactions commit in any order) is still found
# by the next run, as long as it is within this many ids of the highest one sealed.
LOOKBACK_IDS = 1000
_LOCK = "hashtext('selfheal-history-seals')"


@dataclass(frozen=True, slots=True)
class StoredSeal:
    seq: int
    log: str
    row_id: int
    key_id: str
    mac: bytes
    sealed_at: datetime


def _table(log: str) -> str:
    if log not in LOGS:  # table names cannot be bound parameters: only ours get in
        raise ValueError(f"not a sealed log: {log}")
    return log


async def one_snapshot(session: AsyncSession) -> None:
    """Rows and seals as of one moment for the rest of the transaction (its first statement)."""
    await session.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY"))


async def lock_sealing(session: AsyncSession) -> None:
    """One sealer at a time, fleet-wide, until the transaction ends: each seal links to the one
    before it."""
    await session.execute(text(f"SELECT pg_advisory_xact_lock({_LOCK})"))


async def last_seal(session: AsyncSession) -> StoredSeal | None:
    row = (
        await session.execute(
            text(
                "SELECT seq, log, row_id, key_id, mac, sealed_at FROM history_seals"
                " ORDER BY seq DESC LIMIT 1"
            )
        )
    ).one_or_none()
    return None if row is None else StoredSeal(**row._mapping)


async def count_seals(session: AsyncSession) -> int:
    return int((await session.execute(text("SELECT count(*) FROM history_seals"))).scalar_one())


async def unsealed_rows(session: AsyncSession, log: str, limit: int) -> list[Mapping[str, Any]]:
    """Rows of `log` without a seal, oldest id first, near or past the highest id sealed."""
    table = _table(log)
    result = await session.execute(
        text(
            f"SELECT t.* FROM {table} t"
            " WHERE t.id > coalesce((SELECT max(s.row_id) FROM history_seals s"
            "                        WHERE s.log = :log), 0) - :lookback"
            " AND NOT EXISTS (SELECT 1 FROM history_seals s"
            "                 WHERE s.log = :log AND s.row_id = t.id)"
            " ORDER BY t.id LIMIT :limit"
        ),
        {"log": log, "lookback": LOOKBACK_IDS, "limit": limit},
    )
    return [dict(r._mapping) for r in result]


async def append_seals(session: AsyncSession, seals: Sequence[Mapping[str, Any]]) -> list[int]:
    """Insert seals (log, row_id, key_id, mac) in order; their sequence numbers."""
    seqs = []
    for values in seals:
        seq = (
            await session.execute(
                text(
                    "INSERT INTO history_seals (log, row_id, key_id, mac)"
                    " VALUES (:log, :row_id, :key_id, :mac) RETURNING seq"
                ),
                dict(values),
            )
        ).scalar_one()
        seqs.append(int(seq))
    return seqs


async def seals_after(session: AsyncSession, after_seq: int, limit: int) -> list[StoredSeal]:
    result = await session.execute(
        text(
            "SELECT seq, log, row_id, key_id, mac, sealed_at FROM history_seals"
            " WHERE seq > :after ORDER BY seq LIMIT :limit"
        ),
        {"after": after_seq, "limit": limit},
    )
    return [StoredSeal(**r._mapping) for r in result]


async def seal_by_seq(session: AsyncSession, seq: int) -> StoredSeal | None:
    row = (
        await session.execute(
            text(
                "SELECT seq, log, row_id, key_id, mac, sealed_at FROM history_seals"
                " WHERE seq = :seq"
            ),
            {"seq": seq},
        )
    ).one_or_none()
    return None if row is None else StoredSeal(**row._mapping)


async def rows_by_id(
    session: AsyncSession, log: str, ids: Sequence[int]
) -> dict[int, Mapping[str, Any]]:
    table = _table(log)
    result = await session.execute(
        text(f"SELECT t.* FROM {table} t WHERE t.id = ANY(:ids)"),
        {"ids": list(ids)},
    )
    return {int(r._mapping["id"]): dict(r._mapping) for r in result}


async def rows_never_sealed(
    session: AsyncSession, log: str, before: datetime, limit: int
) -> list[int]:
    """Ids of rows of `log` that no seal covers and that the sealer will never reach: below its
    lookback (an id slipped in among old rows, whatever time it claims), or written before
    `before`."""
    table = _table(log)
    result = await session.execute(
        text(
            f"SELECT t.id FROM {table} t"
            " WHERE (t.at < :before OR t.id <= coalesce((SELECT max(s.row_id) FROM history_seals s"
            "                                            WHERE s.log = :log), 0) - :lookback)"
            " AND NOT EXISTS (SELECT 1 FROM history_seals s"
            "                 WHERE s.log = :log AND s.row_id = t.id)"
            " ORDER BY t.id LIMIT :limit"
        ),
        {"log": log, "before": before, "lookback": LOOKBACK_IDS, "limit": limit},
    )
    return [int(r[0]) for r in result]
