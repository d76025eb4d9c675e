#!/usr/bin/env python3
"""Developer entry points; standard library only, so it runs before anything is installed.

    python3 tasks.py up [args...]      set up .venv, then run `selfheal up [args...]`
    python3 tasks.py check [args...]   set up .venv, then ruff, ruff format --check, mypy,
                                       lint-imports (the layer contracts in pyproject), pytest
                                       (args go to pytest); stops at the first failure
    python3 tasks.py fmt               set up .venv, then ruff format and ruff check --fix

The setup creates .venv when missing and runs `pip install -e '.[dev]'` again whenever
pyproject.toml changed since the last successful install.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / ("python.exe" if os.name == "nt" else "python")
# Kept inside .venv so that a deleted or recreated venv always reinstalls.
STAMP = VENV / ".selfheal-pyproject.sha256"
TYPED_PACKAGES = ("app", "workers", "plugin_client", "sim")
PYTEST_NO_TESTS = 5


def _display(cmd: list[str]) -> str:
    return shlex.join(os.path.relpath(c, ROOT) if c.startswith(str(ROOT)) else c for c in cmd)


def _show(cmd: list[str]) -> None:
    print("+ " + _display(cmd), flush=True)


def _run(cmd: list[str]) -> int:
    _show(cmd)
    return subprocess.call(cmd, cwd=ROOT)  # noqa: S603 - our own fixed commands


def _tool(name: str) -> str:
    return str(BIN / (name + ".exe" if os.name == "nt" else name))


def setup() -> None:
    # Not dead code: this file is run by whatever `python3` the machine has.
    if sys.version_info < (3, 11):  # noqa: UP036
        sys.exit(f"tasks.py needs Python 3.11+, this is {sys.version.split()[0]}: use python3.11")
    if not PYTHON.exists():
        code = _run([sys.executable, "-m", "venv", str(VENV)])
        if code != 0:
            # A half-made venv would pass the PYTHON check next time and never be repaired.
            shutil.rmtree(VENV, ignore_errors=True)
            sys.exit(
                f"creating .venv failed (exit code {code}); on Debian/Ubuntu install "
                "python3-venv (apt-get install python3-venv)"
            )
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    try:
        installed = STAMP.read_text().strip()
    except FileNotFoundError:
        installed = ""
    if installed != digest:
        code = _run([str(PYTHON), "-m", "pip", "install", "-e", ".[dev]"])
        if code != 0:
            sys.exit(code)
        STAMP.write_text(digest + "\n")


def up(args: list[str]) -> None:
    setup()
    cmd = [_tool("selfheal"), "up", *args]
    _show(cmd)
    os.chdir(ROOT)
    sys.stdout.flush()
    os.execv(cmd[0], cmd)  # noqa: S606 - replaces this process, as intended


def check(pytest_args: list[str]) -> int:
    setup()
    # mypy rejects a directory without Python files, e.g. a package folder not written yet.
    packages = [p for p in TYPED_PACKAGES if any((ROOT / p).rglob("*.py"))]
    steps = [
        [_tool("ruff"), "check", "."],
        [_tool("ruff"), "format", "--check", "."],
        *([[_tool("mypy"), *packages]] if packages else []),
        [_tool("lint-imports")],
        [_tool("pytest"), *pytest_args],
    ]
    for cmd in steps:
        code = _run(cmd)
        if code == PYTEST_NO_TESTS and Path(cmd[0]).name.startswith("pytest"):
            print(
                "FAILED: pytest collected no tests (exit code 5); a check that tests nothing "
                "does not pass",
                file=sys.stderr,
            )
            return code
        if code != 0:
            print(f"FAILED (exit code {code}): {_display(cmd)}", file=sys.stderr)
            return code
    print("all checks passed", flush=True)
    return 0


def fmt() -> int:
    setup()
    code = _run([_tool("ruff"), "format", "."])
    if code != 0:
        return code
    return _run([_tool("ruff"), "check", "--fix", "."])


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0 if argv else 2
    command, args = argv[0], argv[1:]
    if command == "up":
        up(args)
        return 0  # not reached: up() execs
    if command == "check":
        return check(args)
    if command == "fmt":
        if args:
            print("fmt takes no arguments", file=sys.stderr)
            return 2
        return fmt()
    print(f"unknown command {command!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
