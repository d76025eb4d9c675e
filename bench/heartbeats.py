"""Heartbeat ingest benchmark: signed heartbeats over loopback against `selfheal api` on the
machine's PostgreSQL and Redis, and the same load against a bare FastAPI endpoint that only
parses the JSON (bench/bare_app.py). The ratio of the two is the headline.

    .venv/bin/python bench/heartbeats.py [--plugins 10000] [--duration 20] [--connections 64]
        [--threads 1] [--workers 2] [--skip-bare] [--breakdown] [--keep-db]

Steps: install wrk if missing; create a fresh database selfheal_bench_<random>, migrate it and
register the installations with bulk COPY; pre-sign every request of the run (each one unique:
a repeated signed request would be a replay); start `selfheal api`; warm up; measure with wrk
(bench/heartbeat.lua); count the stored samples; then the same load against the bare endpoint.
Prints a side-by-side table and writes bench/results/heartbeats-<timestamp>.json. With
--breakdown, also runs selfheal with its rate limits off and with nothing stored
(bench/no_storage_app.py), and times the ingest statement alone: where a heartbeat's CPU goes.
See bench/README.md for what each figure means. A benchmark prints figures; it is not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import json
import multiprocessing
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import psycopg  # noqa: E402

from app.cli import run_migrations  # noqa: E402
from app.core.crypto import SecretBox, new_plugin_secret  # noqa: E402
from app.core.settings import Settings, libpq_url  # noqa: E402
from app.plugins.signatures import sign  # noqa: E402
from tests.support.databases import (  # noqa: E402
    clean_redis,
    create_database,
    drop_database,
    with_database,
)
from tests.support.ports import free_port  # noqa: E402

BENCH_DIR = REPO / "bench"
LUA_SCRIPT = BENCH_DIR / "heartbeat.lua"
RESULTS_DIR = BENCH_DIR / "results"
VENV_BIN = Path(sys.executable).parent

HEARTBEAT_PATH = "/api/plugins/heartbeat"
BENCH_SECRET_KEY = "selfheal-bench-secret-key-not-for-production-0123456789"
PLUGIN_VERSION = "1.2.2"
PLUGIN_NAMES = ("xcore-payments", "xcore-webhooks", "xcore-catalog", "xcore-shipping")
SIGNATURE_WINDOW_S = 300

TARGET_RATE = 5000.0
TARGET_P99_MS = 50.0
TARGET_RATIO = 0.33
# Issue 11's ingest target: what --breakdown measures the budget against.
TARGET_BREAKDOWN_RATIO = 0.6

CLK_TCK = os.sysconf("SC_CLK_TCK")


def say(message: str) -> None:
    print(f"[bench] {message}", flush=True)


# --------------------------------------------------------------------------------------------
# wrk


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    say("wrk is not installed: apt-get install -y wrk (Debian package)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "wrk"]
    if subprocess.run(install, env=env, check=False).returncode != 0:
        say("apt-get install failed; running apt-get update, then installing again")
        subprocess.run(["apt-get", "update", "-q"], env=env, check=True)
        subprocess.run(install, env=env, check=True)
    found = shutil.which("wrk")
    if not found:
        raise SystemExit("wrk is still not on PATH after apt-get install")
    say(f"installed {found}")
    return found


# --------------------------------------------------------------------------------------------
# database


@dataclass(frozen=True, slots=True)
class Plugin:
    id: str
    secret: str


def register_plugins(db_url: str, count: int, tenants: int) -> list[Plugin]:
    """Tenants, installations and sealed secrets with COPY: 10,000 take about a second."""
    box = SecretBox(BENCH_SECRET_KEY)
    plugins = [Plugin(str(uuid.uuid4()), new_plugin_secret()) for _ in range(count)]
    with psycopg.connect(db_url) as conn, conn.cursor() as cur:
        with cur.copy("COPY tenants (id, name) FROM STDIN") as copy:
            for t in range(tenants):
                copy.write_row((f"bench-tenant-{t:04d}", f"Bench merchant {t}"))
        with cur.copy(
            "COPY merchant_plugins (id, tenant_id, plugin_name, plugin_version, env) FROM STDIN"
        ) as copy:
            for i, p in enumerate(plugins):
                copy.write_row(
                    (
                        p.id,
                        f"bench-tenant-{i % tenants:04d}",
                        PLUGIN_NAMES[i % len(PLUGIN_NAMES)],
                        PLUGIN_VERSION,
                        "prod",
                    )
                )
        with cur.copy("COPY plugin_secrets (installation_id, secret_enc) FROM STDIN") as copy:
            for p in plugins:
                copy.write_row((p.id, box.seal(p.secret, bound_to=p.id)))
        conn.commit()
        cur.execute("ANALYZE tenants, merchant_plugins, plugin_secrets")
        conn.commit()
    return plugins


def count_heartbeats(db_url: str) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT count(*) FROM plugin_heartbeats").fetchone()
    assert row is not None
    return int(row[0])


def settled_count(db_url: str, timeout_s: float = 15.0) -> int:
    """The sample count once the server has finished the batches still in flight."""
    deadline = time.monotonic() + timeout_s
    last = count_heartbeats(db_url)
    while time.monotonic() < deadline:
        time.sleep(0.4)
        now = count_heartbeats(db_url)
        if now == last:
            return now
        last = now
    return last


def backend_pids(admin_url: str, dbname: str) -> set[int]:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s", (dbname,)
        ).fetchall()
    return {int(r[0]) for r in rows}


def database_stats(admin_url: str, dbname: str) -> dict[str, int]:
    """Cumulative counters of the bench database (pg_stat_database): sessions opened,
    commits, rollbacks, rows inserted."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT sessions, xact_commit, xact_rollback, tup_inserted"
            " FROM pg_stat_database WHERE datname = %s",
            (dbname,),
        ).fetchone()
    if row is None:
        return {}
    return dict(
        zip(("sessions", "commits", "rollbacks", "rows_inserted"), map(int, row), strict=True)
    )


def pg_settings(admin_url: str) -> dict[str, str]:
    names = ("server_version", "synchronous_commit", "fsync", "shared_buffers", "max_connections")
    with psycopg.connect(admin_url, autocommit=True) as conn:
        return {
            n: str(conn.execute(f"SHOW {n}").fetchone()[0])  # type: ignore[index]
            for n in names
        }


# --------------------------------------------------------------------------------------------
# request generation (forked workers; the plugin list is inherited, not pickled)

_GEN_PLUGINS: list[tuple[str, bytes]] = []
_GEN_PREFIX = f".POST.{HEARTBEAT_PATH}.".encode()


def _gen_body(seq: int, sent_at: str) -> bytes:
    # uptime_s grows with the sequence number: every body, hence every signed message,
    # is unique, so no request of the run is a replay of another.
    return (
        f'{{"plugin_version": "{PLUGIN_VERSION}", "env": "prod", "uptime_s": {3600 + seq}, '
        f'"sent_at": "{sent_at}", "telemetry": {{"requests": {1000 + seq % 500}, '
        f'"errors": {seq % 7}, "webhook_attempts": {50 + seq % 20}, '
        f'"webhook_failures": {seq % 3}, "latency_p95_ms": {80 + seq % 90}, '
        f'"errors_last_24h": {40 + seq % 11}}}, "meta": {{}}}}'
    ).encode()


def _gen_chunk(task: tuple[int, int, int]) -> bytes:
    start, stop, timestamp = task
    plugins = _GEN_PLUGINS
    n = len(plugins)
    ts = str(timestamp)
    sent_at = datetime.fromtimestamp(timestamp, UTC).isoformat()
    prefix = ts.encode() + _GEN_PREFIX
    out: list[bytes] = []
    sha256 = hashlib.sha256
    for seq in range(start, stop):
        plugin_id, key = plugins[seq % n]
        body = _gen_body(seq, sent_at)
        sig = hmac.new(key, prefix + body, sha256).hexdigest()
        out.append(b"%s\t%s\tv1=%s\t%s\n" % (plugin_id.encode(), ts.encode(), sig.encode(), body))
    return b"".join(out)


def generate_requests(plugins: list[Plugin], path: Path, first_seq: int, count: int) -> float:
    """Write `count` signed requests (sequence numbers first_seq..) to `path`; returns seconds."""
    global _GEN_PLUGINS
    _GEN_PLUGINS = [(p.id, p.secret.encode()) for p in plugins]
    started = time.perf_counter()
    timestamp = int(time.time())
    chunk = 20_000
    tasks = [
        (s, min(s + chunk, first_seq + count), timestamp)
        for s in range(first_seq, first_seq + count, chunk)
    ]
    processes = max(1, len(os.sched_getaffinity(0)))
    with path.open("wb") as f, multiprocessing.get_context("fork").Pool(processes) as pool:
        for data in pool.imap(_gen_chunk, tasks):
            f.write(data)
    return time.perf_counter() - started


def self_check(plugins: list[Plugin], path: Path) -> None:
    """The first generated line must verify with app.plugins.signatures.sign and parse."""
    from app.plugins.schemas import Heartbeat

    with path.open("rb") as f:
        line = f.readline().rstrip(b"\n")
    plugin_id, ts, sig, body = line.split(b"\t", 3)
    secret = next(p.secret for p in plugins if p.id == plugin_id.decode())
    assert sign(secret, ts.decode(), "POST", HEARTBEAT_PATH, body) == sig.decode(), "bad signature"
    Heartbeat.model_validate_json(body)


# --------------------------------------------------------------------------------------------
# processes


def descendants(root: int) -> list[int]:
    """root and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _read_stat(int(entry))
        if stat is not None:
            children.setdefault(stat[1], []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _read_stat(pid: int) -> tuple[str, int, int] | None:
    """(comm, ppid, CPU ticks of the process and of its reaped children), None when gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = raw[raw.index("(") + 1 : raw.rindex(")")]
    fields = raw[raw.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state): ppid is field 4, utime 14, stime 15, cutime 16, cstime 17
    return comm, int(fields[1]), sum(int(x) for x in fields[11:15])


class Server:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.log = log
        self._log_file = log.open("wb")
        self.proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env=env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_healthy(self, url: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    body = json.loads(resp.read())
                    # The API alone: PostgreSQL and Redis must answer; no worker is started.
                    parts = body.get("components", {})
                    if body.get("status") == "ok" or all(
                        parts.get(name, {}).get("status") == "ok" for name in ("postgres", "redis")
                    ):
                        return
                    last = json.dumps(body)
            except (urllib.error.URLError, OSError, ValueError) as exc:
                last = str(exc)
            time.sleep(0.25)
        self.stop()
        tail = self.log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{self.name} did not become healthy ({last}); log tail:\n{tail}")

    def pids(self) -> list[int]:
        return descendants(self.proc.pid)

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.proc.poll() is None:
            pids = self.pids()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                say(f"{self.name} did not stop within {timeout_s:g} s: SIGKILL")
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                self.proc.wait(5)
            # workers the supervisor left behind (it normally reaps them)
            for pid in pids[1:]:
                stat = _read_stat(pid)
                if stat is not None and stat[1] == 1:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)
        self._log_file.close()


# --------------------------------------------------------------------------------------------
# CPU accounting


@dataclass(slots=True)
class CpuSnapshot:
    at: float
    ticks: dict[int, int]  # pid -> utime + stime + cutime + cstime
    machine_busy: int
    machine_total: int
    forks: int


def machine_ticks() -> tuple[int, int, int]:
    """(busy ticks over all CPUs, total ticks, processes forked since boot) from /proc/stat."""
    busy = total = forks = 0
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu "):
                parts = [int(x) for x in line.split()[1:]]
                idle = parts[3] + parts[4]  # idle + iowait
                total = sum(parts[:8])  # guest time is already inside user
                busy = total - idle
            elif line.startswith("processes "):
                forks = int(line.split()[1])
    return busy, total, forks


def snapshot() -> CpuSnapshot:
    """CPU ticks of every process on the machine (a few hundred /proc reads)."""
    ticks = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _read_stat(int(entry))
            if stat is not None:
                ticks[int(entry)] = stat[2]
    busy, total, forks = machine_ticks()
    return CpuSnapshot(time.monotonic(), ticks, busy, total, forks)


def background_cores(seconds: float = 1.0) -> float:
    """Cores busy on the machine while nothing of the bench runs: other people's work."""
    busy0, _, _ = machine_ticks()
    time.sleep(seconds)
    busy1, _, _ = machine_ticks()
    return (busy1 - busy0) / CLK_TCK / seconds


def pids_by_comm(name: str, cmdline_contains: str = "") -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _read_stat(int(entry))
            if stat is None or stat[0] != name:
                continue
            if cmdline_contains:
                try:
                    cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
                except OSError:
                    continue
                if cmdline_contains.encode() not in cmdline:
                    continue
            found.add(int(entry))
    return found


def _command(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    text = raw.replace(b"\0", b" ").decode(errors="replace").strip()
    if not text:
        stat = _read_stat(pid)
        text = f"[{stat[0]}]" if stat else "?"
    return text[:90]


def postmaster_pid(admin_url: str) -> int | None:
    """The machine cluster's postmaster: the parent of one of its backends."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        stat = _read_stat(int(row[0]))
    return stat[1] if stat is not None else None


def process_groups(
    server: Server, admin_url: str, dbname: str, postmaster: int | None, redis_port: str
) -> dict[str, set[int]]:
    bench_backends = backend_pids(admin_url, dbname)
    cluster = set(descendants(postmaster)) if postmaster else pids_by_comm("postgres")
    return {
        "api workers": set(server.pids()),
        "postgres: bench db backends": bench_backends,
        "postgres: rest of cluster": cluster - bench_backends,
        "redis": pids_by_comm("redis-server", f":{redis_port}"),
    }


def cpu_split(
    groups: dict[str, set[int]], before: CpuSnapshot, after: CpuSnapshot
) -> dict[str, Any]:
    """CPU seconds per group between two snapshots (groups are disjoint; a process that appears
    only in `after` started during the window, so all its CPU counts; a parent's cutime/cstime
    holds the CPU of children it reaped: exited PostgreSQL backends land in the postmaster's
    group). "other processes" is the machine's busy time that none of the groups explains."""
    wall = after.at - before.at
    out: dict[str, Any] = {"window_s": round(wall, 3)}
    accounted = 0.0
    for name, pids in groups.items():
        ticks = sum(after.ticks.get(p, 0) - before.ticks.get(p, 0) for p in pids)
        out[name] = ticks / CLK_TCK
        accounted += ticks / CLK_TCK
    busy = (after.machine_busy - before.machine_busy) / CLK_TCK
    total = after.machine_total - before.machine_total
    out["other processes"] = max(0.0, busy - accounted)
    grouped = set().union(*groups.values()) if groups else set()
    others = sorted(
        (
            (after.ticks[p] - before.ticks.get(p, 0), p)
            for p in after.ticks
            if p not in grouped and after.ticks[p] > before.ticks.get(p, 0)
        ),
        reverse=True,
    )
    out["top_other_processes"] = [
        {"pid": p, "cpu_s": t / CLK_TCK, "command": _command(p)} for t, p in others[:3]
    ]
    out["machine (all processes)"] = busy
    out["machine_busy_fraction"] = round(
        (after.machine_busy - before.machine_busy) / total if total else 0.0, 4
    )
    out["machine_cores"] = len(os.sched_getaffinity(0))
    out["machine_forks"] = after.forks - before.forks
    return out


# --------------------------------------------------------------------------------------------
# wrk runs


@dataclass(slots=True)
class WrkResult:
    requests: int
    duration_s: float
    non2xx: int
    errors: dict[str, int]
    latency_ms: dict[str, float]
    loaded: int
    sent: int
    exhausted_threads: int
    accepted: int = 0
    rate: float = 0.0
    cpu: dict[str, Any] = field(default_factory=dict)


def run_wrk(
    wrk: str,
    port: int,
    request_file: Path,
    *,
    threads: int,
    connections: int,
    duration_s: int,
    workdir: Path,
    label: str,
    cpu_groups: Any = None,
) -> WrkResult:
    """One wrk run. `cpu_groups()` (when given) returns {group: pids}; CPU is sampled from the
    moment wrk starts its clock (its "Running" line, after the Lua init loaded the file) to
    its exit."""
    summary_path = workdir / f"wrk-{label}.json"
    env = {
        **os.environ,
        "HB_FILE": str(request_file),
        "HB_THREADS": str(threads),
        "HB_SUMMARY": str(summary_path),
    }
    argv = [
        wrk,
        "-t",
        str(threads),
        "-c",
        str(connections),
        "-d",
        f"{duration_s}s",
        "--timeout",
        "10s",
        "--latency",
        "-s",
        str(LUA_SCRIPT),
        f"http://127.0.0.1:{port}",
    ]
    background = background_cores() if cpu_groups is not None else None
    stdbuf = shutil.which("stdbuf")
    if stdbuf:  # line-buffered, so the "Running" line arrives when wrk starts its clock
        argv = [stdbuf, "-oL", *argv]
    started = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    output: list[str] = []
    before: CpuSnapshot | None = None
    groups: dict[str, set[int]] = {}
    for line in proc.stdout:
        output.append(line)
        if before is None and line.startswith("Running"):
            if cpu_groups is not None:
                groups = {**cpu_groups(), "wrk": {proc.pid}}
                before = snapshot()
            say(f"{label}: wrk loaded its requests in {time.monotonic() - started:.1f} s; running")
    after = None
    if cpu_groups is not None and before is not None:
        # groups again: a process that started during the run (new DB backend) counts too
        for name, pids in cpu_groups().items():
            groups[name] = groups.get(name, set()) | pids
        claimed: set[int] = set()
        for name in list(groups):  # disjoint: a pid belongs to the first group naming it
            groups[name] = groups[name] - claimed
            claimed |= groups[name]
        after = snapshot()
    rc = proc.wait()
    (workdir / f"wrk-{label}.txt").write_text("".join(output))
    if rc != 0 or not summary_path.exists():
        raise SystemExit(f"wrk failed (exit {rc}):\n{''.join(output)[-3000:]}")
    raw = json.loads(summary_path.read_text())
    result = WrkResult(
        requests=raw["requests"],
        duration_s=raw["duration_s"],
        non2xx=raw["non2xx"],
        errors=raw["errors"],
        latency_ms=raw["latency_ms"],
        loaded=raw["loaded"],
        sent=raw["sent"],
        exhausted_threads=raw["exhausted_threads"],
    )
    socket_errors = sum(v for k, v in result.errors.items() if k != "status")
    result.accepted = result.requests - result.non2xx
    result.rate = result.accepted / result.duration_s if result.duration_s else 0.0
    if before is not None and after is not None:
        result.cpu = cpu_split(groups, before, after)
        result.cpu["background_cores_before"] = round(background or 0.0, 3)
    if result.exhausted_threads:
        say(
            f"!!! {label}: wrk ran out of pre-generated requests ({result.loaded:,} loaded): "
            "the figures of this run are NOT valid; raise --max-rate"
        )
    if socket_errors:
        say(f"{label}: socket errors {result.errors}")
    return result


# --------------------------------------------------------------------------------------------
# /metrics


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def scrape_metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and m.group(1).startswith(("selfheal_heartbeats", "selfheal_ingest_batch_size_")):
            if m.group(1).endswith("_bucket"):
                continue
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def metric_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}


# --------------------------------------------------------------------------------------------
# report


def print_report(report: dict[str, Any]) -> None:
    cfg = report["config"]
    sh: dict[str, Any] = report["selfheal"]
    bare: dict[str, Any] | None = report.get("bare")
    w = 22
    print()
    print(
        f"heartbeat ingest: {cfg['plugins']:,} plugins, {cfg['duration_s']} s, "
        f"{cfg['connections']} connections, wrk -t{cfg['threads']}, {cfg['workers']} API workers, "
        f"nproc {cfg['nproc']}"
    )
    print(
        f"PostgreSQL {report['postgres']['server_version']} (synchronous_commit="
        f"{report['postgres']['synchronous_commit']}, fsync={report['postgres']['fsync']}), "
        f"auth cache TTL {cfg['auth_cache_ttl_s']} s"
    )
    print()
    print(f"{'':{w}}{'selfheal':>14}{'bare':>14}{'selfheal/bare':>16}")
    rows = [
        ("heartbeats/s", "rate", "{:,.1f}"),
        ("p50 ms", "p50", "{:.2f}"),
        ("p99 ms", "p99", "{:.2f}"),
        ("non-2xx", "non2xx", "{:,.0f}"),
    ]
    for label, key, fmt in rows:
        s_val = _figure(sh, key)
        line = f"{label:{w}}{fmt.format(s_val):>14}"
        if bare is not None:
            b_val = _figure(bare, key)
            line += f"{fmt.format(b_val):>14}"
            if key == "rate" and b_val:
                line += f"{s_val / b_val:>16.2f}"
        else:
            line += f"{'skipped':>14}"
        print(line)
    print()
    print("targets:")
    for t in report["targets"]:
        print(f"  {t['name']:<28}{t['value']:>12}   {t['verdict']}")
    print()
    d = report["durability"]
    flag = "" if d["ok"] else "   <<< MISMATCH: ACCEPTED HEARTBEATS ARE MISSING >>>"
    print(
        f"durable: stored {d['stored_in_run']:,} of {d['accepted_by_wrk']:,} accepted"
        f" (measured run; {d['stored_in_run'] - d['accepted_by_wrk']:+,} answered after wrk"
        f" stopped counting){flag}"
    )
    print(
        f"         whole run: server answered {d['server_accepted_total']:,} heartbeats with 200,"
        f" table holds {d['rows_total']:,} samples"
    )
    if sh.get("rejected"):
        print(f"rejected by reason (server /metrics): {sh['rejected']}")
    if sh.get("mean_batch") is not None:
        print(f"ingest: mean batch {sh['mean_batch']:.1f} heartbeats per statement")
    if sh.get("database"):
        db = sh["database"]
        secs = sh["duration_s"] or 1.0
        print(
            f"bench database during the run: {db.get('sessions', 0):,} new sessions"
            f" ({db.get('sessions', 0) / secs:,.0f}/s), {db.get('commits', 0) / secs:,.0f} commits/s,"
            f" {db.get('rollbacks', 0) / secs:,.0f} rollbacks/s"
        )
    print()
    print("CPU seconds per 1000 heartbeats (cores busy on average during the run):")
    names: list[str] = []
    for r in (sh, bare):
        if r is not None:
            for k in r["cpu"]:
                if (
                    k not in names
                    and isinstance(r["cpu"][k], float)
                    and not k.startswith(("window", "machine_", "background"))
                ):
                    names.append(k)
    w2 = max(len(n) for n in names) + 2 if names else w
    print(f"  {'':{w2}}{'selfheal':>18}{'bare':>18}")
    for name in names:
        line = f"  {name:{w2}}"
        for r in (sh, bare):
            if r is None or name not in r["cpu"]:
                line += f"{'-':>18}"
                continue
            cpu_s = r["cpu"][name]
            per_k = cpu_s / (r["accepted"] / 1000) if r["accepted"] else 0.0
            cores = cpu_s / r["cpu"]["window_s"] if r["cpu"]["window_s"] else 0.0
            line += f"{per_k:>11.3f} ({cores:.2f})"
        print(line)
    for r, label in ((sh, "selfheal"), (bare, "bare")):
        if r is not None and r["cpu"]:
            c = r["cpu"]
            print(
                f"  {label} run: machine {100 * c['machine_busy_fraction']:.0f}% busy"
                f" ({c['machine_cores']} cores); {c['background_cores_before']:.2f} cores were"
                f" busy in the idle second before it (other people's work);"
                f" {c['machine_forks']:,} processes forked during it"
            )
            for o in c.get("top_other_processes", []):
                print(f"    other: {o['cpu_s']:6.2f} CPU s  pid {o['pid']}  {o['command']}")
    print()


def _figure(r: dict[str, Any], key: str) -> float:
    if key == "rate":
        return float(r["rate"])
    if key == "non2xx":
        return float(r["non2xx"] + sum(v for k, v in r["errors"].items() if k != "status"))
    return float(r["latency_ms"][key])


def targets(sh: WrkResult, bare: WrkResult | None) -> list[dict[str, Any]]:
    out = [
        {
            "name": f"heartbeats/s >= {TARGET_RATE:,.0f}",
            "value": f"{sh.rate:,.0f}",
            "verdict": "PASS" if sh.rate >= TARGET_RATE else "MISS",
        },
        {
            "name": f"p99 <= {TARGET_P99_MS:g} ms",
            "value": f"{sh.latency_ms['p99']:.1f} ms",
            "verdict": "PASS" if sh.latency_ms["p99"] <= TARGET_P99_MS else "MISS",
        },
    ]
    if bare is not None and bare.rate:
        ratio = sh.rate / bare.rate
        out.append(
            {
                "name": f"selfheal/bare >= {TARGET_RATIO:g}",
                "value": f"{ratio:.2f}",
                "verdict": "PASS" if ratio >= TARGET_RATIO else "MISS",
            }
        )
    else:
        out.append({"name": f"selfheal/bare >= {TARGET_RATIO:g}", "value": "-", "verdict": "n/a"})
    return out


# --------------------------------------------------------------------------------------------
# main


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--plugins", type=int, default=10_000, help="installations (default 10000)")
    p.add_argument("--tenants", type=int, default=100, help="tenants (default 100)")
    p.add_argument("--duration", type=int, default=20, help="measured seconds (default 20)")
    p.add_argument(
        "--warmup", type=int, default=3, help="warm-up seconds before each measured run (default 3)"
    )
    p.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    p.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    p.add_argument("--workers", type=int, default=2, help="API worker processes (default 2)")
    p.add_argument(
        "--max-rate",
        type=int,
        default=15_000,
        help="highest request rate to pre-generate for, per second (default 15000); the file "
        "holds duration x max-rate x 1.5 requests",
    )
    p.add_argument(
        "--auth-cache-ttl",
        type=float,
        default=None,
        help="SELFHEAL_AUTH_CACHE_TTL_S for the server (default: the app's default)",
    )
    p.add_argument("--skip-bare", action="store_true", help="do not run the bare endpoint")
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="also run selfheal with its rate limits off, and with nothing stored "
        "(bench/no_storage_app.py), and time the ingest statement alone: where a heartbeat's "
        "CPU goes (about 90 s more)",
    )
    p.add_argument("--keep-db", action="store_true", help="keep the bench database")
    p.add_argument(
        "--pg-url",
        default=os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="admin URL of the PostgreSQL server (env BENCH_PG_URL)",
    )
    p.add_argument(
        "--redis-url",
        default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"),
        help="Redis URL (env BENCH_REDIS_URL)",
    )
    args = p.parse_args()
    if args.duration + args.warmup + 60 > SIGNATURE_WINDOW_S:
        p.error(
            f"--warmup + --duration must stay well inside the {SIGNATURE_WINDOW_S} s signature window"
        )
    return args


@dataclass
class BenchRun:
    """One run of the benchmark: its names, its scratch folder and what it started."""

    args: argparse.Namespace
    wrk: str
    run_id: str
    workdir: Path
    started: float  # time.monotonic()
    started_at: str
    servers: list[Server] = field(default_factory=list)
    db_created: bool = False
    pg: dict[str, str] = field(default_factory=dict)  # the PostgreSQL server's settings
    postmaster: int | None = None
    redis_port: str = "6379"

    @property
    def dbname(self) -> str:
        return f"selfheal_bench_{self.run_id}"

    @property
    def redis_prefix(self) -> str:
        return f"selfheal-bench-{self.run_id}:"

    @property
    def admin_url(self) -> str:
        return str(self.args.pg_url)

    @property
    def db_url(self) -> str:
        return with_database(self.admin_url, self.dbname)


@dataclass(frozen=True, slots=True)
class RequestFiles:
    warm: Path
    main: Path
    warm_count: int
    main_count: int


@dataclass(slots=True)
class Counters:
    """What the server and the database had counted at one moment."""

    rows: int  # stored samples
    metrics: dict[str, float]  # /metrics
    database: dict[str, int]  # pg_stat_database


@dataclass(slots=True)
class SelfhealResult:
    wrk: WrkResult
    summary: dict[str, Any]  # the report's "selfheal" entry
    durability: dict[str, Any]
    auth_cache_ttl_s: float


def new_run(args: argparse.Namespace) -> BenchRun:
    started = time.monotonic()
    started_at = datetime.now(UTC).isoformat()
    wrk = ensure_wrk()
    run_id = secrets.token_hex(4)
    workdir = Path(tempfile.mkdtemp(prefix="selfheal-bench-"))
    return BenchRun(args, wrk, run_id, workdir, started, started_at)


def look_at_the_machine(run: BenchRun) -> None:
    """PostgreSQL's settings and postmaster, Redis's port: for the report and CPU accounting."""
    run.pg = pg_settings(run.admin_url)
    run.postmaster = postmaster_pid(run.admin_url)
    run.redis_port = str(urllib.parse.urlsplit(run.args.redis_url).port or 6379)


def create_bench_database(run: BenchRun) -> list[Plugin]:
    """The run's database, migrated, with the installations registered."""
    t0 = time.perf_counter()
    create_database(run.admin_url, run.dbname)
    run.db_created = True
    run_migrations(Settings(database_url=run.db_url, redis_url=run.args.redis_url))
    say(f"database {run.dbname} created and migrated in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    plugins = register_plugins(libpq_url(run.db_url), run.args.plugins, run.args.tenants)
    say(
        f"registered {len(plugins):,} installations of {run.args.tenants} tenants "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    return plugins


def request_files(run: BenchRun) -> RequestFiles:
    return RequestFiles(
        warm=run.workdir / "warmup.tsv",
        main=run.workdir / "requests.tsv",
        warm_count=int(run.args.warmup * run.args.max_rate * 1.5),
        main_count=int(run.args.duration * run.args.max_rate * 1.5),
    )


def selfheal_env(run: BenchRun) -> dict[str, str]:
    """The environment of the API under test (`selfheal api` and the --breakdown variants)."""
    env = {
        **os.environ,
        "DATABASE_URL": run.db_url,
        "REDIS_URL": run.args.redis_url,
        "SELFHEAL_SECRET_KEY": BENCH_SECRET_KEY,
        "SELFHEAL_REDIS_PREFIX": run.redis_prefix,
        "SELFHEAL_DATA_DIR": str(run.workdir / "data"),
        "SELFHEAL_ENV": "dev",
        "LOG_LEVEL": "warning",
    }
    if run.args.auth_cache_ttl is not None:
        env["SELFHEAL_AUTH_CACHE_TTL_S"] = str(run.args.auth_cache_ttl)
    return env


def start_selfheal_api(run: BenchRun, port: int) -> tuple[Server, float]:
    """`selfheal api` starting (not waited for) on `port`; its auth cache TTL."""
    args = run.args
    env = selfheal_env(run)
    auth_ttl = float(
        env.get("SELFHEAL_AUTH_CACHE_TTL_S", Settings.model_fields["auth_cache_ttl_s"].default)
    )
    server = Server(
        "selfheal api",
        [
            str(VENV_BIN / "selfheal"),
            "api",
            "--port",
            str(port),
            "--workers",
            str(args.workers),
        ],
        env,
        run.workdir / "selfheal-api.log",
    )
    run.servers.append(server)
    return server, auth_ttl


def sign_requests(plugins: list[Plugin], files: RequestFiles) -> None:
    """Every request of the run signed into the request files, the first one checked."""
    secs = generate_requests(plugins, files.warm, 0, files.warm_count)
    secs += generate_requests(plugins, files.main, files.warm_count, files.main_count)
    self_check(plugins, files.main)
    size_mb = (files.warm.stat().st_size + files.main.stat().st_size) / 1e6
    say(
        f"signed {files.warm_count + files.main_count:,} unique requests ({size_mb:.0f} MB) "
        f"in {secs:.1f} s with {len(os.sched_getaffinity(0))} processes"
    )


def wrk_options(run: BenchRun) -> dict[str, Any]:
    return {
        "threads": run.args.threads,
        "connections": run.args.connections,
        "workdir": run.workdir,
    }


def warm_up(run: BenchRun, port: int, files: RequestFiles, label: str) -> WrkResult:
    return run_wrk(
        run.wrk, port, files.warm, duration_s=run.args.warmup, label=label, **wrk_options(run)
    )


def measured_run(
    run: BenchRun, server: Server, port: int, files: RequestFiles, label: str
) -> WrkResult:
    """The measured wrk run, with the CPU of each process group."""

    def groups() -> dict[str, set[int]]:
        return process_groups(server, run.admin_url, run.dbname, run.postmaster, run.redis_port)

    return run_wrk(
        run.wrk,
        port,
        files.main,
        duration_s=run.args.duration,
        label=label,
        cpu_groups=groups,
        **wrk_options(run),
    )


def counters(run: BenchRun, port: int) -> Counters:
    rows = settled_count(libpq_url(run.db_url))
    metrics = scrape_metrics(port)
    time.sleep(1.1)  # backends flush their statistics at most once a second
    return Counters(rows, metrics, database_stats(run.admin_url, run.dbname))


def ingest_figures(
    run: BenchRun, sh: WrkResult, warm: WrkResult, before: Counters, after: Counters
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The report's "selfheal" entry (rejections, batch sizes, database work) and whether
    every accepted heartbeat was stored."""
    dbstats = {k: v - before.database.get(k, 0) for k, v in after.database.items()}
    rows_total = count_heartbeats(libpq_url(run.db_url))
    delta = metric_delta(before.metrics, after.metrics)
    rejected = {
        k.split('reason="')[1].rstrip('"}'): int(v)
        for k, v in delta.items()
        if k.startswith("selfheal_heartbeats_rejected_total{")
    }
    # Copies of a stored heartbeat: a 401 replay to wrk too, counted apart by the server.
    if copies := int(delta.get("selfheal_heartbeats_already_stored_total", 0)):
        rejected["replay (already stored)"] = copies
    batches = delta.get("selfheal_ingest_batch_size_count", 0.0)
    mean_batch = delta.get("selfheal_ingest_batch_size_sum", 0.0) / batches if batches else None
    server_accepted_total = int(after.metrics.get("selfheal_heartbeats_accepted_total", 0))
    stored_in_run = after.rows - before.rows
    durable_ok = stored_in_run >= sh.accepted and rows_total >= server_accepted_total
    say(
        f"selfheal: {sh.rate:,.0f} heartbeats/s, p99 {sh.latency_ms['p99']:.1f} ms, "
        f"stored {stored_in_run:,} of {sh.accepted:,} accepted"
    )
    summary: dict[str, Any] = {
        **asdict(sh),
        "rejected": rejected,
        "mean_batch": mean_batch,
        "database": dbstats,
        "warmup": asdict(warm),
    }
    durability = {
        "ok": durable_ok,
        "accepted_by_wrk": sh.accepted,
        "stored_in_run": stored_in_run,
        "server_accepted_total": server_accepted_total,
        "rows_total": rows_total,
    }
    return summary, durability


def measure_selfheal(run: BenchRun, plugins: list[Plugin], files: RequestFiles) -> SelfhealResult:
    """`selfheal api` under the load: warm-up, the measured run, what was stored."""
    port = free_port()
    server, auth_ttl = start_selfheal_api(run, port)
    # Sign right before the run: timestamps must stay inside the signature window.
    sign_requests(plugins, files)
    server.wait_healthy(f"http://127.0.0.1:{port}/health")
    say(f"selfheal api up on port {port} with {run.args.workers} workers")
    warm = warm_up(run, port, files, "selfheal-warmup")
    say(
        f"warm-up: {warm.accepted:,} accepted, {warm.non2xx} non-2xx, "
        f"p99 {warm.latency_ms['p99']:.1f} ms"
    )
    before = counters(run, port)
    sh = measured_run(run, server, port, files, "selfheal")
    after = counters(run, port)
    server.stop()
    run.servers.remove(server)
    summary, durability = ingest_figures(run, sh, warm, before, after)
    return SelfhealResult(sh, summary, durability, auth_ttl)


def measure_bare(run: BenchRun, files: RequestFiles) -> WrkResult | None:
    """The bare endpoint, same load, same request file (None with --skip-bare)."""
    if run.args.skip_bare:
        return None
    workers = run.args.workers
    bport = free_port()
    bare_server = Server(
        "bare app",
        uvicorn_argv("bench.bare_app:app", bport, workers),
        {**os.environ, "PYTHONPATH": str(REPO)},
        run.workdir / "bare-app.log",
    )
    run.servers.append(bare_server)
    bare_server.wait_healthy(f"http://127.0.0.1:{bport}/health")
    say(f"bare app up on port {bport} with {workers} workers")
    warm_up(run, bport, files, "bare-warmup")
    bare = measured_run(run, bare_server, bport, files, "bare")
    bare_server.stop()
    run.servers.remove(bare_server)
    say(f"bare: {bare.rate:,.0f} requests/s, p99 {bare.latency_ms['p99']:.1f} ms")
    return bare


def uvicorn_argv(target: str, port: int, workers: int, *extra: str) -> list[str]:
    """uvicorn as `selfheal api` runs it: uvloop, httptools, no access log."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        target,
        *extra,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--no-access-log",
        "--log-level",
        "warning",
    ]


# --------------------------------------------------------------------------------------------
# --breakdown: where a heartbeat's CPU goes

NO_LIMITS = {"SELFHEAL_RATE_PER_INSTALLATION": "0", "SELFHEAL_RATE_PER_TENANT": "0"}
STATEMENT_BATCHES = (30, 100)
STATEMENT_HEARTBEATS = 12_000  # per batch size: ~1 s of backend CPU, 100 clock ticks


def measure_variant(
    run: BenchRun, plugins: list[Plugin], files: RequestFiles, label: str, *, store: bool
) -> WrkResult:
    """The same load against selfheal with its rate limits off (SELFHEAL_RATE_PER_* = 0, a
    setting), and with `store` False, also with nothing stored (bench/no_storage_app.py)."""
    port = free_port()
    env = {**selfheal_env(run), **NO_LIMITS}
    if store:
        argv = [str(VENV_BIN / "selfheal"), "api", "--port", str(port)]
        argv += ["--workers", str(run.args.workers)]
    else:
        argv = uvicorn_argv("bench.no_storage_app:create_app", port, run.args.workers, "--factory")
        env["PYTHONPATH"] = str(REPO)
    server = Server(label, argv, env, run.workdir / f"{label.replace(' ', '-')}.log")
    run.servers.append(server)
    sign_requests(plugins, files)
    server.wait_healthy(f"http://127.0.0.1:{port}/health")
    warm_up(run, port, files, f"{label}-warmup")
    result = measured_run(run, server, port, files, label)
    server.stop()
    run.servers.remove(server)
    say(f"{label}: {result.rate:,.0f} heartbeats/s, p99 {result.latency_ms['p99']:.1f} ms")
    return result


def statement_cost(run: BenchRun, plugins: list[Plugin]) -> dict[str, float]:
    """PostgreSQL's CPU per heartbeat for the ingest statement alone (INGEST_SQL, the batch
    document the API builds, autocommit, prepared), one statement at a time on one
    connection, by batch size: the database's share of a heartbeat without any HTTP."""
    from app.plugins.ingest import INGEST_SQL, batch_document, batch_row
    from app.plugins.schemas import Heartbeat

    now = datetime.now(UTC)
    # What the run's plugins send, with an uptime above theirs (a lower one is a restart,
    # which the statement also reports).
    heartbeat = Heartbeat.model_validate_json(_gen_body(10**8, now.isoformat()))
    ids = [uuid.UUID(p.id) for p in plugins]
    defaults = Settings()  # the API's own defaults, as the bench's server runs them
    out: dict[str, float] = {}
    with psycopg.connect(libpq_url(run.db_url), autocommit=True, prepare_threshold=1) as conn:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        backend = int(row[0])
        for size in STATEMENT_BATCHES:
            batches = [
                {
                    "batch": batch_document(
                        [
                            batch_row(
                                ids[(b * size + i) % len(ids)], os.urandom(32), heartbeat, now
                            )
                            for i in range(size)
                        ]
                    ),
                    "interval_s": defaults.heartbeat_interval_s,
                    "lease_s": defaults.command_lease_s,
                }
                for b in range(STATEMENT_HEARTBEATS // size)
            ]
            for params in batches[:5]:  # planned and cached first
                conn.execute(INGEST_SQL, params).fetchall()
            before = _read_stat(backend)
            for params in batches[5:]:
                conn.execute(INGEST_SQL, params).fetchall()
            after = _read_stat(backend)
            assert before is not None and after is not None
            heartbeats = (len(batches) - 5) * size
            out[str(size)] = (after[2] - before[2]) / CLK_TCK / heartbeats * 1000
    say(
        "ingest statement alone: "
        + ", ".join(f"batch {k}: {v:.3f} ms/heartbeat" for k, v in out.items())
    )
    return out


def breakdown(
    run: BenchRun,
    plugins: list[Plugin],
    files: RequestFiles,
    selfheal: WrkResult,
    bare: WrkResult | None,
) -> dict[str, Any]:
    """The report's "breakdown": each run's CPU per heartbeat by process group, the ingest
    statement's cost in PostgreSQL, and what 0.6x the bare endpoint leaves for storing."""
    no_limits = measure_variant(run, plugins, files, "limits off", store=True)
    floor = measure_variant(run, plugins, files, "limits off, no storage", store=False)
    runs = {
        "selfheal, as shipped": selfheal,
        "selfheal, rate limits off": no_limits,
        "selfheal, limits off, nothing stored": floor,
    }
    if bare is not None:
        runs["bare endpoint"] = bare
    rows = {label: per_heartbeat(r) for label, r in runs.items()}
    out: dict[str, Any] = {"runs": rows, "statement_ms": statement_cost(run, plugins)}
    if bare is not None:
        budget = rows["bare endpoint"]["machine"] / TARGET_BREAKDOWN_RATIO
        out["budget"] = {
            "ratio": TARGET_BREAKDOWN_RATIO,
            "machine_ms_allowed": budget,
            "floor_ms": rows["selfheal, limits off, nothing stored"]["machine"],
            "left_for_limits_and_storage_ms": budget
            - rows["selfheal, limits off, nothing stored"]["machine"],
            "limits_ms": rows["selfheal, as shipped"]["machine"]
            - rows["selfheal, rate limits off"]["machine"],
            "storage_ms": rows["selfheal, rate limits off"]["machine"]
            - rows["selfheal, limits off, nothing stored"]["machine"],
        }
    return out


BREAKDOWN_GROUPS = {
    "api": "api workers",
    "postgres": "postgres: bench db backends",
    "redis": "redis",
    "wrk": "wrk",
    "machine": "machine (all processes)",
}


def per_heartbeat(r: WrkResult) -> dict[str, float]:
    """heartbeats/s, and ms of CPU per heartbeat of each process group of the run."""
    row = {"rate": r.rate}
    for key, group in BREAKDOWN_GROUPS.items():
        cpu_s = r.cpu.get(group)
        row[key] = cpu_s / r.accepted * 1000 if cpu_s is not None and r.accepted else 0.0
    return row


def print_breakdown(b: dict[str, Any]) -> None:
    print("--breakdown: ms of CPU per heartbeat (every process of the machine), same load:")
    cols = ("machine", "api", "postgres", "redis", "wrk")
    print(f"  {'':38}{'heartbeats/s':>13}" + "".join(f"{c:>10}" for c in cols))
    for label, row in b["runs"].items():
        print(f"  {label:38}{row['rate']:>13,.0f}" + "".join(f"{row[c]:>10.3f}" for c in cols))
    print(
        "  the ingest statement alone, in PostgreSQL (one connection, one statement at a time): "
        + ", ".join(f"batch {k}: {v:.3f}" for k, v in b["statement_ms"].items())
    )
    budget = b.get("budget")
    if budget:
        print(
            f"  {budget['ratio']:g}x the bare endpoint allows {budget['machine_ms_allowed']:.3f} ms"
            f" per heartbeat; with nothing stored and no limits selfheal takes"
            f" {budget['floor_ms']:.3f},"
        )
        print(
            f"  which leaves {budget['left_for_limits_and_storage_ms']:.3f} for rate limits and"
            f" storage; they take {budget['limits_ms']:.3f} + {budget['storage_ms']:.3f}"
            f" = {budget['limits_ms'] + budget['storage_ms']:.3f}"
        )
    print()


def build_report(
    run: BenchRun, files: RequestFiles, selfheal: SelfhealResult, bare: WrkResult | None
) -> dict[str, Any]:
    args, sh = run.args, selfheal.wrk
    return {
        "started_at": run.started_at,
        "config": {
            "plugins": args.plugins,
            "tenants": args.tenants,
            "duration_s": args.duration,
            "connections": args.connections,
            "threads": args.threads,
            "workers": args.workers,
            "max_rate": args.max_rate,
            "warmup_s": args.warmup,
            "requests_generated": files.warm_count + files.main_count,
            "auth_cache_ttl_s": selfheal.auth_cache_ttl_s,
            "nproc": len(os.sched_getaffinity(0)),
            "cpu_model": _cpu_model(),
            "git": _git_head(),
        },
        "postgres": run.pg,
        "selfheal": selfheal.summary,
        "bare": asdict(bare) if bare is not None else None,
        "ratio": (sh.rate / bare.rate) if bare is not None and bare.rate else None,
        "targets": targets(sh, bare),
        "durability": selfheal.durability,
        "bench_seconds": round(time.monotonic() - run.started, 1),
    }


def publish(report: dict[str, Any]) -> None:
    """The table on stdout, the JSON in bench/results/."""
    print_report(report)
    if report.get("breakdown"):
        print_breakdown(report["breakdown"])
    if not report["durability"]["ok"]:
        say("!!! DURABILITY MISMATCH: fewer samples stored than heartbeats accepted !!!")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS_DIR / f"heartbeats-{stamp}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    say(f"results written to {out.relative_to(REPO)}")


def clean_up(run: BenchRun) -> None:
    """Stop what still runs, delete the Redis keys, drop (or keep) the database."""
    for s in run.servers:
        s.stop()
    _cleanup_redis(run.args.redis_url, run.redis_prefix)
    if run.db_created and not run.args.keep_db:
        drop_database(run.admin_url, run.dbname)
        say(f"dropped database {run.dbname}")
    elif run.db_created:
        say(f"kept database {run.dbname}: {libpq_url(run.db_url)}")
    shutil.rmtree(run.workdir, ignore_errors=True)
    say(f"bench took {time.monotonic() - run.started:.0f} s")


def main() -> int:
    run = new_run(parse_args())
    report: dict[str, Any] = {}
    try:
        look_at_the_machine(run)
        plugins = create_bench_database(run)
        files = request_files(run)
        selfheal = measure_selfheal(run, plugins, files)
        bare = measure_bare(run, files)
        report = build_report(run, files, selfheal, bare)
        if run.args.breakdown:
            report["breakdown"] = breakdown(run, plugins, files, selfheal.wrk, bare)
        publish(report)
    finally:
        clean_up(run)
    return 0 if report.get("durability", {}).get("ok") else 1


def _cleanup_redis(url: str, prefix: str) -> None:
    try:
        clean_redis(url, prefix)
    except Exception as exc:
        say(f"could not clean Redis keys {prefix}*: {exc}")


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def _git_head() -> str | None:
    """HEAD, with "+dirty" when app/ or migrations/ differ from it (the code that ran)."""
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "app", "migrations"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return head + ("+dirty" if dirty else "")
    return None


if __name__ == "__main__":
    sys.exit(main())
