"""The API fuzzed from its OpenAPI document: 10,000 schemathesis cases (issue 11).

    .venv/bin/python bench/fuzz.py [--cases 10000] [--per-operation 100]

Runs tests/test_fuzz_api.py (a real `selfheal api` process on a fresh copy of the migrated
test database, admin bearer token for /api/ops, HMAC-signed /api/plugins requests) with
SELFHEAL_FUZZ_CASES raised from CI's few hundred, and prints the case count, the statuses,
the cases per operation, the server errors and the schema violations. Needs DATABASE_URL and
REDIS_URL as the tests do (or starts the embedded servers). Exit status: pytest's (0 when
there is no server error and no violation)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument(
        "--per-operation",
        type=int,
        default=100,
        help="cases per operation, generation mode and round (each round has its own seed)",
    )
    args = parser.parse_args()
    env = os.environ | {
        "SELFHEAL_FUZZ_CASES": str(args.cases),
        "SELFHEAL_FUZZ_PER_OPERATION": str(args.per_operation),
    }
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-s",
        "-p",
        "no:cacheprovider",
        "tests/test_fuzz_api.py",
    ]
    return subprocess.call(command, cwd=REPO, env=env)


if __name__ == "__main__":
    sys.exit(main())
