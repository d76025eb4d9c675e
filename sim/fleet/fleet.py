"""The fleet: N simulated installations in one asyncio process, sharing one HTTP client, and
the fault schedule that makes some of them sick (sim/fleet/scenario.py)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx

from sim.fleet.plugins import FleetContext, Identity, SimPlugin
from sim.fleet.scenario import PROBLEM_KINDS, PlannedFault, RunPlan
from sim.fleet.timeline import Cause, FaultRecord, InstallationTruth
from sim.fleet.truth import Truth

SICK_TRAFFIC_EVERY_S = 1.0
AGENTS_PER_CLIENT = 200
CONNECTIONS_PER_CLIENT = 32

log = logging.getLogger("sim.fleet")

# Agents are created (state_dir files) this many at a time.
_CREATE_BATCH = 64


class DecisionServiceControl(Protocol):
    """Switches the reference decision service's mode (POST /_control)."""

    async def set_mode(self, mode: str) -> None: ...


@dataclass(frozen=True, slots=True)
class FleetEvent:
    at: float
    kind: str  # fault | decision_service | note
    text: str


@dataclass(slots=True)
class Injection:
    """One planned fault as it was applied: how many installations it wanted and got."""

    at: float
    cycle: int
    kind: str
    wanted: int
    got: int
    note: str | None = None
    duration_s: float | None = None


@dataclass(frozen=True, slots=True)
class FleetSnapshot:
    at: float
    elapsed_s: float
    running: int
    heartbeats_sent: int
    heartbeats_failed: int
    commands_applied: int
    commands_refused: int
    commands_failed: int
    problems: dict[str, int]  # installations with each problem kind (silence included)
    decision_service: str


@dataclass
class DecisionServiceWindow:
    start: float
    planned_end: float
    mode: str
    end: float | None = None


class QueueOutsideThePool(httpx.AsyncBaseTransport):
    """httpx's transport with at most `limit` requests in its connection pool at a time (as
    many as it has connections); the others wait in an asyncio.Semaphore, whose queue costs
    nothing per step. A slot is held until the response is closed."""

    def __init__(self, limit: int) -> None:
        self._inner = httpx.AsyncHTTPTransport(
            limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
        )
        self._slots = asyncio.Semaphore(limit)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await self._slots.acquire()
        try:
            response = await self._inner.handle_async_request(request)
        except BaseException:
            self._slots.release()
            raise
        stream = response.stream
        assert isinstance(stream, httpx.AsyncByteStream)
        response.stream = _ReleasingStream(stream, self._slots)
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


class _ReleasingStream(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream, slots: asyncio.Semaphore) -> None:
        self._inner = inner
        self._slots: asyncio.Semaphore | None = slots

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            if self._slots is not None:
                self._slots.release()
                self._slots = None


@dataclass
class Fleet:
    plan: RunPlan
    truth: Truth
    identities: list[Identity]
    base_url: str
    public_key: str
    state_root: Path
    sha256: dict[str, str]
    seed: int
    decision_service: DecisionServiceControl | None = None
    on_event: Callable[[FleetEvent], None] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    clock: Callable[[], float] = time.time
    # plugin_client's early report (False: plugins that report on schedule only, as a
    # client without it would: the baseline of bench/fleet.py).
    early_report: bool = True

    plugins: list[SimPlugin] = field(default_factory=list, init=False)
    injections: list[Injection] = field(default_factory=list, init=False)
    ds_windows: list[DecisionServiceWindow] = field(default_factory=list, init=False)
    t0: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(f"{self.seed}:faults")
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self._http: list[httpx.AsyncClient] = []
        self._stopped: asyncio.Future[None] | None = None
        self._scheduler: asyncio.Task[None] | None = None
        self._ds_mode = "normal" if self.decision_service is not None else "not controlled"

    # -- life -----------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._stopped = loop.create_future()
        # Several small connection pools rather than one big one: httpcore's pool re-scans
        # every connection for every queued request (encode/httpcore#1035, O(N*M)); with
        # thousands of agents on one pool of a thousand connections the simulator spent its
        # CPU there and could not send a tenth of a 10,000-plugin fleet's heartbeats.
        # Requests also wait in a semaphore in front of each pool, never inside it: a pool
        # with a queue costs O(connections * queued) per step, so a simulator that fell
        # behind would spend its CPU there and fall further behind.
        shards = max(1, math.ceil(len(self.identities) / AGENTS_PER_CLIENT))
        self._http = [
            httpx.AsyncClient(
                transport=QueueOutsideThePool(CONNECTIONS_PER_CLIENT),
                timeout=httpx.Timeout(10.0, connect=5.0),
                trust_env=False,
            )
            for _ in range(shards)
        ]
        ctx = FleetContext(
            base_url=self.base_url,
            public_key=self.public_key,
            http=self._http,
            truth=self.truth,
            traffic=self.plan.scenario.traffic,
            state_root=self.state_root,
            interval_s=float(self.plan.interval_s),
            sha256=self.sha256,
            stopped=self._stopped,
            on_version=self._version_changed,
            meta=self.meta,
            clock=self.clock,
            early_report=self.early_report,
        )
        self.plugins = [
            SimPlugin(ctx, index, identity, random.Random(f"{self.seed}:{index}"))
            for index, identity in enumerate(self.identities)
        ]
        for start in range(0, len(self.plugins), _CREATE_BATCH):
            batch = self.plugins[start : start + _CREATE_BATCH]
            agents = await asyncio.gather(
                *(asyncio.to_thread(p.make_agent, p.version) for p in batch)
            )
            for plugin, agent in zip(batch, agents, strict=True):
                plugin.agent = agent
        self.t0 = self.clock()
        spread = float(self.plan.interval_s)
        for plugin in self.plugins:
            # The fleet spreads over one interval, as real installations do, and is in its
            # steady state: the first heartbeat carries a whole interval of traffic, as if
            # the one before had gone out an interval earlier.
            delay = plugin.rng.uniform(0.0, spread)
            plugin.accounted_until = self.t0 + delay - spread
            await plugin.start(delay=delay)
        self._scheduler = asyncio.create_task(self._schedule())
        self._tasks.add(self._scheduler)
        self._scheduler.add_done_callback(self._tasks.discard)
        self._spawn(self._count_sick_traffic())

    def stop_faults(self) -> None:
        """No new fault from now on (the run's --duration is over); faults already injected
        go on as planned, and a decision service switched off comes back on time."""
        if self._scheduler is not None:
            self._scheduler.cancel()

    async def stop(self) -> None:
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(p.stop(wait_s=5.0) for p in self.plugins), return_exceptions=True)
        await self._restore_decision_service()
        for client in self._http:
            await client.aclose()

    def _spawn(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _sleep_until(self, moment: float) -> bool:
        """True when the fleet stopped meanwhile."""
        assert self._stopped is not None
        delay = moment - self.clock()
        if delay > 0:
            done, _ = await asyncio.wait((self._stopped,), timeout=delay)
            return bool(done)
        return self._stopped.done()

    async def _count_sick_traffic(self) -> None:
        """A real plugin counts as its requests happen, and plugin_client reports trouble as
        soon as the counts cross the detection thresholds (its early report). Installations
        with a problem therefore get their traffic counted every second, not only just before
        their scheduled heartbeat; healthy ones (most of a big fleet) are counted then, which
        costs nothing in realism: their counts cross no threshold."""
        while not await self._sleep_until(self.clock() + SICK_TRAFFIC_EVERY_S):
            now = self.clock()
            for plugin in self.plugins:
                if plugin.agent is None or plugin.silent_until(now) is not None:
                    continue
                if plugin.record.faults or self.truth.introduces(plugin.version):
                    problems = plugin.record.problems_at(now, self.truth)
                    if problems:
                        plugin.account(now)
                    plugin.crash_tick(now, "crash_loop" in problems)

    # -- the schedule ---------------------------------------------------------------------

    async def _schedule(self) -> None:
        plan = self.plan
        for cycle in itertools.count():
            base = self.t0 + cycle * plan.duration_s
            for fault in plan.faults:
                if await self._sleep_until(base + fault.at_s):
                    return
                try:
                    await self._inject(fault, cycle)
                except Exception:
                    log.exception("fault injection failed: %s", fault)
                    self._event("note", f"injecting {fault.kind} failed (see the fleet log)")
            if not plan.loop:
                return
            if await self._sleep_until(self.t0 + (cycle + 1) * plan.duration_s):
                return

    async def _inject(self, fault: PlannedFault, cycle: int) -> None:
        now = self.clock()
        if fault.kind == "decision_service_down":
            await self._decision_service_down(fault, cycle, now)
            return
        chosen = self.choose(fault, now)
        injection = Injection(now, cycle, fault.kind, fault.installations, len(chosen))
        injection.duration_s = fault.duration_s
        if len(chosen) < fault.installations:
            injection.note = (
                f"only {len(chosen)} of {fault.installations} installations could take it"
            )
        self.injections.append(injection)
        for plugin in chosen:
            plugin.faults_assigned += 1
            plugin.last_fault_at = now
        if fault.kind == "bad_release":
            version = fault.target_version
            assert version is not None
            await asyncio.gather(*(plugin.redeploy(version) for plugin in chosen))
            what = f"operators deploy {version} (bad release)"
        else:
            end = None if fault.duration_s is None else now + fault.duration_s
            for plugin in chosen:
                plugin.account(now)  # the traffic before the fault is healthy
                plugin.record.faults.append(
                    FaultRecord(
                        next(self._ids),
                        plugin.installation_id,
                        fault.kind,
                        now,
                        end,
                        dict(fault.params),
                    )
                )
            what = fault.kind.replace("_", " ")
            if fault.duration_s is not None:
                what += f" for {fault.duration_s:g} s"
        self._event(
            "fault",
            f"{what} on {len(chosen)} installation{'s' if len(chosen) != 1 else ''}"
            + (f" ({injection.note})" if injection.note else ""),
        )

    def choose(self, fault: PlannedFault, now: float) -> list[SimPlugin]:
        """Installations that can take `fault`: running, with no problem now, not already
        fixed against it; the least faulted first (then the longest since a fault), so that
        faults spread over the fleet."""
        eligible = [p for p in self.plugins if self._eligible(p, fault, now)]
        ranked = sorted(
            eligible, key=lambda p: (p.faults_assigned, p.last_fault_at, self._rng.random())
        )
        return ranked[: fault.installations]

    def _eligible(self, plugin: SimPlugin, fault: PlannedFault, now: float) -> bool:
        if not plugin.running or plugin.silent_until(now) is not None:
            return False
        if plugin.record.problems_at(now, self.truth):
            return False
        if fault.kind in PROBLEM_KINDS and fault.kind in self.truth.fixes(plugin.version):
            return False
        return not (fault.kind == "bad_release" and plugin.version == fault.target_version)

    async def _decision_service_down(self, fault: PlannedFault, cycle: int, now: float) -> None:
        mode = str(fault.params.get("mode", "error"))
        duration = fault.duration_s or 0.0
        injection = Injection(now, cycle, fault.kind, 0, 0, duration_s=duration)
        self.injections.append(injection)
        if self.decision_service is None:
            injection.note = "skipped: the decision service is not under the simulator's control"
            self._event("decision_service", f"decision service down: {injection.note}")
            return
        await self.decision_service.set_mode(mode)
        self._ds_mode = mode
        window = DecisionServiceWindow(now, now + duration, mode)
        self.ds_windows.append(window)
        self._event("decision_service", f"decision service switched to {mode} for {duration:g} s")

        async def back_up() -> None:
            if not await self._sleep_until(window.planned_end):
                await self._restore_decision_service()

        self._spawn(back_up())

    async def _restore_decision_service(self) -> None:
        open_windows = [w for w in self.ds_windows if w.end is None]
        if not open_windows or self.decision_service is None:
            return
        try:
            await self.decision_service.set_mode("normal")
        except Exception:
            log.exception("could not switch the decision service back to normal")
            return
        for window in open_windows:
            window.end = self.clock()
        self._ds_mode = "normal"
        self._event("decision_service", "decision service back to normal")

    # -- what happened --------------------------------------------------------------------

    def _version_changed(self, plugin: SimPlugin, version: str, cause: Cause, at: float) -> None:
        if self.truth.is_bad(version):
            plugin.record.faults.append(
                FaultRecord(
                    next(self._ids),
                    plugin.installation_id,
                    "bad_release",
                    at,
                    None,
                    {},
                    version=version,
                    origin="scenario" if cause == "deploy" else "selfheal",
                )
            )

    def _event(self, kind: str, text: str) -> None:
        if self.on_event is not None:
            self.on_event(FleetEvent(self.clock(), kind, text))

    def records(self) -> list[InstallationTruth]:
        return [plugin.record for plugin in self.plugins]

    def snapshot(self) -> FleetSnapshot:
        now = self.clock()
        totals: Counter[str] = Counter()
        problems: Counter[str] = Counter()
        running = 0
        for plugin in self.plugins:
            totals.update(plugin.stats())
            running += plugin.running
            for kind in plugin.record.problems_at(now, self.truth):
                problems[kind] += 1
        return FleetSnapshot(
            at=now,
            elapsed_s=now - self.t0 if self.t0 else 0.0,
            running=running,
            heartbeats_sent=totals["heartbeats_sent"],
            heartbeats_failed=totals["heartbeats_failed"],
            commands_applied=totals["commands_applied"],
            commands_refused=totals["commands_refused"],
            commands_failed=totals["commands_failed"],
            problems=dict(problems),
            decision_service=self._ds_mode,
        )

    def refusals(self) -> dict[str, int]:
        """Why agents refused commands (the last reason of each agent that refused any)."""
        reasons: Counter[str] = Counter()
        for plugin in self.plugins:
            if plugin.stats()["commands_refused"]:
                reasons[plugin.last_refusal() or "unknown"] += plugin.stats()["commands_refused"]
        return dict(reasons)

    def undetectable_silences(self, grace_s: float) -> int:
        """Silences too short to be noticed (interval + grace): for the report's notes."""
        limit = self.plan.interval_s + grace_s
        return sum(
            1
            for plugin in self.plugins
            for f in plugin.record.faults
            if f.kind == "silence" and f.end is not None and f.end - f.start <= limit
        )


def fleet_log_to(path: Path) -> logging.Handler:
    """Send the agents' own log (plugin_client) and the fleet's to a file, not the terminal:
    a progress view would drown in per-agent warnings."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("plugin_client", "sim.fleet"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return handler
