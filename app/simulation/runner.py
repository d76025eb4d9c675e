"""`selfheal simulate` and `selfheal up --demo`: everything a run needs around the fleet
(sim/fleet/): the control plane's processes, its database, the releases, the policy, the
progress view and the report. See docs/simulator.md.

Life of a self-started run: embedded services (or DATABASE_URL / REDIS_URL), migrations, a
temporary signing key, the simulated plugin's releases, the reference decision service and
staging runner (with the truth file), the API and a worker; the policy for the run's
tenants; the fleet for --duration; a bounded drain; the report; then everything stops in
order (also on Ctrl-C / SIGTERM): fleet, worker, API, reference services, embedded services.

Over 600 lines: the run's stages in the order they happen (start, set the policy, drive, drain,
report, stop in reverse order); each stage is a function, and cleanup on Ctrl-C needs all of
them in one supervisor."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
from rich.console import Console
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from app.core.crypto import SecretBox
from app.core.db import create_engine, create_sessionmaker
from app.core.settings import Settings
from app.releases.service import ReleaseConflict
from app.releases.signing import generate_key
from app.simulation import controlplane as cp
from app.simulation.services import (
    Child,
    DecisionServiceSwitch,
    ReferenceServices,
    StartFailed,
    control_plane_children,
    free_port,
    stop_children,
    wait_http,
    workers_ok,
)
from app.startup import (
    describe,
    load_settings,
    migrate_database,
    running_services,
    terminate_on_sigterm,
)
from sim.artifacts import build_plugin_artifact
from sim.fleet.fleet import Fleet, fleet_log_to
from sim.fleet.metrics import ReportInputs, build_report
from sim.fleet.plugins import Identity
from sim.fleet.report import render_report, write_report
from sim.fleet.scenario import RunPlan, ScenarioError, load_scenario, plan_run
from sim.fleet.truth import Truth, write_json_atomically
from sim.fleet.view import Mode, Progress

T = TypeVar("T")
SIM_DATA_DIR = Path(".selfheal-sim")
DEMO_TENANTS = ("demo-acme", "demo-globex", "demo-initech")
DEMO_COOLDOWN_S = 600
DRAIN_POLL_S = 2.0


class Stopped(Exception):
    """A signal asked the run to stop."""


@dataclass
class SimulateOptions:
    scenario: str | None = None
    installations: int | None = None
    tenants: int | None = None
    interval: int | None = None
    faulty_share: float | None = None
    duration: float | None = None
    report: Path | None = None
    url: str | None = None
    seed: int | None = None
    data_dir: Path | None = None
    early_report: bool = True


def _say(console: Console, text: str) -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def make_console(*, soft_wrap: bool) -> Console:
    """Plain text (no markup: the fleet's texts are shown as they are); away from a terminal,
    wide enough that a report's tables and the progress lines are not cut at 80 columns."""
    console = Console(markup=False, highlight=False, soft_wrap=soft_wrap)
    if not console.is_terminal:
        console = Console(markup=False, highlight=False, soft_wrap=soft_wrap, width=160)
    return console


def _iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).isoformat()


# --- what a self-started run and the demo share ---------------------------------------------


@dataclass
class Session:
    """One run: its directory, processes, engine, and the signal that stops it."""

    settings: Settings
    console: Console
    run_id: str
    run_dir: Path
    plan: RunPlan
    truth: Truth
    engine: AsyncEngine | None = None
    children: list[Child] = field(default_factory=list)
    services: ReferenceServices | None = None
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    signal_number: int | None = None
    saved_policy: dict[str, Any] | None = None
    tenants: list[str] = field(default_factory=list)
    # A process of the run died: why (the run stops, and exits non-zero).
    failure: str | None = None

    _maker: cp.Maker | None = field(default=None, init=False, repr=False)

    @property
    def maker(self) -> cp.Maker:
        if self._maker is None:
            assert self.engine is not None
            self._maker = create_sessionmaker(self.engine)
        return self._maker

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._on_signal, signum)

    def _on_signal(self, signum: int) -> None:
        if self.signal_number is None:
            self.signal_number = signum
            _say(
                self.console,
                f"{signal.Signals(signum).name}: stopping (fleet, worker, API, services)...",
            )
        self.stop.set()

    async def guard(self, work: Awaitable[T]) -> T:
        """`work`, unless a signal comes first (then Stopped)."""
        task = asyncio.ensure_future(work)
        stopper = asyncio.ensure_future(self.stop.wait())
        try:
            done, _ = await asyncio.wait((task, stopper), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise Stopped

    async def in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.guard(asyncio.to_thread(fn, *args))

    def stopping(self) -> bool:
        return self.stop.is_set()

    async def watch_children(self) -> None:
        """Stop the run when one of its processes dies (the API, the worker, a reference
        service): a simulation without them measures nothing."""
        while not self.stop.is_set():
            for child in self.children:
                if not child.alive():
                    code = child.proc.returncode if child.proc is not None else "?"
                    tail = child.tail(1500).strip()
                    self.failure = (
                        f"{child.name} exited with code {code} (log: {child.log_path})"
                        + (f"\n--- log tail ---\n{tail}" if tail else "")
                    )
                    _say(self.console, f"{child.name} exited with code {code}: stopping the run")
                    self.stop.set()
                    return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 1.0)

    # -- setup steps ---------------------------------------------------------------------

    async def releases(self, *, unquarantine: bool) -> tuple[str, dict[str, str]]:
        """Artifacts of every version, a temporary signing key, the releases recorded. The
        public key plugins pin, and each version's sha256."""
        folder = self.run_dir / "artifacts"
        folder.mkdir(parents=True, exist_ok=True)
        artifacts = {
            version: build_plugin_artifact(
                folder, name=self.truth.plugin, version=version, simulated=True
            )
            for version in self.truth.versions
        }
        signer = generate_key(self.run_dir / "keys" / "release-signing.pem")
        hashes = await cp.publish_releases(
            self.maker,
            signer,
            plugin=self.truth.plugin,
            artifacts=artifacts,
            max_bytes=self.settings.artifact_max_bytes,
            unquarantine=unquarantine,
        )
        return signer.public_key_b64, hashes

    async def start_services(self) -> ReferenceServices:
        truth_file = self.run_dir / "staging-truth.json"
        write_json_atomically(truth_file, self.truth.staging_truth())
        services = ReferenceServices(self.run_dir, truth_file, dict(os.environ))
        services.start()
        self.children.extend(services.children)
        self.services = services
        await self.in_thread(services.wait_ready, self.stopping)
        return services

    async def start_control_plane(self, port: int, env: dict[str, str]) -> tuple[Child, Child]:
        api, worker = control_plane_children(self.run_dir, env, port)
        self.children.extend([api.start(), worker.start()])
        url = f"http://127.0.0.1:{port}/health"
        await self.in_thread(lambda: wait_http(api, url, timeout_s=60.0, stopping=self.stopping))
        await self.in_thread(
            lambda: wait_http(
                worker_watch(worker, api),
                url,
                timeout_s=60.0,
                ready=workers_ok,
                stopping=self.stopping,
            )
        )
        return api, worker

    async def register_fleet(self, **options: Any) -> Fleet:
        """Register the plan's installations across this run's tenants, on the scenario's
        initial version, and the fleet of agents that will run them (`options`: the rest of
        Fleet's arguments)."""
        identities: list[Identity] = await self.guard(
            cp.register_fleet(
                self.maker,
                SecretBox.for_settings(self.settings),
                tenants=self.tenants,
                plugin=self.truth.plugin,
                version=self.truth.initial_version,
                count=self.plan.installations,
            )
        )
        return Fleet(
            plan=self.plan,
            truth=self.truth,
            identities=identities,
            state_root=self.run_dir / "agents",
            **options,
        )

    def control_plane_env(
        self, services: ReferenceServices, port: int, **extra: str
    ) -> dict[str, str]:
        """The environment of the API and worker this run starts: ours, the reference
        services', the plan's heartbeat interval, the port, and `extra`."""
        return {
            **os.environ,
            **services.control_plane_env(),
            "SELFHEAL_HEARTBEAT_INTERVAL_S": str(self.plan.interval_s),
            "PORT": str(port),
            **extra,
        }

    async def set_policy(self, **changes: Any) -> dict[str, Any]:
        self.saved_policy = await cp.read_policy(self.maker)
        values = cp.policy_for(
            tenants=self.tenants, installations=self.plan.installations, **changes
        )
        return await cp.set_policy(self.maker, values)

    # -- teardown ------------------------------------------------------------------------

    async def watched(self, work: Awaitable[T]) -> T:
        """`work`, while watching the run's processes (one dying stops the run)."""
        watcher = asyncio.create_task(self.watch_children())
        try:
            return await work
        finally:
            watcher.cancel()

    async def close(self, fleet: Fleet | None, log_handler: logging.Handler) -> None:
        """The end of every run: the fleet stops, then the processes and services, then the
        fleet's log."""
        if fleet is not None:
            await fleet.stop()
        await self.teardown()
        logging.getLogger("plugin_client").removeHandler(log_handler)
        log_handler.close()

    async def teardown(self) -> None:
        """Everything this session started or changed, in order; never raises."""
        if self.engine is not None:
            if self.tenants:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(cp.disable_installations(self.maker, self.tenants), 10)
            if self.saved_policy is not None:
                try:
                    await asyncio.wait_for(
                        cp.set_policy(self.maker, cp.restorable(self.saved_policy)), 10
                    )
                    _say(self.console, "policy: put back as it was before the run")
                except Exception as error:
                    _say(self.console, f"policy: could not be put back ({error})")
        killed = await asyncio.to_thread(stop_children, list(reversed(self.children)))
        if killed:
            _say(self.console, f"had to kill (no exit within 10 s of SIGTERM): {', '.join(killed)}")
        if self.engine is not None:
            with contextlib.suppress(Exception):
                await self.engine.dispose()


def worker_watch(worker: Child, api: Child) -> Child:
    """A child whose `alive()` is both: /health is polled on the API for the worker's
    readiness, and either process dying is a failure."""

    class Both(Child):
        def alive(self) -> bool:
            return worker.alive() and api.alive()

        def failed(self, why: str) -> StartFailed:
            culprit = worker if not worker.alive() or api.alive() else api
            return culprit.failed(
                why if culprit is api else f"{why}; no worker reported to /health"
            )

    both = Both(worker.name, worker.argv, worker.log_path, worker.env)
    both.proc = worker.proc
    return both


def _new_run_id() -> str:
    return time.strftime("%m%d%H%M") + secrets.token_hex(2)


def _run_async(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """The event loop of a run (uvloop when available); SIGTERM handling as `up` has it
    is put back afterwards, for the embedded services' clean stop."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if sys.platform != "win32":
        with contextlib.suppress(ImportError):
            import uvloop

            factory = uvloop.new_event_loop
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(main())
    finally:
        terminate_on_sigterm()


# --- selfheal simulate -----------------------------------------------------------------------


def simulate(options: SimulateOptions) -> int:
    console = make_console(soft_wrap=False)
    try:
        scenario, scenario_path = load_scenario(options.scenario)
        plan = plan_run(
            scenario,
            installations=options.installations,
            tenants=options.tenants,
            interval_s=options.interval,
            faulty_share=options.faulty_share,
            duration_s=options.duration,
        )
    except (ScenarioError, ValueError) as error:
        _say(console, f"selfheal simulate: {error}")
        return 2
    self_started = options.url is None
    if options.data_dir is not None:
        os.environ["SELFHEAL_DATA_DIR"] = str(options.data_dir)
    elif self_started:
        # Its own data dir: a simulation does not mix with `selfheal up`'s data. With --url
        # it is SELFHEAL_DATA_DIR's, so that it joins `selfheal up`'s embedded PostgreSQL.
        os.environ["SELFHEAL_DATA_DIR"] = str(SIM_DATA_DIR)
    terminate_on_sigterm()
    settings = load_settings()
    seed = options.seed if options.seed is not None else secrets.randbelow(2**31)
    run_id = _new_run_id()
    try:
        with running_services(settings, redis=self_started) as settings:
            if self_started:
                migrate_database(settings)
            run = SimulateRun(settings, console, options, plan, scenario_path, run_id, seed)
            return _run_async(run.main)
    except KeyboardInterrupt:
        _say(console, "selfheal simulate: interrupted while starting; stopped")
        return 130


@dataclass
class _Run:
    settings: Settings
    console: Console

    def _say(self, text: str) -> None:
        _say(self.console, text)


@dataclass
class SimulateRun(_Run):
    options: SimulateOptions
    plan: RunPlan
    scenario_path: Path
    run_id: str
    seed: int

    async def main(self) -> int:
        settings, plan = self.settings, self.plan
        truth = Truth(plan.scenario)
        run_dir = (settings.data_dir / "runs" / self.run_id).absolute()
        run_dir.mkdir(parents=True, exist_ok=True)
        session = Session(settings, self.console, self.run_id, run_dir, plan, truth)
        session.install_signal_handlers()
        session.tenants = [f"sim-{self.run_id}-t{i + 1:02d}" for i in range(plan.tenants)]
        log_handler = fleet_log_to(run_dir / "fleet.log")
        self_started = self.options.url is None
        self._say(
            f"selfheal simulate: scenario {plan.scenario.name} ({self.scenario_path}), run"
            f" {self.run_id}, seed {self.seed}: {plan.installations} installations, {plan.tenants}"
            f" tenants, interval {plan.interval_s} s, duration {plan.duration_s:g} s,"
            f" faulty share {plan.faulty_share:g}"
        )
        self._say(f"run directory: {run_dir}")
        fleet: Fleet | None = None
        running = False
        try:
            session.engine = create_engine(settings, role="simulator")
            if not self_started:
                assert self.options.url is not None
                await session.in_thread(_check_reachable, self.options.url.rstrip("/"))
            public_key, hashes = await session.guard(session.releases(unquarantine=self_started))
            switch: DecisionServiceSwitch | None = None
            if self_started:
                services = await session.start_services()
                switch = DecisionServiceSwitch(services.sira_url, services.sira_token)
                port = free_port()
                base_url = f"http://127.0.0.1:{port}"
                prefix = os.environ.get("SELFHEAL_REDIS_PREFIX", settings.redis_prefix)
                env = session.control_plane_env(
                    services,
                    port,
                    SELFHEAL_HOST="127.0.0.1",
                    SELFHEAL_PUBLIC_URL=base_url,
                    # Its own arq queue: a shared Redis must not mix this run's jobs with
                    # another deployment's.
                    SELFHEAL_REDIS_PREFIX=f"{prefix}sim-{self.run_id}:",
                )
                self._say("starting the reference services, the API and a worker...")
                await session.start_control_plane(port, env)
                policy = await session.guard(session.set_policy())
                policy_note = "set by the simulator for this run; put back at the end"
            else:
                assert self.options.url is not None
                base_url = self.options.url.rstrip("/")
                policy = await session.guard(cp.read_policy(session.maker))
                policy_note = (
                    "--url: the running control plane's policy, not touched by the simulator"
                    " (autopatch acts only on whitelisted tenants; this run's tenants are"
                    f" sim-{self.run_id}-*)"
                )
                self._say(f"using the control plane at {base_url}; {policy_note}")
            self._say("policy: " + ", ".join(f"{k}={v}" for k, v in cp.restorable(policy).items()))
            fleet = await session.register_fleet(
                base_url=base_url,
                public_key=public_key,
                sha256=hashes,
                seed=self.seed,
                decision_service=switch,
                meta={"simulator_run": self.run_id},
                early_report=self.options.early_report,
            )
            running = True
            report = await session.watched(
                self._run_fleet(session, fleet, switch, policy, policy_note, base_url)
            )
            render_report(report, self.console)
            if self.options.report is not None:
                write_report(report, self.options.report)
                self._say(f"report written to {self.options.report}")
            self._say(f"logs: {run_dir}")
            if session.failure is not None:
                self._say(f"selfheal simulate: the run stopped early: {session.failure}")
                return 1
            if session.signal_number is not None:
                return 128 + session.signal_number
            return 0
        except Stopped:
            self._say("selfheal simulate: stopped before the fleet ran")
            return 128 + (session.signal_number or signal.SIGINT)
        except StartFailed as error:
            self._say(f"selfheal simulate: could not start: {error}")
            return 1
        except (SQLAlchemyError, OSError, ReleaseConflict, httpx.HTTPError, ValueError) as error:
            what = "failed during the run" if running else "could not start"
            self._say(f"selfheal simulate: {what}: {type(error).__name__}: {error}")
            return 1
        finally:
            await session.close(fleet, log_handler)

    async def _run_fleet(
        self,
        session: Session,
        fleet: Fleet,
        switch: DecisionServiceSwitch | None,
        policy: dict[str, Any],
        policy_note: str,
        base_url: str,
    ) -> dict[str, Any]:
        plan, settings = self.plan, self.settings
        maker, tenants = session.maker, session.tenants
        mode: Mode = "live" if self.console.is_terminal else "lines"
        progress = Progress(
            fleet,
            self.console,
            mode,
            f"selfheal simulate: {plan.scenario.name}, run {self.run_id}",
            lambda: cp.read_incidents(maker, tenants),
        )
        fleet.on_event = progress.on_event
        view_stop = asyncio.Event()
        started_at = time.time()
        await fleet.start()
        view = asyncio.create_task(progress.run(view_stop))
        drain_bound = 2.0 * plan.interval_s + settings.health_window_s
        drain: dict[str, Any] = {
            "bound_s": drain_bound,
            "waited_s": 0.0,
            "ended": "not reached",
            "note": "after --duration no new fault starts and the fleet keeps running until"
            " nothing is left to heal on its installations, for at most 2 intervals + the"
            " health window (SELFHEAL_HEALTH_WINDOW_S), so that incidents started near the"
            " end can close",
        }
        try:
            progress.phase.name = "running"
            progress.phase.ends_at = fleet.t0 + plan.duration_s
            with contextlib.suppress(Stopped):
                await session.guard(
                    asyncio.sleep(max(0.0, fleet.t0 + plan.duration_s - time.time()))
                )
            if not session.stopping():
                fleet.stop_faults()
                progress.phase.name = "draining"
                progress.phase.ends_at = time.time() + drain_bound
                drain_start = time.time()
                drain["ended"] = await self._drain(session, fleet, drain_bound)
                drain["waited_s"] = round(time.time() - drain_start, 1)
            else:
                drain["ended"] = "interrupted"
            horizon = time.time()
            incidents = await cp.read_incidents(maker, tenants)
            fleet_incidents = await cp.read_fleet_incidents(maker, plan.scenario.plugin, fleet.t0)
            attempts = await cp.read_attempts(maker, tenants)
            releases = await cp.read_releases(maker, plan.scenario.plugin)
            ds_state: dict[str, Any] = {}
            if switch is not None:
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    ds_state = await switch.state()
        finally:
            view_stop.set()
            await view
        snap = fleet.snapshot()
        notes = []
        short = fleet.undetectable_silences(settings.heartbeat_grace_s)
        if short:
            notes.append(
                f"{short} silences were no longer than interval + SELFHEAL_HEARTBEAT_GRACE_S:"
                " too short to be noticed as missed heartbeats"
            )
        if not switch:
            notes.append(
                "the decision service is not under the simulator's control (--url): decision_service_down faults were skipped"
            )
        if snap.heartbeats_failed:
            notes.append(
                f"{snap.heartbeats_failed} heartbeats were not accepted; see {session.run_dir / 'fleet.log'}"
            )
        inputs = ReportInputs(
            run={
                "run_id": self.run_id,
                "scenario": plan.scenario.name,
                "scenario_file": str(self.scenario_path),
                "seed": self.seed,
                "early_report": self.options.early_report,
                "started_at": _iso(started_at),
                "finished_at": _iso(horizon),
                "control_plane": {
                    "mode": "self-started" if self.options.url is None else "url",
                    "url": base_url,
                    "run_dir": str(session.run_dir),
                    "health_window_s": settings.health_window_s,
                    "heartbeat_grace_s": settings.heartbeat_grace_s,
                },
                "aborted": session.failure,
                "tenant_ids": tenants,
                "plugin": plan.scenario.plugin,
                "faulty_share": plan.faulty_share,
                "loop": plan.loop,
            },
            t0=fleet.t0,
            horizon=horizon,
            installations=plan.installations,
            tenants=plan.tenants,
            interval_s=float(plan.interval_s),
            duration_s=plan.duration_s,
            truth=fleet.truth,
            records=fleet.records(),
            incidents=incidents,
            fleet_incidents=fleet_incidents,
            attempts=attempts,
            releases=releases,
            policy={
                "set_by_simulator": self.options.url is None,
                "note": policy_note,
                "values": cp.restorable(policy),
                "previous": cp.restorable(session.saved_policy) if session.saved_policy else None,
            },
            decision_service={
                "controlled": switch is not None,
                "calls": ds_state.get("calls"),
                "feedback_count": ds_state.get("feedback_count"),
                "down_windows": [
                    {
                        "mode": w.mode,
                        "start_s": round(w.start - fleet.t0, 3),
                        "end_s": None if w.end is None else round(w.end - fleet.t0, 3),
                    }
                    for w in fleet.ds_windows
                ],
            },
            heartbeats={"sent": snap.heartbeats_sent, "failed": snap.heartbeats_failed},
            commands={
                "applied": snap.commands_applied,
                "refused": snap.commands_refused,
                "failed": snap.commands_failed,
            },
            refusal_reasons=fleet.refusals(),
            injections=[
                {
                    "at_s": round(i.at - fleet.t0, 3),
                    "cycle": i.cycle,
                    "kind": i.kind,
                    "wanted": i.wanted,
                    "got": i.got,
                    "duration_s": i.duration_s,
                    "note": i.note,
                }
                for i in fleet.injections
            ],
            drain=drain,
            interrupted=session.signal_number is not None or session.failure is not None,
            notes=notes,
        )
        return build_report(inputs)

    async def _drain(self, session: Session, fleet: Fleet, bound: float) -> str:
        deadline = time.time() + bound
        while time.time() < deadline:
            if session.stopping():
                return "interrupted"
            try:
                open_, in_flight = await cp.work_in_progress(session.maker, session.tenants)
            except SQLAlchemyError:
                open_, in_flight = 1, 1
            sick = sum(fleet.snapshot().problems.values())
            if open_ == 0 and in_flight == 0 and sick == 0:
                return "nothing left to heal"
            with contextlib.suppress(Stopped):
                await session.guard(asyncio.sleep(DRAIN_POLL_S))
        return "bound reached"


def _check_reachable(base_url: str) -> None:
    try:
        response = httpx.get(f"{base_url}/health", timeout=5.0, trust_env=False)
    except httpx.HTTPError as error:
        raise StartFailed(f"the control plane at {base_url} does not answer: {error}") from None
    if response.status_code != 200:
        raise StartFailed(
            f"{base_url}/health answered {response.status_code} ({response.text[:200]}):"
            " is it a selfheal API, and is its PostgreSQL up?"
        )


# --- selfheal up --demo ----------------------------------------------------------------------


def demo(port: int | None) -> int:
    console = make_console(soft_wrap=True)
    terminate_on_sigterm()
    settings = load_settings()
    code = 0
    try:
        with running_services(settings) as settings:
            describe(settings)
            migrate_database(settings)
            code = _run_async(DemoRun(settings, console, port or settings.port).main)
    except KeyboardInterrupt:
        code = 0
    _say(console, "selfheal stopped")
    return code


@dataclass
class DemoRun(_Run):
    port: int

    async def main(self) -> int:
        settings = self.settings
        try:
            scenario, _ = load_scenario("demo")
            plan = plan_run(scenario, tenants=len(DEMO_TENANTS))
        except (ScenarioError, ValueError) as error:
            _say(self.console, f"selfheal up --demo: {error}")
            return 2
        truth = Truth(plan.scenario)
        run_id = _new_run_id()
        demo_dir = (settings.data_dir / "demo").absolute()
        shutil.rmtree(demo_dir, ignore_errors=True)  # the previous start's agents: disabled below
        run_dir = demo_dir / run_id
        run_dir.mkdir(parents=True)
        session = Session(settings, self.console, run_id, run_dir, plan, truth)
        session.install_signal_handlers()
        session.tenants = list(DEMO_TENANTS)
        log_handler = fleet_log_to(run_dir / "fleet.log")
        public = settings.model_copy(update={"port": self.port}).api_base_url
        fleet: Fleet | None = None
        try:
            session.engine = create_engine(settings, role="simulator")
            await session.guard(cp.disable_installations(session.maker, session.tenants))
            public_key, hashes = await session.guard(session.releases(unquarantine=True))
            services = await session.start_services()
            env = session.control_plane_env(services, self.port)
            if not settings.public_url:
                env["SELFHEAL_PUBLIC_URL"] = public
            self._say("starting the reference services, the API and a worker...")
            await session.start_control_plane(self.port, env)
            policy = await session.guard(session.set_policy(cooldown_s=DEMO_COOLDOWN_S))
            user = await session.guard(cp.ensure_demo_user(session.maker))
            fleet = await session.register_fleet(
                base_url=public,
                public_key=public_key,
                sha256=hashes,
                seed=secrets.randbelow(2**31),
                decision_service=DecisionServiceSwitch(services.sira_url, services.sira_token),
                meta={"simulator_run": run_id, "demo": True},
            )
            self._banner(public, user, policy, plan)
            progress = Progress(
                fleet,
                self.console,
                "demo",
                "selfheal demo",
                lambda: cp.read_incidents(session.maker, session.tenants),
            )
            fleet.on_event = progress.on_event
            await fleet.start()
            self._say(
                f"demo fleet: {plan.installations} installations running; Ctrl-C stops everything"
            )
            await session.watched(progress.run(session.stop))
            if session.failure is not None:
                self._say(f"selfheal up --demo: stopped: {session.failure}")
                return 1
            return 0
        except Stopped:
            return 0
        except StartFailed as error:
            self._say(f"selfheal up --demo: could not start: {error}")
            return 1
        except (SQLAlchemyError, OSError, ReleaseConflict, httpx.HTTPError) as error:
            self._say(f"selfheal up --demo: could not start: {type(error).__name__}: {error}")
            return 1
        finally:
            await session.close(fleet, log_handler)

    def _banner(
        self, public: str, user: cp.DemoUser, policy: dict[str, Any], plan: RunPlan
    ) -> None:
        token = user.user.token
        lines = [
            "",
            "selfheal demo is running",
            f"  API:       {public}",
            f"  health:    {public}/health",
            f"  metrics:   {public}/metrics",
            f"  ops API:   curl -H 'Authorization: Bearer {token}' {public}/api/ops/plugin-incidents",
            f"  dashboard: {public}/ops/login (sign in as demo with the password below)",
            f"  demo operator: user demo (admin), password {user.user.password}",
            f"  demo token: {token}",
            "  (shown once; "
            + (
                "the user existed: its password and token were rotated now, old tokens revoked)"
                if user.rotated
                else "a new password and token are issued at every start)"
            ),
            f"  fleet: {plan.installations} simulated installations of {plan.scenario.plugin}"
            f" for tenants {', '.join(DEMO_TENANTS)}, heartbeat every {plan.interval_s} s,"
            f" faults every {plan.duration_s:g} s (sim/scenarios/demo.yaml)",
            "  policy: autopatch on for the demo tenants only, approvals only for critical,"
            f" cooldown {policy.get('cooldown_s')} s (put back as it was when the demo stops)",
            "",
        ]
        for line in lines:
            _say(self.console, line)
        sys.stdout.flush()
