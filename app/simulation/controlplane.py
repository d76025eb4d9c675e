"""What a simulation does in the control plane's database: register the fleet, publish the
simulated plugin's releases, set (and put back) the ops policy, the demo operator, and read
the outcomes for the report and the progress view. Short transactions on the app's own
engine; the policy is changed with `selfheal.actor = 'simulator'` so the audit log names us.
Through the domain's services where they exist; the simulator's own statements are in
app/simulation/repository.py."""

from __future__ import annotations

import asyncio
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.core.crypto import SecretBox, new_api_token, token_digest
from app.core.db import set_actor
from app.ops.security import NewUser, add_user, hash_password
from app.plugins.service import register_installation
from app.policy import repository as policy_repository
from app.policy.repository import POLICY_FIELDS
from app.releases.service import add_release
from app.releases.signing import Signer
from app.simulation import repository
from sim.fleet.metrics import AttemptRow, IncidentRow, ReleaseState
from sim.fleet.plugins import Identity

ACTOR = "simulator"
REGISTER_BATCH = 50
REGISTER_CONCURRENCY = 4

Maker = async_sessionmaker[AsyncSession]


def _epoch(moment: datetime | None) -> float | None:
    return None if moment is None else moment.timestamp()


# --- the fleet -------------------------------------------------------------------------------


async def register_fleet(
    maker: Maker,
    box: SecretBox,
    *,
    tenants: Sequence[str],
    plugin: str,
    version: str,
    count: int,
) -> list[Identity]:
    """`count` installations spread round-robin over `tenants`, registered in batches of
    REGISTER_BATCH per transaction, a few transactions at a time."""
    wanted = [tenants[i % len(tenants)] for i in range(count)]
    batches = [wanted[i : i + REGISTER_BATCH] for i in range(0, count, REGISTER_BATCH)]
    gate = asyncio.Semaphore(REGISTER_CONCURRENCY)

    async def register(batch: list[str]) -> list[Identity]:
        async with gate, maker() as session, session.begin():
            out = []
            for tenant in batch:
                issued = await register_installation(
                    session, box, tenant=tenant, name=plugin, version=version, env="prod"
                )
                out.append(Identity(str(issued.plugin_id), issued.secret, tenant))
            return out

    results = await asyncio.gather(*(register(batch) for batch in batches))
    return [identity for batch in results for identity in batch]


async def disable_installations(maker: Maker, tenants: Sequence[str]) -> int:
    """The run's installations stop counting as active (no missed-heartbeat incident once the
    agents are gone, no share in later fleet incidents)."""
    async with maker() as session, session.begin():
        return await repository.disable_installations(session, tenants)


# --- releases --------------------------------------------------------------------------------


async def publish_releases(
    maker: Maker,
    signer: Signer,
    *,
    plugin: str,
    artifacts: dict[str, Path],
    max_bytes: int,
    unquarantine: bool,
) -> dict[str, str]:
    """Sign and record each version's artifact (the control plane serves the bytes); the
    sha256 of each. With `unquarantine`, a quarantine left by an earlier run is lifted, so
    each run starts from the same release state."""
    hashes = {}
    async with maker() as session, session.begin():
        for version, artifact in artifacts.items():
            added = await add_release(
                session,
                signer,
                plugin=plugin,
                version=version,
                artifact=artifact,
                valid_days=30,
                max_bytes=max_bytes,
            )
            hashes[version] = added.release.sha256
        if unquarantine:
            await repository.unquarantine_versions(session, plugin, list(artifacts))
    return hashes


async def read_releases(maker: Maker, plugin: str) -> list[ReleaseState]:
    async with maker() as session:
        rows = await repository.release_states(session, plugin)
        return [ReleaseState(r.version, r.quarantined, r.quarantine_reason) for r in rows]


# --- the policy ------------------------------------------------------------------------------


def policy_for(*, tenants: Sequence[str], installations: int, **changes: Any) -> dict[str, Any]:
    """The policy of a self-started run: autopatch on for the run's tenants only, up to high
    severity, approvals only for critical (no human in the loop), blast-radius caps raised to
    fit the fleet, canary 100%. min_confidence, approvals_required, approval_ttl_s and
    cooldown_s stay as they are unless `changes` says otherwise."""
    per_tenant = installations / max(1, len(tenants))
    values: dict[str, Any] = {
        "autopatch_enabled": True,
        "autopatch_whitelist": list(tenants),
        "autopatch_max_severity": "high",
        "approval_min_severity": "critical",
        "canary_percent": 100,
        "max_concurrent_actions": max(10, math.ceil(0.2 * installations)),
        "max_concurrent_actions_per_tenant": max(2, math.ceil(0.5 * per_tenant)),
    }
    values.update(changes)
    return values


async def read_policy(maker: Maker) -> dict[str, Any]:
    async with maker() as session:
        row = await policy_repository.read_policy(session)
    return _policy_json(dict(row._mapping))


async def set_policy(maker: Maker, values: dict[str, Any]) -> dict[str, Any]:
    unknown = set(values) - set(POLICY_FIELDS)
    if unknown:
        raise ValueError(f"not policy columns: {sorted(unknown)}")
    async with maker() as session, session.begin():
        await set_actor(session, ACTOR)
        row = await policy_repository.update_policy(session, {**values, "updated_by": ACTOR})
    return _policy_json(dict(row._mapping))


def _policy_json(row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, datetime):
            out[key] = value.isoformat()
        elif key == "min_confidence":
            out[key] = float(value)
        else:
            out[key] = value
    return out


def restorable(policy: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in policy.items() if k in POLICY_FIELDS}


# --- the demo operator -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DemoUser:
    user: NewUser
    rotated: bool  # the user existed: new password and token, the old token revoked


async def ensure_demo_user(maker: Maker, username: str = "demo") -> DemoUser:
    async with maker() as session, session.begin():
        found = await repository.lock_user(session, username)
        if found is None:
            return DemoUser(await add_user(session, username, "admin"), rotated=False)
        password = secrets.token_urlsafe(18)
        token = new_api_token()
        await repository.reset_admin(session, found, hash_password(password))
        await repository.replace_tokens(session, found, token_digest(token))
        return DemoUser(NewUser(username, "admin", password, token), rotated=True)


# --- outcomes --------------------------------------------------------------------------------


async def read_incidents(maker: Maker, tenants: Sequence[str]) -> list[IncidentRow]:
    async with maker() as session:
        return [_incident(r) for r in await repository.incidents_of(session, tenants)]


async def read_fleet_incidents(maker: Maker, plugin: str, since: float) -> list[IncidentRow]:
    """Fleet incidents (no installation) of the simulated plugin opened since `since`: they
    group installations of every run on the same data, so they are counted, not judged."""
    async with maker() as session:
        rows = await repository.fleet_incidents_since(session, plugin, since)
        return [_incident(r) for r in rows]


def _incident(row: Any) -> IncidentRow:
    return IncidentRow(
        id=str(row.id),
        installation_id=None if row.installation_id is None else str(row.installation_id),
        tenant_id=row.tenant_id,
        type=row.type,
        severity=row.severity,
        status=row.status,
        detected_at=row.detected_at.timestamp(),
        resolved_at=_epoch(row.resolved_at),
        first_bad_signal_at=_epoch(row.first_bad_signal_at),
        status_reason=row.status_reason,
        decision_source=row.source,
        decision_action=row.action,
        fallback_reason=row.fallback_reason,
    )


async def read_attempts(maker: Maker, tenants: Sequence[str]) -> list[AttemptRow]:
    async with maker() as session:
        rows = await repository.attempts_of(session, tenants)
        return [
            AttemptRow(
                id=str(r.id),
                incident_id=None if r.incident_id is None else str(r.incident_id),
                installation_id=None if r.installation_id is None else str(r.installation_id),
                action=r.action,
                from_version=r.from_version,
                to_version=r.to_version,
                status=r.status,
                automatic=r.automatic,
                created_at=r.created_at.timestamp(),
                finished_at=_epoch(r.finished_at),
                decision_source=r.decision_source,
                failure_reason=r.failure_reason,
            )
            for r in rows
        ]


async def work_in_progress(maker: Maker, tenants: Sequence[str]) -> tuple[int, int]:
    """(open incidents, attempts in flight) on the run's installations: the drain waits for
    both to reach zero."""
    async with maker() as session:
        return await repository.work_in_progress(session, tenants)
