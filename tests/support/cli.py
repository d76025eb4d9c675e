"""The `selfheal` console script run as a subprocess, the way an operator runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson

SELFHEAL = str(Path(sys.executable).parent / "selfheal")


def runner(env: dict[str, str], cwd: Path):
    """Run `selfheal ARGS` in an empty directory (no stray .env) with `env`; keyword arguments
    set (or, with None, remove) variables for one call."""

    def run(*args: str, **changes: str | None) -> subprocess.CompletedProcess[str]:
        full = dict(env)
        for key, value in changes.items():
            if value is None:
                full.pop(key, None)
            else:
                full[key] = value
        return subprocess.run(
            [SELFHEAL, *args],
            env=full,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    return run


def one_json_object(stdout: str) -> dict[str, Any]:
    lines = stdout.splitlines()
    assert len(lines) == 1, stdout
    data = orjson.loads(lines[0])
    assert isinstance(data, dict)
    return data
