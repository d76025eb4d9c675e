"""`selfheal up` as a fresh machine runs it: no DATABASE_URL, no REDIS_URL. It must start the
embedded PostgreSQL and Redis, migrate, serve, keep data across a restart, and stop everything
on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import psutil
import psycopg

from app.embedded import EmbeddedServices
from app.plugins.signatures import sign
from tests.support.plugins import HEARTBEAT, heartbeat_body
from tests.support.processes import descendants

SELFHEAL = str(Path(sys.executable).parent / "selfheal")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def environment(data_dir: Path, port: int) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SELFHEAL_") and k not in ("DATABASE_URL", "REDIS_URL", "PORT")
    }
    env.update(SELFHEAL_DATA_DIR=str(data_dir), PORT=str(port), LOG_LEVEL="warning")
    return env


def start(env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([SELFHEAL, "up"], env=env, cwd=cwd, stdout=out, stderr=out)


def wait_healthy(
    port: int, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 60
) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"selfheal up exited early:\n{log.read_text()}"
        try:
            response = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
            if response.status_code == 200:
                return response.json()
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"selfheal up not healthy in {timeout_s} s:\n{log.read_text()}")


def stop(proc: subprocess.Popen[bytes]) -> int:
    children = [child for child, _cmdline in descendants(proc.pid)]
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(30)
    _gone, alive = psutil.wait_procs(children, timeout=15)
    assert alive == [], f"left running after SIGTERM: {[str(p) for p in alive]}"
    return code


def cli(env: dict[str, str], cwd: Path, *args: str) -> dict:
    done = subprocess.run(
        [SELFHEAL, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return orjson.loads(done.stdout)


def test_up_serves_on_embedded_services_keeps_data_and_stops_on_sigterm(tmp_path):
    data_dir, port, log = tmp_path / "data", free_port(), tmp_path / "up.log"
    env = environment(data_dir, port)

    proc = start(env, tmp_path, log)
    health = wait_healthy(port, proc, log)
    deadline = time.monotonic() + 20
    while health["components"]["workers"]["status"] != "ok":  # the worker it started
        assert time.monotonic() < deadline, health
        time.sleep(0.2)
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
    assert health["status"] == "ok"
    assert "listening on http://127.0.0.1:" in log.read_text()

    # While `up` runs, the CLI joins its embedded servers (and leaves them running).
    plugin = cli(
        env,
        tmp_path,
        "plugin",
        "register",
        "--tenant",
        "m1",
        "--name",
        "payments",
        "--version",
        "1.2.2",
        "--json",
    )
    body = heartbeat_body(uptime_s=1)
    ts = str(int(time.time()))
    headers = {
        "X-Plugin-Id": plugin["plugin_id"],
        "X-Timestamp": ts,
        "X-Signature": sign(plugin["secret"], ts, "POST", HEARTBEAT, body),
        "Content-Type": "application/json",
    }
    response = httpx.post(f"http://127.0.0.1:{port}{HEARTBEAT}", content=body, headers=headers)
    assert response.status_code == 200, response.text
    assert stop(proc) == 0
    assert "selfheal stopped" in log.read_text()

    # A restart finds the installation and its stored heartbeat: the data survived.
    proc = start(env, tmp_path, log)
    try:
        wait_healthy(port, proc, log)
        ts = str(int(time.time()))
        again = heartbeat_body(uptime_s=2)
        headers.update(
            {"X-Timestamp": ts, "X-Signature": sign(plugin["secret"], ts, "POST", HEARTBEAT, again)}
        )
        response = httpx.post(f"http://127.0.0.1:{port}{HEARTBEAT}", content=again, headers=headers)
        assert response.status_code == 200, response.text
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert "selfheal_heartbeats_accepted_total 1.0" in metrics
        joined = EmbeddedServices(data_dir, redis=False)
        joined.start()
        try:
            assert joined.database_url
            with psycopg.connect(joined.database_url) as conn:
                assert conn.execute("SELECT count(*) FROM plugin_heartbeats").fetchone() == (2,)
        finally:
            joined.stop()  # joined, not started: leaves the server to `selfheal up`
    finally:
        assert stop(proc) == 0
