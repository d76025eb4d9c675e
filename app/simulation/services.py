"""The processes a self-started simulation (and `selfheal up --demo`) runs: the reference
decision service and staging runner, the API and a worker, each a child process with its
output in a log file of the run directory.

Children get their own session (a Ctrl-C in the terminal reaches the parent only, which stops
them in order) and, on Linux, a parent-death signal, so that they do not outlive a parent
that was killed outright: no orphans either way."""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

_PR_SET_PDEATHSIG = 1
STOP_TIMEOUT_S = 10.0


class StartFailed(RuntimeError):
    """A child could not start; the message says which and ends with its log's tail."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _die_with_parent(parent: int) -> Callable[[], None]:
    def setup() -> None:
        if sys.platform.startswith("linux"):
            with contextlib.suppress(Exception):
                libc = ctypes.CDLL(None, use_errno=True)
                libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl: do not linger
            os._exit(1)

    return setup


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> Child:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(  # noqa: S603 - our own interpreter and modules
                self.argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent(os.getpid()),
            )
        return self

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, chars: int = 2500) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return text[-chars:]

    def failed(self, why: str) -> StartFailed:
        tail = self.tail().strip()
        return StartFailed(
            f"{self.name} {why} (log: {self.log_path})"
            + (f"\n--- log tail ---\n{tail}" if tail else "")
        )


def stop_children(children: Sequence[Child], timeout_s: float = STOP_TIMEOUT_S) -> list[str]:
    """SIGTERM to all at once, then wait (together) up to `timeout_s`; SIGKILL for those
    still running. Returns the names of the ones that had to be killed."""
    running = [c for c in children if c.alive()]
    for child in running:
        assert child.proc is not None
        with contextlib.suppress(ProcessLookupError):
            child.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    killed = []
    for child in running:
        assert child.proc is not None
        try:
            child.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                child.proc.kill()
            child.proc.wait()
            killed.append(child.name)
    return killed


def wait_http(
    child: Child,
    url: str,
    *,
    timeout_s: float = 60.0,
    ready: Callable[[httpx.Response], bool] = lambda r: r.status_code == 200,
    stopping: Callable[[], bool] = lambda: False,
) -> httpx.Response:
    """Poll `url` until `ready(response)`; StartFailed when the child exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while True:
        if not child.alive():
            raise child.failed(f"exited with code {child.proc.returncode if child.proc else '?'}")
        if stopping():
            raise KeyboardInterrupt
        try:
            response = httpx.get(url, timeout=2.0, trust_env=False)
            if ready(response):
                return response
            last = f"HTTP {response.status_code}: {response.text[:200]}"
        except httpx.HTTPError as error:
            last = f"{type(error).__name__}"
        if time.monotonic() > deadline:
            raise child.failed(f"did not become ready at {url} within {timeout_s:g} s ({last})")
        time.sleep(0.2)


@dataclass
class ReferenceServices:
    """The reference decision service and staging runner (python -m sim ...)."""

    run_dir: Path
    truth_file: Path
    env: dict[str, str]
    # Hex: a token starting with "-" would read as an option on the command line.
    sira_token: str = field(default_factory=lambda: secrets.token_hex(24))
    runner_token: str = field(default_factory=lambda: secrets.token_hex(24))
    sira_port: int = field(default_factory=free_port)
    runner_port: int = field(default_factory=free_port)
    children: list[Child] = field(default_factory=list)

    @property
    def sira_url(self) -> str:
        return f"http://127.0.0.1:{self.sira_port}"

    @property
    def runner_url(self) -> str:
        return f"http://127.0.0.1:{self.runner_port}"

    def start(self) -> None:
        python = sys.executable
        self.children = [
            Child(
                "decision service",
                [
                    python,
                    "-m",
                    "sim",
                    "decision-service",
                    "--port",
                    str(self.sira_port),
                    "--token",
                    self.sira_token,
                ],
                self.run_dir / "decision-service.log",
                self.env,
            ).start(),
            Child(
                "staging runner",
                [
                    python,
                    "-m",
                    "sim",
                    "staging-runner",
                    "--port",
                    str(self.runner_port),
                    "--token",
                    self.runner_token,
                    "--truth-file",
                    str(self.truth_file),
                ],
                self.run_dir / "staging-runner.log",
                self.env,
            ).start(),
        ]

    def wait_ready(self, stopping: Callable[[], bool]) -> None:
        for child, url in zip(self.children, (self.sira_url, self.runner_url), strict=True):
            wait_http(child, f"{url}/health", timeout_s=30.0, stopping=stopping)

    def control_plane_env(self) -> dict[str, str]:
        return {
            "SIRA_API_URL": self.sira_url,
            "SIRA_API_TOKEN": self.sira_token,
            "STAGING_RUNNER_URL": self.runner_url,
            "STAGING_RUNNER_TOKEN": self.runner_token,
        }


class DecisionServiceSwitch:
    """Switches the reference decision service's mode (the fleet's decision_service_down) and
    reads its call counters, over its /_control endpoint."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.headers = {"Authorization": f"Bearer {token}"}

    async def set_mode(self, mode: str) -> None:
        async with httpx.AsyncClient(timeout=5.0, trust_env=False) as client:
            response = await client.post(
                f"{self.url}/_control", json={"mode": mode}, headers=self.headers
            )
            response.raise_for_status()

    async def state(self) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=5.0, trust_env=False) as client:
            response = await client.get(f"{self.url}/_control", headers=self.headers)
            response.raise_for_status()
            data: dict[str, Any] = response.json()
            return data


def control_plane_children(
    run_dir: Path, env: dict[str, str], port: int, *, api_log: str = "api.log"
) -> tuple[Child, Child]:
    """`selfheal api --port P` and `selfheal worker`, not started yet."""
    python = sys.executable
    api = Child(
        "API", [python, "-m", "app.cli", "api", "--port", str(port)], run_dir / api_log, env
    )
    worker = Child("worker", [python, "-m", "app.cli", "worker"], run_dir / "worker.log", env)
    return api, worker


def workers_ok(response: httpx.Response) -> bool:
    """/health answers and reports a worker."""
    if response.status_code != 200:
        return False
    with contextlib.suppress(ValueError, KeyError, TypeError):
        return bool(response.json()["components"]["workers"]["status"] == "ok")
    return False
