"""Fault scenarios with real processes (issue 11, "Fault and load tests"), shared by
tests/test_faults.py (short versions) and bench/faults.py (the full runs).

- worker_kills: `selfheal worker` processes SIGKILLed at random moments (seeded) while
  incidents are being healed; after each kill and at the end the database must show at most
  one attempt in flight per incident and per installation, at most one command of a type per
  attempt, no command handed out twice (plugin side and delivery_count), and in the end every
  incident healed.
- api_kills: two `selfheal api` processes under heartbeat load, one SIGKILLed and restarted;
  the client re-sends the same signed bytes of every heartbeat that got no 200 (the replay
  guard makes that safe) and every heartbeat must be stored exactly once.
- outage: a private PostgreSQL or Redis (the embedded servers, app/embedded/, never the
  machine's shared ones) stopped and started under load: no 5xx but 503, /health says the
  server is down, and the API and the worker recover by themselves; the recovery seconds are
  measured.

Each scenario returns a report: figures to print and the violations found (empty = passed)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import orjson
import psycopg

from app.core.redis import health_check_key
from app.core.settings import Settings, libpq_url
from app.core.states import ATTEMPT_IN_FLIGHT_SQL, INCIDENT_CLOSED
from plugin_client import AsyncAgent, HeartbeatFailed
from tests.support.dashboard import sign_in
from tests.support.healing import FAILING_WEBHOOKS, HEALTHY, add_release, enable_autopatch
from tests.support.personas import make_user
from tests.support.plugins import HEARTBEAT, Plugin, heartbeat_body, register
from tests.support.processes import stop_process
from tests.support.services import RUNNER_TOKEN, SIRA_TOKEN, Server
from tests.support.settings import REPO, settings_env

OLD, NEW = "1.2.2", "1.2.3"
# Heal steps that are under way (the kill must land in one of them).
ACTIVE = ("detected", "deciding", "staging", "applying", "verifying", "rolling_back")
_uptime = itertools.count(10_000_000)

Say = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


# --- processes ----------------------------------------------------------------------------------


class Child:
    """A `selfheal api` or `selfheal worker` in a session of its own (a Ctrl-C reaches the
    caller only), its output appended to a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.log = log
        self._out: IO[bytes] = log.open("ab")
        self.proc = subprocess.Popen(
            argv,
            env=env,
            cwd=REPO,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill9(self) -> None:
        """SIGKILL: no handler runs, no transaction is finished, no lease is given back."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._out.close()

    def stop(self) -> int | None:
        stop_process(self.proc, 20)
        if not self._out.closed:
            self._out.close()
        return self.proc.returncode

    def tail(self, chars: int = 2000) -> str:
        if not self._out.closed:
            self._out.flush()
        return self.log.read_text(errors="replace")[-chars:]


SELFHEAL = [sys.executable, "-m", "app.cli"]


# A healing loop quick enough to give many steps a minute (as tests/test_healing_workers.py
# runs it): what CI's short runs use. `bench/faults.py --timings default` runs without them.
QUICK_TIMINGS = {
    "SELFHEAL_HEAL_POLL_S": "0.1",
    "SELFHEAL_HEAL_LEASE_S": "5",
    "SELFHEAL_HEALTH_WINDOW_S": "30",
    "SELFHEAL_DETECT_EVERY_S": "0.2",
    "SELFHEAL_RECOVERY_HEARTBEATS": "2",
    # The load here is a few plugins beating fast, not a fleet: the per-installation limit
    # (20 per 10 s) would answer 429 to what is the test's own pace.
    "SELFHEAL_RATE_PER_INSTALLATION": "100000",
}


def service_env(
    settings: Settings,
    sira: Server | None = None,
    runner: Server | None = None,
    *,
    quick: bool = True,
    **extra: str,
) -> dict[str, str]:
    """What the API and workers of a scenario run with: the settings, the reference services,
    the quick timings unless `quick` is false (then the product's defaults: a 30-s heal lease,
    a 90-s health window...), and no fleet incidents (every plugin here is on the same failing
    version: that is the scenario's shape, not a timing)."""
    env = settings_env(settings) | {
        "SELFHEAL_DATA_DIR": str(settings.data_dir),
        "SELFHEAL_FLEET_MIN_INSTALLATIONS": "1000000",
    }
    if quick:
        env |= QUICK_TIMINGS
    if sira is not None:
        env |= {"SIRA_API_URL": sira.url, "SIRA_API_TOKEN": SIRA_TOKEN}
    if runner is not None:
        env |= {"STAGING_RUNNER_URL": runner.url, "STAGING_RUNNER_TOKEN": RUNNER_TOKEN}
    return env | extra


def start_api(env: dict[str, str], port: int, log: Path, name: str = "api") -> Child:
    """`selfheal api --port P` (one process: SIGKILL takes the whole API down), once it
    answers /health (200 or 503)."""
    child = Child(name, [*SELFHEAL, "api", "--port", str(port)], env, log)
    deadline = time.monotonic() + 60
    while True:
        assert child.alive(), f"{name} exited with {child.proc.returncode}: {child.tail()}"
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code in (200, 503):
                return child
        assert time.monotonic() < deadline, f"{name} did not answer within 60 s: {child.tail()}"
        time.sleep(0.05)


def start_worker(env: dict[str, str], log: Path, name: str = "worker") -> Child:
    return Child(name, [*SELFHEAL, "worker"], env, log)


def wait_workers_healthy(settings: Settings, workers: list[Child], timeout_s: float = 60) -> None:
    from redis import Redis

    client = Redis.from_url(settings.redis_url or "")
    try:
        deadline = time.monotonic() + timeout_s
        while not client.exists(health_check_key(settings)):
            for worker in workers:
                assert worker.alive(), f"{worker.name} exited: {worker.tail()}"
            assert time.monotonic() < deadline, "the workers did not report healthy"
            time.sleep(0.05)
    finally:
        client.close()


@contextlib.contextmanager
def reference_services(workdir: Path, staging_delay_s: float) -> Iterator[tuple[Server, Server]]:
    sira = Server(["sim", "decision-service"], SIRA_TOKEN, log=workdir / "sira.log")
    runner = Server(["sim", "staging-runner"], RUNNER_TOKEN, log=workdir / "runner.log")
    try:
        sira.start()
        runner.start()
        sira.control(mode="normal")
        runner.control(mode="normal", fail_versions=[], delay_s=staging_delay_s)
        yield sira, runner
    finally:
        runner.stop()
        sira.stop()


def owner_db(settings: Settings) -> psycopg.Connection[Any]:
    return psycopg.connect(libpq_url(settings.migration_url or ""), autocommit=True)


async def until(
    predicate: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.05
) -> float:
    """Poll `predicate` until true; the seconds it took. AssertionError at the deadline."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(poll_s)
    return time.monotonic() - started


def signed(plugin: Plugin, path: str, payload: Any) -> tuple[bytes, dict[str, str]]:
    body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    return body, plugin.headers(body, path)


# --- 1. workers killed mid-step -----------------------------------------------------------------


@dataclass
class WorkerKillReport:
    seed: int
    kills: int = 0
    kills_by_status: Counter[str] = field(default_factory=Counter)
    plugins_started: int = 0
    incidents: int = 0
    incidents_by_status: Counter[str] = field(default_factory=Counter)
    attempts: int = 0
    attempts_by_status: Counter[str] = field(default_factory=Counter)
    commands: int = 0
    deliveries_plugin_side: int = 0
    deliveries_in_database: int = 0
    duplicate_deliveries: int = 0
    invariant_checks: int = 0
    heal_seconds: float = 0.0
    violations: list[str] = field(default_factory=list)

    def figures(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "kills": self.kills,
            "incidents in a heal step at the kills (status: count)": dict(self.kills_by_status),
            "plugins made sick": self.plugins_started,
            "incidents": self.incidents,
            "incidents by status": dict(self.incidents_by_status),
            "attempts": self.attempts,
            "attempts by status": dict(self.attempts_by_status),
            "commands": self.commands,
            "deliveries (plugin side)": self.deliveries_plugin_side,
            "deliveries (plugin_agent_commands.delivery_count)": self.deliveries_in_database,
            "commands handed out twice": self.duplicate_deliveries,
            "invariant checks": self.invariant_checks,
            "seconds from the last kill until all healed": round(self.heal_seconds, 2),
            "violations": len(self.violations),
        }


@dataclass
class SickPlugin:
    """A plugin on the failing version that beats until it runs the fixed one (and a little
    after): every command it gets is counted and acked at once, and an update or rollback
    switches the version it runs."""

    plugin: Plugin
    version: str = OLD
    deliveries: Counter[str] = field(default_factory=Counter)
    healthy_beats: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    async def run(
        self, client: httpx.AsyncClient, stop: asyncio.Event, every_s: float | None
    ) -> None:
        """Beat every `every_s`, or when the control plane says (next_heartbeat_s, as
        plugin_client does) with None."""
        while not stop.is_set():
            wait_s = every_s
            telemetry = FAILING_WEBHOOKS if self.version == OLD else HEALTHY
            body = heartbeat_body(
                plugin_version=self.version, uptime_s=next(_uptime), telemetry=telemetry
            )
            try:
                response = await client.post(
                    HEARTBEAT, content=body, headers=self.plugin.headers(body, HEARTBEAT)
                )
            except httpx.TransportError as exc:
                self.errors[type(exc).__name__] += 1
            else:
                if response.status_code != 200:
                    self.errors[str(response.status_code)] += 1
                else:
                    if self.version == NEW:
                        self.healthy_beats += 1
                    answer = response.json()
                    for command in answer["commands"]:
                        await self.take(client, command)
                    if wait_s is None:
                        wait_s = float(answer["next_heartbeat_s"])
            with contextlib.suppress(TimeoutError):
                # No answer to follow: try again at the fast cadence (plugin_client's backoff
                # starts there too).
                await asyncio.wait_for(stop.wait(), 5.0 if wait_s is None else wait_s)

    async def take(self, client: httpx.AsyncClient, command: dict[str, Any]) -> None:
        self.deliveries[command["id"]] += 1
        path = f"/api/plugins/commands/{command['id']}/ack"
        for _ in range(20):  # an ack refused with 503 may be sent again
            body, headers = signed(self.plugin, path, {"result": {"ok": True}})
            with contextlib.suppress(httpx.TransportError):
                response = await client.post(path, content=body, headers=headers)
                if response.status_code == 200:
                    break
            await asyncio.sleep(0.2)
        version = (command.get("payload") or {}).get("version")
        if command["type"] in ("update", "rollback") and version:
            self.version = version


def incident_statuses(db: psycopg.Connection[Any]) -> dict[str, int]:
    rows = db.execute(
        "SELECT status || coalesce(' (' || status_reason || ')', ''), count(*)"
        " FROM plugin_incidents GROUP BY 1"
    ).fetchall()
    return {status: n for status, n in rows}


def invariant_violations(db: psycopg.Connection[Any]) -> list[str]:
    """What the database must never show, whatever was killed when."""
    found: list[str] = []
    for column in ("incident_id", "installation_id"):
        rows = db.execute(
            f"SELECT {column}, count(*) FROM plugin_autopatch_attempts"
            f" WHERE status IN {ATTEMPT_IN_FLIGHT_SQL} GROUP BY 1 HAVING count(*) > 1"
        ).fetchall()
        found += [f"{n} attempts in flight for {column} {key}" for key, n in rows]
    rows = db.execute(
        "SELECT attempt_id, type, count(*) FROM plugin_agent_commands"
        " WHERE attempt_id IS NOT NULL GROUP BY 1, 2 HAVING count(*) > 1"
    ).fetchall()
    found += [f"{n} {kind} commands for attempt {attempt}" for attempt, kind, n in rows]
    rows = db.execute(
        "SELECT id, delivery_count FROM plugin_agent_commands WHERE delivery_count > 1"
    ).fetchall()
    found += [f"command {command} delivered {n} times" for command, n in rows]
    return found


async def worker_kills(
    settings: Settings,
    workdir: Path,
    *,
    kills: int,
    seed: int,
    workers: int = 3,
    sick_at_once: int = 3,
    kill_delay_s: tuple[float, float] | None = None,
    staging_delay_s: float = 0.5,
    quick: bool = True,
    heal_timeout_s: float | None = None,
    say: Say = _quiet,
) -> WorkerKillReport:
    """`workers` worker processes heal plugins that fall sick `sick_at_once` at a time; `kills`
    times, after a random delay (random.Random(seed)) while at least one incident is in a heal
    step, one worker chosen at random is SIGKILLed and a new one started in its place. Then
    every plugin made sick must end healed (its incident resolved, the plugin on NEW).

    `quick` (CI's short run): QUICK_TIMINGS, plugins beating every 0.3 s, kills 0.05-1.5 s
    apart. Otherwise the product's default settings (30-s heal lease, 90-s health window,
    0.5-s detection), plugins beating when the control plane asks them to (5 s while sick or
    healing), and kills 0.5-20 s apart, so that they fall in every step of a heal that now
    lasts minutes, not only in its longest wait."""
    if kill_delay_s is None:
        kill_delay_s = (0.05, 1.5) if quick else (0.5, 20.0)
    if heal_timeout_s is None:
        heal_timeout_s = 180 if quick else 600
    beat_every_s = 0.3 if quick else None
    rng = random.Random(seed)
    report = WorkerKillReport(seed=seed)
    # Enough plugins to keep `sick_at_once` sick until the last kill: at the product's
    # defaults a heal ends within about as long as the wait between two kills.
    pool = [
        await register(settings, tenant=f"kill-{n}", name="payments")
        for n in range((1 if quick else 4) * kills + sick_at_once + 2)
    ]
    for version in (OLD, NEW):
        await add_release(settings, workdir, "payments", version)
    with owner_db(settings) as db:
        enable_autopatch(
            db,
            *(p.tenant for p in pool),
            cooldown_s=0,
            max_concurrent_actions=1000,
            max_concurrent_actions_per_tenant=1000,
        )
    with reference_services(workdir, staging_delay_s) as (sira, runner):
        env = service_env(settings, sira, runner, quick=quick)
        api = start_api(env, settings.port, workdir / "api.log")
        procs: list[Child] = []
        stop = asyncio.Event()
        sick: list[SickPlugin] = []
        tasks: list[asyncio.Task[None]] = []
        try:
            procs = [
                start_worker(env, workdir / f"worker-{n}.log", f"worker-{n}")
                for n in range(workers)
            ]
            wait_workers_healthy(settings, procs)
            async with httpx.AsyncClient(base_url=settings.api_base_url, timeout=30) as client:

                def make_sick() -> None:
                    plugin = SickPlugin(pool[len(sick)])
                    sick.append(plugin)
                    tasks.append(asyncio.create_task(plugin.run(client, stop, beat_every_s)))

                with owner_db(settings) as db:

                    def active() -> list[str]:
                        rows = db.execute(
                            "SELECT status FROM plugin_incidents WHERE status = ANY(%s)",
                            (list(ACTIVE),),
                        ).fetchall()
                        return [row[0] for row in rows]

                    def top_up() -> bool:
                        """Keep `sick_at_once` plugins sick; true once a step is under way."""
                        healing = sum(1 for p in sick if p.version == OLD)
                        while healing < sick_at_once and len(sick) < len(pool):
                            make_sick()
                            healing += 1
                        return bool(active())

                    serial = itertools.count(workers)
                    for _ in range(kills):
                        try:
                            await until(top_up, 30, "an incident in a heal step")
                        except AssertionError as exc:
                            raise AssertionError(
                                f"{exc}; incidents: {incident_statuses(db)}; plugins: "
                                f"{[(p.version, dict(p.errors)) for p in sick]}"
                            ) from None
                        await asyncio.sleep(rng.uniform(*kill_delay_s))
                        statuses = active()
                        victim = rng.choice(procs)
                        victim.kill9()
                        procs.remove(victim)
                        report.kills += 1
                        report.kills_by_status.update(statuses or ["(none: between steps)"])
                        report.invariant_checks += 1
                        report.violations += [
                            f"after kill {report.kills}: {v}" for v in invariant_violations(db)
                        ]
                        for plugin in sick:
                            report.violations += [
                                f"after kill {report.kills}: command {c} handed out {n} times"
                                for c, n in plugin.deliveries.items()
                                if n > 1
                            ]
                        for other in procs:
                            if not other.alive():
                                report.violations.append(
                                    f"{other.name} exited by itself ({other.proc.returncode})"
                                )
                        procs.append(
                            start_worker(
                                env, workdir / f"worker-{next(serial)}.log", f"worker-{len(procs)}"
                            )
                        )
                        if report.kills % 10 == 0:
                            say(f"{report.kills} kills, {len(sick)} plugins made sick")
                    last_kill = time.monotonic()

                    def all_healed() -> bool:
                        return (
                            all(p.version == NEW and p.healthy_beats >= 3 for p in sick)
                            and not db.execute(
                                "SELECT 1 FROM plugin_incidents WHERE status <> ALL(%s)",
                                ([str(s) for s in INCIDENT_CLOSED],),
                            ).fetchone()
                        )

                    try:
                        await until(all_healed, heal_timeout_s, "every sick plugin healed", 0.2)
                    except AssertionError as exc:
                        report.violations.append(str(exc))
                    report.heal_seconds = time.monotonic() - last_kill
                    stop.set()
                    await asyncio.gather(*tasks)
                    report.invariant_checks += 1
                    report.violations += [f"at the end: {v}" for v in invariant_violations(db)]
                    collect_worker_kill_figures(db, sick, report)
        finally:
            stop.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for proc in procs:
                proc.stop()
            api.stop()
    return report


def collect_worker_kill_figures(
    db: psycopg.Connection[Any], sick: list[SickPlugin], report: WorkerKillReport
) -> None:
    report.plugins_started = len(sick)
    rows = db.execute("SELECT status, count(*) FROM plugin_incidents GROUP BY 1").fetchall()
    report.incidents_by_status = Counter({status: n for status, n in rows})
    report.incidents = sum(report.incidents_by_status.values())
    rows = db.execute(
        "SELECT status, count(*) FROM plugin_autopatch_attempts GROUP BY 1"
    ).fetchall()
    report.attempts_by_status = Counter({status: n for status, n in rows})
    report.attempts = sum(report.attempts_by_status.values())
    commands = dict(
        db.execute("SELECT id::text, delivery_count FROM plugin_agent_commands").fetchall()
    )
    report.commands = len(commands)
    report.deliveries_in_database = sum(commands.values())
    handed: Counter[str] = Counter()
    for plugin in sick:
        handed.update(plugin.deliveries)
    report.deliveries_plugin_side = sum(handed.values())
    report.duplicate_deliveries = sum(1 for n in handed.values() if n > 1)
    for command, n in handed.items():
        if n > 1:
            report.violations.append(f"command {command} handed out {n} times")
        if commands.get(command) != n:
            report.violations.append(
                f"command {command}: the plugin got it {n} times, delivery_count says"
                f" {commands.get(command)}"
            )
    for command, n in commands.items():
        if n and command not in handed:
            report.violations.append(f"command {command} delivered {n} times, never received")
    unhealed = [p.plugin.id for p in sick if p.version != NEW]
    report.violations += [f"plugin {p} never got its update" for p in unhealed]
    if report.incidents_by_status.get("resolved", 0) < len(sick):
        report.violations.append(
            f"{len(sick)} plugins made sick, {report.incidents_by_status.get('resolved', 0)}"
            " incidents resolved"
        )


# --- 2. an API process killed under ingest load -------------------------------------------------


@dataclass
class ApiKillReport:
    seed: int
    kills: int = 0
    heartbeats: int = 0  # new heartbeats the agents built (each with its own uptime_s)
    accepted_first_try: int = 0
    failed_tries: int = 0
    resent: int = 0  # sent again as the same signed bytes (plugin_client, RESEND_WITHIN_S)
    confirmed_by_replay: int = 0  # a copy answered with the signed 401 replay
    stored: int = 0
    duplicates: int = 0
    requests_counted: int = 0  # agent.record_request totals, every agent
    requests_stored: int = 0  # sum of plugin_heartbeats.requests
    statuses: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)

    def figures(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "API kills": self.kills,
            "heartbeats": self.heartbeats,
            "accepted at the first try": self.accepted_first_try,
            "tries that failed": self.failed_tries,
            "sent again as the same signed bytes": self.resent,
            "  then 401 replay, signed (stored by an earlier copy)": self.confirmed_by_replay,
            "rows stored": self.stored,
            "stored twice": self.duplicates,
            "requests counted by the plugins": self.requests_counted,
            "requests stored": self.requests_stored,
            "failures seen": dict(self.statuses),
            "violations": len(self.violations),
        }


class _Counted:
    """One installation's AsyncAgent (the real plugin_client) and what it counted."""

    def __init__(self, plugin: Plugin, url: str, http: httpx.AsyncClient) -> None:
        self.plugin = plugin
        self.uptimes: list[int] = []
        self.counted = 0
        self.agent = AsyncAgent(
            url,
            plugin.id,
            plugin.secret,
            plugin=plugin.name,
            version="1.2.2",
            http=http,
            uptime=self._new_uptime,
            early_report=False,
        )

    def _new_uptime(self) -> int:
        """Called once per new heartbeat (a copy sent again keeps its body): a unique uptime_s
        names each heartbeat in plugin_heartbeats."""
        uptime = next(_uptime)
        self.uptimes.append(uptime)
        return uptime

    def count(self, rng: random.Random) -> None:
        n = rng.randint(1, 9)
        self.agent.record_request(n)
        self.counted += n

    async def beat(self, report: ApiKillReport, *, first: bool) -> bool:
        """One try; True when the heartbeat it sent is known stored."""
        try:
            answer = await self.agent.beat()
        except HeartbeatFailed as exc:
            report.failed_tries += 1
            report.statuses[str(exc.status_code or "no answer")] += 1
            if exc.status_code not in (None, 429, 503):
                report.violations.append(f"heartbeat failed: {exc}"[:300])
            return False
        if answer == {}:  # the signed 401 replay: an earlier copy was stored
            report.confirmed_by_replay += 1
        elif first:
            report.accepted_first_try += 1
        return True


async def api_kills(
    settings: Settings,
    workdir: Path,
    *,
    kills: int,
    seed: int,
    plugins: int = 20,
    concurrency: int = 16,
    kill_after_s: tuple[float, float] = (1.0, 3.0),
    say: Say = _quiet,
) -> ApiKillReport:
    """Two API processes on two ports; `concurrency` plugins, each the real plugin_client's
    AsyncAgent pointed at one of them, count requests and send heartbeats back to back,
    trying again after a failure as the agent decides (the same signed bytes while the
    fate of the last one is unknown, RESEND_WITHIN_S); `kills` times, after a random delay,
    one API is SIGKILLed and started again on its port. Then every heartbeat is looked up in
    plugin_heartbeats (by its unique uptime_s), and the requests the plugins counted are
    compared with the requests stored: none lost, none counted twice."""
    from tests.support.ports import free_port

    rng = random.Random(seed)
    report = ApiKillReport(seed=seed)
    fleet = [await register(settings, tenant=f"load-{n}") for n in range(max(plugins, concurrency))]
    env = service_env(settings)
    ports = [settings.port, free_port()]
    apis = [
        start_api(env, port, workdir / f"api-{n}.log", f"api-{n}") for n, port in enumerate(ports)
    ]
    stop = asyncio.Event()
    beats = 0

    async def sender(counted: _Counted) -> None:
        nonlocal beats
        while not stop.is_set():
            counted.count(rng)
            first = True
            while not await counted.beat(report, first=first):
                first = False
                await asyncio.sleep(rng.uniform(0.05, 0.3))
                counted.count(rng)  # counted while the API is away: goes with a later heartbeat
            beats += 1

    async def under_load(heartbeats: int) -> None:
        """Until `heartbeats` more were accepted (the load is on, and goes on after a kill)."""
        before = beats
        await until(lambda: beats > before + heartbeats, 60, "heartbeat load")

    counted: list[_Counted] = []
    try:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with contextlib.AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(httpx.AsyncClient(timeout=10, limits=limits))
                for _ in ports
            ]
            counted = [
                _Counted(plugin, f"http://127.0.0.1:{ports[n % 2]}", clients[n % 2])
                for n, plugin in enumerate(fleet[:concurrency])
            ]
            tasks = [asyncio.create_task(sender(c)) for c in counted]
            try:
                for _ in range(kills):
                    await under_load(50)
                    await asyncio.sleep(rng.uniform(*kill_after_s))
                    n = rng.randrange(len(apis))
                    apis[n].kill9()
                    report.kills += 1
                    say(f"API kill {report.kills}: {apis[n].name}, {beats} heartbeats so far")
                    apis[n] = await asyncio.to_thread(
                        start_api, env, ports[n], workdir / f"api-{n}.log", apis[n].name
                    )
                await under_load(50)
            finally:
                stop.set()
                await asyncio.gather(*tasks, return_exceptions=True)
            # What the plugins counted last goes out with one more heartbeat each.
            for c in counted:
                for _ in range(100):
                    if await c.beat(report, first=False) and await c.beat(report, first=False):
                        break
                    await asyncio.sleep(0.1)
                else:
                    report.violations.append(
                        f"plugin {c.plugin.id}: its last counts never went out"
                    )
    finally:
        for api in apis:
            api.stop()
    with owner_db(settings) as db:
        rows = db.execute(
            "SELECT uptime_s, count(*), sum(requests) FROM plugin_heartbeats GROUP BY 1"
        ).fetchall()
    stored = {uptime: (n, requests) for uptime, n, requests in rows}
    report.stored = sum(n for n, _ in stored.values())
    report.requests_stored = sum(int(requests) for _, requests in stored.values())
    for c in counted:
        report.heartbeats += len(c.uptimes)
        report.resent += c.agent.stats.heartbeats_resent
        report.requests_counted += c.counted
        for uptime in c.uptimes:
            n = stored.get(uptime, (0, 0))[0]
            if n > 1:
                report.duplicates += 1
                report.violations.append(f"heartbeat uptime_s={uptime} stored {n} times")
    if report.requests_stored != report.requests_counted:
        report.violations.append(
            f"the plugins counted {report.requests_counted} requests,"
            f" plugin_heartbeats holds {report.requests_stored}"
        )
    return report


# --- 3. PostgreSQL or Redis stopped and started under load --------------------------------------


@dataclass
class OutageReport:
    server: str
    outage_s: float = 0.0
    statuses_before: Counter[str] = field(default_factory=Counter)
    statuses_during: Counter[str] = field(default_factory=Counter)
    statuses_after: Counter[str] = field(default_factory=Counter)
    health_during: Counter[str] = field(default_factory=Counter)
    # The rest of the API during the outage, "<request> <status>": the ops JSON API, a plugin's
    # ack and a dashboard page (signed in before it).
    others_during: Counter[str] = field(default_factory=Counter)
    api_recovery_s: float | None = None
    health_recovery_s: float | None = None
    worker_recovery_s: float | None = None
    violations: list[str] = field(default_factory=list)

    def figures(self) -> dict[str, Any]:
        def r(value: float | None) -> float | None:
            return None if value is None else round(value, 2)

        return {
            "server": self.server,
            "outage seconds": round(self.outage_s, 2),
            "heartbeat answers before": dict(self.statuses_before),
            "heartbeat answers during": dict(self.statuses_during),
            "heartbeat answers after": dict(self.statuses_after),
            "/health during (code status component)": dict(self.health_during),
            "ops API, ack and dashboard during": dict(self.others_during),
            "API recovery s (first heartbeat 200 after the server is back)": r(self.api_recovery_s),
            "/health recovery s": r(self.health_recovery_s),
            "worker recovery s (a new sick plugin's incident detected)": r(self.worker_recovery_s),
            "violations": len(self.violations),
        }


# What the outage scenario sends besides heartbeats (OutageReport.others_during).
PROBES = ("GET /api/ops/plugin-incidents", "POST ack", "GET /ops/incidents")


@dataclass
class Observed:
    at: float
    status: str


class Outage:
    """A private server the scenario may stop and start: the embedded PostgreSQL or Redis of
    `data_dir` (app/embedded), started here."""

    def __init__(self, data_dir: Path, server: str) -> None:
        from app.embedded import EmbeddedServices

        assert server in ("postgres", "redis")
        self.server = server
        self.services = EmbeddedServices(
            data_dir, postgres=server == "postgres", redis=server == "redis"
        )

    def start(self) -> None:
        self.services.start()

    def stop(self) -> None:
        self.services.stop()

    @property
    def owner_url(self) -> str:
        assert self.services.database_owner_url
        return self.services.database_owner_url

    @property
    def redis_url(self) -> str:
        assert self.services.redis_url
        return self.services.redis_url


async def outage(
    settings: Settings,
    workdir: Path,
    server: Outage,
    *,
    plugins: int = 10,
    beat_every_s: float = 0.2,
    answers_during: int = 30,
    down_for_s: float = 0.0,
    recovery_timeout_s: float = 60,
    recovery_limit_s: float = 15,
    say: Say = _quiet,
) -> OutageReport:
    """An API and a worker on `settings` (whose PostgreSQL or Redis is `server`); `plugins`
    beat every `beat_every_s`; `server` is stopped until `answers_during` heartbeats were
    answered and /health reported it down (and at least `down_for_s`: the length of the
    outage is what the bench varies), then started again. Measured: when heartbeats are
    200 again, /health 200 with the server ok, and the worker opens an incident for a plugin
    that falls sick once the server is back."""
    report = OutageReport(server=server.server)
    fleet = [await register(settings, tenant=f"steady-{n}") for n in range(plugins)]
    probe = await register(settings, tenant="probe")
    admin = await make_user(settings, "outage-admin", "admin")
    env = service_env(settings)
    api = start_api(env, settings.port, workdir / "api.log")
    worker = start_worker(env, workdir / "worker.log")
    stop = asyncio.Event()
    answers: list[Observed] = []
    others: list[tuple[Observed, str]] = []
    health: list[tuple[float, int, str, str]] = []
    component = "postgres" if server.server == "postgres" else "redis"

    async def beat(client: httpx.AsyncClient, plugin: Plugin) -> None:
        while not stop.is_set():
            body = heartbeat_body(uptime_s=next(_uptime))
            try:
                response = await client.post(
                    HEARTBEAT, content=body, headers=plugin.headers(body, HEARTBEAT)
                )
                status = str(response.status_code)
            except httpx.TransportError as exc:
                status = type(exc).__name__
            answers.append(Observed(time.monotonic(), status))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), beat_every_s)

    async def probe_others(client: httpx.AsyncClient, dashboard: httpx.AsyncClient) -> None:
        """Besides heartbeats: an ops API read, a plugin's ack of a command it does not have
        (404 when the database answers) and a dashboard page, every 0.2 s."""
        bearer = {"Authorization": f"Bearer {admin.token}"}

        async def ack() -> httpx.Response:
            path = f"/api/plugins/commands/{uuid.uuid4()}/ack"
            body, headers = signed(fleet[0], path, {"result": {"ok": True}})
            return await client.post(path, content=body, headers=headers)

        send: dict[str, Callable[[], Awaitable[httpx.Response]]] = {
            "GET /api/ops/plugin-incidents": lambda: client.get(
                "/api/ops/plugin-incidents", headers=bearer
            ),
            "POST ack": ack,
            "GET /ops/incidents": lambda: dashboard.get("/ops/incidents"),
        }
        while not stop.is_set():
            for what in PROBES:
                try:
                    status = str((await send[what]()).status_code)
                except httpx.TransportError as exc:
                    status = type(exc).__name__
                others.append((Observed(time.monotonic(), status), what))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)

    async def watch_health(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            try:
                response = await client.get("/health")
                body = response.json()
                health.append(
                    (
                        time.monotonic(),
                        response.status_code,
                        body["status"],
                        body["components"][component]["status"],
                    )
                )
            except httpx.TransportError as exc:
                health.append((time.monotonic(), 0, type(exc).__name__, ""))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)

    try:
        wait_workers_healthy(settings, [worker])
        async with (
            httpx.AsyncClient(base_url=settings.api_base_url, timeout=30) as client,
            httpx.AsyncClient(base_url=settings.api_base_url, timeout=30) as dashboard,
        ):
            await sign_in(dashboard, admin)
            tasks = [asyncio.create_task(beat(client, p)) for p in fleet]
            tasks.append(asyncio.create_task(watch_health(client)))
            tasks.append(asyncio.create_task(probe_others(client, dashboard)))
            try:
                await until(
                    lambda: sum(a.status == "200" for a in answers) >= 3 * plugins,
                    60,
                    "steady heartbeats",
                )
                await until(
                    lambda: bool(health) and health[-1][1] == 200 and health[-1][3] == "ok",
                    60,
                    "/health ok before the outage",
                )
                down_at = time.monotonic()
                await asyncio.to_thread(server.stop)
                say(f"{server.server} stopped")
                down_done = time.monotonic()
                await until(
                    lambda: (
                        sum(a.at > down_done for a in answers) >= answers_during
                        and time.monotonic() - down_at >= down_for_s
                        and any(h[0] > down_done and h[3] == "down" for h in health)
                        # Each of the other requests answered at least twice while it is down.
                        and all(
                            sum(o.at > down_done and w == what for o, w in others) >= 2
                            for what in PROBES
                        )
                    ),
                    60 + down_for_s,
                    f"answers during the {server.server} outage and /health saying it is down",
                )
                starting_at = time.monotonic()
                await asyncio.to_thread(server.start)
                up_at = time.monotonic()
                report.outage_s = up_at - down_at
                say(f"{server.server} back after {report.outage_s:.1f} s")

                async def probe_sick() -> None:
                    while not stop.is_set():
                        body = heartbeat_body(uptime_s=next(_uptime), telemetry=FAILING_WEBHOOKS)
                        with contextlib.suppress(httpx.TransportError):
                            await client.post(
                                HEARTBEAT, content=body, headers=probe.headers(body, HEARTBEAT)
                            )
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(stop.wait(), beat_every_s)

                tasks.append(asyncio.create_task(probe_sick()))

                def first_after(items: list[Any], ok: Callable[[Any], bool]) -> float | None:
                    for item in items:
                        at = item.at if isinstance(item, Observed) else item[0]
                        if at > up_at and ok(item):
                            return float(at - up_at)
                    return None

                def recovered() -> bool:
                    report.api_recovery_s = first_after(answers, lambda a: a.status == "200")
                    report.health_recovery_s = first_after(
                        health, lambda h: h[1] == 200 and h[3] == "ok"
                    )
                    return (
                        report.api_recovery_s is not None and report.health_recovery_s is not None
                    )

                try:
                    await until(recovered, recovery_timeout_s, "the API to recover")
                except AssertionError as exc:
                    report.violations.append(str(exc))
                with psycopg.connect(
                    libpq_url(settings.migration_url or ""), autocommit=True
                ) as db:

                    def detected() -> bool:
                        with contextlib.suppress(psycopg.OperationalError):
                            return bool(
                                db.execute(
                                    "SELECT 1 FROM plugin_incidents WHERE installation_id = %s",
                                    (probe.id,),
                                ).fetchone()
                            )
                        return False

                    try:
                        await until(detected, recovery_timeout_s, "the worker to detect again")
                        report.worker_recovery_s = time.monotonic() - up_at
                    except AssertionError as exc:
                        report.violations.append(str(exc))
                settled = time.monotonic()
                await until(
                    lambda: sum(a.at > settled for a in answers) >= plugins, 30, "answers after"
                )
            finally:
                stop.set()
                await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        worker_code = worker.proc.poll()
        worker.stop()
        api.stop()
    if worker_code is not None:
        report.violations.append(f"the worker exited by itself ({worker_code}): {worker.tail(600)}")
    for observed in answers:
        if observed.at < down_at:
            report.statuses_before[observed.status] += 1
        elif observed.at < up_at:
            report.statuses_during[observed.status] += 1
        else:
            report.statuses_after[observed.status] += 1
    for at, code, status, state in health:
        if down_done < at < up_at:
            report.health_during[f"{code} {status} {component}={state}"] += 1
    for observed, what in others:
        if down_at < observed.at < up_at:
            report.others_during[f"{what} {observed.status}"] += 1
        if observed.status.startswith("5") and observed.status != "503":
            report.violations.append(f"{what} answered {observed.status}")
        elif not observed.status.isdigit():
            report.violations.append(f"{what} got no answer ({observed.status})")
    for phase, seen in (
        ("before", report.statuses_before),
        ("during", report.statuses_during),
        ("after", report.statuses_after),
    ):
        for status, n in seen.items():
            if status.startswith("5") and status != "503":
                report.violations.append(f"{n} heartbeats answered {status} {phase} the outage")
            if not status.isdigit():
                report.violations.append(f"{n} heartbeats got no answer ({status}) {phase}")
    if server.server == "postgres":
        wrong = [k for k in report.health_during if not k.startswith("503 down postgres=down")]
    else:
        wrong = [k for k in report.health_during if not k.endswith("redis=down")]
    # /health may still say ok while the server stops, and again once it accepts connections
    # (before start() returns); between the first "down" and the restart it must say down.
    first_down = next((h[0] for h in health if down_done < h[0] < up_at and h[3] == "down"), up_at)
    late = [h for h in health if first_down < h[0] < starting_at and h[3] != "down"]
    if late:
        report.violations.append(f"/health not down during the outage: {late[:3]} ({wrong})")
    for name, value in (
        ("API", report.api_recovery_s),
        ("/health", report.health_recovery_s),
        ("worker", report.worker_recovery_s),
    ):
        if value is not None and value > recovery_limit_s:
            report.violations.append(f"{name} recovered only after {value:.1f} s")
    return report


@contextlib.asynccontextmanager
async def private_postgres(
    workdir: Path, redis_url: str, redis_prefix: str, **overrides: Any
) -> AsyncIterator[tuple[Outage, Settings]]:
    """A private PostgreSQL (embedded) with a migrated database, and the settings for it."""
    from app.core.migrations import run_migrations
    from tests.support.databases import create_database
    from tests.support.ports import free_port
    from tests.support.settings import make_settings

    server = Outage(workdir / "pg", "postgres")
    await asyncio.to_thread(server.start)
    try:
        owner_url = create_database(server.owner_url, f"selfheal_faults_{uuid.uuid4().hex[:8]}")
        settings = make_settings(
            owner_url,
            redis_url,
            redis_prefix,
            data_dir=workdir / "data",
            port=free_port(),
            **overrides,
        )
        await asyncio.to_thread(run_migrations, settings)
        yield server, settings
    finally:
        await asyncio.to_thread(server.stop)


@contextlib.asynccontextmanager
async def private_redis(
    workdir: Path, database_url: str, redis_prefix: str, **overrides: Any
) -> AsyncIterator[tuple[Outage, Settings]]:
    """A private Redis (embedded), and settings for it on `database_url` (migrated)."""
    from tests.support.ports import free_port
    from tests.support.settings import make_settings

    server = Outage(workdir / "redis", "redis")
    await asyncio.to_thread(server.start)
    try:
        yield (
            server,
            make_settings(
                database_url,
                server.redis_url,
                redis_prefix,
                data_dir=workdir / "data",
                port=free_port(),
                **overrides,
            ),
        )
    finally:
        await asyncio.to_thread(server.stop)
