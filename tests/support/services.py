"""The reference services (sim's decision service and staging runner), each in its own process
on loopback, started with `python -m <module> --port P --token T` and their tokens."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import httpx

from tests.support.ports import free_port
from tests.support.settings import REPO

SIRA_TOKEN = "sim-sira-token"
RUNNER_TOKEN = "sim-runner-token"


class Server:
    """A reference service in its own process, started with `python -m <module>`.

    With `log`, its output goes to that file and it runs in a session of its own (a Ctrl-C in
    a benchmark's terminal reaches the benchmark only, which then stops it)."""

    def __init__(
        self,
        module: list[str],
        token: str,
        port: int | None = None,
        args: Sequence[str] = (),
        *,
        log: Path | None = None,
    ) -> None:
        self.module = module
        self.token = token
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = list(args)  # the service's own options
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self._out: IO[bytes] | None = None

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        self.launch()
        self.wait_ready()

    def launch(self) -> None:
        """Start the process without waiting for it to answer."""
        argv = [
            sys.executable,
            "-m",
            *self.module,
            "--port",
            str(self.port),
            "--token",
            self.token,
            *self.args,
        ]
        if self.log is None:
            self.proc = subprocess.Popen(argv, cwd=REPO)
            return
        self._close_log()
        self._out = self.log.open("ab")
        self.proc = subprocess.Popen(
            argv, cwd=REPO, stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_ready(self, timeout_s: float = 15) -> None:
        """Until its /health answers 200."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.proc.poll() is None, (
                f"{self.module} exited with {self.proc.returncode}{self._tail()}"
            )
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/health", timeout=0.5).status_code == 200:
                    return
            assert time.monotonic() < deadline, (
                f"{self.module} did not answer within {timeout_s:g} s{self._tail()}"
            )
            time.sleep(0.05)

    def kill(self) -> None:
        """Down hard, as a crashed host would be: no graceful close of anything."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(5)

    def stop(self) -> None:
        try:
            if self.proc is None or self.proc.poll() is not None:
                return
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        finally:
            self._close_log()

    def control(self, **changes: Any) -> dict[str, Any]:
        response = httpx.post(f"{self.url}/_control", json=changes, headers=self.auth)
        response.raise_for_status()
        state: dict[str, Any] = response.json()
        return state

    def decide_calls(self) -> int:
        response = httpx.get(f"{self.url}/_control", headers=self.auth)
        calls: int = response.json()["calls"].get("/api/sira/decide", 0)
        return calls

    def _tail(self, chars: int = 3000) -> str:
        if self.log is None or self._out is None:
            return ""
        self._out.flush()
        return "; log tail:\n" + self.log.read_text(errors="replace")[-chars:]

    def _close_log(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None


@contextlib.contextmanager
def running(module: list[str], token: str, *args: str) -> Iterator[Server]:
    server = Server(module, token, args=args)
    server.start()
    try:
        yield server
    finally:
        server.stop()
