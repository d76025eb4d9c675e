"""Healing benchmark: the whole loop, end to end, with real processes.

    .venv/bin/python bench/healing.py [--fleet 200] [--workers 2] [--compare]
        [--concurrency 64] [--poll-s 0.2] [--heal-poll-s 0.1] [--timeout 300] [--job-stats]
        [--keep-db] [--pg-url postgresql://postgres@127.0.0.1:5432/postgres]
        [--redis-url redis://127.0.0.1:6379/0]

Per run, on a fresh database of the machine's PostgreSQL and a private prefix on its Redis:
the reference decision service and staging runner (staging takes 0.1 s) as processes,
`--workers` real `python -m app.cli worker` processes, and the API in this process (its
lifespan, served by uvicorn on loopback) with this process playing `--fleet` plugins, each
its own tenant, all on payments 1.2.2 with releases 1.2.2 and 1.2.3 signed and autopatch on
for every tenant (no caps, no cooldown):
  1. at t0 every plugin sends one heartbeat with 60% webhook failures (30 of 50);
  2. each then polls with heartbeats (still failing, every --poll-s 0.2 s, at most
     --concurrency requests in flight) until its `update` command arrives in a response, acks
     it at once, and sends SELFHEAL_RECOVERY_HEARTBEATS (3) healthy heartbeats on 1.2.3,
     --poll-s apart;
  3. the bench waits until every incident is `resolved`.
Printed per run: seconds from each plugin's bad heartbeat (its received_at) to its incident
row (detected_at), to its update command (plugin_agent_commands.created_at), to the command
in the plugin's hands (client clock, from sending the bad heartbeat) and to resolution
(resolved_at), p50 / p95; wall time until all are resolved; peak RSS (VmHWM) of each worker;
the median timeline of every step; CPU seconds by process group. With --compare the same
scenario runs with 1 worker and with --workers, side by side. Everything is stopped and
dropped on exit, also on Ctrl-C. A benchmark prints figures; it is not a test. See
bench/README.md for what each figure means."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # tests.support, when run as `python bench/healing.py`
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import psutil  # noqa: E402
import psycopg  # noqa: E402
import uvicorn  # noqa: E402
from redis import Redis  # noqa: E402

from app.cli import run_migrations  # noqa: E402
from app.core.crypto import SecretBox  # noqa: E402
from app.core.db import create_engine, create_sessionmaker  # noqa: E402
from app.core.redis import health_check_key  # noqa: E402
from app.core.settings import Settings, libpq_url  # noqa: E402
from app.main import create_app  # noqa: E402
from app.plugins.service import register_installation  # noqa: E402
from app.releases import service as release_service  # noqa: E402
from app.releases.signing import generate_key, load_signer  # noqa: E402
from sim.artifacts import build_plugin_artifact  # noqa: E402
from tests.support.databases import clean_redis, create_database, drop_database  # noqa: E402
from tests.support.plugins import HEARTBEAT, heartbeat_body, signed_headers  # noqa: E402
from tests.support.ports import free_port  # noqa: E402
from tests.support.services import Server  # noqa: E402

RESULTS_DIR = REPO / "bench" / "results"
BENCH_SECRET_KEY = "selfheal-bench-secret-key-not-for-production-0123456789"
SIRA_TOKEN = "bench-sira-token"
RUNNER_TOKEN = "bench-runner-token"
PLUGIN = "payments"
OLD, NEW = "1.2.2", "1.2.3"
STAGING_DELAY_S = 0.1
RECOVERY_HEARTBEATS = int(Settings.model_fields["recovery_heartbeats"].default)
FAILING = {"requests": 1000, "errors": 2, "webhook_attempts": 50, "webhook_failures": 30}
HEALTHY = {"requests": 1000, "errors": 2, "webhook_attempts": 50, "webhook_failures": 0}


def loop_settings(heal_poll_s: float) -> dict[str, str]:
    """What the workers (and the API in this process) run with."""
    return {
        "SELFHEAL_HEAL_POLL_S": f"{heal_poll_s:g}",
        "SELFHEAL_DETECT_EVERY_S": "0.5",
        "SELFHEAL_HEALTH_WINDOW_S": "30",
        "SELFHEAL_FLEET_MIN_INSTALLATIONS": "1000000",  # the bench fleet is not one fleet incident
        "SELFHEAL_RECOVERY_HEARTBEATS": str(RECOVERY_HEARTBEATS),
    }


def say(message: str) -> None:
    print(f"[bench] {message}", flush=True)


# --------------------------------------------------------------------------------------------
# database, Redis, processes


class Process:
    """A child in its own session (a Ctrl-C in the terminal reaches the bench only, which
    then stops its children in order), its output in a log file."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None):
        self.name = name
        self.log = log
        self.metrics_port: int | None = None  # a worker's own /metrics (workers/metrics.py)
        self._out = log.open("wb")
        self.proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env=env,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with {self.proc.returncode}; log tail:\n{self.tail()}"
            )

    def tail(self, chars: int = 3000) -> str:
        self._out.flush()
        return self.log.read_text(errors="replace")[-chars:]

    def stop(self, wait_s: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(wait_s)
            except subprocess.TimeoutExpired:
                say(f"{self.name} did not stop within {wait_s:g} s of SIGTERM: SIGKILL")
                self.proc.kill()
                self.proc.wait(5)
        self._out.close()


def proc_status(pid: int, field_name: str) -> int | None:
    """A kB figure from /proc/<pid>/status (VmHWM: peak resident set)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field_name}:"):
                return int(line.split()[1])
    return None


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a live process, from /proc/<pid>/stat."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        raw = Path(f"/proc/{pid}/stat").read_text()
        fields = raw[raw.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return None


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, stolen) time of all CPUs since boot, from /proc/stat: busy is user, nice,
    system, irq and softirq; stolen is what the hypervisor gave to other guests."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (
            int(x) for x in f.readline().split()[1:9]
        )
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


def cpu_probe_ms() -> float:
    """How fast this machine runs Python right now: the best of 5 runs of a fixed loop (about
    17 ms on an idle core here). On a shared or virtual machine it tells a slow run from a slow
    machine."""
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        total = 0
        for n in range(300_000):
            total += n * n % 7
        best = min(best, time.perf_counter() - started)
    return round(best * 1000, 1)


def connected_to(pid: int, port: int) -> bool:
    with contextlib.suppress(psutil.Error):
        return any(
            c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
            for c in psutil.Process(pid).net_connections(kind="tcp")
        )
    return False


ARQ_STARTED = re.compile(r"^\s*(-?[\d.]+)s \u2192 ([a-z_]+):")  # wait since enqueued
ARQ_FINISHED = re.compile(r"^\s*([\d.]+)s \u2190 ([a-z_]+):")  # run time


@dataclass
class WorkerLogs:
    events: Counter[str] = field(default_factory=Counter)  # warning and above
    lines: list[str] = field(default_factory=list)  # the same, verbatim
    waits: dict[str, list[float]] = field(default_factory=dict)  # arq job: enqueued -> started
    runs: dict[str, list[float]] = field(default_factory=dict)  # arq job: started -> finished


def read_worker_logs(paths: list[Path]) -> WorkerLogs:
    """What the workers logged: warnings and errors counted by event; with --job-stats (info
    level) also arq's line per job start and end, by job (detect, heal, advance, ...)."""
    logs = WorkerLogs()
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                level, event = str(entry.get("level", "?")), str(entry.get("event", "?"))
            except (ValueError, AttributeError):
                level, event = "?", "(not JSON)"
            if level in ("debug", "info"):
                for pattern, into in ((ARQ_STARTED, logs.waits), (ARQ_FINISHED, logs.runs)):
                    m = pattern.match(event)
                    if m:
                        into.setdefault(m.group(2), []).append(float(m.group(1)))
                continue
            logs.lines.append(line)
            logs.events[f"{level} {event[:120]}"] += 1
    return logs


def wait_workers(workers: list[Process], settings: Settings, timeout_s: float = 30.0) -> None:
    """Up when arq has written its health-check key and every worker holds its Redis
    connection (arq connects, then runs the worker's start-up and its tick loop)."""
    redis_port = urllib.parse.urlsplit(settings.redis_url or "").port or 6379
    client = Redis.from_url(settings.redis_url or "")
    deadline = time.monotonic() + timeout_s
    try:
        while not (
            client.exists(health_check_key(settings))
            and all(connected_to(w.pid, redis_port) for w in workers)
        ):
            for w in workers:
                w.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers not up within {timeout_s:g} s")
            time.sleep(0.05)
    finally:
        client.close()
    time.sleep(0.5)  # start-up (engine, HTTP client) and the first tick


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Cleaning up: a second Ctrl-C (or SIGTERM) must not leave half of it undone."""
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


# --------------------------------------------------------------------------------------------
# setting the scene


@dataclass
class Plugin:
    id: str
    secret: str
    tenant: str
    sent_bad_at: float = 0.0  # client clock (time.time()), just before sending it
    command_at: float | None = None  # the response carrying the update command arrived
    polls: int = 0


async def prepare(settings: Settings, fleet: int, workdir: Path) -> list[Plugin]:
    """Register the installations (one tenant each) and add the two signed releases."""
    engine = create_engine(settings, role="bench")
    plugins = []
    try:
        maker = create_sessionmaker(engine)
        box = SecretBox(settings.secret_key)
        async with maker() as session, session.begin():
            for n in range(fleet):
                tenant = f"bench-tenant-{n:06d}"
                issued = await register_installation(
                    session, box, tenant=tenant, name=PLUGIN, version=OLD, env="prod"
                )
                plugins.append(Plugin(str(issued.plugin_id), issued.secret, tenant))
        key = workdir / "keys" / "release-signing.pem"
        generate_key(key)
        signer = load_signer(key)
        for version in (OLD, NEW):
            # A simulated plugin's artifact: the staging runner fetches it from the API (a
            # pre-signed URL) and passes it without running code.
            artifact = build_plugin_artifact(
                workdir / f"{PLUGIN}-{version}.tar.gz", name=PLUGIN, version=version, simulated=True
            )
            async with maker() as session, session.begin():
                await release_service.add_release(
                    session,
                    signer,
                    plugin=PLUGIN,
                    version=version,
                    artifact=artifact,
                    valid_days=30,
                )
    finally:
        await engine.dispose()
    return plugins


def enable_autopatch(db_url: str, tenants: list[str]) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE ops_policy SET autopatch_enabled = true,"
            " autopatch_whitelist = %s::jsonb, max_concurrent_actions = 100000,"
            " max_concurrent_actions_per_tenant = 100000, cooldown_s = 0 WHERE id = 1",
            (json.dumps(tenants),),
        )


# --------------------------------------------------------------------------------------------
# the plugins


@dataclass
class Traffic:
    base_url: str
    in_flight: asyncio.Semaphore
    poll_s: float  # plugins poll (and space their recovery heartbeats) this often
    heartbeats: int = 0
    acks: int = 0
    round_trips_ms: list[float] = field(default_factory=list)
    refused: Counter[str] = field(default_factory=Counter)
    uptime: Iterator[int] = field(default_factory=lambda: itertools.count(1000))
    # One client (one keep-alive connection) per plugin, as each real plugin has its own. One
    # client shared by the fleet made httpcore's pool the bottleneck of this process: every
    # request scanned every pooled connection (a readability syscall each), which took most
    # of the process's CPU and, the API sharing this process, its answers 300-500 ms.
    clients: dict[str, httpx.AsyncClient] = field(default_factory=dict)
    # Built once: each client would build its own (~20 ms of CPU), even for http://.
    tls: ssl.SSLContext = field(default_factory=ssl.create_default_context)

    def client_of(self, plugin: Plugin) -> httpx.AsyncClient:
        client = self.clients.get(plugin.id)
        if client is None:
            client = httpx.AsyncClient(
                base_url=self.base_url,
                timeout=30,
                verify=self.tls,
                limits=httpx.Limits(max_connections=1),
            )
            self.clients[plugin.id] = client
        return client

    async def close(self) -> None:
        await asyncio.gather(*(client.aclose() for client in self.clients.values()))

    async def post(self, plugin: Plugin, path: str, body: bytes) -> httpx.Response:
        async with self.in_flight:
            headers = signed_headers(plugin.id, plugin.secret, body, path)
            started = time.perf_counter()
            response = await self.client_of(plugin).post(path, content=body, headers=headers)
            self.round_trips_ms.append((time.perf_counter() - started) * 1000)
        return response

    async def beat(
        self, plugin: Plugin, version: str, telemetry: dict[str, int]
    ) -> list[dict[str, Any]] | None:
        """One signed heartbeat; the commands it brought back (None: refused, try again)."""
        body = heartbeat_body(
            plugin_version=version,
            uptime_s=next(self.uptime),  # each body distinct: no replay
            sent_at=datetime.now(UTC).isoformat(),
            telemetry=telemetry,
        )
        response = await self.post(plugin, HEARTBEAT, body)
        self.heartbeats += 1
        if response.status_code != 200:
            self.refused[f"heartbeat {response.status_code}"] += 1
            return None
        commands: list[dict[str, Any]] = response.json()["commands"]
        return commands

    async def ack(self, plugin: Plugin, command_id: str) -> None:
        path = f"/api/plugins/commands/{command_id}/ack"
        while True:
            response = await self.post(plugin, path, b'{"result": {"ok": true}}')
            if response.status_code == 200:
                self.acks += 1
                return
            self.refused[f"ack {response.status_code}"] += 1
            await asyncio.sleep(self.poll_s)


async def play(traffic: Traffic, plugin: Plugin) -> None:
    """One sick plugin: the bad heartbeat, polling until the update arrives, the ack, then
    healthy heartbeats on the new version."""
    plugin.sent_bad_at = time.time()
    while await traffic.beat(plugin, OLD, FAILING) is None:
        await asyncio.sleep(traffic.poll_s)
    update = None
    while update is None:
        await asyncio.sleep(traffic.poll_s)
        commands = await traffic.beat(plugin, OLD, FAILING)
        plugin.polls += 1
        update = next((c for c in commands or [] if c["type"] == "update"), None)
    plugin.command_at = time.time()
    assert update["payload"]["version"] == NEW, update
    await traffic.ack(plugin, update["id"])
    sent = 0
    while sent < RECOVERY_HEARTBEATS:
        if await traffic.beat(plugin, NEW, HEALTHY) is not None:
            sent += 1
        if sent < RECOVERY_HEARTBEATS:
            await asyncio.sleep(traffic.poll_s)


async def scenario(
    settings: Settings, plugins: list[Plugin], args: argparse.Namespace
) -> tuple[float, Traffic]:
    """Play the fleet against the API in this process; wait until every incident is
    resolved. The client-clock t0 and what the traffic looked like."""
    app = create_app(settings)
    db_url = libpq_url(settings.database_url or "")
    # The API listens on loopback (the staging runner fetches artifacts from it).
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=settings.port, log_config=None, access_log=False)
    )
    serving = asyncio.create_task(server.serve())
    while not server.started:
        if serving.done():
            serving.result()
        await asyncio.sleep(0.02)
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as db:
        traffic = Traffic(settings.api_base_url, asyncio.Semaphore(args.concurrency), args.poll_s)
        for plugin in plugins:  # before t0
            traffic.client_of(plugin)
        timeout_s = args.timeout
        t0 = time.time()
        deadline = time.monotonic() + timeout_s
        tasks = [asyncio.create_task(play(traffic, p)) for p in plugins]
        try:
            done, pending = await asyncio.wait(tasks, timeout=timeout_s)
            if pending:
                raise TimeoutError
            for task in done:
                task.result()  # a plugin that failed fails the run
            while True:
                cur = await db.execute(
                    "SELECT count(*) FILTER (WHERE status = 'resolved'), count(*)"
                    " FROM plugin_incidents WHERE installation_id IS NOT NULL"
                )
                resolved, total = await cur.fetchone() or (0, 0)
                if resolved == total == len(plugins):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError
                await asyncio.sleep(0.1)
        except TimeoutError:
            cur = await db.execute(
                "SELECT status, count(*) FROM plugin_incidents GROUP BY 1 ORDER BY 2 DESC"
            )
            seen = await cur.fetchall()
            waiting = sum(p.command_at is None for p in plugins)
            raise RuntimeError(
                f"not all {len(plugins)} incidents resolved within {timeout_s:g} s;"
                f" {waiting} plugins still without their command; incidents: {seen}"
            ) from None
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await traffic.close()
            server.should_exit = True
            await serving
    return t0, traffic


# --------------------------------------------------------------------------------------------
# figures


def quantile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks: what percentile_cont computes."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


FIGURES_SQL = """
WITH bad AS (
    SELECT installation_id, min(received_at) AS at FROM plugin_heartbeats GROUP BY 1
), upd AS (
    SELECT installation_id, min(created_at) AS at, count(*) AS n
    FROM plugin_agent_commands WHERE type = 'update' GROUP BY 1
), per AS (
    SELECT extract(epoch FROM i.detected_at - bad.at) AS incident_s,
           extract(epoch FROM upd.at - bad.at) AS command_s,
           extract(epoch FROM i.resolved_at - bad.at) AS resolved_s,
           i.resolved_at, upd.n
    FROM plugin_incidents i JOIN bad USING (installation_id) JOIN upd USING (installation_id)
    WHERE i.installation_id IS NOT NULL
)
SELECT count(*),
       percentile_cont(0.5) WITHIN GROUP (ORDER BY incident_s),
       percentile_cont(0.95) WITHIN GROUP (ORDER BY incident_s),
       percentile_cont(0.5) WITHIN GROUP (ORDER BY command_s),
       percentile_cont(0.95) WITHIN GROUP (ORDER BY command_s),
       percentile_cont(0.5) WITHIN GROUP (ORDER BY resolved_s),
       percentile_cont(0.95) WITHIN GROUP (ORDER BY resolved_s),
       extract(epoch FROM max(resolved_at)),
       max(n)
FROM per
"""


# Each installation's steps (first time each was reached), for the timeline figures.
STEPS_CTE = """
WITH bad AS (
    SELECT installation_id, min(received_at) AS at FROM plugin_heartbeats GROUP BY 1
), events AS (
    SELECT a.installation_id, e.at,
           CASE WHEN e.old_status IS NULL THEN 'attempt'
                WHEN e.old_status = 'pending' THEN 'staging started'
                WHEN e.old_status = 'staging' AND e.new_status = 'staging' THEN 'staging passed'
                WHEN e.new_status = 'applying' THEN 'command queued'
                ELSE e.new_status END AS step
    FROM plugin_autopatch_attempt_events e
    JOIN plugin_autopatch_attempts a ON a.id = e.attempt_id
    UNION ALL
    SELECT installation_id, detected_at, 'incident' FROM plugin_incidents
    UNION ALL
    SELECT installation_id, decided_at, 'decided' FROM plugin_incidents
    UNION ALL
    SELECT installation_id, delivered_at, 'delivered' FROM plugin_agent_commands
    UNION ALL
    SELECT installation_id, acked_at, 'acked' FROM plugin_agent_commands
    UNION ALL
    SELECT installation_id, resolved_at, 'resolved' FROM plugin_incidents
), steps AS (
    SELECT installation_id, step, extract(epoch FROM min(events.at) - min(bad.at)) AS s
    FROM events JOIN bad USING (installation_id)
    WHERE events.at IS NOT NULL
    GROUP BY installation_id, step
)
"""
# Where the time goes: the median of each step, in seconds from the bad heartbeat.
TIMELINE_SQL = (
    STEPS_CTE + "SELECT step, percentile_cont(0.5) WITHIN GROUP (ORDER BY s) FROM steps"
    " GROUP BY step ORDER BY 2"
)
# The same steps for the installation resolved last.
SLOWEST_SQL = (
    STEPS_CTE + "SELECT step, s FROM steps WHERE installation_id = (SELECT installation_id"
    " FROM steps WHERE step = 'resolved' ORDER BY s DESC LIMIT 1) ORDER BY s"
)


def database_figures(db_url: str) -> dict[str, Any]:
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute(FIGURES_SQL).fetchone()
        assert row is not None
        n, i50, i95, c50, c95, r50, r95, last_resolved, commands_max = row
        sources = conn.execute(
            "SELECT coalesce(sira_decision->>'source', '-'), count(*) FROM plugin_incidents"
            " GROUP BY 1 ORDER BY 2 DESC"
        ).fetchall()
        attempts = conn.execute(
            "SELECT status, count(*) FROM plugin_autopatch_attempts GROUP BY 1 ORDER BY 2 DESC"
        ).fetchall()
        per_incident = conn.execute(
            "SELECT coalesce(max(c), 0) FROM (SELECT count(*) AS c FROM plugin_autopatch_attempts"
            " GROUP BY incident_id) a"
        ).fetchone()
        fleet_incidents = conn.execute(
            "SELECT count(*) FROM plugin_incidents WHERE installation_id IS NULL"
        ).fetchone()
        timeline = conn.execute(TIMELINE_SQL).fetchall()
        slowest = conn.execute(SLOWEST_SQL).fetchall()
    return {
        "incidents": n,
        "to_incident_s": (float(i50), float(i95)),
        "to_command_s": (float(c50), float(c95)),
        "to_resolved_s": (float(r50), float(r95)),
        "last_resolved_at": float(last_resolved),
        "update_commands_per_installation_max": commands_max,
        "attempts_per_incident_max": per_incident[0] if per_incident else None,
        "fleet_incidents": fleet_incidents[0] if fleet_incidents else None,
        "decisions": dict(sources),
        "attempts": dict(attempts),
        "timeline_p50_s": {step: round(float(s), 2) for step, s in timeline},
        "timeline_slowest_s": {step: round(float(s), 2) for step, s in slowest},
    }


# --------------------------------------------------------------------------------------------
# one run


def worker_env(
    settings: Settings, sira: Server, runner: Server, loop: dict[str, str], log_level: str
) -> dict[str, str]:
    own = ("SELFHEAL_", "SIRA_", "STAGING_RUNNER_")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(own) and k not in ("DATABASE_URL", "REDIS_URL", "LOG_LEVEL", "PORT")
    }
    env.update(
        DATABASE_URL=libpq_url(settings.database_url or ""),
        REDIS_URL=settings.redis_url or "",
        SELFHEAL_REDIS_PREFIX=settings.redis_prefix,
        SELFHEAL_SECRET_KEY=settings.secret_key,
        SELFHEAL_DATA_DIR=str(settings.data_dir),
        SIRA_API_URL=sira.url,
        SIRA_API_TOKEN=SIRA_TOKEN,
        STAGING_RUNNER_URL=runner.url,
        STAGING_RUNNER_TOKEN=RUNNER_TOKEN,
        LOG_LEVEL=log_level,
        PORT=str(settings.port),
        **loop,
    )
    return env


@dataclass
class Usage:
    """What the scenario cost, measured around it."""

    t0: float  # client clock when the plugins got sick
    traffic: Traffic
    machine_s: float  # CPU seconds of the whole machine
    stolen_s: float  # taken by the hypervisor for other guests
    bench_s: float  # this process: the API and the plugins
    workers_s: float
    services_s: float  # decision service and staging runner
    worker_rss_kb: list[int]  # peak resident set of each worker
    scenario_s: float


def fresh_database(
    args: argparse.Namespace, redis_prefix: str, stack: contextlib.ExitStack
) -> tuple[str, str]:
    """A new database on the machine's PostgreSQL, migrated; dropped (unless --keep-db), and
    the run's Redis keys deleted, when the run ends. Its name and URL."""
    name = f"selfheal_healbench_{uuid.uuid4().hex[:8]}"
    db_url = create_database(args.pg_url, name)
    if args.keep_db:
        stack.callback(say, f"kept database {name}: {db_url}")
    else:
        stack.callback(say, f"dropped database {name}")
        stack.callback(drop_database, args.pg_url, name)
    stack.callback(clean_redis, args.redis_url, redis_prefix)
    run_migrations(Settings(database_url=db_url, redis_url=args.redis_url))
    return name, db_url


def start_services(workdir: Path, stack: contextlib.ExitStack) -> tuple[Server, Server]:
    """The reference decision service and staging runner (staging takes STAGING_DELAY_S),
    started together, stopped when the run ends."""
    sira = Server(["sim.decision_service"], SIRA_TOKEN, log=workdir / "sira.log")
    sira.launch()
    stack.callback(sira.stop)
    runner = Server(["sim", "staging-runner"], RUNNER_TOKEN, log=workdir / "runner.log")
    runner.launch()
    stack.callback(runner.stop)
    sira.wait_ready()
    runner.wait_ready()
    runner.control(delay_s=STAGING_DELAY_S)
    return sira, runner


def run_settings(
    args: argparse.Namespace,
    db_url: str,
    redis_prefix: str,
    workdir: Path,
    sira: Server,
    runner: Server,
) -> Settings:
    """The settings of the API in this process (the workers get the same through worker_env)."""
    return Settings(
        database_url=db_url,
        redis_url=args.redis_url,
        redis_prefix=redis_prefix,
        secret_key=BENCH_SECRET_KEY,
        data_dir=workdir / "data",
        port=free_port(),
        log_level="warning",
        sira_api_url=sira.url,
        sira_api_token=SIRA_TOKEN,
        staging_runner_url=runner.url,
        staging_runner_token=RUNNER_TOKEN,
        heal_poll_s=float(args.loop["SELFHEAL_HEAL_POLL_S"]),
        detect_every_s=float(args.loop["SELFHEAL_DETECT_EVERY_S"]),
        health_window_s=int(args.loop["SELFHEAL_HEALTH_WINDOW_S"]),
        fleet_min_installations=int(args.loop["SELFHEAL_FLEET_MIN_INSTALLATIONS"]),
        recovery_heartbeats=RECOVERY_HEARTBEATS,
    )


def set_the_scene(
    settings: Settings, args: argparse.Namespace, name: str, db_url: str, workdir: Path
) -> list[Plugin]:
    """The fleet registered, both releases signed, autopatch on for every tenant."""
    started = time.perf_counter()
    plugins = asyncio.run(prepare(settings, args.fleet, workdir))
    enable_autopatch(db_url, [p.tenant for p in plugins])
    say(
        f"database {name}: {len(plugins):,} installations, releases {OLD} and {NEW},"
        f" autopatch on ({time.perf_counter() - started:.1f} s)"
    )
    return plugins


def start_workers(
    settings: Settings,
    args: argparse.Namespace,
    workers: int,
    services: tuple[Server, Server],
    workdir: Path,
    stack: contextlib.ExitStack,
) -> list[Process]:
    """`workers` real worker processes, up and connected; stopped when the run ends."""
    sira, runner = services
    env = worker_env(settings, sira, runner, args.loop, "info" if args.job_stats else "warning")
    procs: list[Process] = []
    for n in range(workers):
        port = free_port()
        proc = Process(
            f"worker {n + 1}",
            [sys.executable, "-m", "app.cli", "worker"],
            workdir / f"worker-{n + 1}.log",
            {**env, "SELFHEAL_WORKER_METRICS_PORT": str(port)},
        )
        proc.metrics_port = port
        procs.append(proc)
        stack.callback(proc.stop)
    wait_workers(procs, settings)
    say(f"{workers} worker{'s' if workers > 1 else ''} up; {args.fleet:,} plugins get sick")
    return procs


def play_measured(
    settings: Settings,
    plugins: list[Plugin],
    args: argparse.Namespace,
    procs: list[Process],
    services: list[Server],
) -> Usage:
    """The scenario, with the CPU each part of the machine spent on it."""
    cpu_before = {p.pid: cpu_seconds(p.pid) or 0.0 for p in [*procs, *services]}
    self_before = time.process_time()
    machine_before = machine_cpu_seconds()
    try:
        t0, traffic = asyncio.run(scenario(settings, plugins, args))
    except RuntimeError:
        for w in procs:
            say(f"{w.name} log tail:\n{w.tail(1500)}")
        raise
    machine_after = machine_cpu_seconds()
    machine_cpu = machine_after[0] - machine_before[0]
    stolen = machine_after[1] - machine_before[1]
    bench_cpu = time.process_time() - self_before
    for w in procs:
        w.check_alive()
    rss_kb = [proc_status(w.pid, "VmHWM") or 0 for w in procs]
    worker_cpu = sum((cpu_seconds(p.pid) or 0.0) - cpu_before[p.pid] for p in procs)
    services_cpu = sum((cpu_seconds(p.pid) or 0.0) - cpu_before[p.pid] for p in services)
    return Usage(
        t0=t0,
        traffic=traffic,
        machine_s=machine_cpu,
        stolen_s=stolen,
        bench_s=bench_cpu,
        workers_s=worker_cpu,
        services_s=services_cpu,
        worker_rss_kb=rss_kb,
        scenario_s=time.time() - t0,
    )


def lane_delays(procs: list[Process]) -> dict[str, dict[str, float]]:
    """From each worker's /metrics: how long jobs waited from when they were due to their
    start, per lane and job (workers/lanes.py), the histograms of all workers added up. The
    quantiles are the upper bounds of the buckets they fall in."""
    buckets: dict[str, dict[float, float]] = {}
    sample = re.compile(
        r'^selfheal_worker_job_delay_seconds_bucket\{job="([^"]+)",lane="([^"]+)",le="([^"]+)"\}'
        r" ([0-9.e+]+)$"
    )
    for w in procs:
        if w.metrics_port is None:
            continue
        page = httpx.get(f"http://127.0.0.1:{w.metrics_port}/metrics", timeout=5).text
        for line in page.splitlines():
            m = sample.match(line)
            if m:
                job, lane, le, count = m.groups()
                into = buckets.setdefault(f"{lane}/{job}", {})
                bound = float("inf") if le == "+Inf" else float(le)
                into[bound] = into.get(bound, 0.0) + float(count)
    out: dict[str, dict[str, float]] = {}
    for key, cumulative in sorted(buckets.items()):
        bounds = sorted(cumulative)
        total = cumulative[bounds[-1]]
        if not total:
            continue

        def at(
            q: float,
            bounds: list[float] = bounds,
            cumulative: dict[float, float] = cumulative,
            total: float = total,
        ) -> float:
            return next(b for b in bounds if cumulative[b] >= q * total)

        out[key] = {"count": total, "p50": at(0.5), "p95": at(0.95), "max": at(1.0)}
    return out


def stop_workers(procs: list[Process]) -> WorkerLogs:
    """Stop the workers (their shutdown is part of what they log) and read their logs."""
    for w in procs:
        w.stop()
    logs = read_worker_logs([w.log for w in procs])
    for w in procs:
        if w.proc.returncode != 0:
            logs.events[f"{w.name} exited with {w.proc.returncode}"] += 1
    return logs


def run_figures(
    args: argparse.Namespace,
    workers: int,
    load: float,
    probes: tuple[float, float],
    figures: dict[str, Any],
    plugins: list[Plugin],
    usage: Usage,
    logs: WorkerLogs,
) -> dict[str, Any]:
    """One run's row of the report."""
    in_hands = [p.command_at - p.sent_bad_at for p in plugins if p.command_at is not None]
    wall = figures["last_resolved_at"] - usage.t0
    traffic = usage.traffic
    rtt = traffic.round_trips_ms
    return {
        "workers": workers,
        "fleet": args.fleet,
        "load_average_at_start": round(load, 2),
        "cpu_probe_ms": probes,
        **figures,
        "in_hands_s": (quantile(in_hands, 0.5), quantile(in_hands, 0.95)),
        "all_resolved_s": wall,
        "worker_peak_rss_mb": [round(kb / 1024, 1) for kb in usage.worker_rss_kb],
        "cpu_s": {
            "workers": round(usage.workers_s, 2),
            "api_and_plugins": round(usage.bench_s, 2),
            "decision_and_staging": round(usage.services_s, 2),
            "rest": round(usage.machine_s - usage.workers_s - usage.bench_s - usage.services_s, 2),
            "machine": round(usage.machine_s, 2),
            "stolen": round(usage.stolen_s, 2),
        },
        "scenario_s": round(usage.scenario_s, 2),
        "heartbeats": traffic.heartbeats,
        "polls_p50": quantile([float(p.polls) for p in plugins], 0.5),
        "acks": traffic.acks,
        "refused": dict(traffic.refused),
        "round_trip_ms": (quantile(rtt, 0.5), quantile(rtt, 0.95)),
        "worker_log_events": dict(logs.events),
        "worker_log_lines": logs.lines[:50],
        "jobs": {
            job: {
                "count": len(runs),
                "wait_s": (
                    quantile(logs.waits.get(job, [0.0]), 0.5),
                    max(logs.waits.get(job, [0.0])),
                ),
                "run_s": (quantile(runs, 0.5), max(runs)),
                "run_total_s": round(sum(runs), 1),
            }
            for job, runs in sorted(logs.runs.items())
        },
    }


def run(args: argparse.Namespace, workers: int) -> dict[str, Any]:
    """One run with `workers` workers: everything it starts is stopped and dropped after."""
    load = os.getloadavg()[0]
    probe_before = cpu_probe_ms()
    workdir = Path(tempfile.mkdtemp(prefix="selfheal-healbench-"))
    redis_prefix = f"selfheal-healbench-{uuid.uuid4().hex[:8]}:"
    stack = contextlib.ExitStack()
    stack.callback(shutil.rmtree, workdir, ignore_errors=True)
    try:
        name, db_url = fresh_database(args, redis_prefix, stack)
        sira, runner = start_services(workdir, stack)
        settings = run_settings(args, db_url, redis_prefix, workdir, sira, runner)
        plugins = set_the_scene(settings, args, name, db_url, workdir)
        procs = start_workers(settings, args, workers, (sira, runner), workdir, stack)
        usage = play_measured(settings, plugins, args, procs, [sira, runner])
        figures = database_figures(db_url)
        figures["lane_delay_s"] = lane_delays(procs)
        logs = stop_workers(procs)
    finally:
        with signals_held():
            stack.close()
    probe_after = cpu_probe_ms()
    return run_figures(
        args, workers, load, (probe_before, probe_after), figures, plugins, usage, logs
    )


# --------------------------------------------------------------------------------------------
# report


def pair(values: tuple[float, float]) -> str:
    return f"{values[0]:.2f} / {values[1]:.2f}"


def print_report(rows: list[dict[str, Any]], args: argparse.Namespace, versions: str) -> None:
    fleet = args.fleet
    print()
    print(
        f"healing loop end to end: {fleet:,} sick installations (one tenant each),"
        f" {PLUGIN} {OLD} -> {NEW}, nproc {len(os.sched_getaffinity(0))}"
    )
    print(versions)
    print(
        f"detect every {args.loop['SELFHEAL_DETECT_EVERY_S']} s, heal poll"
        f" {args.loop['SELFHEAL_HEAL_POLL_S']} s, staging {STAGING_DELAY_S} s; plugins poll"
        f" every {args.poll_s:g} s ({args.concurrency} requests in flight at most),"
        f" {RECOVERY_HEARTBEATS} recovery heartbeats"
    )
    print()
    print("seconds from each plugin's bad heartbeat, p50 / p95:")
    print(
        f"{'workers':>7}  {'-> incident':>13}  {'-> command':>13}  {'-> in hands':>13}"
        f"  {'-> resolved':>13}  {f'all {fleet:,} resolved':>17}  {'worker peak RSS':>15}"
    )
    for r in rows:
        print(
            f"{r['workers']:>7}  {pair(r['to_incident_s']):>13}  {pair(r['to_command_s']):>13}"
            f"  {pair(r['in_hands_s']):>13}  {pair(r['to_resolved_s']):>13}"
            f"  {r['all_resolved_s']:>15.2f} s  {max(r['worker_peak_rss_mb']):>12.0f} MB"
        )
    print()
    for r in rows:
        refused = ", ".join(f"{k}: {v}" for k, v in r["refused"].items()) or "none refused"
        decisions = ", ".join(f"{k} {v}" for k, v in r["decisions"].items())
        attempts = ", ".join(f"{k} {v}" for k, v in r["attempts"].items())
        seconds = r["all_resolved_s"]
        cpu = r["cpu_s"]
        logged = ", ".join(f"{k} x{v}" for k, v in r["worker_log_events"].items()) or "nothing"
        timeline = ", ".join(f"{k} {v:.2f}" for k, v in r["timeline_p50_s"].items())
        slowest = ", ".join(f"{k} {v:.2f}" for k, v in r["timeline_slowest_s"].items())
        print(
            f"{r['workers']} worker{'s' if r['workers'] > 1 else ''}:"
            f" {r['heartbeats']:,} heartbeats ({r['heartbeats'] / seconds:,.0f}/s over the"
            f" {seconds:.1f} s; a plugin polled {r['polls_p50']:.0f} times, median),"
            f" {r['acks']:,} acks, {refused};"
            f" request round trip p50 / p95 {r['round_trip_ms'][0]:.1f} / "
            f"{r['round_trip_ms'][1]:.1f} ms\n"
            f"    decisions: {decisions}; attempts: {attempts}"
            f" (at most {r['attempts_per_incident_max']} per incident,"
            f" {r['update_commands_per_installation_max']} update command per installation);"
            f" fleet incidents: {r['fleet_incidents']}\n"
            f"    timeline, median (s): {timeline}\n"
            f"    timeline, the incident resolved last (s): {slowest}\n"
            f"    CPU seconds over the {r['scenario_s']:.1f} s (machine: {cpu['machine']:.1f},"
            f" {cpu['machine'] / r['scenario_s']:.2f} of {len(os.sched_getaffinity(0))} cores):"
            f" workers {cpu['workers']:.1f}, API + plugins (this process)"
            f" {cpu['api_and_plugins']:.1f}, decision + staging {cpu['decision_and_staging']:.1f},"
            f" PostgreSQL, Redis and the rest {cpu['rest']:.1f}; stolen by the hypervisor"
            f" {cpu['stolen']:.1f}\n"
            f"    worker peak RSS {', '.join(f'{mb:.0f}' for mb in r['worker_peak_rss_mb'])} MB;"
            f" load average at start {r['load_average_at_start']};"
            f" CPU probe before / after {r['cpu_probe_ms'][0]} / {r['cpu_probe_ms'][1]} ms;"
            f" worker logs (warning and above): {logged}"
        )
        for key, d in r["lane_delay_s"].items():
            print(
                f"    {key:<14} {d['count']:>7,.0f} jobs; from due to start p50 / p95 / max"
                f" <= {d['p50']:g} / {d['p95']:g} / {d['max']:g} s (histogram buckets)"
            )
        for job, j in r["jobs"].items():
            print(
                f"    arq {job:<8} {j['count']:>6,} jobs; waited in the queue p50 / max"
                f" {j['wait_s'][0]:.2f} / {j['wait_s'][1]:.2f} s; ran p50 / max"
                f" {j['run_s'][0]:.3f} / {j['run_s'][1]:.2f} s, {j['run_total_s']:.1f} s in all"
            )


def server_versions(args: argparse.Namespace) -> str:
    with psycopg.connect(args.pg_url, autocommit=True) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    client = Redis.from_url(args.redis_url)
    try:
        info: dict[str, Any] = client.info("server")
    finally:
        client.close()
    pg = row[0].split()[0] if row else "?"
    return f"PostgreSQL {pg}, Redis {info.get('redis_version', '?')}"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fleet", type=int, default=200, help="sick installations (200)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (2)")
    parser.add_argument(
        "--compare", action="store_true", help="also run with 1 worker, side by side"
    )
    parser.add_argument(
        "--concurrency", type=int, default=64, help="plugin requests in flight at most (64)"
    )
    parser.add_argument(
        "--poll-s", type=float, default=0.2, help="plugins poll every this many seconds (0.2)"
    )
    parser.add_argument("--heal-poll-s", type=float, default=0.1, help="SELFHEAL_HEAL_POLL_S (0.1)")
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds until every incident is resolved"
    )
    parser.add_argument(
        "--job-stats",
        action="store_true",
        help="workers log at info level; print each arq job's queue wait and run time",
    )
    parser.add_argument("--keep-db", action="store_true", help="keep each run's database")
    parser.add_argument(
        "--pg-url",
        default=os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
    )
    parser.add_argument(
        "--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    args = parser.parse_args()
    if args.fleet < 1 or args.workers < 1 or args.concurrency < 1:
        parser.error("--fleet, --workers and --concurrency must be at least 1")
    if args.poll_s <= 0 or args.heal_poll_s <= 0:
        parser.error("--poll-s and --heal-poll-s must be positive")
    args.loop = loop_settings(args.heal_poll_s)
    return args


def main() -> None:
    args = parse_args()

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # the same clean-up as Ctrl-C

    signal.signal(signal.SIGTERM, stop)
    versions = server_versions(args)
    counts = sorted({1, args.workers}) if args.compare else [args.workers]
    rows = []
    started = time.monotonic()
    for workers in counts:
        rows.append(run(args, workers))
        r = rows[-1]
        say(
            f"{workers} worker{'s' if workers > 1 else ''}: all {args.fleet:,} resolved"
            f" {r['all_resolved_s']:.2f} s after the first bad heartbeat"
        )
    print_report(rows, args, versions)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS_DIR / f"healing-{stamp}.json"
    out.write_text(
        json.dumps(
            {
                "started_at": stamp,
                "nproc": len(os.sched_getaffinity(0)),
                "servers": versions,
                "config": {**vars(args), "staging_delay_s": STAGING_DELAY_S},
                "runs": rows,
            },
            indent=2,
        )
        + "\n"
    )
    say(
        f"results written to {out.relative_to(REPO)}; bench took {time.monotonic() - started:.0f} s"
    )


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        say("interrupted; everything started was stopped and dropped")
        sys.exit(130)
