"""What PgBouncer in transaction pooling mode costs the heartbeat path and the ORM: the same
work straight to PostgreSQL (prepared statements, the statement timeout as a startup option)
and through a real PgBouncer 1.18+ with SELFHEAL_DB_POOLER=transaction (nothing prepared, the
timeout set per ORM transaction), in one run on the same database.

    .venv/bin/python bench/pgbouncer.py [--plugins 200] [--heartbeats 4000] [--concurrency 32]
        [--queries 2000] [--pool-size 5] [--pg-url postgresql://postgres@127.0.0.1:5432/postgres]
        [--redis-url redis://127.0.0.1:6379/0]

- ingest: signed heartbeats through an API instance in this process (ASGI, no HTTP server),
  `--concurrency` at a time over `--plugins` installations (rate limits off): heartbeats/s and
  the p50/p99 of one heartbeat, which includes the micro-batching wait.
Three rows: direct; direct with SELFHEAL_DB_POOLER=transaction (what the mode's code paths cost
without the pooler: no prepared statements, SET LOCAL per transaction); through PgBouncer.
- orm: `--queries` one-query transactions on the ORM engine, one after another (the ops API's
  shape): transactions/s, whose difference is the SET LOCAL round trip and the unprepared
  statement.

Needs /usr/sbin/pgbouncer, PostgreSQL with trust authentication on loopback for the
application's login (as the tests have it) and Redis. Prints a table; it is not a test."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from sqlalchemy import text  # noqa: E402

from app.cli import run_migrations  # noqa: E402
from app.core.db import create_engine  # noqa: E402
from app.core.settings import Settings  # noqa: E402
from tests.support.api import serve  # noqa: E402
from tests.support.databases import clean_redis, create_database, drop_database  # noqa: E402
from tests.support.detection import beat  # noqa: E402
from tests.support.pgbouncer import pgbouncer_unavailable, running_pgbouncer  # noqa: E402
from tests.support.plugins import Plugin, register  # noqa: E402
from tests.support.settings import APP_LOGIN, APP_PASSWORD, make_settings  # noqa: E402


async def ingest(settings: Settings, plugins: list[Plugin], total: int, concurrency: int) -> str:
    latencies: list[float] = []
    async with serve(settings) as (_, client):
        for plugin in plugins:  # credentials cached, connections open: not measured
            await beat(client, plugin)
        queue = iter(range(total))

        async def sender() -> None:
            for n in queue:
                started = time.perf_counter()
                await beat(client, plugins[n % len(plugins)])
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(sender() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    cuts = statistics.quantiles(latencies, n=100)
    return (
        f"{total / elapsed:8.0f} heartbeats/s   p50 {cuts[49] * 1000:6.1f} ms"
        f"   p99 {cuts[98] * 1000:6.1f} ms"
    )


async def orm(settings: Settings, queries: int) -> str:
    engine = create_engine(settings, role="bench")
    try:
        statement = text("SELECT count(*) FROM merchant_plugins WHERE tenant_id = :t")
        async with engine.connect() as conn:
            await conn.execute(statement, {"t": "merchant-0"})
        started = time.perf_counter()
        for _ in range(queries):
            async with engine.connect() as conn:
                await conn.execute(statement, {"t": "merchant-0"})
        elapsed = time.perf_counter() - started
    finally:
        await engine.dispose()
    return f"{queries / elapsed:8.0f} transactions/s"


async def run(args: argparse.Namespace) -> None:
    name = f"selfheal_bench_{uuid.uuid4().hex[:10]}"
    owner_url = create_database(args.pg_url, name)
    prefix = f"selfheal-bench:{uuid.uuid4().hex[:8]}:"
    direct = make_settings(
        owner_url, args.redis_url, prefix, rate_per_installation=0, rate_per_tenant=0
    )
    try:
        run_migrations(direct)
        plugins = [
            await register(direct, tenant=f"merchant-{n % 10}", name="payments")
            for n in range(args.plugins)
        ]
        with running_pgbouncer(
            owner_url, {APP_LOGIN: APP_PASSWORD}, pool_size=args.pool_size
        ) as bouncer:
            assert direct.database_url
            pooled = direct.model_copy(
                update={
                    "database_url": bouncer.through(direct.database_url),
                    "db_pooler": "transaction",
                    "database_direct_url": direct.database_url,
                }
            )
            rows: list[tuple[str, str, str]] = []
            # The middle row: the pooler mode's code paths without the pooler's hop.
            unprepared = direct.model_copy(update={"db_pooler": "transaction"})
            modes = (("direct", direct), ("direct+mode", unprepared), ("pgbouncer", pooled))
            for label, settings in modes:
                rows.append(
                    (
                        label,
                        await ingest(settings, plugins, args.heartbeats, args.concurrency),
                        await orm(settings, args.queries),
                    )
                )
        print(
            f"\n{args.plugins} plugins, {args.heartbeats} heartbeats at {args.concurrency} in"
            f" flight, {args.queries} ORM transactions; PgBouncer pool {args.pool_size}"
        )
        for label, ingest_figure, orm_figure in rows:
            print(f"{label:<12} ingest {ingest_figure}   orm {orm_figure}")
    finally:
        drop_database(args.pg_url, name)
        clean_redis(args.redis_url, prefix)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--plugins", type=int, default=200)
    parser.add_argument("--heartbeats", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--pool-size", type=int, default=5)
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    reason = pgbouncer_unavailable()
    if reason is not None:
        raise SystemExit(reason)
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
