"""A reference staging runner (docs/contracts.md "Staging runner"): it really smoke-tests artifacts.

`POST /runs {"plugin", "from_version", "to_version", "artifact"}` answers 202
`{"id", "status": "running", "report"}` at once; the run goes on in the background and
`GET /runs/{id}` reports "running" until it is over, then "passed" or "failed". A run:

1. fetch: `artifact` is an http(s) URL (one plain GET, redirects followed only to http(s),
   size-capped, time-bounded), a `file://` URL or an absolute path;
2. unpack: safely (sim/artifacts.py) into a temporary folder, removed afterwards;
3. manifest: plugin.yaml must name the plugin and to_version of the request;
4. with `simulated: true` in plugin.yaml, the fleet simulator's truth file decides (re-read
   on every run; a version it does not list passes);
   otherwise import / instantiate / smoke in a fresh Python process (cwd = plugin root,
   killed after `--smoke-timeout-s`): import the entry point, instantiate the class, call its
   `selfheal_smoke()` (or `health()`) when it has one; a falsy return or an exception fails.

The report is `{"summary", "checks": [{"name", "passed", "detail"}], "output": {"stdout",
"stderr"}}` (output only when a process ran), the first failed check saying what failed.
This is a smoke test, not a sandbox: the plugin runs with the runner's user rights.

Test switches: `POST /_control {"fail_versions": [...], "delay_s": 0.2, "mode":
"normal|error", "smoke_timeout_s": 30}`. A version in fail_versions fails at once (check
"forced"), without fetching anything; delay_s is the least time a run reports "running"; mode
"error" answers every run request with HTTP 500. fail_versions and delay_s are fixed per run
when it starts.

Run: `python -m sim staging-runner --port 8301 --token T [--truth-file F]`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urljoin, urlsplit

import httpx
from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from sim.artifacts import ArtifactError, read_manifest, unpack_artifact
from sim.serving import bearer_guard, serve_from_command_line

RunnerMode = Literal["normal", "error"]
Outcome = Literal["passed", "failed"]
MAX_RUNS = 10_000
MAX_SMOKE_PROCESSES = 4
MAX_FETCHES = 8
MAX_ARTIFACT_BYTES = 256 * 1024 * 1024
MAX_REDIRECTS = 5
OUTPUT_TAIL_CHARS = 2_000
DETAIL_CHARS = 1_000
STAGES = ("import", "instantiate", "smoke")

# Runs in the smoke process (`python -I -c HARNESS ENTRY_POINT RESULTS_FILE`). Each stage
# appends one JSON line to RESULTS_FILE as soon as it is known, so a run killed at the
# timeout still tells which stage it was in. os._exit: a plugin's stray non-daemon thread
# must not keep a finished smoke test alive until the timeout.
HARNESS = r"""
import asyncio, importlib, inspect, json, os, sys

sys.dont_write_bytecode = True
sys.path.insert(0, os.getcwd())
ENTRY, RESULTS = sys.argv[1], sys.argv[2]


def record(name, passed, detail):
    with open(RESULTS, "a", encoding="utf-8") as out:
        out.write(json.dumps({"name": name, "passed": passed, "detail": detail}) + "\n")


def describe(error):
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= 500 else text[:497] + "..."


def finish(code):
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


async def wait_for(awaitable):
    return await awaitable


module_name, _, attribute = ENTRY.partition(":")
try:
    target = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
except BaseException as error:
    record("import", False, f"importing {ENTRY} raised {describe(error)}")
    finish(1)
record("import", True, f"imported {ENTRY}")
try:
    plugin = target()
except BaseException as error:
    record("instantiate", False, f"{attribute}() raised {describe(error)}")
    finish(1)
record("instantiate", True, f"{attribute}() created")
for method_name in ("selfheal_smoke", "health"):
    method = getattr(plugin, method_name, None)
    if callable(method):
        break
else:
    record("smoke", True, "no selfheal_smoke() or health() method: import and instantiation only")
    finish(0)
try:
    result = method()
    if inspect.isawaitable(result):
        result = asyncio.run(wait_for(result))
except BaseException as error:
    record("smoke", False, f"{method_name}() raised {describe(error)}")
    finish(1)
shown = repr(result)
shown = shown if len(shown) <= 200 else shown[:197] + "..."
if not result:
    record("smoke", False, f"{method_name}() returned {shown}")
    finish(1)
record("smoke", True, f"{method_name}() returned {shown}")
finish(0)
"""


class RunRequest(BaseModel):
    plugin: str = Field(min_length=1, max_length=200)
    from_version: str | None = Field(default=None, max_length=128)
    to_version: str = Field(min_length=1, max_length=128)
    artifact: str = Field(min_length=1, max_length=8192)


class Control(BaseModel):
    fail_versions: list[str] | None = None
    delay_s: float | None = Field(default=None, ge=0)
    mode: RunnerMode | None = None
    smoke_timeout_s: float | None = Field(default=None, gt=0)


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    passed: bool
    detail: str

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "passed": self.passed, "detail": self.detail}


class CheckFailed(Exception):
    def __init__(self, name: str, detail: str) -> None:
        super().__init__(f"{name}: {detail}")
        self.check = Check(name, False, _short(detail))


@dataclass
class Run:
    id: str
    request: RunRequest
    ready_at: float  # monotonic; a run never reports finished before (delay_s)
    checks: list[Check] = field(default_factory=list)
    outcome: Outcome | None = None
    output: dict[str, str] | None = None

    @property
    def target(self) -> str:
        request = self.request
        return f"{request.plugin} {request.from_version} -> {request.to_version}"

    def status(self, now: float) -> str:
        if self.outcome is None or now < self.ready_at:
            return "running"
        return self.outcome

    def as_json(self, now: float) -> dict[str, Any]:
        status = self.status(now)
        report: dict[str, Any] = {"summary": self._summary(status)}
        report["checks"] = [check.as_json() for check in self.checks]
        if self.output is not None:
            report["output"] = self.output
        return {"id": self.id, "status": status, "report": report}

    def _summary(self, status: str) -> str:
        if status == "running":
            return f"staging {self.target}"
        if status == "passed":
            return f"{self.target}: all checks passed"
        failed = next((check for check in self.checks if not check.passed), None)
        if failed is None:  # not reached: a failed run has a failed check
            return f"{self.target}: failed"
        return f"{self.target}: {failed.name} check failed: {_short(failed.detail, 300)}"


@dataclass
class RunnerConfig:
    delay_s: float = 0.2
    smoke_timeout_s: float = 30.0
    truth_file: Path | None = None
    max_runs: int = MAX_RUNS
    max_smoke_processes: int = MAX_SMOKE_PROCESSES
    max_artifact_bytes: int = MAX_ARTIFACT_BYTES
    fetch_timeout_s: float = 60.0
    work_dir: Path | None = None


@dataclass
class RunnerState:
    config: RunnerConfig
    fail_versions: set[str] = field(default_factory=set)
    mode: RunnerMode = "normal"
    runs: OrderedDict[str, Run] = field(default_factory=OrderedDict)

    def remember(self, run: Run) -> None:
        self.runs[run.id] = run
        # The oldest runs go first; asking for one of them later gets a 404, which the
        # control plane treats as a lost run and starts again.
        while len(self.runs) > self.config.max_runs:
            self.runs.popitem(last=False)

    def as_json(self) -> dict[str, Any]:
        config = self.config
        return {
            "delay_s": config.delay_s,
            "fail_versions": sorted(self.fail_versions),
            "mode": self.mode,
            "smoke_timeout_s": config.smoke_timeout_s,
            "truth_file": None if config.truth_file is None else str(config.truth_file),
            "runs": len(self.runs),
            "running": sum(1 for run in self.runs.values() if run.outcome is None),
        }


class Stager:
    """Carries out runs: one asyncio task each, bounded by two semaphores (fetch + unpack,
    and smoke processes) so a burst of runs queues instead of exhausting the machine."""

    def __init__(self, config: RunnerConfig, http: httpx.AsyncClient) -> None:
        self.config = config
        self.http = http
        self.fetching = asyncio.Semaphore(MAX_FETCHES)
        self.smoking = asyncio.Semaphore(config.max_smoke_processes)
        self.tasks: set[asyncio.Task[None]] = set()

    def start(self, run: Run, *, forced: bool) -> None:
        task = asyncio.create_task(self._execute(run, forced=forced), name=f"run-{run.id}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _execute(self, run: Run, *, forced: bool) -> None:
        if forced:
            detail = f"forced by _control: fail_versions includes {run.request.to_version}"
            run.checks.append(Check("forced", False, detail))
            run.outcome = "failed"
            return
        work: Path | None = None
        try:
            work = Path(
                await asyncio.to_thread(
                    tempfile.mkdtemp, prefix="staging-", dir=self.config.work_dir
                )
            )
            await self._stage(run, work)
            run.outcome = "passed"
        except CheckFailed as failure:
            run.checks.append(failure.check)
            run.outcome = "failed"
        except Exception as error:  # a bug (or a missing --work-dir) still ends the run
            run.checks.append(Check("runner", False, _short(f"{type(error).__name__}: {error}")))
            run.outcome = "failed"
        finally:
            if work is not None:
                await asyncio.to_thread(shutil.rmtree, work, True)

    async def _stage(self, run: Run, work: Path) -> None:
        request = run.request
        async with self.fetching:
            archive, fetched = await self._fetch(request.artifact, work)
            run.checks.append(Check("fetch", True, fetched))
            try:
                root = await asyncio.to_thread(unpack_artifact, archive, work / "plugin")
            except ArtifactError as error:
                raise CheckFailed("unpack", str(error)) from None
            run.checks.append(Check("unpack", True, f"plugin folder {root.relative_to(work)}"))
        try:
            manifest = await asyncio.to_thread(read_manifest, root)
        except ArtifactError as error:
            raise CheckFailed("manifest", str(error)) from None
        expected = (request.plugin, request.to_version)
        if (manifest.name, manifest.version) != expected:
            raise CheckFailed(
                "manifest",
                f"plugin.yaml says {manifest.name} {manifest.version}, the run is for"
                f" {request.plugin} {request.to_version}",
            )
        run.checks.append(
            Check(
                "manifest",
                True,
                f"{manifest.name} {manifest.version}, entry point {manifest.entry_point}"
                + (", simulated" if manifest.simulated else ""),
            )
        )
        if manifest.simulated:
            run.checks.append(await self._simulated_smoke(request))
            return
        async with self.smoking:
            await self._smoke(run, root, manifest.entry_point, work)

    # --- fetch -------------------------------------------------------------------------------

    async def _fetch(self, artifact: str, work: Path) -> tuple[Path, str]:
        """The artifact as a local file, and a line for the report (size and sha256)."""
        parts = urlsplit(artifact)
        if parts.scheme in {"http", "https"}:
            path = work / "artifact"
            try:
                async with asyncio.timeout(self.config.fetch_timeout_s):
                    size = await self._download(artifact, path)
            except TimeoutError:
                raise CheckFailed(
                    "fetch",
                    f"{_public(artifact)}: no complete answer within"
                    f" {self.config.fetch_timeout_s:g} s",
                ) from None
            except httpx.HTTPError as error:
                raise CheckFailed(
                    "fetch", f"{_public(artifact)}: {type(error).__name__}: {error}"
                ) from None
            where = _public(artifact)
        elif parts.scheme == "file" or (not parts.scheme and artifact.startswith("/")):
            if parts.scheme == "file" and parts.netloc not in {"", "localhost"}:
                raise CheckFailed("fetch", f"file URL on another host ({parts.netloc})")
            path = Path(unquote(parts.path) if parts.scheme == "file" else artifact)
            size = await asyncio.to_thread(self._local_size, path)
            where = str(path)
        else:
            shown = parts.scheme or "a relative path"
            raise CheckFailed(
                "fetch",
                f"unsupported artifact location ({shown}): use http(s)://, file:// or an"
                " absolute path",
            )
        digest = await asyncio.to_thread(_sha256, path)
        return path, f"{size} bytes from {where}, sha256 {digest}"

    def _local_size(self, path: Path) -> int:
        try:
            info = path.stat()
        except OSError as error:
            raise CheckFailed("fetch", f"{path}: {error.strerror or error}") from None
        if not path.is_file():
            raise CheckFailed("fetch", f"{path} is not a file")
        if info.st_size > self.config.max_artifact_bytes:
            raise CheckFailed(
                "fetch", f"{path} is larger than {self.config.max_artifact_bytes} bytes"
            )
        return info.st_size

    async def _download(self, url: str, path: Path) -> int:
        """One GET per hop; redirects are followed by hand so that only http(s) targets are
        (and never https -> http)."""
        limit = self.config.max_artifact_bytes
        for _ in range(MAX_REDIRECTS + 1):
            async with self.http.stream("GET", url, follow_redirects=False) as response:
                if response.is_redirect:
                    url = self._next_hop(url, response.headers.get("location", ""))
                    continue
                if response.status_code != 200:
                    raise CheckFailed("fetch", f"HTTP {response.status_code} from {_public(url)}")
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > limit:
                    raise CheckFailed("fetch", f"{_public(url)} is larger than {limit} bytes")
                size = 0
                handle = await asyncio.to_thread(path.open, "wb")
                try:
                    async for chunk in response.aiter_bytes(1024 * 1024):
                        size += len(chunk)
                        if size > limit:
                            raise CheckFailed(
                                "fetch", f"{_public(url)} is larger than {limit} bytes"
                            )
                        await asyncio.to_thread(handle.write, chunk)
                finally:
                    await asyncio.to_thread(handle.close)
                return size
        raise CheckFailed("fetch", f"more than {MAX_REDIRECTS} redirects from {_public(url)}")

    @staticmethod
    def _next_hop(url: str, location: str) -> str:
        target = urljoin(url, location)
        scheme = urlsplit(target).scheme
        if scheme not in {"http", "https"}:
            raise CheckFailed(
                "fetch", f"{_public(url)} redirects to a {scheme or 'relative'} URL: refused"
            )
        if urlsplit(url).scheme == "https" and scheme == "http":
            raise CheckFailed("fetch", f"{_public(url)} redirects from https to http: refused")
        return target

    # --- smoke -------------------------------------------------------------------------------

    async def _simulated_smoke(self, request: RunRequest) -> Check:
        truth_file = self.config.truth_file
        if truth_file is None:
            return Check("smoke", True, "simulated plugin, no truth file")
        truth = await asyncio.to_thread(_read_truth, truth_file)
        if truth is None:
            return Check(
                "smoke", True, f"simulated plugin, truth file {truth_file} not written yet"
            )
        entry = truth.get(request.plugin, {}).get(request.to_version)
        if entry is None:
            return Check("smoke", True, "simulated plugin, not listed in the truth file: passes")
        detail = entry.get("detail")
        if entry.get("passes_staging", True) is False:
            raise CheckFailed(
                "smoke", str(detail) if detail else "simulated plugin fails per the truth file"
            )
        return Check("smoke", True, str(detail) if detail else "passes per the truth file")

    async def _smoke(self, run: Run, root: Path, entry_point: str, work: Path) -> None:
        results = work / "smoke-results.jsonl"
        stdout_path, stderr_path = work / "stdout.txt", work / "stderr.txt"
        timeout = self.config.smoke_timeout_s
        env = {
            "PATH": os.environ.get("PATH", os.defpath),
            "HOME": str(work),
            "LANG": "C.UTF-8",
            "SELFHEAL_STAGING": "1",
        }
        with stdout_path.open("wb") as stdout, stderr_path.open("wb") as stderr:
            # -I: no PYTHON* variables, no user site, no cwd on sys.path (the harness adds
            # the plugin root itself). Its own session, so a timeout kills grandchildren too.
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-I",
                "-c",
                HARNESS,
                entry_point,
                str(results),
                cwd=root,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
            )
            timed_out = False
            try:
                await asyncio.wait_for(process.wait(), timeout)
            except TimeoutError:
                timed_out = True
            finally:
                if process.returncode is None:
                    _kill_group(process.pid)
                    await process.wait()
        checks = await asyncio.to_thread(_read_results, results)
        run.output = {
            "stdout": await asyncio.to_thread(_tail, stdout_path),
            "stderr": await asyncio.to_thread(_tail, stderr_path),
        }
        run.checks.extend(check for check in checks if check.passed)
        failed = next((check for check in checks if not check.passed), None)
        if failed is not None:
            raise CheckFailed(failed.name, failed.detail)
        if len(checks) == len(STAGES):
            return
        stage = STAGES[len(checks)]
        if timed_out:
            raise CheckFailed(stage, f"timed out after {timeout:g} s")
        detail = f"the smoke process exited with code {_exit_status(process.returncode)}"
        last_line = run.output["stderr"].strip().rsplit("\n", 1)[-1]
        raise CheckFailed(stage, detail + (f": {last_line}" if last_line else ""))


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _exit_status(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"{code} ({signal.Signals(-code).name})"
    return str(code)


def _read_results(path: Path) -> list[Check]:
    checks: list[Check] = []
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return checks
    for line in lines:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            item = json.loads(line)
            if item["name"] in STAGES and len(checks) < len(STAGES):
                checks.append(Check(item["name"], bool(item["passed"]), _short(item["detail"])))
    return checks


def _tail(path: Path) -> str:
    with path.open("rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        handle.seek(max(0, size - OUTPUT_TAIL_CHARS * 4))
        text = handle.read().decode("utf-8", errors="replace")
    return text[-OUTPUT_TAIL_CHARS:]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def _read_truth(path: Path) -> dict[str, dict[str, dict[str, Any]]] | None:
    """The fleet simulator's truth file, or None when it does not exist (yet). A file that is
    there but unreadable fails the run: passing a plugin on a broken truth would hide it."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as error:
        raise CheckFailed("truth", f"cannot read the truth file {path}: {error}") from None
    try:
        data = json.loads(text)
    except ValueError as error:
        raise CheckFailed("truth", f"the truth file {path} is not JSON: {error}") from None
    valid = isinstance(data, dict) and all(
        isinstance(versions, dict) and all(isinstance(entry, dict) for entry in versions.values())
        for versions in data.values()
    )
    if not valid:
        raise CheckFailed(
            "truth",
            f"the truth file {path} is not {{plugin: {{version: {{passes_staging, detail}}}}}}",
        )
    truth: dict[str, dict[str, dict[str, Any]]] = data
    return truth


def _public(url: str) -> str:
    """The URL without credentials or query: a pre-signed capability URL must not end up in
    reports and logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}" + ("?..." if parts.query else "")


def _short(text: str, limit: int = DETAIL_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def create_app(
    token: str,
    *,
    delay_s: float = 0.2,
    smoke_timeout_s: float = 30.0,
    truth_file: Path | None = None,
    max_runs: int = MAX_RUNS,
    max_smoke_processes: int = MAX_SMOKE_PROCESSES,
    max_artifact_bytes: int = MAX_ARTIFACT_BYTES,
    fetch_timeout_s: float = 60.0,
    work_dir: Path | None = None,
) -> FastAPI:
    config = RunnerConfig(
        delay_s=delay_s,
        smoke_timeout_s=smoke_timeout_s,
        truth_file=truth_file,
        max_runs=max_runs,
        max_smoke_processes=max_smoke_processes,
        max_artifact_bytes=max_artifact_bytes,
        fetch_timeout_s=fetch_timeout_s,
        work_dir=work_dir,
    )
    state = RunnerState(config=config)
    authorized = Depends(bearer_guard(token))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        timeout = httpx.Timeout(fetch_timeout_s, connect=min(10.0, fetch_timeout_s))
        async with httpx.AsyncClient(timeout=timeout, trust_env=False) as http:
            stager = Stager(config, http)
            app.state.stager = stager
            try:
                yield
            finally:
                await stager.close()

    app = FastAPI(
        title="reference staging runner", docs_url=None, redoc_url=None, lifespan=lifespan
    )
    app.state.runner = state

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/runs", dependencies=[authorized], status_code=202, response_model=None)
    async def start_run(body: RunRequest) -> dict[str, Any] | JSONResponse:
        if state.mode == "error":
            return JSONResponse({"detail": "simulated failure"}, status_code=500)
        now = time.monotonic()
        run = Run(id=str(uuid.uuid4()), request=body, ready_at=now + config.delay_s)
        state.remember(run)
        app.state.stager.start(run, forced=body.to_version in state.fail_versions)
        return run.as_json(now)

    @app.get("/runs/{run_id}", dependencies=[authorized], response_model=None)
    async def show_run(run_id: str) -> dict[str, Any] | JSONResponse:
        if state.mode == "error":
            return JSONResponse({"detail": "simulated failure"}, status_code=500)
        run = state.runs.get(run_id)
        if run is None:
            raise HTTPException(status_code=404, detail="no such run")
        return run.as_json(time.monotonic())

    @app.get("/_control", dependencies=[authorized])
    async def show_control() -> dict[str, Any]:
        return state.as_json()

    @app.post("/_control", dependencies=[authorized])
    async def control(body: Control) -> dict[str, Any]:
        if body.fail_versions is not None:
            state.fail_versions = set(body.fail_versions)
        if body.delay_s is not None:
            config.delay_s = body.delay_s
        if body.mode is not None:
            state.mode = body.mode
        if body.smoke_timeout_s is not None:
            config.smoke_timeout_s = body.smoke_timeout_s
        return state.as_json()

    return app


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--delay-s", type=float, default=0.2, help="least time a run reports running (0.2)"
    )
    parser.add_argument(
        "--smoke-timeout-s",
        type=float,
        default=30.0,
        help="the smoke process is killed after this long and the run fails (30)",
    )
    parser.add_argument(
        "--truth-file",
        type=Path,
        default=None,
        help="the fleet simulator's JSON truth for simulated plugins (re-read on every run)",
    )
    parser.add_argument(
        "--max-runs", type=int, default=MAX_RUNS, help="runs kept in memory (10000)"
    )
    parser.add_argument(
        "--max-smoke-processes",
        type=int,
        default=MAX_SMOKE_PROCESSES,
        help="smoke processes at the same time (4)",
    )
    parser.add_argument(
        "--max-artifact-mib", type=int, default=256, help="largest artifact fetched (256)"
    )
    parser.add_argument(
        "--fetch-timeout-s", type=float, default=60.0, help="time to fetch an artifact (60)"
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="where runs unpack artifacts (default: the system's temporary folder)",
    )


def _build(args: argparse.Namespace) -> FastAPI:
    return create_app(
        args.token,
        delay_s=args.delay_s,
        smoke_timeout_s=args.smoke_timeout_s,
        truth_file=args.truth_file,
        max_runs=args.max_runs,
        max_smoke_processes=args.max_smoke_processes,
        max_artifact_bytes=args.max_artifact_mib * 1024 * 1024,
        fetch_timeout_s=args.fetch_timeout_s,
        work_dir=args.work_dir,
    )


def main(argv: list[str] | None = None) -> None:
    serve_from_command_line(
        "Reference staging runner for selfheal tests and demos.",
        "STAGING_RUNNER_TOKEN",
        _build,
        argv,
        _options,
        prog="python -m sim staging-runner",
    )


if __name__ == "__main__":
    main()
