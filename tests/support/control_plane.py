"""The control plane as a user runs it: `selfheal api` and `selfheal worker` as processes at
default settings, the reference decision service and staging runner as processes, and
simulated plugins that embed the real plugin_client (AsyncAgent) over HTTP and whose webhook
failures depend on the version they run.

The harness of tests/test_e2e_default_settings.py and tests/test_browser.py, as a context manager
that a test module enters from its own fixture."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from redis import Redis as SyncRedis

from app.core.redis import health_check_key
from app.core.settings import Settings
from app.releases.signing import generate_key
from plugin_client import AsyncAgent
from tests.support.plugins import Plugin
from tests.support.ports import free_port
from tests.support.processes import stop_process
from tests.support.services import RUNNER_TOKEN, SIRA_TOKEN, Server
from tests.support.settings import REPO, settings_env

SELFHEAL = [sys.executable, "-m", "app.cli"]


@dataclass
class ControlPlane:
    settings: Settings
    url: str
    sira: Server
    runner: Server
    public_key: str
    env: dict[str, str]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start_api(self) -> None:
        proc = subprocess.Popen(
            [*SELFHEAL, "api", "--port", str(self.settings.port)], env=self.env, cwd=REPO
        )
        self.procs["api"] = proc
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"selfheal api exited with {proc.returncode}"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/health", timeout=1).status_code in (200, 503):
                    return
            assert time.monotonic() < deadline, "selfheal api did not answer within 60 s"
            time.sleep(0.1)

    def start_worker(self) -> None:
        proc = subprocess.Popen([*SELFHEAL, "worker"], env=self.env, cwd=REPO)
        self.procs["worker"] = proc
        redis = SyncRedis.from_url(self.settings.redis_url or "")
        try:
            deadline = time.monotonic() + 60
            while not redis.exists(health_check_key(self.settings)):
                assert proc.poll() is None, f"selfheal worker exited with {proc.returncode}"
                assert time.monotonic() < deadline, "selfheal worker did not report healthy"
                time.sleep(0.1)
        finally:
            redis.close()

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        stop_process(proc, 30)

    def agent(self, plugin: Plugin, version: str, state_dir: Path) -> AsyncAgent:
        return AsyncAgent(
            self.url,
            plugin.id,
            plugin.secret,
            plugin=plugin.name,
            version=version,
            public_keys=[self.public_key],
            state_dir=state_dir,
        )


@contextlib.contextmanager
def control_plane_processes(settings: Settings) -> Iterator[ControlPlane]:
    """The API, a worker and the reference services, all processes, on `settings` (its
    database, Redis prefix, data_dir and port; every timing as given, the defaults unless the
    caller changed them); a release signing key under data_dir. Stopped when the block ends."""
    sira = Server(["sim", "decision-service"], SIRA_TOKEN)
    runner = Server(["sim", "staging-runner"], RUNNER_TOKEN)
    key = generate_key(settings.data_dir / "keys" / "release-signing.pem")
    env = settings_env(settings) | {
        "SELFHEAL_DATA_DIR": str(settings.data_dir),
        "SIRA_API_URL": sira.url,
        "SIRA_API_TOKEN": SIRA_TOKEN,
        "STAGING_RUNNER_URL": runner.url,
        "STAGING_RUNNER_TOKEN": RUNNER_TOKEN,
        "LOG_LEVEL": "info",
    }
    plane = ControlPlane(settings, settings.api_base_url, sira, runner, key.public_key_b64, env)
    try:
        sira.start()
        runner.start()
        plane.start_api()
        plane.start_worker()
        yield plane
    finally:
        for name in ("worker", "api"):
            plane.stop(name)
        sira.stop()
        runner.stop()


@dataclass
class SimulatedPlugin:
    """Counts what a real plugin would: requests and webhook calls, every 0.5 s, failing the
    share of webhooks its running version fails (by the truth given), into the agent; applies
    the updates and rollbacks the control plane sends."""

    agent: AsyncAgent
    webhook_fail_share: Callable[[str], float]
    running: str = ""
    task: asyncio.Task[None] | None = None
    applied: list[tuple[str, str]] = field(default_factory=list)

    def attach(self) -> None:
        self.running = self.agent.version

        @self.agent.on_update
        def _update(version: str, artifact: Path) -> None:
            assert artifact.is_file()
            self.applied.append(("update", version))
            self.running = version

        @self.agent.on_rollback
        def _rollback(version: str) -> None:
            self.applied.append(("rollback", version))
            self.running = version

    async def traffic(self) -> None:
        while True:
            self.agent.record_request(count=20)
            # Five webhook calls per tick, failing that share of them (deterministically).
            failed = round(5 * self.webhook_fail_share(self.running))
            self.agent.record_webhook(ok=False, count=failed)
            self.agent.record_webhook(ok=True, count=5 - failed)
            await asyncio.sleep(0.5)

    async def start(self) -> None:
        self.attach()
        self.task = asyncio.create_task(self.traffic())
        try:
            await self.agent.start()
        except BaseException:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            raise

    async def stop(self) -> None:
        await self.agent.stop()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        await self.agent.aclose()


@contextlib.asynccontextmanager
async def plugins_running(*plugins: SimulatedPlugin) -> AsyncIterator[None]:
    started: list[SimulatedPlugin] = []
    try:
        for plugin in plugins:
            await plugin.start()
            started.append(plugin)
        yield
    finally:
        for plugin in reversed(started):
            await plugin.stop()


def at_defaults(settings: Settings, tmp_path: Path) -> Settings:
    """The test database and Redis prefix, a data dir and a free port: nothing else changed
    (asserted on the timings users meet first)."""
    plain = settings.model_copy(update={"data_dir": tmp_path / "data", "port": free_port()})
    assert (plain.heartbeat_interval_s, plain.health_window_s) == (120, 90)
    assert (plain.recovery_heartbeats, plain.heartbeat_fast_s) == (3, 5)
    return plain
