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

The raise lasts as long as the fleet incident: linking keeps what a raised member is on its own
(`own_severity`: its rule's severity at least its tenant's floor, raised by its later repeats),
and when the fleet incident closes, however it closes (this step, an operator's resolve or
ignore, psql), a trigger (migration 0019) gives each member still open that severity back,
unless it no longer has the raised one (the healing loop escalated it to critical: that stays).
The healing loop and its policy gate read the incident's severity at every step (the severity
cap, the approval threshold), so a lowered member is gated on its own severity from its next
step on; a member waiting in blocked_by_policy or awaiting_approval is gated again at its next
recheck (SELFHEAL_BLOCKED_RECHECK_S), its approvals still valid (the action key has no
severity).

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
incident is not resolved while its group has an open incident waiting to be linked.

The statements are in app/incidents/repository.py ("fleet incidents")."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession

from app.core.settings import Settings
from app.incidents.repository import (
    Group,
    link_members,
    open_fleet_incidents,
    open_fleets,
    resolve_finished,
)


@dataclass(frozen=True, slots=True)
class FleetResult:
    opened: int = 0
    linked: int = 0
    resolved: int = 0


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
