"""`EmbeddedServices`: the embedded PostgreSQL and Redis of one data dir, started and stopped
together.

The PostgreSQL part is in `postgres.py`, the Redis part in `redis.py`, the process handling
they share in `supervise.py`; this module holds the lock, the atexit hook and the order.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from app.embedded import supervise
from app.embedded.postgres import PG_APP_USER, PG_DATABASE, PG_SUPERUSER, _PostgresMixin
from app.embedded.redis import _RedisMixin
from app.embedded.supervise import (
    LOOPBACK,
    START_TIMEOUT_S,
    EmbeddedServiceError,
    _file_lock,
    _stop_server,
)


class EmbeddedServices(_PostgresMixin, _RedisMixin):
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
        # The application's login, and the owner's (migrations), both with their passwords.
        self.database_url: str | None = None
        self.database_owner_url: str | None = None
        self.redis_url: str | None = None
        self.postgres_log_path = self.data_dir / "postgres.log"
        self.redis_log_path = self.data_dir / "redis.log"
        self._pg: supervise.Server | None = None
        self._redis: supervise.Server | None = None
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
                        passwords = self.postgres_passwords()
                        where = f"{LOOPBACK}:{self._pg.port}/{PG_DATABASE}"
                        self.database_url = (
                            f"postgresql://{PG_APP_USER}:{passwords[PG_APP_USER]}@{where}"
                        )
                        self.database_owner_url = (
                            f"postgresql://{PG_SUPERUSER}:{passwords[PG_SUPERUSER]}@{where}"
                        )
                    if self.redis_enabled and self._redis is None:
                        self._redis = self._start_redis()
                        self.redis_url = self.redis_url_for(self._redis.port)
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
                self.database_url = self.database_owner_url = self.redis_url = None
                self._temp_socket_dir = None
                return
            errors: list[str] = []
            # Redis first: the API stops depending on it sooner, and PostgreSQL's fast shutdown
            # is the one that may take a moment to checkpoint.
            for attr in ("_redis", "_pg"):
                server: supervise.Server | None = getattr(self, attr)
                if server is None:
                    continue
                try:
                    _stop_server(server)
                except EmbeddedServiceError as exc:
                    errors.append(str(exc))
                setattr(self, attr, None)
            self.database_url = None
            self.database_owner_url = None
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
