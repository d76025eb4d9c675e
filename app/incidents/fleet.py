"""Fleet incidents: the blast radius of one plugin version.

When many installations of one version show the same problem, the problem is the version,
not each installation: a fleet incident (installation_id and tenant_id NULL) groups their
incidents (the members, `fleet_incident_id`), one severity level above the worst of them,
and each member is raised to at least high. The healing loop keeps healing the members one by
one and hands the fleet incident itself to a human (it has no installation to patch).

When: a group (plugin_name, plugin_version, type) gets a fleet incident once it has at least
SELFHEAL_FLEET_MIN_INSTALLATIONS open, not yet grouped member incidents, and those are at
least SELFHEAL_FLEET_MIN_SHARE of the version's active installations. A fleet incident
resolves when every one of its members is closed.

Cost: this runs at the end of every detection tick, so each statement touches only what is
due, through ix_plugin_incidents_open_members (open installation incidents by plugin, version,
type and fleet incident):
- opening looks only at the groups whose incidents this tick opened or repeated. Counting
  the version's active installations, the share's denominator, stops after
  members / min_share + 1 rows: past that the share is too small whatever the rest, so the
  cost follows the number of failing installations, not the size of the fleet;
- linking and resolving look only at the open fleet incidents (a few at most), each through
  two index probes, and lock only those with something to do: an idle tick stays read-only.
A tick that died between committing its incidents and grouping them leaves the group to be
looked at when one of its incidents opens or repeats again; members of an open fleet incident
are linked on every tick whatever opened them.

Concurrency: two ticks may run these statements at once. The partial unique index on open
fleet incidents (uq_plugin_incidents_open_fleet) makes the second insert a no-op; linking and
resolving lock the fleet incident FOR UPDATE SKIP LOCKED (whoever holds it does the work, the
other skips it until the next tick), members are locked SKIP LOCKED too, so a member that a
healing step holds is linked on a later tick instead of making detection wait; a fleet
incident is not resolved while its group has an open incident waiting to be linked."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.settings import Settings
from app.incidents.repository import CLOSED, RANKS, Group, at_least


def open_fleet(alias: str = "") -> str:
    """The predicate of uq_plugin_incidents_open_fleet (an open fleet incident). The planner,
    and ON CONFLICT's index inference, use a partial index only when the query's WHERE
    implies the index's: keep these the indexes' predicates."""
    a = f"{alias}." if alias else ""
    return f"{a}installation_id IS NULL AND {a}status NOT IN {CLOSED}"


def open_member(alias: str) -> str:
    """An open incident of an active installation: the predicate of
    ix_plugin_incidents_open_members (which the planner needs to see), and the installation
    still active, since shares are taken over active installations and a disabled one's
    incidents, which nothing closes any more, must neither make nor hold a fleet incident."""
    return (
        f"{alias}.installation_id IS NOT NULL AND {alias}.status NOT IN {CLOSED}"
        f" AND EXISTS (SELECT 1 FROM merchant_plugins active_{alias}"
        f" WHERE active_{alias}.id = {alias}.installation_id"
        f" AND active_{alias}.status = 'active')"
    )


@dataclass(frozen=True, slots=True)
class FleetResult:
    opened: int = 0
    linked: int = 0
    resolved: int = 0


def one_above(rank: str) -> str:
    """SQL: the severity one level above the rank (array_position in RANKS), capped."""
    return f"({RANKS})[least({rank} + 1, 4)]"


async def group_fleets(
    session: AsyncSession, settings: Settings, touched: Iterable[Group], *, link_limit: int
) -> FleetResult:
    """The fleet step of a detection tick: open the fleet incidents that are due among the
    touched groups, link the open ones' new members, resolve those whose members are all
    closed. On an idle tick this is one read-only statement: locking a row every tick would
    make every tick a write (a transaction id, a WAL flush at commit)."""
    groups = sorted({g for g in touched if g.plugin_version is not None})
    opened = 0
    if groups:
        opened = len(
            await open_fleet_incidents(
                session,
                groups,
                min_installations=settings.fleet_min_installations,
                min_share=settings.fleet_min_share,
            )
        )
    fleets = await open_fleets(session)
    to_link = [f.id for f in fleets if f.unlinked]
    finished = [f.id for f in fleets if not f.unlinked and not f.open_members]
    linked = await link_members(session, to_link, limit=link_limit) if to_link else 0
    resolved = len(await resolve_finished(session, finished)) if finished else 0
    return FleetResult(opened, linked, resolved)


async def work_due(session: AsyncSession) -> bool:
    """Whether an open fleet incident has members to link or none open any more: lets an idle
    tick skip the fleet step's transaction altogether."""
    return any(f.unlinked or not f.open_members for f in await open_fleets(session))


async def open_fleets(session: AsyncSession) -> list[Any]:
    """The open fleet incidents (a few at most), each with whether its group has open
    incidents waiting to be linked and whether any of its members is still open: two index
    probes each. Reads only; the steps that change something lock what they change."""
    rows = await session.execute(
        text(
            f"""
            SELECT f.id,
                EXISTS (SELECT 1 FROM plugin_incidents m
                        WHERE m.plugin_name = f.plugin_name
                          AND m.plugin_version = f.plugin_version AND m.type = f.type
                          AND m.fleet_incident_id IS NULL AND {open_member("m")}) AS unlinked,
                EXISTS (SELECT 1 FROM plugin_incidents m
                        WHERE m.plugin_name = f.plugin_name
                          AND m.plugin_version = f.plugin_version AND m.type = f.type
                          AND m.fleet_incident_id = f.id AND {open_member("m")}) AS open_members
            FROM plugin_incidents f
            WHERE {open_fleet("f")}
            """
        )
    )
    return list(rows)


async def open_fleet_incidents(
    session: AsyncSession, groups: list[Group], *, min_installations: int, min_share: float
) -> list[uuid.UUID]:
    """Open a fleet incident for each of `groups` that has no open one and whose open, not yet
    grouped incidents reach both thresholds. It is 'detected' like any incident; its severity
    is one level above its worst member's, first_bad_signal_at the earliest of theirs, and the
    snapshot says how wide the problem is. The members are linked by link_members."""
    rows = await session.execute(
        text(
            f"""
            WITH touched AS (
                SELECT DISTINCT plugin_name, plugin_version, type
                FROM unnest(CAST(:names AS text[]), CAST(:versions AS text[]),
                            CAST(:types AS text[])) AS g(plugin_name, plugin_version, type)
            ),
            counted AS (
                SELECT t.plugin_name, t.plugin_version, t.type, s.members, s.tenants, s.top,
                       s.first_bad
                FROM touched t
                CROSS JOIN LATERAL (
                    SELECT count(*) AS members, count(DISTINCT i.tenant_id) AS tenants,
                           max(array_position({RANKS}, i.severity)) AS top,
                           min(i.first_bad_signal_at) AS first_bad
                    FROM plugin_incidents i
                    WHERE i.plugin_name = t.plugin_name AND i.plugin_version = t.plugin_version
                      AND i.type = t.type AND i.fleet_incident_id IS NULL
                      AND {open_member("i")}
                ) s
                WHERE s.members >= :min_members
                  AND NOT EXISTS (
                    SELECT 1 FROM plugin_incidents f
                    WHERE f.plugin_name = t.plugin_name AND f.plugin_version = t.plugin_version
                      AND f.type = t.type AND {open_fleet("f")})
            ),
            sized AS (
                SELECT c.*, a.active
                FROM counted c
                CROSS JOIN LATERAL (
                    SELECT count(*) AS active FROM (
                        SELECT 1 FROM merchant_plugins m
                        WHERE m.plugin_name = c.plugin_name
                          AND m.plugin_version = c.plugin_version AND m.status = 'active'
                        LIMIT CASE WHEN :min_share > 0
                                   THEN CAST(floor(c.members / :min_share) AS bigint) + 1 END
                    ) capped
                ) a
            )
            INSERT INTO plugin_incidents (installation_id, tenant_id, plugin_name,
                plugin_version, type, severity, status, first_bad_signal_at, telemetry_snapshot,
                occurrences)
            SELECT NULL, NULL, plugin_name, plugin_version, type, {one_above("top")},
                'detected', first_bad,
                jsonb_build_object(
                    'members', members,
                    'active_installations', active,
                    'share', round(members::numeric / active, 4),
                    'tenants', tenants,
                    'min_installations', CAST(:min_members AS integer),
                    'min_share', CAST(:min_share AS double precision)),
                members
            FROM sized
            WHERE active > 0 AND members::double precision / active >= :min_share
            ON CONFLICT (plugin_name, plugin_version, type) WHERE {open_fleet()} DO NOTHING
            RETURNING id
            """
        ),
        {
            "names": [g.plugin_name for g in groups],
            "versions": [g.plugin_version for g in groups],
            "types": [g.type for g in groups],
            "min_members": min_installations,
            "min_share": float(min_share),
        },
    )
    return list(rows.scalars())


async def link_members(session: AsyncSession, fleet_ids: list[uuid.UUID], *, limit: int) -> int:
    """Link the open, not yet grouped incidents of each of these fleet incidents' groups to it
    (at most `limit` per call; the rest on the next tick) and raise them to at least high:
    a problem shared by a good part of the fleet is bigger than its magnitude on one
    installation. The fleet incident follows: severity one level above the worst linked
    member's own severity (only ever up), earliest first bad signal, and fresh figures (its
    occurrences count its members)."""
    result = await session.execute(
        text(
            f"""
            WITH fleets AS MATERIALIZED (
                SELECT id, plugin_name, plugin_version, type FROM plugin_incidents
                WHERE id = ANY(:fleets) AND {open_fleet()}
                FOR UPDATE SKIP LOCKED
            ),
            candidates AS MATERIALIZED (
                SELECT i.id, f.id AS fleet_id, i.severity AS own_severity,
                       i.first_bad_signal_at, i.tenant_id
                FROM fleets f
                JOIN plugin_incidents i
                  ON i.plugin_name = f.plugin_name AND i.plugin_version = f.plugin_version
                 AND i.type = f.type AND i.fleet_incident_id IS NULL AND {open_member("i")}
                ORDER BY i.id
                LIMIT :limit
                FOR UPDATE OF i SKIP LOCKED
            ),
            linked AS (
                UPDATE plugin_incidents i
                SET fleet_incident_id = c.fleet_id, updated_at = now(),
                    severity = {at_least("i.severity", "'high'")}
                FROM candidates c
                WHERE i.id = c.id
                RETURNING c.fleet_id, c.own_severity, c.first_bad_signal_at, c.tenant_id
            ),
            per_fleet AS (
                SELECT l.fleet_id, count(*) AS n,
                       max(array_position({RANKS}, l.own_severity)) AS top,
                       min(l.first_bad_signal_at) AS first_bad
                FROM linked l GROUP BY l.fleet_id
            ),
            figures AS MATERIALIZED (
                -- This statement's snapshot does not see the links made above: count them in.
                SELECT p.fleet_id, p.top, p.first_bad,
                       p.n + (SELECT count(*) FROM plugin_incidents m
                              WHERE m.fleet_incident_id = p.fleet_id) AS members,
                       (SELECT count(DISTINCT x.tenant_id) FROM (
                            SELECT m.tenant_id FROM plugin_incidents m
                            WHERE m.fleet_incident_id = p.fleet_id
                            UNION ALL
                            SELECT l.tenant_id FROM linked l WHERE l.fleet_id = p.fleet_id
                        ) x) AS tenants,
                       (SELECT count(*) FROM merchant_plugins mp
                        WHERE mp.plugin_name = f.plugin_name
                          AND mp.plugin_version = f.plugin_version
                          AND mp.status = 'active') AS active,
                       p.n
                FROM per_fleet p JOIN fleets f ON f.id = p.fleet_id
            )
            UPDATE plugin_incidents f SET
                severity = {at_least("f.severity", one_above("x.top"))},
                first_bad_signal_at = least(f.first_bad_signal_at, x.first_bad),
                occurrences = x.members,
                telemetry_snapshot = f.telemetry_snapshot || jsonb_build_object(
                    'members', x.members,
                    'active_installations', x.active,
                    'share', CASE WHEN x.active > 0
                                  THEN round(x.members::numeric / x.active, 4) END,
                    'tenants', x.tenants),
                updated_at = now()
            FROM figures x
            WHERE f.id = x.fleet_id
            RETURNING x.n
            """
        ),
        {"fleets": fleet_ids, "limit": limit},
    )
    return sum(int(n) for n in result.scalars())


async def resolve_finished(session: AsyncSession, fleet_ids: list[uuid.UUID]) -> list[uuid.UUID]:
    """Resolve those of these fleet incidents none of whose members is open any more (and
    whose group has no open incident waiting to be linked).

    Lock first (SKIP LOCKED: one a concurrent tick is linking to is left for the next tick),
    then check again in a statement whose snapshot is taken after the lock: a member linked by
    a concurrent tick that committed in between keeps its fleet incident open."""
    locked = list(
        (
            await session.execute(
                text(
                    f"SELECT id FROM plugin_incidents WHERE id = ANY(:ids) AND {open_fleet()}"
                    " FOR UPDATE SKIP LOCKED"
                ),
                {"ids": fleet_ids},
            )
        ).scalars()
    )
    if not locked:
        return []
    rows = await session.execute(
        text(
            f"""
            UPDATE plugin_incidents f SET
                status = 'resolved', resolved_at = now(), updated_at = now(),
                next_check_at = NULL, status_reason = 'every member incident is closed'
            WHERE f.id = ANY(:ids) AND {open_fleet("f")}
              AND NOT EXISTS (
                SELECT 1 FROM plugin_incidents m
                WHERE m.plugin_name = f.plugin_name AND m.plugin_version = f.plugin_version
                  AND m.type = f.type AND m.fleet_incident_id = f.id AND {open_member("m")})
              AND NOT EXISTS (
                SELECT 1 FROM plugin_incidents m
                WHERE m.plugin_name = f.plugin_name AND m.plugin_version = f.plugin_version
                  AND m.type = f.type AND m.fleet_incident_id IS NULL AND {open_member("m")})
            RETURNING f.id
            """
        ),
        {"ids": locked},
    )
    return list(rows.scalars())
