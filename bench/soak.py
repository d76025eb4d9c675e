"""Soak: N minutes at twice the 10k-installation load, with detection and healing running
(issue 11). Prints figures and exits non-zero when a bound is broken.

    .venv/bin/python bench/soak.py [--minutes 30] [--installations 20000] [--interval 120]
        [--sick-every 60] [--sick-per-wave 5] [--warmup-s 120] [--api-workers 1]
        [--keep-db] [--pg-url postgresql://postgres@127.0.0.1:5432/postgres]
        [--redis-url redis://127.0.0.1:6379/0]

Real processes, every setting at its default: `selfheal api`, one `selfheal worker`, the
reference decision service and staging runner; a fresh database on the machine's PostgreSQL
and a private prefix on its Redis. This process plays the fleet: --installations signed
plugins (100 tenants, four plugin names, all on 1.2.2), each beating every --interval seconds
(the default heartbeat interval; 20,000 at 120 s is twice the 10k fleet, ~167 heartbeats/s)
spread evenly over the interval, then whenever the server's `next_heartbeat_s` says, as the
plugin_client agent does. Every --sick-every seconds --sick-per-wave installations of
xcore-payments still on 1.2.2 start failing 60% of their webhooks: incidents open, the decision
service picks the 1.2.3 release, staging passes it, the plugin acks the `update` command from
a heartbeat answer and is healthy on 1.2.3 from then on (so the incident resolves).

A heartbeat that gets no answer or a 5xx is sent again as the same signed bytes, as plugin_client
does: a copy of one that was stored gets a signed 401 replay, which counts as its answer (it was
stored, once); other 4xx are not retried (they would be refused again) and count as lost.

Printed and checked (the bounds of the issue):
- heartbeats sent / answered 200 / stored in plugin_heartbeats: 0 lost (every heartbeat ends
  answered 200, and the table holds every one answered 200);
- latency p50 / p95 / p99 after warm-up: p95 <= 100 ms;
- RSS of the API (its process tree) and of the worker after warm-up and at the end: growth
  <= 10 %;
- Redis keys of the run's prefix over time, all and those without a TTL: the ones without a
  TTL must not grow after warm-up (keys with a TTL are bounded by it: replay keys live 300 s,
  so their count climbs for the first five minutes, then levels off);
- incidents opened and resolved.
Results also land in bench/results/soak-<UTC timestamp>.json."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # bench.* and tests.support, when run as `python bench/soak.py`
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import orjson  # noqa: E402
import psutil  # noqa: E402
import psycopg  # noqa: E402
from redis import Redis  # noqa: E402

from app.core.settings import Settings  # noqa: E402
from app.plugins.signatures import sign  # noqa: E402
from app.releases import service as release_service  # noqa: E402
from app.releases.signing import generate_key, load_signer  # noqa: E402
from bench.healing import (  # noqa: E402
    BENCH_SECRET_KEY,
    Process,
    enable_autopatch,
    fresh_database,
    start_services,
    wait_workers,
    worker_env,
)
from bench.heartbeats import PLUGIN_NAMES, PLUGIN_VERSION, register_plugins  # noqa: E402
from sim.artifacts import build_plugin_artifact  # noqa: E402
from tests.support.ports import free_port  # noqa: E402

RESULTS_DIR = REPO / "bench" / "results"
HEARTBEAT = "/api/plugins/heartbeat"
SICK_PLUGIN = PLUGIN_NAMES[0]
NEW_VERSION = "1.2.3"
TENANTS = 100
HEALTHY = {"requests": 1000, "errors": 2, "webhook_attempts": 50, "webhook_failures": 0}
FAILING = {"requests": 1000, "errors": 2, "webhook_attempts": 50, "webhook_failures": 30}
MAX_TRIES = 5
# The bounds of issue 11.
P95_BOUND_MS = 100.0
RSS_GROWTH_BOUND = 0.10
SAMPLE_EVERY_S = 15.0
CONNECTIONS = 32


def say(message: str) -> None:
    print(f"[soak] {message}", flush=True)


@dataclass
class Installation:
    id: str
    secret: str
    plugin: str
    version: str = PLUGIN_VERSION
    sick: bool = False
    # Each plugin started an hour before the run: its uptime grows with the clock (an uptime
    # shorter than the time between two heartbeats is a restart, and three make a crash loop).
    started_at: float = field(default_factory=lambda: time.time() - 3600)
    healed_at: float | None = None


@dataclass
class Figures:
    sent: int = 0  # heartbeats (a retried one counts once)
    requests: int = 0  # HTTP requests, retries included
    answered_200: int = 0  # and copies answered with the signed 401 replay (`replayed`)
    replayed: int = 0
    retried: int = 0
    lost: int = 0  # never answered 200
    statuses: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)  # after warm-up
    commands: int = 0
    acks_failed: int = 0
    queued_ms_max: float = 0.0  # the longest wait for a free connection in this process


class Fleet:
    """The plugins: each beats when its schedule says, follows next_heartbeat_s, acts on the
    commands in its answers."""

    def __init__(self, client: httpx.AsyncClient, plugins: list[Installation], warm_at: float):
        self.client = client
        self.plugins = plugins
        self.figures = Figures()
        self.warm_at = warm_at
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopping = asyncio.Event()
        # Requests wait here, not in httpcore's pool, whose every step costs O(connections x
        # waiting requests) (encode/httpcore#1035; the simulator does the same, sim/fleet).
        self.slots = asyncio.Semaphore(CONNECTIONS)
        self.window_ms: list[float] = []  # before warm-up, per sample (progress lines only)

    def _signed(self, plugin: Installation, method: str, path: str, body: bytes) -> dict[str, str]:
        stamp = str(int(time.time()))
        return {
            "X-Plugin-Id": plugin.id,
            "X-Timestamp": stamp,
            "X-Signature": sign(plugin.secret, stamp, method, path, body),
            "Content-Type": "application/json",
        }

    async def beat(self, plugin: Installation) -> float:
        """One heartbeat (retried on no answer or 5xx); seconds until the next one."""
        failing = plugin.sick and plugin.version == PLUGIN_VERSION
        body = orjson.dumps(
            {
                "plugin_version": plugin.version,
                "env": "prod",
                "uptime_s": int(time.time() - plugin.started_at),
                "sent_at": datetime.now(UTC).isoformat(),
                "telemetry": {**(FAILING if failing else HEALTHY), "latency_p95_ms": 120},
                "meta": {},
            }
        )
        figures = self.figures
        figures.sent += 1
        # Signed once: a try after one with no answer may find the first copy stored.
        headers = self._signed(plugin, "POST", HEARTBEAT, body)
        for attempt in range(MAX_TRIES):
            if attempt:
                figures.retried += 1
                await asyncio.sleep(0.5 * attempt)
            figures.requests += 1
            due = time.monotonic()
            try:
                async with self.slots:
                    started = time.monotonic()
                    figures.queued_ms_max = max(figures.queued_ms_max, (started - due) * 1000)
                    response = await self.client.post(HEARTBEAT, content=body, headers=headers)
            except httpx.HTTPError as error:
                key = type(error).__name__
                figures.statuses[key] = figures.statuses.get(key, 0) + 1
                continue
            elapsed_ms = (time.monotonic() - started) * 1000
            key = str(response.status_code)
            figures.statuses[key] = figures.statuses.get(key, 0) + 1
            if started >= self.warm_at:
                figures.latencies_ms.append(elapsed_ms)
            else:
                self.window_ms.append(elapsed_ms)
            if response.status_code == 200:
                figures.answered_200 += 1
                answer = response.json()
                for command in answer["commands"]:
                    await self.act(plugin, command)
                return float(answer["next_heartbeat_s"])
            if attempt and response.status_code == 401 and _replay(response):
                figures.answered_200 += 1
                figures.replayed += 1
                return 5.0
            if response.status_code < 500:
                break
        figures.lost += 1
        return 30.0

    async def act(self, plugin: Installation, command: dict[str, Any]) -> None:
        self.figures.commands += 1
        path = f"/api/plugins/commands/{command['id']}/ack"
        body = orjson.dumps({"result": {"ok": True}})
        try:
            async with self.slots:
                response = await self.client.post(
                    path, content=body, headers=self._signed(plugin, "POST", path, body)
                )
        except httpx.HTTPError:
            self.figures.acks_failed += 1
            return
        if response.status_code != 200:
            self.figures.acks_failed += 1
            return
        if command["type"] in ("update", "rollback"):
            plugin.version = command["payload"]["version"]
            if plugin.version == NEW_VERSION:
                plugin.healed_at = time.monotonic()

    async def pause(self, seconds: float) -> None:
        """Sleep, cut short when the run stops (a heartbeat under way is never cancelled)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)

    async def live(self, plugin: Installation, first_in_s: float) -> None:
        await self.pause(first_in_s)
        while not self.stopping.is_set():
            wait_s = await self.beat(plugin)
            await self.pause(wait_s)

    def start(self, interval_s: float) -> None:
        count = len(self.plugins)
        for n, plugin in enumerate(self.plugins):
            task = asyncio.create_task(self.live(plugin, interval_s * n / count))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def stop(self) -> None:
        """Stop sending; the heartbeats under way finish (with their retries)."""
        self.stopping.set()
        await asyncio.gather(*self.tasks)


def tree_rss_kb(pid: int) -> int:
    """Resident set of a process and its children (the API's uvicorn workers), in kB."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += proc.memory_info().rss
    return total // 1024


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of a process and its children so far."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def redis_keys(redis: Redis, prefix: str) -> tuple[int, int]:
    """Keys of the run's prefix: all of them, and those without a TTL."""
    keys = list(redis.scan_iter(match=f"{prefix}*", count=2000))
    persistent = 0
    for chunk in range(0, len(keys), 1000):
        pipe = redis.pipeline(transaction=False)
        for key in keys[chunk : chunk + 1000]:
            pipe.ttl(key)
        persistent += sum(1 for ttl in pipe.execute() if ttl == -1)
    return len(keys), persistent


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def add_releases(settings: Settings, workdir: Path) -> None:
    from app.core.db import create_engine, create_sessionmaker

    key = workdir / "keys" / "release-signing.pem"
    generate_key(key)
    signer = load_signer(key)
    engine = create_engine(settings, role="bench")
    try:
        maker = create_sessionmaker(engine)
        for version in (PLUGIN_VERSION, NEW_VERSION):
            artifact = build_plugin_artifact(
                workdir / f"{SICK_PLUGIN}-{version}.tar.gz",
                name=SICK_PLUGIN,
                version=version,
                simulated=True,
            )
            async with maker() as session, session.begin():
                await release_service.add_release(
                    session,
                    signer,
                    plugin=SICK_PLUGIN,
                    version=version,
                    artifact=artifact,
                    valid_days=30,
                )
    finally:
        await engine.dispose()


def incident_counts(db_url: str) -> dict[str, int]:
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT type, status, count(*) FROM plugin_incidents GROUP BY 1, 2 ORDER BY 1, 2"
        ).fetchall()
    return {f"{kind} {status}": int(n) for kind, status, n in rows}


def stored_heartbeats(db_url: str) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT count(*) FROM plugin_heartbeats").fetchone()
    return int(row[0]) if row else 0


async def soak(
    args: argparse.Namespace, stack: contextlib.ExitStack, workdir: Path
) -> dict[str, Any]:
    prefix = f"selfheal-soak:{uuid.uuid4().hex[:8]}:"
    name, db_url = fresh_database(args, prefix, stack)
    sira, runner = start_services(workdir, stack)
    settings = Settings(
        database_url=db_url,
        redis_url=args.redis_url,
        redis_prefix=prefix,
        secret_key=BENCH_SECRET_KEY,
        data_dir=workdir / "data",
        port=free_port(),
        log_level="warning",
    )
    started = time.perf_counter()
    registered = register_plugins(db_url, args.installations, TENANTS)
    await add_releases(settings, settings.data_dir)
    tenants = [f"bench-tenant-{t:04d}" for t in range(TENANTS)]
    enable_autopatch(db_url, tenants)
    plugins = [
        Installation(p.id, p.secret, PLUGIN_NAMES[i % len(PLUGIN_NAMES)])
        for i, p in enumerate(registered)
    ]
    say(
        f"database {name}: {len(plugins):,} installations over {TENANTS} tenants, releases"
        f" {PLUGIN_VERSION} and {NEW_VERSION} of {SICK_PLUGIN}, autopatch on"
        f" ({time.perf_counter() - started:.1f} s)"
    )
    # Every setting at its default, but the heartbeat interval when --interval changes it
    # (the server tells each plugin when to beat next).
    env = worker_env(
        settings, sira, runner, {"SELFHEAL_HEARTBEAT_INTERVAL_S": f"{args.interval:.0f}"}, "warning"
    )
    api = Process(
        "api",
        [
            sys.executable,
            "-m",
            "app.cli",
            "api",
            "--port",
            str(settings.port),
            "--workers",
            str(args.api_workers),
        ],
        workdir / "api.log",
        env,
    )
    stack.callback(api.stop)
    worker = Process(
        "worker", [sys.executable, "-m", "app.cli", "worker"], workdir / "worker.log", env
    )
    stack.callback(worker.stop)
    wait_workers([worker], settings)
    deadline = time.monotonic() + 60
    while True:
        api.check_alive()
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{settings.api_base_url}/health", timeout=1).status_code == 200:
                break
        if time.monotonic() > deadline:
            raise RuntimeError(f"the API did not answer within 60 s:\n{api.tail()}")
        await asyncio.sleep(0.2)
    say(f"API (pid {api.pid}, {args.api_workers} worker(s)) and worker (pid {worker.pid}) up")

    duration_s = args.minutes * 60
    warmup_s = args.warmup_s if args.warmup_s is not None else min(args.interval, duration_s / 3)
    t0 = time.monotonic()
    until = t0 + duration_s
    redis = Redis.from_url(args.redis_url)
    stack.callback(redis.close)
    samples: list[dict[str, Any]] = []
    rss_warm: dict[str, Any] = {}
    rng = random.Random(11)
    candidates = [p for p in plugins if p.plugin == SICK_PLUGIN]
    rng.shuffle(candidates)
    sick_iter = iter(candidates)
    limits = httpx.Limits(max_connections=CONNECTIONS, max_keepalive_connections=CONNECTIONS)
    async with httpx.AsyncClient(
        base_url=settings.api_base_url, limits=limits, timeout=10
    ) as client:
        fleet = Fleet(client, plugins, warm_at=t0 + warmup_s)
        fleet.start(args.interval)
        next_sample = t0
        seen = 0
        next_wave = t0 + args.sick_every
        while time.monotonic() < until:
            now = time.monotonic()
            api.check_alive()
            worker.check_alive()
            if now >= next_wave:
                for plugin in itertools.islice(sick_iter, args.sick_per_wave):
                    plugin.sick = True
                next_wave += args.sick_every
            if now >= next_sample:
                keys, persistent = await asyncio.to_thread(redis_keys, redis, prefix)
                window = fleet.figures.latencies_ms[seen:] or fleet.window_ms
                fleet.window_ms.clear()
                seen = len(fleet.figures.latencies_ms)
                sample = {
                    "window_p95_ms": round(quantile(window, 0.95), 1),
                    "api_cpu_s": round(tree_cpu_s(api.pid), 1),
                    "worker_cpu_s": round(tree_cpu_s(worker.pid), 1),
                    "t_s": round(now - t0, 1),
                    "api_rss_kb": tree_rss_kb(api.pid),
                    "worker_rss_kb": tree_rss_kb(worker.pid),
                    "redis_keys": keys,
                    "redis_keys_without_ttl": persistent,
                    "sent": fleet.figures.sent,
                    "answered_200": fleet.figures.answered_200,
                }
                samples.append(sample)
                say(
                    f"t={sample['t_s']:>6.0f} s  sent {sample['sent']:>8,}  200 {sample['answered_200']:>8,}"
                    f"  API RSS {sample['api_rss_kb'] / 1024:6.1f} MB"
                    f"  worker RSS {sample['worker_rss_kb'] / 1024:6.1f} MB"
                    f"  Redis keys {keys:,} ({persistent:,} without TTL)"
                    f"  p95 {sample['window_p95_ms']:.0f} ms"
                    f"  CPU s API {sample['api_cpu_s']} worker {sample['worker_cpu_s']}"
                )
                if not rss_warm and now - t0 >= warmup_s:
                    rss_warm = {
                        "t_s": sample["t_s"],
                        "api": sample["api_rss_kb"],
                        "worker": sample["worker_rss_kb"],
                        "redis_keys_without_ttl": persistent,
                    }
                next_sample += SAMPLE_EVERY_S
            await asyncio.sleep(0.5)
        await fleet.stop()
    end = {
        "api": tree_rss_kb(api.pid),
        "worker": tree_rss_kb(worker.pid),
    }
    keys_end, persistent_end = redis_keys(redis, prefix)
    await asyncio.sleep(1)  # the ingest batcher's last flush
    stored = stored_heartbeats(db_url)
    incidents = incident_counts(db_url)
    figures = fleet.figures
    sick = [p for p in plugins if p.sick]
    healed = [p for p in sick if p.healed_at is not None]
    return {
        "installations": len(plugins),
        "interval_s": args.interval,
        "minutes": args.minutes,
        "warmup_s": warmup_s,
        "rate_per_s": round(len(plugins) / args.interval, 1),
        "heartbeats": {
            "sent": figures.sent,
            "requests": figures.requests,
            "retried": figures.retried,
            "answered_200": figures.answered_200,
            "replayed": figures.replayed,
            "stored": stored,
            "never_answered_200": figures.lost,
            "statuses": figures.statuses,
        },
        "latency_ms": {
            "count": len(figures.latencies_ms),
            "p50": quantile(figures.latencies_ms, 0.50),
            "p95": quantile(figures.latencies_ms, 0.95),
            "p99": quantile(figures.latencies_ms, 0.99),
            "max": max(figures.latencies_ms, default=float("nan")),
            "mean": statistics.fmean(figures.latencies_ms) if figures.latencies_ms else None,
            "client_queue_max": round(figures.queued_ms_max, 1),
        },
        "rss_kb": {"after_warmup": rss_warm, "end": end},
        "redis_keys": {"end": keys_end, "end_without_ttl": persistent_end},
        "incidents": incidents,
        "plugins_made_sick": len(sick),
        "plugins_healed": len(healed),
        "commands_acked": figures.commands - figures.acks_failed,
        "acks_failed": figures.acks_failed,
        "samples": samples,
    }


def verdicts(report: dict[str, Any]) -> list[tuple[str, str, bool]]:
    hb = report["heartbeats"]
    lost = hb["never_answered_200"] + max(0, hb["answered_200"] - hb["stored"])
    warm = report["rss_kb"]["after_warmup"]
    end = report["rss_kb"]["end"]
    checks = [
        (
            "0 heartbeats lost",
            f"{hb['sent']:,} sent, {hb['answered_200']:,} answered 200, {hb['stored']:,} stored,"
            f" {hb['never_answered_200']} never answered 200",
            lost == 0 and hb["answered_200"] == hb["sent"] and hb["stored"] == hb["answered_200"],
        ),
        (
            f"p95 <= {P95_BOUND_MS:g} ms",
            f"{report['latency_ms']['p95']:.1f} ms",
            report["latency_ms"]["p95"] <= P95_BOUND_MS,
        ),
    ]
    if not warm:
        checks.append(("RSS after warm-up", "no sample after warm-up", False))
        return checks
    for name in ("api", "worker"):
        growth = (end[name] - warm[name]) / warm[name]
        checks.append(
            (
                f"{name} RSS growth <= {RSS_GROWTH_BOUND:.0%}",
                f"{warm[name] / 1024:.1f} -> {end[name] / 1024:.1f} MB ({growth:+.1%})",
                growth <= RSS_GROWTH_BOUND,
            )
        )
    before = warm["redis_keys_without_ttl"]
    after = report["redis_keys"]["end_without_ttl"]
    checks.append(
        (
            "Redis keys without TTL not growing",
            f"{before:,} after warm-up -> {after:,} at the end"
            f" (all keys at the end: {report['redis_keys']['end']:,})",
            # A handful may come and go (arq's job keys): growth beyond that is a leak.
            after <= before * 1.1 + 20,
        )
    )
    return checks


def print_report(report: dict[str, Any], checks: list[tuple[str, str, bool]]) -> None:
    hb = report["heartbeats"]
    lat = report["latency_ms"]
    print()
    print(
        f"soak: {report['installations']:,} installations every {report['interval_s']:g} s"
        f" (~{report['rate_per_s']:g} heartbeats/s), {report['minutes']:g} min,"
        f" warm-up {report['warmup_s']:g} s"
    )
    print(
        f"heartbeats: {hb['sent']:,} sent ({hb['requests']:,} requests, {hb['retried']} retries),"
        f" {hb['answered_200']:,} answered 200 ({hb['replayed']} of them a signed replay of a"
        f" copy), {hb['stored']:,} stored; statuses {hb['statuses']}"
    )
    print(
        f"latency after warm-up ({lat['count']:,} requests): p50 {lat['p50']:.1f} ms,"
        f" p95 {lat['p95']:.1f} ms, p99 {lat['p99']:.1f} ms, max {lat['max']:.1f} ms"
        f" (from send to answer; the longest wait for one of the bench's {CONNECTIONS}"
        f" connections: {lat['client_queue_max']:.0f} ms)"
    )
    print(
        f"incidents: {report['incidents']}; plugins made sick {report['plugins_made_sick']},"
        f" healed (update acked) {report['plugins_healed']}, commands acked"
        f" {report['commands_acked']}, acks failed {report['acks_failed']}"
    )
    print("Redis keys over time (all / without TTL):")
    print(
        "  "
        + ", ".join(
            f"{s['t_s']:.0f}s {s['redis_keys']:,}/{s['redis_keys_without_ttl']:,}"
            for s in report["samples"]
        )
    )
    print("bounds:")
    for name, figure, ok in checks:
        print(f"  {name:<36} {figure:<60} {'PASS' if ok else 'FAIL'}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--installations", type=int, default=20_000)
    parser.add_argument(
        "--interval",
        type=int,
        default=float(Settings.model_fields["heartbeat_interval_s"].default),
        help="seconds between a healthy plugin's heartbeats (the default heartbeat interval)",
    )
    parser.add_argument("--sick-every", type=float, default=60.0)
    parser.add_argument("--sick-per-wave", type=int, default=5)
    parser.add_argument(
        "--warmup-s",
        type=float,
        default=None,
        help="RSS and latency are measured after it (default: one interval, at most a third)",
    )
    parser.add_argument("--api-workers", type=int, default=1)
    parser.add_argument("--keep-db", action="store_true")
    parser.add_argument("--logs", help="a folder for the processes' logs (kept after the run)")
    parser.add_argument(
        "--pg-url",
        default=os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
    )
    parser.add_argument(
        "--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="selfheal-soak-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        # The processes' logs: kept in --logs when given, else gone with the run.
        workdir = Path(args.logs) if args.logs else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        report = asyncio.run(soak(args, stack, workdir))
        checks = verdicts(report)
        print_report(report, checks)
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        out = RESULTS_DIR / f"soak-{stamp}.json"
        report["bounds"] = [{"name": n, "figure": f, "pass": ok} for n, f, ok in checks]
        out.write_text(json.dumps(report, indent=2, default=str))
        say(f"wrote {out.relative_to(REPO)}")
    return 0 if all(ok for _, _, ok in checks) else 1


def _replay(response: httpx.Response) -> bool:
    """The control plane's 401 `replay` (the copy's first try was stored)."""
    try:
        return bool(response.json()["error"]["code"] == "replay")
    except (ValueError, KeyError, TypeError):
        return False


if __name__ == "__main__":
    sys.exit(main())
