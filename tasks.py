#!/usr/bin/env python3
"""Developer entry points; standard library only, so it runs before anything is installed.

    python3 tasks.py up [args...]      set up .venv, then run `selfheal up [args...]`
    python3 tasks.py check [args...]   set up .venv, then the vulnerability audit of
                                       requirements.lock (pip-audit), ruff, ruff format --check,
                                       mypy, lint-imports (the layer contracts in pyproject),
                                       pytest (args go to pytest); stops at the first failure
    python3 tasks.py fmt               set up .venv, then ruff format and ruff check --fix
    python3 tasks.py setup             set up .venv only
    python3 tasks.py audit             set up .venv, then the vulnerability audit alone
    python3 tasks.py lock [args...]    write requirements.lock from pyproject.toml with uv
                                       (`uv pip compile`, every extra, every platform, hashes),
                                       keeping the pins it already has; args go to uv, e.g.
                                       --upgrade or --upgrade-package NAME

The setup refuses a requirements.lock that does not match pyproject.toml (run `python3 tasks.py
lock`), creates .venv when missing, and installs exactly the lock (`pip install
--require-hashes -r requirements.lock`, then `pip install --no-deps -e .`) again whenever
pyproject.toml or requirements.lock changed since the last successful install.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / ("python.exe" if os.name == "nt" else "python")
PYPROJECT = ROOT / "pyproject.toml"
LOCK = ROOT / "requirements.lock"
LOCK_COMMAND = "python3 tasks.py lock"
# The line `tasks.py lock` adds to uv's header: the digest of pyproject's dependency
# declarations the lock was made from, so that setup can tell a stale lock.
LOCK_DIGEST_PREFIX = "# pyproject.toml dependencies sha256: "
# The oldest Python the lock must install on (requires-python); uv resolves for it and newer.
LOCK_PYTHON = "3.11"
# Kept inside .venv so that a deleted or recreated venv always reinstalls.
STAMP = VENV / ".selfheal-install.sha256"
# The audit's own bound: pip-audit asks PyPI once per locked package, 15 s at most each.
AUDIT_TIMEOUT_S = 300
AUDIT_HTTP_TIMEOUT_S = 15
# Where the audit reads a project's data when pip-audit cannot get a release's (see audit()).
AUDIT_PYPI_URL_VARIABLE = "SELFHEAL_AUDIT_PYPI_URL"
PIP_AUDIT_NOT_FOUND = "Dependency not found on PyPI"
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


def _require_python() -> None:
    # Not dead code: this file is run by whatever `python3` the machine has.
    if sys.version_info < (3, 11):  # noqa: UP036
        sys.exit(f"tasks.py needs Python 3.11+, this is {sys.version.split()[0]}: use python3.11")


def _ensure_venv() -> None:
    if PYTHON.exists():
        return
    code = _run([sys.executable, "-m", "venv", str(VENV)])
    if code != 0:
        # A half-made venv would pass the PYTHON check next time and never be repaired.
        shutil.rmtree(VENV, ignore_errors=True)
        sys.exit(
            f"creating .venv failed (exit code {code}); on Debian/Ubuntu install "
            "python3-venv (apt-get install python3-venv)"
        )


def canonical_name(name: str) -> str:
    """A distribution name as PyPI compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared(pyproject: Path) -> tuple[dict[str, Any], list[str]]:
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        requirements.extend(extra)
    return project, requirements


def dependency_digest(pyproject: Path) -> str:
    """SHA-256 of what pyproject.toml declares about dependencies, whatever its layout."""
    project, _ = _declared(pyproject)
    canonical = {
        "requires-python": project.get("requires-python", ""),
        "dependencies": sorted(" ".join(r.split()) for r in project.get("dependencies", [])),
        "optional-dependencies": {
            extra: sorted(" ".join(r.split()) for r in requirements)
            for extra, requirements in project.get("optional-dependencies", {}).items()
        },
    }
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()


def declared_names(pyproject: Path) -> set[str]:
    """The distributions pyproject.toml names, runtime and every extra."""
    _, requirements = _declared(pyproject)
    names = set()
    for requirement in requirements:
        match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
        if match:
            names.add(canonical_name(match.group(1)))
    return names


def locked_pins(lock_text: str) -> dict[str, str]:
    """{canonical name: pinned version} of a requirements lock."""
    pins = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)", lock_text, re.M)
    return {canonical_name(name): version for name, version in pins}


def lock_problems(pyproject: Path = PYPROJECT, lock: Path = LOCK) -> list[str]:
    """Why `lock` does not match `pyproject`; empty when it does."""
    if not lock.exists():
        return [f"{lock.name} is missing"]
    text = lock.read_text()
    problems = []
    missing = sorted(declared_names(pyproject) - set(locked_pins(text)))
    if missing:
        problems.append(f"not locked: {', '.join(missing)}")
    recorded = [line for line in text.splitlines() if line.startswith(LOCK_DIGEST_PREFIX)]
    if not recorded:
        problems.append(f"{lock.name} does not say which pyproject.toml it was made from")
    elif recorded[0].removeprefix(LOCK_DIGEST_PREFIX).strip() != dependency_digest(pyproject):
        problems.append(
            f"the dependencies in {pyproject.name} changed since {lock.name} was written"
        )
    return problems


def _check_lock() -> None:
    problems = lock_problems()
    if problems:
        sys.exit(
            f"{LOCK.name} does not match {PYPROJECT.name}: {'; '.join(problems)}.\n"
            f"Run `{LOCK_COMMAND}` (it keeps the versions already pinned) and commit "
            f"{LOCK.name}."
        )


def setup() -> None:
    _require_python()
    _check_lock()
    _ensure_venv()
    digest = hashlib.sha256(PYPROJECT.read_bytes() + b"\0" + LOCK.read_bytes()).hexdigest()
    try:
        installed = STAMP.read_text().strip()
    except FileNotFoundError:
        installed = ""
    if installed != digest:
        # Exactly the locked versions, each checked against its hash; then this project alone.
        pip = [str(PYTHON), "-m", "pip", "install"]
        for cmd in (
            [*pip, "--require-hashes", "-r", str(LOCK)],
            [*pip, "--no-deps", "-e", "."],
        ):
            code = _run(cmd)
            if code != 0:
                sys.exit(code)
        STAMP.write_text(digest + "\n")


def _locked_block(lock_text: str, name: str) -> str | None:
    """The lines of `name`'s pin in a lock (the pin and its hashes), if it has one."""
    lines = lock_text.splitlines()
    for i, line in enumerate(lines):
        if re.match(rf"{re.escape(name)}==", line):
            block = [line]
            while block[-1].rstrip().endswith("\\") and i + len(block) < len(lines):
                block.append(lines[i + len(block)])
            return "\n".join(block) + "\n"
    return None


def lock(uv_args: list[str]) -> int:
    _require_python()
    _ensure_venv()
    uv = _tool("uv")
    if not Path(uv).exists():
        # uv is a dev dependency; before the first setup (or with a stale lock) install the
        # locked uv, hash-checked, or the newest one when the lock has none yet.
        block = _locked_block(LOCK.read_text(), "uv") if LOCK.exists() else None
        with tempfile.TemporaryDirectory() as tmp:
            pin = Path(tmp) / "uv.txt"
            pin.write_text(block or "uv\n")
            hashed = ["--require-hashes"] if block else []
            code = _run([str(PYTHON), "-m", "pip", "install", "--no-deps", *hashed, "-r", str(pin)])
        if code != 0:
            return code
    cmd = [
        uv,
        "pip",
        "compile",
        "--quiet",
        PYPROJECT.name,
        "--all-extras",
        "--universal",
        "--python-version",
        LOCK_PYTHON,
        "--generate-hashes",
        "--custom-compile-command",
        LOCK_COMMAND,
        "--output-file",
        LOCK.name,
        *uv_args,
    ]
    code = _run(cmd)
    if code != 0:
        print(f"FAILED (exit code {code}): uv could not lock the dependencies", file=sys.stderr)
        return code
    lines = LOCK.read_text().splitlines(keepends=True)
    lines = [line for line in lines if not line.startswith(LOCK_DIGEST_PREFIX)]
    header = 0
    while header < len(lines) and lines[header].startswith("#"):
        header += 1
    lines.insert(header, LOCK_DIGEST_PREFIX + dependency_digest(PYPROJECT) + "\n")
    LOCK.write_text("".join(lines))
    print(f"wrote {LOCK.name}; commit it with {PYPROJECT.name}", flush=True)
    return 0


# (name, version, advisory ids, fixed in)
Finding = tuple[str, str, list[str], list[str]]


def _describe(findings: list[Finding]) -> list[str]:
    """One line per advisory: PyPI lists one under each database's id (PYSEC, GHSA)."""
    lines = []
    seen: dict[str, set[str]] = {}
    for name, version, ids, fixed_in in findings:
        known = seen.setdefault(name, set())
        if known.intersection(ids):
            continue
        known.update(ids)
        fix = f"fixed in {', '.join(fixed_in)}" if fixed_in else "no fixed release yet"
        also = f" (also {', '.join(ids[1:])})" if len(ids) > 1 else ""
        lines.append(f"{name} {version}: {ids[0]}{also}, {fix}")
    return lines


def _latest_release_audit(base: str, name: str, version: str) -> tuple[list[Finding], str | None]:
    """(vulnerabilities of `name` `version`, None), or ([], why it could not be audited).

    PyPI's project JSON lists the known vulnerabilities of the project's latest release, so
    it answers for a pin that is that release; raises OSError when the service cannot be
    reached.
    """
    url = f"{base.rstrip('/')}/pypi/{name}/json"
    try:
        # A fixed https (or configured) URL, not user input.
        with urllib.request.urlopen(url, timeout=AUDIT_HTTP_TIMEOUT_S) as response:  # noqa: S310
            data = json.load(response)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 404:
            return [], f"{name} {version}: not on {base}"
        raise OSError(f"{url}: HTTP {e.code}") from e
    except (urllib.error.URLError, TimeoutError, ValueError) as e:
        raise OSError(f"{url}: {e}") from e
    latest = str(data.get("info", {}).get("version", ""))
    if latest != version:
        return [], f"{name} {version}: only the latest release ({latest}) has data here"
    found: list[Finding] = [
        (name, version, [v["id"], *v.get("aliases", [])], list(v.get("fixed_in", [])))
        for v in data.get("vulnerabilities", [])
        if not v.get("withdrawn")
    ]
    return found, None


def audit(lock_path: Path = LOCK) -> int:
    """Fail on a known vulnerability in a locked release, or when the audit cannot run.

    pip-audit reads the lock (hashes required, no pip resolution) and asks PyPI's JSON API
    for each release's known vulnerabilities (PyPI takes them from the OSV / PyPA advisory
    database). Where that per-release data is not served (HTTP 404 for a release PyPI has,
    e.g. behind a registry proxy that passes only the project pages), each such release is
    checked against its project's page, which lists the vulnerabilities of the latest
    release: exact for a pin that is the latest release; any other is reported as not
    audited.
    """
    pins = locked_pins(lock_path.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "pip-audit.json"
        cmd = [
            _tool("pip-audit"),
            "--requirement",
            str(lock_path),
            "--require-hashes",
            "--disable-pip",
            "--progress-spinner",
            "off",
            "--format",
            "json",
            "--output",
            str(report),
        ]
        _show(cmd)
        try:
            done = subprocess.run(  # noqa: S603 - our own fixed command
                cmd, cwd=ROOT, capture_output=True, text=True, timeout=AUDIT_TIMEOUT_S
            )
        except subprocess.TimeoutExpired:
            print(
                f"FAILED: the vulnerability audit did not finish within {AUDIT_TIMEOUT_S} s "
                "(pip-audit asking PyPI's JSON API at https://pypi.org); nothing was audited",
                file=sys.stderr,
            )
            return 1
        try:
            dependencies = json.loads(report.read_text())["dependencies"]
        except (OSError, ValueError, KeyError):
            said = (done.stdout + done.stderr).strip().splitlines()
            # A traceback's last line is its error; the rest is noise here.
            print("\n".join(said if len(said) <= 10 else ["...", *said[-3:]]), file=sys.stderr)
            print(
                f"FAILED (pip-audit exit code {done.returncode}, output above): the "
                "vulnerability audit could not run, so nothing was audited. It needs PyPI's "
                "JSON API (https://pypi.org/pypi/NAME/VERSION/json).",
                file=sys.stderr,
            )
            return done.returncode or 1
    found: list[Finding] = []
    not_audited: list[str] = []
    not_served: list[str] = []
    for dependency in dependencies:
        name = canonical_name(dependency["name"])
        reason = dependency.get("skip_reason")
        if reason is None:
            for v in dependency.get("vulns", []):
                ids = [v["id"], *v.get("aliases", [])]
                found.append((name, dependency["version"], ids, list(v.get("fix_versions", []))))
        elif reason.startswith(PIP_AUDIT_NOT_FOUND) and name in pins:
            not_served.append(name)
        else:
            not_audited.append(f"{name}: {reason}")
    audited = len(dependencies) - len(not_served) - len(not_audited)
    if not_served:
        base = os.environ.get(AUDIT_PYPI_URL_VARIABLE) or "https://pypi.org"
        print(
            f"audit: no per-release vulnerability data for {len(not_served)} locked releases "
            f"(HTTP 404); checking them against each project's latest release on {base}",
            flush=True,
        )
        with ThreadPoolExecutor(max_workers=8) as pool:
            futures = [pool.submit(_latest_release_audit, base, n, pins[n]) for n in not_served]
            try:
                results = [f.result() for f in futures]
            except OSError as e:
                print(
                    f"FAILED: the vulnerability audit could not reach {base} ({e}), so "
                    "the locked releases were not audited",
                    file=sys.stderr,
                )
                return 1
        for vulns, why_not in results:
            found.extend(vulns)
            if why_not is None:
                audited += 1
            else:
                not_audited.append(why_not)
    if not_audited:
        print(
            f"WARNING: {len(not_audited)} locked releases could not be audited here:\n  "
            + "\n  ".join(not_audited),
            file=sys.stderr,
        )
    if audited == 0 and dependencies:
        print(
            f"FAILED: none of the {len(dependencies)} locked releases could be audited",
            file=sys.stderr,
        )
        return 1
    if found:
        names = sorted({name for name, *_ in found})
        print(
            f"FAILED: known vulnerabilities in {lock_path.name}:\n  "
            + "\n  ".join(_describe(found))
            + f"\nBump them: `{LOCK_COMMAND} "
            + " ".join(f"--upgrade-package {n}" for n in names)
            + "`, then commit the lock (with no fixed release: drop or replace it).",
            file=sys.stderr,
        )
        return 1
    print(f"audit: no known vulnerabilities in {audited} locked releases", flush=True)
    return 0


def up(args: list[str]) -> None:
    setup()
    cmd = [_tool("selfheal"), "up", *args]
    _show(cmd)
    os.chdir(ROOT)
    sys.stdout.flush()
    os.execv(cmd[0], cmd)  # noqa: S606 - replaces this process, as intended


def xdist_options(pytest_args: list[str]) -> list[str]:
    """pytest-xdist's options for the suite: SELFHEAL_TEST_WORKERS processes (default: twice
    the cores, at least 2: most tests wait on servers and child processes, not on a core; on
    a 2-core machine 4 processes take the suite from about 14 to about 5 minutes).
    Nothing when the arguments choose already (`-n`, `--numprocesses`, `-p no:xdist`)."""
    chosen = any(
        arg in ("-n", "--numprocesses", "no:xdist", "-pno:xdist")
        or arg.startswith(("-n", "--numprocesses=", "--dist"))
        for arg in pytest_args
    )
    if chosen:
        return []
    workers = os.environ.get("SELFHEAL_TEST_WORKERS") or str(max(2, 2 * (os.cpu_count() or 1)))
    return ["-n", workers]


def check(pytest_args: list[str]) -> int:
    setup()
    code = audit()
    if code != 0:
        return code
    # mypy rejects a directory without Python files, e.g. a package folder not written yet.
    packages = [p for p in TYPED_PACKAGES if any((ROOT / p).rglob("*.py"))]
    steps = [
        [_tool("ruff"), "check", "."],
        [_tool("ruff"), "format", "--check", "."],
        *([[_tool("mypy"), *packages]] if packages else []),
        [_tool("lint-imports")],
        [_tool("pytest"), *xdist_options(pytest_args), *pytest_args],
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
    if command == "lock":
        return lock(args)
    if command in ("fmt", "audit", "setup"):
        if args:
            print(f"{command} takes no arguments", file=sys.stderr)
            return 2
        if command == "fmt":
            return fmt()
        setup()
        return audit() if command == "audit" else 0
    print(f"unknown command {command!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
