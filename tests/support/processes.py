"""Child processes of tests: the tree a supervisor started, and a real `selfheal worker`."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
from redis import Redis as SyncRedis

from app.core.settings import Settings
from tests.support.settings import REPO, settings_env


def stop_process(proc: subprocess.Popen[bytes], wait_s: float = 20) -> None:
    """SIGTERM (the process's graceful shutdown), then SIGKILL if it has not ended within
    `wait_s`; returns once it is gone. A process already ended is left as it is."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def descendants(pid: int) -> list[tuple[psutil.Process, str]]:
    """The processes `pid` started, directly or not, with their command lines.

    A process that exits while we look (gone, or a zombie not yet reaped) is skipped:
    the tree of a running supervisor changes under us.
    """
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for child in children:
        try:
            found.append((child, " ".join(child.cmdline())))
        except psutil.NoSuchProcess:  # ZombieProcess included
            continue
    return found


def catches_sigterm(pid: int) -> bool:
    """Whether process `pid` has installed a SIGTERM handler (Linux: SigCgt in its status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True  # not Linux, or gone: the caller's other checks decide
    for line in status.splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return True


@contextlib.asynccontextmanager
async def running_worker(settings: Settings) -> AsyncIterator[subprocess.Popen[bytes]]:
    """A real `selfheal worker` process on the test's database and Redis prefix; stopped with
    SIGTERM (its graceful shutdown) when the block ends."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "worker"], env=settings_env(settings), cwd=REPO
    )
    key = f"{settings.redis_prefix}arq:queue:health-check"
    client = SyncRedis.from_url(settings.redis_url or "")
    try:
        deadline = time.monotonic() + 20
        # Healthy (the key is per queue: another worker may have written it) and this process
        # handles SIGTERM, so the block's end stops it gracefully, not by the default action.
        while not (client.exists(key) and catches_sigterm(proc.pid)):
            assert proc.poll() is None, f"selfheal worker exited with {proc.returncode}"
            assert time.monotonic() < deadline, "selfheal worker did not report healthy"
            await asyncio.sleep(0.05)
        yield proc
    finally:
        client.close()
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, 20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError("selfheal worker did not stop within 20 s of SIGTERM") from None
        assert proc.returncode == 0, f"selfheal worker exited with {proc.returncode}"
