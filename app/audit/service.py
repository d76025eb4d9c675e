"""Sealing the history, exporting the head, verifying.

`seal_history` runs on a worker tick (SELFHEAL_AUDIT_SEAL_EVERY_S, and at worker start) and
from `selfheal audit seal`: it appends a seal for every row not sealed yet, in one
transaction under an advisory lock, then exports the new head: a file (SELFHEAL_AUDIT_HEAD_FILE,
default data_dir/audit/head.json, replaced atomically, with every head also appended to
heads.jsonl beside it) and a log line (`history_sealed`), both signed with the key. Keep
either outside the database's reach (ship the log, back the file up): that is what catches
seals removed from the end, or remade by someone who has the key.

`verify_history` recomputes every seal from the rows as they are now and reports the first
row that does not match (altered, or its seal altered), rows that are gone, rows never
sealed although older than the last seal, and a head (the exported one) that the database's
seals no longer contain."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.audit import repository
from app.audit.seals import GENESIS, LOGS, Head, keys_of, seal
from app.core.files import write_private
from app.core.settings import Settings

log = structlog.get_logger(__name__)

BATCH = 2000
# A row written this long before the last seal and still without one was skipped on purpose.
UNSEALED_GRACE = dt.timedelta(minutes=5)


@dataclass(frozen=True, slots=True)
class Sealed:
    sealed: int
    head: Head | None


async def seal_history(
    maker: async_sessionmaker[AsyncSession], settings: Settings, *, export: bool = True
) -> Sealed:
    """Seal every row not sealed yet; export the head when something was sealed (or when no
    head was exported yet)."""
    key, _ = keys_of(settings)
    total = 0
    async with maker() as session, session.begin():
        await repository.lock_sealing(session)
        last = await repository.last_seal(session)
        previous = last.mac if last else GENESIS
        for name in LOGS:
            while True:
                rows = await repository.unsealed_rows(session, name, BATCH)
                if not rows:
                    break
                batch = []
                for row in rows:
                    mac = seal(key, previous, name, int(row["id"]), row)
                    batch.append(
                        {"log": name, "row_id": int(row["id"]), "key_id": key.id, "mac": mac}
                    )
                    previous = mac
                await repository.append_seals(session, batch)
                total += len(batch)
                if len(rows) < BATCH:
                    break
        last = await repository.last_seal(session)
        count = await repository.count_seals(session) if last else 0
    if last is None:
        return Sealed(0, None)
    head = Head(
        seq=last.seq,
        mac=last.mac.hex(),
        key_id=last.key_id,
        sealed_at=last.sealed_at.astimezone(dt.UTC).isoformat(),
        rows=count,
    ).signed(key)
    if export and (total or not settings.audit_head_path.exists()):
        export_head(settings.audit_head_path, head)
        log.info("history_sealed", sealed=total, **head_fields(head))
    return Sealed(total, head)


def head_fields(head: Head) -> dict[str, object]:
    return {
        "head_seq": head.seq,
        "head_mac": head.mac,
        "head_key_id": head.key_id,
        "head_sealed_at": head.sealed_at,
        "head_rows": head.rows,
        "head_signature": head.signature,
    }


def export_head(path: Path, head: Head) -> None:
    """Replace `path` with `head` (atomically, 0600) and append it to heads.jsonl beside it."""
    write_private(path, head.to_json() + "\n")
    fd = os.open(path.with_name("heads.jsonl"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as out:
        out.write(head.to_json() + "\n")


def read_head(path: Path) -> Head | None:
    try:
        return Head.from_json(path.read_text())
    except FileNotFoundError:
        return None


@dataclass
class Verification:
    seals: int = 0
    problems: list[str] = field(default_factory=list)
    # The first row that does not match its seal: (log, row id).
    first_altered: tuple[str, int] | None = None
    head_checked: bool = False

    @property
    def intact(self) -> bool:
        return not self.problems


async def verify_history(
    maker: async_sessionmaker[AsyncSession],
    settings: Settings,
    *,
    head: Head | None,
    extra_keys: Iterable[str] = (),
) -> Verification:
    _, keys = keys_of(settings, extra_keys)
    result = Verification()
    previous = GENESIS
    after = 0
    last_sealed_at: dt.datetime | None = None
    async with maker() as session, session.begin():
        await repository.one_snapshot(session)
        head_seal = None
        while True:
            seals = await repository.seals_after(session, after, BATCH)
            if not seals:
                break
            by_log: dict[str, list[int]] = {}
            for s in seals:
                by_log.setdefault(s.log, []).append(s.row_id)
            rows = {
                name: await repository.rows_by_id(session, name, ids)
                for name, ids in by_log.items()
            }
            for s in seals:
                result.seals += 1
                row = rows[s.log].get(s.row_id)
                key = keys.get(s.key_id)
                if row is None:
                    _altered(
                        result, s.log, s.row_id, f"{s.log} row {s.row_id} (seal #{s.seq}) is gone"
                    )
                elif key is None:
                    result.problems.append(
                        f"seal #{s.seq} was made with key {s.key_id}, which is not configured"
                        " (SELFHEAL_AUDIT_KEY, SELFHEAL_SECRET_KEY(_PREVIOUS), --key)"
                    )
                elif seal(key, previous, s.log, s.row_id, row) != s.mac:
                    _altered(
                        result,
                        s.log,
                        s.row_id,
                        f"{s.log} row {s.row_id} does not match its seal #{s.seq}: the row was"
                        " changed, or a seal before it was removed or changed",
                    )
                previous = s.mac
                if head is not None and s.seq == head.seq:
                    head_seal = s
                last_sealed_at = s.sealed_at
            after = seals[-1].seq
        if last_sealed_at is not None:
            for name in LOGS:
                never = await repository.rows_never_sealed(
                    session, name, last_sealed_at - UNSEALED_GRACE, 20
                )
                for row_id in never:
                    _altered(
                        result,
                        name,
                        row_id,
                        f"{name} row {row_id} was never sealed, although older than the last seal"
                        " (added behind the sealer's back, or its seal was removed)",
                    )
    if head is not None:
        result.head_checked = True
        if not head.signature_valid(keys):
            result.problems.append(
                f"the exported head (seal #{head.seq}) has no valid signature: it was not made"
                " with a configured key"
            )
        elif head_seal is None:
            result.problems.append(
                f"seal #{head.seq}, the head exported at {head.sealed_at}, is no longer in the"
                f" database: seals were removed (the database has {result.seals})"
            )
        elif head_seal.mac.hex() != head.mac:
            result.problems.append(
                f"seal #{head.seq} differs from the head exported at {head.sealed_at}: the"
                " seals were remade"
            )
        elif result.seals < head.rows:
            result.problems.append(
                f"the database has {result.seals} seals, the head exported at"
                f" {head.sealed_at} counted {head.rows}: seals were removed"
            )
    return result


def _altered(result: Verification, name: str, row_id: int, problem: str) -> None:
    result.problems.append(problem)
    if result.first_altered is None:
        result.first_altered = (name, row_id)
