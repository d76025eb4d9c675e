"""One detection tick: open the incidents that are due, resolve the ones that recovered."""

from __future__ import annotations

from dataclasses import dataclass

import structlog
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.core.settings import Settings
from app.incidents import repository

log = structlog.get_logger("selfheal.detection")

# Most incidents one tick opens per rule; the rest are opened by the next ticks.
TICK_LIMIT = 10_000


@dataclass(frozen=True, slots=True)
class TickResult:
    opened: int
    resolved: int


async def detect_once(maker: async_sessionmaker[AsyncSession], settings: Settings) -> TickResult:
    async with maker() as session, session.begin():
        opened = await repository.open_missed_heartbeat_incidents(
            session, grace_s=settings.heartbeat_grace_s, limit=TICK_LIMIT
        )
        resolved = await repository.resolve_recovered_missed_heartbeats(
            session, healthy_heartbeats=settings.recovery_heartbeats
        )
    if opened or resolved:
        log.info("detection_tick", opened=len(opened), resolved=len(resolved))
    return TickResult(opened=len(opened), resolved=len(resolved))
