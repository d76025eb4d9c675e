"""One simulated plugin installation: a real plugin_client.AsyncAgent over HTTP, with its own
identity and state_dir, whose handlers change the version the simulated plugin runs. What
that version does (which problems it has) is decided by the truth table, never by the agent.

Traffic is not simulated request by request: just before each heartbeat (the agent's `wait`
hook), and every second while the installation has a problem (the fleet's ticker, so that
plugin_client's early report sees trouble as a real plugin's would), the counts for the time
elapsed since they were last recorded are drawn at random around the scenario's rates, per
stretch of constant fault state (a fault starting mid-interval splits it), and recorded in
bulk with record_request(count) / record_error(count=) / record_webhook(ok=, count=)."""

from __future__ import annotations

import asyncio
import math
import random
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx

from plugin_client import AsyncAgent
from sim.artifacts import ArtifactError, read_manifest, unpack_artifact
from sim.fleet.scenario import Traffic
from sim.fleet.timeline import Cause, InstallationTruth, VersionChange
from sim.fleet.truth import Truth

# A plugin that crashes on start dies this long after it starts, and a supervisor (systemd,
# a container runtime) starts it again after RESTART_GAP_S.
CRASH_AFTER_S = (1.0, 3.0)
RESTART_GAP_S = 1.0

STAT_FIELDS = (
    "heartbeats_sent",
    "heartbeats_failed",
    "commands_applied",
    "commands_refused",
    "commands_failed",
)


@dataclass(frozen=True, slots=True)
class Identity:
    installation_id: str
    secret: str
    tenant_id: str


@dataclass
class FleetContext:
    """What every installation of a fleet shares."""

    base_url: str
    public_key: str
    http: list[httpx.AsyncClient]  # shared: installation i uses http[i % len(http)]
    truth: Truth
    traffic: Traffic
    state_root: Path
    interval_s: float
    sha256: dict[str, str]
    stopped: asyncio.Future[None]
    # (installation, version, cause, at): the plugin changed version (update, rollback, deploy)
    on_version: Callable[[SimPlugin, str, Cause, float], None]
    meta: dict[str, Any]
    clock: Callable[[], float] = time.time
    early_report: bool = True


def poisson(lam: float, rng: random.Random) -> int:
    if lam <= 0:
        return 0
    if lam < 30:
        limit, k, p = math.exp(-lam), 0, 1.0
        while True:
            p *= rng.random()
            if p <= limit:
                return k
            k += 1
    return max(0, round(rng.gauss(lam, math.sqrt(lam))))


def binomial(n: int, p: float, rng: random.Random) -> int:
    if n <= 0 or p <= 0:
        return 0
    if p >= 1:
        return n
    if n <= 50:
        return sum(1 for _ in range(n) if rng.random() < p)
    mean = n * p
    if mean < 20:
        return min(n, poisson(mean, rng))
    return min(n, max(0, round(rng.gauss(mean, math.sqrt(mean * (1 - p))))))


def check_artifact(artifact: Path, plugin: str, version: str) -> None:
    """What a real host checks before installing: the archive unpacks safely and its
    plugin.yaml names this plugin and version. Raises to fail the update command."""
    folder = Path(tempfile.mkdtemp(prefix="selfheal-sim-artifact-"))
    try:
        manifest = read_manifest(unpack_artifact(artifact, folder))
    except ArtifactError as error:
        raise RuntimeError(f"artifact of {version} is unusable: {error}") from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if (manifest.name, manifest.version) != (plugin, version):
        raise RuntimeError(
            f"artifact says {manifest.name} {manifest.version}, the update is {plugin} {version}"
        )


class SimPlugin:
    def __init__(
        self, ctx: FleetContext, index: int, identity: Identity, rng: random.Random
    ) -> None:
        self.ctx = ctx
        self.index = index
        self.identity = identity
        self.rng = rng
        now = ctx.clock()
        self.version = ctx.truth.initial_version
        self.record = InstallationTruth(identity.installation_id, identity.tenant_id)
        self.record.versions.append(VersionChange(now, self.version, "initial"))
        # Plugins have been running for a while when the simulation starts.
        self.boot = now - rng.uniform(3600, 7 * 86400)
        self.accounted_until = now
        self.faults_assigned = 0
        self.last_fault_at = -math.inf
        self.agent: AsyncAgent | None = None
        self._halt: asyncio.Future[None] | None = None
        # A crash loop: when the running process dies (None: it is not crashing), and what
        # ends the agent's pause so that the restarted process beats as it starts.
        self._crash_at: float | None = None
        self._started: asyncio.Future[None] | None = None
        self._carried: Counter[str] = Counter()

    @property
    def installation_id(self) -> str:
        return self.identity.installation_id

    @property
    def running(self) -> bool:
        return self._halt is not None and not self._halt.done()

    # -- the agent ----------------------------------------------------------------------------

    def make_agent(self, version: str) -> AsyncAgent:
        """A new agent (file I/O: its state_dir; run it in a thread for a big fleet)."""
        ctx = self.ctx
        agent = AsyncAgent(
            ctx.base_url,
            self.identity.installation_id,
            self.identity.secret,
            plugin=ctx.truth.plugin,
            version=version,
            public_keys=[ctx.public_key],
            state_dir=ctx.state_root / self.identity.installation_id,
            env="prod",
            http=ctx.http[self.index % len(ctx.http)],
            uptime=self.uptime,
            meta=ctx.meta,
            installed_sha256=ctx.sha256.get(version),
            interval_s=ctx.interval_s,
            rng=self.rng,
            wait=self._wait,
            early_report=ctx.early_report,
        )
        agent.on_update(self._on_update)
        agent.on_rollback(self._on_rollback)
        return agent

    async def start(self, delay: float) -> None:
        if self.agent is None:
            self.agent = await asyncio.to_thread(self.make_agent, self.version)
        self._halt = asyncio.get_running_loop().create_future()
        await self.agent.start(delay=delay)

    async def stop(self, wait_s: float = 5.0) -> None:
        if self._halt is not None and not self._halt.done():
            self._halt.set_result(None)
        if self.agent is not None:
            await self.agent.stop(wait_s)

    async def redeploy(self, version: str) -> float:
        """The installation's own operator deploys `version` outside selfheal: the plugin
        restarts on it (a new agent on the same state_dir). Returns the moment it runs it."""
        await self.stop()
        if self.agent is not None:
            stats = self.agent.stats
            for name in STAT_FIELDS:
                self._carried[name] += getattr(stats, name)
        now = self.ctx.clock()
        self.accounted_until = now  # the old process's uncounted traffic went with it
        self.boot = now
        self._crash_at = None
        self._changed(version, "deploy", now, account=False)
        self.agent = await asyncio.to_thread(self.make_agent, version)
        await self.start(0.0)
        return now

    def stats(self) -> Counter[str]:
        totals = Counter(self._carried)
        if self.agent is not None:
            stats = self.agent.stats
            for name in STAT_FIELDS:
                totals[name] += getattr(stats, name)
        return totals

    def last_refusal(self) -> str | None:
        return None if self.agent is None else self.agent.stats.last_refusal_reason

    # -- hooks --------------------------------------------------------------------------------

    def uptime(self) -> float:
        return max(0.0, self.ctx.clock() - self.boot)

    async def _sleep(self, seconds: float, *, restart_ends_it: bool = False) -> bool:
        """Pause; True when the fleet or this installation is stopping. With
        `restart_ends_it`, a restart of the crash-looping plugin ends the pause too."""
        assert self._halt is not None
        waiting: tuple[asyncio.Future[None], ...] = (self.ctx.stopped, self._halt)
        if restart_ends_it:
            self._started = asyncio.get_running_loop().create_future()
            waiting += (self._started,)
        try:
            await asyncio.wait(
                waiting, timeout=max(0.0, seconds), return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            self._started = None
        return self.ctx.stopped.done() or self._halt.done()

    async def _wait(self, delay: float) -> bool:
        """The agent's pause between heartbeats: a silence stretches it, a restart (crash
        loop) cuts it short, since a plugin's agent beats as the plugin starts; then the
        traffic since the last heartbeat is recorded, just before the next one goes out."""
        if await self._sleep(delay, restart_ends_it=True):
            return True
        while (until := self.silent_until(self.ctx.clock())) is not None:
            if await self._sleep(until - self.ctx.clock()):
                return True
        self.account(self.ctx.clock())
        return False

    def silent_until(self, now: float) -> float | None:
        ends = [
            f.end
            for f in self.record.faults
            if f.kind == "silence" and f.start <= now and f.end is not None and now < f.end
        ]
        return max(ends) if ends else None

    def crash_tick(self, now: float, crashing: bool) -> None:
        """Called about every second while the installation has a problem. A crash-looping
        plugin dies CRASH_AFTER_S after it starts (the first time: that long after the fault
        began) and its supervisor starts it again RESTART_GAP_S later; the new process's
        agent beats at once, with an uptime of about 0 s."""
        if not crashing:
            self._crash_at = None
            return
        if self._crash_at is None:
            self._crash_at = now + self.rng.uniform(*CRASH_AFTER_S)
            return
        if now < self._crash_at + RESTART_GAP_S:
            return
        self.boot = now
        self._crash_at = now + self.rng.uniform(*CRASH_AFTER_S)
        if self._started is not None and not self._started.done():
            self._started.set_result(None)

    def account(self, until: float) -> None:
        """Record the traffic of [accounted_until, until) in the agent's counters."""
        start = self.accounted_until
        agent = self.agent
        if until <= start or agent is None:
            self.accounted_until = max(start, until)
            return
        bounds = {start, until}
        for fault in self.record.faults:
            for moment in (fault.start, fault.end):
                if moment is not None and start < moment < until:
                    bounds.add(moment)
        traffic, truth, rng = self.ctx.traffic, self.ctx.truth, self.rng
        requests = errors = webhooks = failures = 0
        spiking = False
        for a, b in pairwise(sorted(bounds)):
            problems = self.record.problems_at((a + b) / 2, truth)
            seconds = b - a
            n = poisson(traffic.requests_per_s * seconds, rng)
            spike = problems.get("error_spike")
            spiking = spiking or spike is not None
            rate = (
                spike.error_rate if spike and spike.error_rate is not None else traffic.error_rate
            )
            requests += n
            errors += binomial(n, rate, rng)
            w = poisson(traffic.webhooks_per_s * seconds, rng)
            broken = problems.get("webhook_failures")
            wrate = (
                broken.failure_rate
                if broken and broken.failure_rate is not None
                else traffic.webhook_failure_rate
            )
            webhooks += w
            failures += binomial(w, wrate, rng)
        agent.record_request(requests)
        agent.record_error(count=errors)
        agent.record_webhook(ok=True, count=webhooks - failures)
        agent.record_webhook(ok=False, count=failures)
        if traffic.latency_ms > 0:
            agent.record_latency(traffic.latency_ms * rng.uniform(0.8, 1.2) * (3 if spiking else 1))
        self.accounted_until = until

    async def _on_update(self, version: str, artifact: Path) -> None:
        await asyncio.to_thread(check_artifact, artifact, self.ctx.truth.plugin, version)
        self._changed(version, "update", self.ctx.clock())

    async def _on_rollback(self, version: str) -> None:
        self._changed(version, "rollback", self.ctx.clock())

    def _changed(self, version: str, cause: Cause, now: float, *, account: bool = True) -> None:
        if account:
            self.account(now)  # the traffic so far happened on the old version
        self.version = version
        self.record.versions.append(VersionChange(now, version, cause))
        self.ctx.on_version(self, version, cause, now)
