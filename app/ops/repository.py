"""SQL for the ops policy. The row is read and written as the brief's runbook names it."""

from __future__ import annotations

from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncSession

# The columns ops set (the API's PUT, the simulator, psql).
POLICY_FIELDS = (
    "autopatch_enabled",
    "autopatch_whitelist",
    "autopatch_max_severity",
    "min_confidence",
    "canary_percent",
    "approvals_required",
    "approval_min_severity",
    "approval_ttl_s",
    "max_concurrent_actions",
    "max_concurrent_actions_per_tenant",
    "cooldown_s",
)
POLICY_COLUMNS = ", ".join((*POLICY_FIELDS, "updated_at", "updated_by"))


async def read_policy(session: AsyncSession) -> Row[Any]:
    row = await session.execute(text(f"SELECT {POLICY_COLUMNS} FROM ops_policy WHERE id = 1"))
    return row.one()


async def update_policy(session: AsyncSession, changes: dict[str, Any]) -> Row[Any]:
    assignments = []
    params: dict[str, Any] = {}
    for column, value in changes.items():
        if column == "autopatch_whitelist":
            assignments.append(f"{column} = CAST(:{column} AS jsonb)")
            params[column] = orjson.dumps(value).decode()
        else:
            assignments.append(f"{column} = :{column}")
            params[column] = value
    row = await session.execute(
        text(
            f"UPDATE ops_policy SET {', '.join(assignments)} WHERE id = 1 RETURNING {POLICY_COLUMNS}"
        ),
        params,
    )
    return row.one()
