"""A real PgBouncer in transaction pooling mode in front of the test PostgreSQL, as a child
process with its own configuration in a temporary directory and a free loopback port.

- pgbouncer_unavailable: why none can run here (None when one can); a test skips with it, or
  fails when SELFHEAL_PGBOUNCER_TESTS=required (what .ci/run sets, after installing Debian's
  pgbouncer package).
- running_pgbouncer: the process, its every database name forwarded to the same name on the
  PostgreSQL server of the URL given (so each test's own database works), clients
  authenticated by password (md5, from an auth file holding the application's login), a small
  pool so that clients really share server connections; stopped when the block ends.
- through: a database URL with its host and port replaced by the pooler's."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg

from tests.support.ports import free_port
from tests.support.processes import stop_process

PGBOUNCER = Path(os.environ.get("SELFHEAL_PGBOUNCER", "/usr/sbin/pgbouncer"))
# "required": a pgbouncer that is missing or cannot start fails the test instead of skipping it.
REQUIRED = os.environ.get("SELFHEAL_PGBOUNCER_TESTS", "").strip().lower() == "required"


def pgbouncer_unavailable() -> str | None:
    """Why no PgBouncer can run on this machine; None when one can."""
    if not PGBOUNCER.exists():
        return f"{PGBOUNCER} is missing (apt-get install -y --no-install-recommends pgbouncer)"
    return None


@dataclass(frozen=True)
class PgBouncer:
    host: str
    port: int
    pool_size: int
    directory: Path

    def through(self, url: str) -> str:
        """`url` (any form) with its host and port replaced by the pooler's."""
        parts = urllib.parse.urlsplit(url)
        login = parts.netloc.rpartition("@")[0]
        netloc = f"{login}@{self.host}:{self.port}" if login else f"{self.host}:{self.port}"
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))

    def pool(self, url: str) -> dict[str, int]:
        """SHOW POOLS' counters of the database and user of `url` (a URL through this pooler
        whose login is the first of `logins`): cl_active, cl_waiting, sv_active, sv_idle, ..."""
        parts = urllib.parse.urlsplit(url)
        admin = urllib.parse.urlunsplit(parts._replace(path="/pgbouncer", query=""))
        database = parts.path.lstrip("/")
        user = urllib.parse.unquote(parts.username or "")
        # The admin console speaks the simple query protocol only: a client-side cursor.
        with psycopg.connect(
            admin.replace("postgresql+psycopg://", "postgresql://", 1),
            autocommit=True,
            cursor_factory=psycopg.ClientCursor,
        ) as conn:
            cursor = conn.execute("SHOW POOLS")
            names = [column.name for column in cursor.description or ()]
            for row in cursor.fetchall():
                pool = dict(zip(names, row, strict=True))
                if pool["database"] == database and pool["user"] == user:
                    return {k: v for k, v in pool.items() if isinstance(v, int)}
        raise AssertionError(f"pgbouncer has no pool for {database}/{user}")

    @property
    def log(self) -> str:
        path = self.directory / "pgbouncer.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _quoted(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


@contextlib.contextmanager
def running_pgbouncer(
    server_url: str, logins: dict[str, str], *, pool_size: int = 5
) -> Iterator[PgBouncer]:
    """PgBouncer in transaction mode in front of the PostgreSQL server of `server_url` (the
    server must let PgBouncer's own logins in without a password, as the tests' trust
    authentication on loopback does); `logins` are the user names and passwords clients may
    use. At most `pool_size` server connections per database and user."""
    server = urllib.parse.urlsplit(server_url)
    directory = Path(tempfile.mkdtemp(prefix="selfheal-pgbouncer-"))
    port = free_port()
    auth_file = directory / "userlist.txt"
    auth_file.write_text(
        "".join(f"{_quoted(user)} {_quoted(password)}\n" for user, password in logins.items())
    )
    ini = directory / "pgbouncer.ini"
    ini.write_text(
        "[databases]\n"
        f"* = host={server.hostname or '127.0.0.1'} port={server.port or 5432}\n"
        "[pgbouncer]\n"
        "listen_addr = 127.0.0.1\n"
        f"listen_port = {port}\n"
        f"unix_socket_dir = {directory}\n"
        f"pidfile = {directory / 'pgbouncer.pid'}\n"
        f"logfile = {directory / 'pgbouncer.log'}\n"
        "auth_type = md5\n"
        f"auth_file = {auth_file}\n"
        "pool_mode = transaction\n"
        f"default_pool_size = {pool_size}\n"
        "min_pool_size = 0\n"
        "reserve_pool_size = 0\n"
        "max_client_conn = 500\n"
        "max_db_connections = 0\n"
        # What a production PgBouncer has: none of the startup parameters it cannot pool.
        "ignore_startup_parameters = extra_float_digits\n"
        "server_reset_query =\n"
        "log_connections = 0\n"
        "log_disconnections = 0\n"
        # The first login may read the pooler's figures (SHOW POOLS on database `pgbouncer`).
        f"stats_users = {next(iter(logins))}\n"
    )
    command = [str(PGBOUNCER), "-q", str(ini)]
    if os.geteuid() == 0:
        # PgBouncer refuses to run as root (CI's containers): it drops to `nobody`, which
        # must own its directory (socket, pid and log files).
        command[1:1] = ["-u", "nobody"]
        for path in (directory, auth_file, ini):
            shutil.chown(path, "nobody")
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    bouncer = PgBouncer("127.0.0.1", port, pool_size, directory)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, (
                f"pgbouncer exited with {proc.returncode}: {bouncer.log[-2000:]}"
            )
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            assert time.monotonic() < deadline, "pgbouncer did not listen within 20 s"
            time.sleep(0.05)
        yield bouncer
    finally:
        stop_process(proc, 10)
        shutil.rmtree(directory, ignore_errors=True)
