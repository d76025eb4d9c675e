"""Fault runs: processes killed and servers restarted under load, with real processes.

    .venv/bin/python bench/faults.py [--kills 50] [--workers 3] [--timings quick|default]
        [--seed N] [--api-kills 5]
        [--outages 1] [--outage-s 10] [--only workers|api|postgres|redis ...] [--keep-db]
        [--pg-url postgresql://postgres@127.0.0.1:5432/postgres]
        [--redis-url redis://127.0.0.1:6379/0]

The scenarios are tests/support/faults.py's, which tests/test_faults.py runs in short:
  workers   --workers `selfheal worker` processes heal plugins that fall sick three at a time;
            --kills times, after a random delay while an incident is in a heal step, one
            worker is SIGKILLed and another started. After each kill and at the end: at most
            one attempt in flight per incident and per installation, one command of a type per
            attempt, no command handed out twice (counted by the plugins and in
            plugin_agent_commands.delivery_count); in the end every sick plugin healed.
            --timings quick (the default, as CI runs it): a 5-s heal lease, a 30-s health
            window, plugins beating every 0.3 s. --timings default: the product's settings,
            plugins beating when the control plane asks, kills 0.5-20 s apart.
  api       two `selfheal api` processes under heartbeat load from plugins that embed the
            real plugin_client (AsyncAgent); --api-kills times one is SIGKILLed and started
            again. The agents try again as they decide (a heartbeat whose fate is unknown goes
            again as the same signed bytes; a copy of a stored one gets a signed 401 replay);
            every heartbeat must be stored at most once, and the requests the plugins counted
            must all be stored, once.
  postgres  a private PostgreSQL (the embedded one, under a temp dir) stopped and started
            --outages times under load, down for --outage-s seconds: 503 and never 500 while it is down, /health 503
            "down", and the recovery of the API, /health and the worker measured.
  redis     the same with a private Redis (the embedded one).
The machine's PostgreSQL and Redis hold the databases and keys of the runs (never stopped).
Exit status 1 on any violation. Seeds are printed: `--seed N` replays a run's kill times."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # tests.support, when run as `python bench/faults.py`
    sys.path.insert(0, str(REPO))

from app.core.migrations import run_migrations  # noqa: E402
from app.core.settings import Settings  # noqa: E402
from tests.support import faults  # noqa: E402
from tests.support.databases import clean_redis, create_database, drop_database  # noqa: E402
from tests.support.ports import free_port  # noqa: E402
from tests.support.settings import make_settings  # noqa: E402

RESULTS_DIR = REPO / "bench" / "results"
SCENARIOS = ("workers", "api", "postgres", "redis")


def say(message: str) -> None:
    print(f"[faults] {message}", flush=True)


@contextlib.asynccontextmanager
async def fresh(args: argparse.Namespace, workdir: Path) -> AsyncIterator[Settings]:
    """A new migrated database on the machine's PostgreSQL and a Redis prefix of its own,
    dropped and deleted afterwards (the database kept with --keep-db)."""
    name = f"selfheal_faults_{uuid.uuid4().hex[:8]}"
    prefix = f"selfheal-faults:{uuid.uuid4().hex[:8]}:"
    owner_url = create_database(args.pg_url, name)
    try:
        settings = make_settings(
            owner_url, args.redis_url, prefix, data_dir=workdir / "data", port=free_port()
        )
        await asyncio.to_thread(run_migrations, settings)
        yield settings
    finally:
        clean_redis(args.redis_url, prefix)
        if args.keep_db:
            say(f"kept database {name}")
        else:
            drop_database(args.pg_url, name)


def show(title: str, figures: dict[str, Any], violations: list[str]) -> None:
    print(f"\n== {title}", flush=True)
    for key, value in figures.items():
        print(f"  {key}: {value}")
    for violation in violations[:50]:
        print(f"  !!! {violation}")
    if len(violations) > 50:
        print(f"  !!! ... and {len(violations) - 50} more")


async def run(args: argparse.Namespace) -> int:
    results: dict[str, Any] = {"seed": args.seed, "started": datetime.now(UTC).isoformat()}
    failed = 0
    with tempfile.TemporaryDirectory(prefix="selfheal-faults-") as tmp:
        root = Path(tmp)
        if "workers" in args.only:
            workdir = root / "workers"
            workdir.mkdir()
            started = time.monotonic()
            async with fresh(args, workdir) as settings:
                say(
                    f"workers: {args.kills} kills of {args.workers} workers, seed {args.seed},"
                    f" {args.timings} timings"
                )
                report = await faults.worker_kills(
                    settings,
                    workdir,
                    kills=args.kills,
                    seed=args.seed,
                    workers=args.workers,
                    quick=args.timings == "quick",
                    say=say,
                )
            figures = report.figures() | {
                "timings": args.timings,
                "wall seconds": round(time.monotonic() - started, 1),
            }
            show("kill -9 of a worker mid-step", figures, report.violations)
            results["workers"] = figures | {"violations": report.violations}
            failed += bool(report.violations)
        if "api" in args.only:
            workdir = root / "api"
            workdir.mkdir()
            started = time.monotonic()
            async with fresh(args, workdir) as settings:
                say(f"api: {args.api_kills} kills of one of two API processes, seed {args.seed}")
                api = await faults.api_kills(
                    settings, workdir, kills=args.api_kills, seed=args.seed, say=say
                )
            figures = api.figures() | {"wall seconds": round(time.monotonic() - started, 1)}
            show("kill -9 of an API process under ingest load", figures, api.violations)
            results["api"] = figures | {"violations": api.violations}
            failed += bool(api.violations)
        for server in ("postgres", "redis"):
            if server not in args.only:
                continue
            for n in range(args.outages):
                workdir = root / f"{server}-{n}"
                workdir.mkdir()
                prefix = f"selfheal-faults:{uuid.uuid4().hex[:8]}:"
                say(f"{server}: restart {n + 1} of {args.outages}")
                if server == "postgres":
                    async with faults.private_postgres(workdir, args.redis_url, prefix) as (
                        private,
                        settings,
                    ):
                        outage = await faults.outage(
                            settings, workdir, private, down_for_s=args.outage_s, say=say
                        )
                    clean_redis(args.redis_url, prefix)
                else:
                    async with fresh(args, workdir) as shared:
                        async with faults.private_redis(
                            workdir, shared.migration_url or "", prefix
                        ) as (private, settings):
                            outage = await faults.outage(
                                settings, workdir, private, down_for_s=args.outage_s, say=say
                            )
                show(f"{server} restart {n + 1} under load", outage.figures(), outage.violations)
                results[f"{server}-{n}"] = outage.figures() | {"violations": outage.violations}
                failed += bool(outage.violations)
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"faults-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nresults: {path}")
    print("PASS: no violation" if not failed else f"FAIL: violations in {failed} scenario(s)")
    return 1 if failed else 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kills", type=int, default=50, help="worker kills (50)")
    parser.add_argument("--workers", type=int, default=3, help="worker processes (3)")
    parser.add_argument("--api-kills", type=int, default=5, help="API process kills (5)")
    parser.add_argument("--outages", type=int, default=1, help="restarts of each server (1)")
    parser.add_argument(
        "--outage-s", type=float, default=10.0, help="each server stays down this long (10)"
    )
    parser.add_argument(
        "--timings",
        choices=("quick", "default"),
        default="quick",
        help="workers scenario: quick (CI's timings: a 5-s heal lease, a 30-s health window,"
        " plugins beating every 0.3 s) or default (the product's settings, plugins beating when"
        " asked; about 9 minutes for 50 kills)",
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed (a new one)")
    parser.add_argument(
        "--only", nargs="+", choices=SCENARIOS, default=list(SCENARIOS), help="scenarios to run"
    )
    parser.add_argument("--keep-db", action="store_true", help="keep each run's database")
    parser.add_argument(
        "--pg-url",
        default=os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
    )
    parser.add_argument(
        "--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    args = parser.parse_args()
    if args.kills < 1 or args.workers < 2 or args.api_kills < 1 or args.outages < 1:
        parser.error("--kills, --api-kills and --outages at least 1, --workers at least 2")
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**32)
    return args


def main() -> None:
    args = parse_args()
    # Each failed try of the API scenario's agents would print a warning: the report counts them.
    logging.basicConfig()
    logging.getLogger("plugin_client").setLevel(logging.ERROR)
    say(f"seed {args.seed}")
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
