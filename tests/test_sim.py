"""End to end: the reference decision service and staging runner as real processes on
loopback (the decision service learning from feedback, the staging runner smoke-testing real
artifacts), DecisionClient against the decision service in each of its moods, killed, and
restarted; and sim/artifacts.py's building and safe unpacking in process."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import io
import json
import os
import re
import stat
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.decisions import (
    CircuitBreaker,
    DecisionClient,
    Feedback,
    LocalEvidence,
    OutcomeStats,
)
from sim.artifacts import (
    ManifestError,
    UnsafeArtifact,
    build_plugin_artifact,
    read_manifest,
    unpack_artifact,
)
from sim.staging_runner import Run, RunnerConfig, RunnerState, RunRequest
from tests.support.decisions import incident
from tests.support.services import RUNNER_TOKEN, SIRA_TOKEN, Server, running
from tests.support.settings import REPO

CANDIDATES = ["1.2.3", "1.10.0", "1.9.0"]


@pytest.fixture(scope="module")
def sira_process() -> Iterator[Server]:
    with running(["sim.decision_service"], SIRA_TOKEN) as server:
        yield server


@pytest.fixture
def sira(sira_process: Server) -> Server:
    """The shared process, in normal mode and with nothing learned: each test starts alike."""
    sira_process.control(mode="normal", slow_s=30, regression_strategy="rollback", reset=True)
    return sira_process


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the staging runner unpacks, so tests can see it clean up (and nothing escape)."""
    return tmp_path_factory.mktemp("runner") / "work"


@pytest.fixture(scope="module")
def runner_process(work_dir: Path) -> Iterator[Server]:
    work_dir.mkdir()
    options = ["--smoke-timeout-s", "20", "--work-dir", str(work_dir)]
    with running(["sim", "staging-runner"], RUNNER_TOKEN, *options) as server:
        yield server


@pytest.fixture
def runner(runner_process: Server) -> Server:
    runner_process.control(mode="normal", fail_versions=[], delay_s=0.05, smoke_timeout_s=20)
    return runner_process


@contextlib.asynccontextmanager
async def decision_client(server: Server, **options: Any) -> AsyncIterator[DecisionClient]:
    options.setdefault("token", server.token)
    options.setdefault("deadline_s", 1.0)
    options.setdefault("backoff_base_s", 0.02)
    options.setdefault("backoff_max_s", 0.05)
    async with httpx.AsyncClient() as http:
        yield DecisionClient(http, base_url=server.url, **options)


# Our own records say 1.9.0 healed this often: what the fallback patches to.
EVIDENCE = LocalEvidence(outcomes={"1.9.0": OutcomeStats(successes=40, failures=1)})


# --- decision service ------------------------------------------------------------------------


async def test_normal_service_decisions_are_used(sira: Server) -> None:
    cases = [
        (incident(), CANDIDATES, ("patch", "1.10.0", 0.87)),
        (incident(type="error_spike"), CANDIDATES, ("patch", "1.10.0", 0.87)),
        (incident(type="regression"), CANDIDATES, ("rollback", "1.2.1", 0.9)),
        (incident(type="heartbeat_missed"), CANDIDATES, ("escalate", None, 0.8)),
        # Nothing to patch to: back to the known-good version, or a human when there is none.
        (incident(), [], ("rollback", "1.2.1", 0.9)),
        (incident(previous_version=None), [], ("escalate", None, 0.5)),
        # A patch goes forward only.
        (incident(previous_version=None), ["1.2.1", "1.2.2"], ("escalate", None, 0.5)),
    ]
    async with decision_client(sira) as client:
        for facts, candidates, expected in cases:
            decision = await client.decide(facts, candidates, EVIDENCE)
            assert (decision.action, decision.patch_version, decision.confidence) == expected
            assert decision.source == "sira"
    assert client.breaker.state == "closed"


async def test_feedback_reaches_the_service(sira: Server) -> None:
    feedback = Feedback(
        incident_id="inc-fb",
        attempt_id="att-fb",
        incident_type="webhook_fail_rate",
        plugin="payments",
        from_version="1.2.2",
        to_version="1.10.0",
        decision_source="sira",
        confidence=0.87,
        outcome="success",
    )
    async with decision_client(sira) as client:
        await client.send_feedback(feedback)
    listed = httpx.get(f"{sira.url}/api/sira/feedback", headers=sira.auth).json()["items"]
    assert [item for item in listed if item["attempt_id"] == "att-fb"] == [feedback.as_json()]


async def test_slow_service_is_cut_off_at_the_deadline_and_fallback_decides(
    sira: Server,
) -> None:
    sira.control(mode="slow", slow_s=5)
    async with decision_client(sira, deadline_s=0.5) as client:
        started = time.monotonic()
        decision = await client.decide(incident(), CANDIDATES, EVIDENCE)
        elapsed = time.monotonic() - started
    assert elapsed < 0.5 + 0.15
    assert (decision.source, decision.action, decision.patch_version) == (
        "fallback",
        "patch",
        "1.9.0",
    )
    assert decision.fallback_reason == "no answer within the 0.5 s deadline (1 attempt)"


async def test_failing_service_is_retried_then_fallback_decides(sira: Server) -> None:
    sira.control(mode="error")
    before = sira.decide_calls()
    async with decision_client(sira, max_attempts=3) as client:
        decision = await client.decide(incident(), CANDIDATES, EVIDENCE)
    assert sira.decide_calls() - before == 3
    assert decision.source == "fallback"
    assert decision.rule == "best_observed_candidate"
    assert decision.fallback_reason == "HTTP 500 from the decision service (3 attempts)"


async def test_garbage_answer_is_not_trusted(sira: Server) -> None:
    sira.control(mode="garbage")
    before = sira.decide_calls()
    async with decision_client(sira) as client:
        decision = await client.decide(incident(), CANDIDATES, EVIDENCE)
    assert sira.decide_calls() - before == 1
    assert decision.source == "fallback"
    assert decision.fallback_reason == (
        "nonsense answer: action: Input should be 'patch', 'rollback', 'ignore' or 'escalate'; "
        "patch_version: Input should be a valid string; "
        "confidence: Input should be a valid number (+1 more)"
    )
    assert decision.explanation.startswith(
        f"Decision service unavailable ({decision.fallback_reason}); "
        "fallback rule 'best observed candidate': 1.9.0 healed 40 of 41"
    )


async def test_wrong_token_is_refused_and_not_retried(sira: Server) -> None:
    before = sira.decide_calls()
    async with decision_client(sira, token="not-the-token") as client:
        decision = await client.decide(incident(), CANDIDATES)
    assert sira.decide_calls() - before == 1
    assert decision.fallback_reason == "HTTP 401 from the decision service (credentials refused)"


async def test_down_service_opens_the_breaker_which_closes_after_restart() -> None:
    server = Server(["sim.decision_service"], SIRA_TOKEN)
    server.start()
    try:
        breaker = CircuitBreaker(failure_threshold=2, cool_down_s=2.0)
        async with decision_client(server, breaker=breaker, max_attempts=2) as client:
            assert (await client.decide(incident(), CANDIDATES)).source == "sira"

            server.kill()
            for _ in range(2):
                decision = await client.decide(incident(), CANDIDATES, EVIDENCE)
                assert decision.source == "fallback"
                assert decision.fallback_reason is not None
                assert decision.fallback_reason.startswith("cannot reach the decision service (")
            assert breaker.state == "open"

            server.start()  # same port
            # While the cool-down lasts, the service being back changes nothing: no call.
            while breaker.retry_in_s() > 0.2:
                decision = await client.decide(incident(), CANDIDATES, EVIDENCE)
                assert decision.fallback_reason is not None
                assert decision.fallback_reason.startswith("circuit breaker open after 2 ")
                assert (decision.action, decision.patch_version) == ("patch", "1.9.0")
                await asyncio.sleep(0.05)
            assert server.decide_calls() == 0

            await asyncio.sleep(breaker.retry_in_s())
            assert breaker.snapshot()["state"] == "half_open"
            decision = await client.decide(incident(), CANDIDATES, EVIDENCE)
            assert (decision.source, decision.patch_version, breaker.state) == (
                "sira",
                "1.10.0",
                "closed",
            )
            assert server.decide_calls() == 1  # the probe
    finally:
        server.stop()


# --- decision service: learning from feedback -----------------------------------------------


def ask(
    server: Server,
    *,
    type: str = "webhook_fail_rate",
    candidates: Sequence[str] = ("1.2.3", "1.2.4"),
    current: str | None = "1.2.2",
    previous: str | None = "1.2.1",
    incident_id: str = "inc-learn",
) -> dict[str, Any]:
    body = {
        "incident": {
            "id": incident_id,
            "type": type,
            "severity": "medium",
            "tenant_id": "merchant-1",
            "plugin": "payments",
            "current_version": current,
            "previous_version": previous,
            "telemetry_snapshot": {},
            "detected_at": "2026-11-23T12:00:00+00:00",
        },
        "candidates": list(candidates),
    }
    response = httpx.post(f"{server.url}/api/sira/decide", json=body, headers=server.auth)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def tell(
    server: Server,
    attempt_id: str,
    to_version: str,
    outcome: str,
    *,
    type: str = "webhook_fail_rate",
    from_version: str = "1.2.2",
    incident_id: str = "inc-learn",
) -> dict[str, Any]:
    body = {
        "incident_id": incident_id,
        "attempt_id": attempt_id,
        "incident_type": type,
        "plugin": "payments",
        "from_version": from_version,
        "to_version": to_version,
        "decision_source": "sira",
        "confidence": 0.87,
        "outcome": outcome,
    }
    response = httpx.post(f"{server.url}/api/sira/feedback", json=body, headers=server.auth)
    assert response.status_code == 202, response.text
    result: dict[str, Any] = response.json()
    return result


def posterior(server: Server) -> list[dict[str, Any]]:
    response = httpx.get(f"{server.url}/api/sira/posterior", headers=server.auth)
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


def chosen(answer: dict[str, Any]) -> tuple[Any, Any, Any]:
    return answer["action"], answer["patch_version"], answer["confidence"]


def test_rolled_back_releases_give_way_to_the_next_candidate_then_to_a_rollback(
    sira: Server,
) -> None:
    # Never tried: both at the prior (0.87); the newest wins the tie.
    assert chosen(ask(sira)) == ("patch", "1.2.4", 0.87)
    tell(sira, "att-1", "1.2.4", "rolled_back")
    # 1.2.4 failed once (posterior 8.7 / 11): the untried 1.2.3 is now the better bet.
    answer = ask(sira)
    assert chosen(answer) == ("patch", "1.2.3", 0.87)
    assert (
        "1.2.4: 0 successes, 1 failure on webhook_fail_rate (posterior 0.79)"
        in (answer["explanation"])
    )
    for n in range(2, 9):
        tell(sira, f"att-{n}", "1.2.4", "rolled_back")
    for n in range(8):
        tell(sira, f"att-b{n}", "1.2.3", "failed")
    # Eight failures each: both below 0.5, skipped; back to the known-good version.
    answer = ask(sira)
    assert chosen(answer) == ("rollback", "1.2.1", 0.9)
    assert (
        "1.2.4: 0 successes, 8 failures on webhook_fail_rate (posterior 0.48)"
        in (answer["explanation"])
    )
    # Without a known-good version there is nothing left to try.
    assert chosen(ask(sira, previous=None)) == ("escalate", None, 0.5)
    # A release nobody tried yet is proposed again.
    assert chosen(ask(sira, candidates=["1.2.3", "1.2.4", "1.2.5"])) == ("patch", "1.2.5", 0.87)


def test_successes_raise_the_confidence_and_the_explanation_gives_the_numbers(
    sira: Server,
) -> None:
    for n in range(5):
        assert tell(sira, f"ok-{n}", "1.2.3", "success")["counted"] is True
    answer = ask(sira)
    # Beta(8.7 + 5, 1.3): 13.7 / 15; 1.2.3 now beats the newer, untried 1.2.4.
    assert chosen(answer) == ("patch", "1.2.3", 0.9133)
    assert answer["explanation"] == (
        "webhook_fail_rate on payments 1.2.2: patch to the best candidate, 1.2.3: 5 successes,"
        " 0 failures on webhook_fail_rate (posterior 0.91). Also considered: 1.2.4: never tried"
        " on webhook_fail_rate (prior 0.87)."
    )
    # What is learned on one incident type says nothing about another.
    assert chosen(ask(sira, type="error_spike")) == ("patch", "1.2.4", 0.87)


def test_duplicate_feedback_counts_once(sira: Server) -> None:
    first = tell(sira, "att-dup", "1.2.4", "rolled_back")
    assert (first["counted"], first["duplicate"]) == (True, False)
    for _ in range(3):
        again = tell(sira, "att-dup", "1.2.4", "rolled_back")
        assert (again["counted"], again["duplicate"]) == (False, True)
    # An outcome that says nothing about the release is listed, not counted.
    assert tell(sira, "att-cancelled", "1.2.4", "cancelled")["counted"] is False
    assert posterior(sira) == [
        {
            "incident_type": "webhook_fail_rate",
            "plugin": "payments",
            "version": "1.2.4",
            "action": "patch",
            "successes": 0,
            "failures": 1,
            "alpha": 8.7,
            "beta": 2.3,
            "mean": 0.790909,
        }
    ]
    listed = httpx.get(f"{sira.url}/api/sira/feedback", headers=sira.auth).json()["items"]
    assert [item["attempt_id"] for item in listed] == ["att-dup", "att-cancelled"]


def test_regression_rolls_back_to_the_known_good_version_and_learns_from_it(
    sira: Server,
) -> None:
    answer = ask(sira, type="regression", incident_id="inc-reg")
    assert chosen(answer) == ("rollback", "1.2.1", 0.9)
    assert answer["explanation"] == (
        "regression on payments 1.2.2: roll back to the known-good 1.2.1: never tried on"
        " regression (prior 0.90)."
    )
    # The feedback does not name the action: the service remembers what it answered.
    assert tell(sira, "att-reg", "1.2.1", "failed", type="regression", incident_id="inc-reg")[
        "action"
    ] == ("rollback")
    assert chosen(ask(sira, type="regression", incident_id="inc-reg-2")) == (
        "rollback",
        "1.2.1",
        0.8182,
    )
    # Without that memory, a move to a lower version is a rollback.
    assert tell(sira, "att-x", "1.2.1", "success", type="regression", incident_id="?")[
        "action"
    ] == ("rollback")
    # No known-good version (or the one running): no rollback, a patch when there is one.
    assert chosen(ask(sira, type="regression", previous=None)) == ("patch", "1.2.4", 0.87)
    assert chosen(ask(sira, type="regression", previous="1.2.2", candidates=[])) == (
        "escalate",
        None,
        0.5,
    )


def test_forward_strategy_patches_regressions_forward_when_it_can(sira: Server) -> None:
    assert sira.control(regression_strategy="forward")["regression_strategy"] == "forward"
    answer = ask(sira, type="regression", candidates=["1.2.1", "1.2.3"])
    assert chosen(answer) == ("patch", "1.2.3", 0.87)
    assert "regression_strategy forward" in answer["explanation"]
    # Nothing newer than 1.2.2: the known-good version after all.
    assert chosen(ask(sira, type="regression", candidates=["1.2.1"])) == ("rollback", "1.2.1", 0.9)
    sira.control(regression_strategy="rollback")
    assert chosen(ask(sira, type="regression", candidates=["1.2.3"])) == ("rollback", "1.2.1", 0.9)


def test_learning_survives_a_restart_with_a_state_file(tmp_path: Path) -> None:
    state_file = tmp_path / "state" / "sira.json"
    options = ["--state-file", str(state_file), "--regression-strategy", "forward"]
    server = Server(["sim", "decision-service"], SIRA_TOKEN, args=options)
    server.start()
    try:
        tell(server, "att-1", "1.2.4", "rolled_back")
        tell(server, "att-2", "1.2.4", "rolled_back")
        tell(server, "att-3", "1.2.3", "success")
        learned = posterior(server)
        assert len(learned) == 2
        server.kill()  # no graceful shutdown: what was answered 202 is on disk already
        assert json.loads(state_file.read_text())["format"] == 1
        assert [p.name for p in state_file.parent.iterdir()] == ["sira.json"]  # no leftovers
        server.start()
        assert posterior(server) == learned
        assert tell(server, "att-2", "1.2.4", "rolled_back")["duplicate"] is True
        assert chosen(ask(server)) == ("patch", "1.2.3", 0.8818)
        control = httpx.get(f"{server.url}/_control", headers=server.auth).json()
        assert (control["regression_strategy"], control["feedback_count"]) == ("forward", 3)
        # reset forgets, on disk too
        server.control(reset=True)
        server.kill()
        server.start()
        assert posterior(server) == []
    finally:
        server.stop()


def test_an_unreadable_state_file_stops_the_service(tmp_path: Path) -> None:
    state_file = tmp_path / "sira.json"
    state_file.write_text("{half a file")
    result = subprocess.run(
        [
            *(sys.executable, "-m", "sim", "decision-service", "--port", "1", "--token", "t"),
            *("--state-file", str(state_file)),
        ],
        cwd=REPO,
        capture_output=True,
        check=False,
        timeout=30,
    )
    assert result.returncode != 0
    assert f"cannot read the state file {state_file}".encode() in result.stderr


def test_posterior_and_feedback_need_the_token(sira: Server) -> None:
    for path in ("/api/sira/posterior", "/api/sira/feedback"):
        assert httpx.get(f"{sira.url}{path}").status_code == 401
    assert httpx.post(f"{sira.url}/api/sira/feedback", json={}).status_code == 401


# --- staging runner --------------------------------------------------------------------------


async def wait_for_run(runner: Server, run_id: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=runner.url, headers=runner.auth) as http:
        while True:
            run: dict[str, Any] = (await http.get(f"/runs/{run_id}")).json()
            if run["status"] != "running":
                return run
            assert time.monotonic() < deadline, f"run {run_id} still running after {timeout} s"
            await asyncio.sleep(0.05)


def start_run(
    runner: Server, to_version: str, artifact: str, plugin: str = "payments"
) -> dict[str, Any]:
    response = httpx.post(
        f"{runner.url}/runs",
        json={
            "plugin": plugin,
            "from_version": "1.2.2",
            "to_version": to_version,
            "artifact": artifact,
        },
        headers=runner.auth,
    )
    assert response.status_code == 202, response.text
    run: dict[str, Any] = response.json()
    return run


async def staged(runner: Server, to_version: str, artifact: str) -> dict[str, Any]:
    return await wait_for_run(runner, start_run(runner, to_version, artifact)["id"])


def release(
    folder: Path,
    version: str = "1.2.3",
    source: str | None = None,
    *,
    simulated: bool = False,
    name: str = "payments",
    suffix: str = ".tar.gz",
) -> str:
    """A real artifact on disk, as the `file://` URL the control plane passes for it."""
    path = folder / f"{name}-{version}{suffix}"
    return build_plugin_artifact(
        path, name=name, version=version, source=source, simulated=simulated
    ).as_uri()


def checks(run: dict[str, Any]) -> list[tuple[str, bool]]:
    return [(check["name"], check["passed"]) for check in run["report"]["checks"]]


def failed_check(run: dict[str, Any]) -> dict[str, Any]:
    failed: list[dict[str, Any]] = [c for c in run["report"]["checks"] if not c["passed"]]
    assert len(failed) == 1, run
    return failed[0]


REAL_STAGES = ["fetch", "unpack", "manifest", "import", "instantiate", "smoke"]


async def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        await asyncio.sleep(0.05)


async def test_a_good_artifact_passes_every_check_after_the_delay(
    runner: Server, tmp_path: Path, work_dir: Path
) -> None:
    assert runner.control(delay_s=0.3)["smoke_timeout_s"] == 20
    artifact = release(tmp_path)
    started = time.monotonic()
    run = start_run(runner, "1.2.3", artifact)
    assert run["status"] == "running"
    assert run["report"] == {"summary": "staging payments 1.2.2 -> 1.2.3", "checks": []}
    finished = await wait_for_run(runner, run["id"])
    assert time.monotonic() - started >= 0.3
    assert finished["status"] == "passed", finished
    report = finished["report"]
    assert report["summary"] == "payments 1.2.2 -> 1.2.3: all checks passed"
    assert checks(finished) == [(name, True) for name in REAL_STAGES]
    details = {check["name"]: check["detail"] for check in report["checks"]}
    sha256 = hashlib.sha256(Path(artifact.removeprefix("file://")).read_bytes()).hexdigest()
    assert details["fetch"].endswith(f"sha256 {sha256}")
    assert details["manifest"] == "payments 1.2.3, entry point src.main:Plugin"
    assert details["smoke"] == "selfheal_smoke() returned True"
    assert report["output"] == {"stdout": "", "stderr": ""}
    # The temporary folder goes once the run is over.
    await wait_until(lambda: not any(work_dir.iterdir()), "cleaning up the work folder")


async def test_an_artifact_whose_import_raises_fails_at_import(
    runner: Server, tmp_path: Path
) -> None:
    source = "import vendor_sdk_that_is_not_installed\n\nclass Plugin:\n    pass\n"
    run = await staged(runner, "1.2.3", release(tmp_path, source=source))
    assert run["status"] == "failed"
    assert checks(run) == [("fetch", True), ("unpack", True), ("manifest", True), ("import", False)]
    detail = failed_check(run)["detail"]
    assert detail == (
        "importing src.main:Plugin raised ModuleNotFoundError:"
        " No module named 'vendor_sdk_that_is_not_installed'"
    )
    assert run["report"]["summary"] == f"payments 1.2.2 -> 1.2.3: import check failed: {detail}"


async def test_a_plugin_whose_constructor_or_health_fails_is_reported(
    runner: Server, tmp_path: Path
) -> None:
    source = (
        "import os\n\nclass Plugin:\n    def __init__(self):\n"
        "        self.url = os.environ['DB_URL']\n"
    )
    run = await staged(runner, "1.2.3", release(tmp_path, "1.2.3", source))
    assert failed_check(run) == {
        "name": "instantiate",
        "passed": False,
        "detail": "Plugin() raised KeyError: 'DB_URL'",
    }
    source = (
        "import sys\n\nclass Plugin:\n    async def health(self):\n"
        "        print('checking the database'); print('db down', file=sys.stderr)\n"
        "        return {}\n"
    )
    run = await staged(runner, "1.2.4", release(tmp_path, "1.2.4", source))
    assert failed_check(run) == {"name": "smoke", "passed": False, "detail": "health() returned {}"}
    assert run["report"]["output"] == {"stdout": "checking the database\n", "stderr": "db down\n"}
    # A plugin without either method is imported and instantiated, nothing more.
    run = await staged(runner, "1.2.5", release(tmp_path, "1.2.5", "class Plugin:\n    pass\n"))
    assert run["status"] == "passed"
    assert run["report"]["checks"][-1]["detail"].startswith("no selfheal_smoke() or health()")


async def test_a_hanging_smoke_test_is_killed_at_the_timeout(
    runner: Server, tmp_path: Path
) -> None:
    runner.control(smoke_timeout_s=1)
    pid_file = tmp_path / "smoke.pid"
    source = (
        "import os, time\n\nclass Plugin:\n    def selfheal_smoke(self):\n"
        f"        open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        "        time.sleep(3600)\n"
    )
    started = time.monotonic()
    run = await staged(runner, "1.2.3", release(tmp_path, source=source))
    assert time.monotonic() - started < 10
    assert checks(run)[-3:] == [("import", True), ("instantiate", True), ("smoke", False)]
    assert failed_check(run)["detail"] == "timed out after 1 s"
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped


async def test_a_path_traversal_archive_fails_at_unpack_and_writes_nothing_outside(
    runner: Server, tmp_path: Path, work_dir: Path
) -> None:
    archive = tmp_path / "payments-1.2.3.tar.gz"
    archive.write_bytes(
        tar_gz(
            [
                file_member("payments/plugin.yaml", MANIFEST_123),
                file_member("payments/src/main.py", b"class Plugin: pass\n"),
                file_member("../../../evil.py", b"print('escaped')\n"),
            ]
        )
    )
    run = await staged(runner, "1.2.3", archive.as_uri())
    assert checks(run) == [("fetch", True), ("unpack", False)]
    assert failed_check(run)["detail"] == "refused member '../../../evil.py': path traversal ('..')"
    assert not (work_dir.parent / "evil.py").exists()


async def test_a_manifest_for_another_plugin_or_version_fails(
    runner: Server, tmp_path: Path
) -> None:
    run = await staged(runner, "1.2.4", release(tmp_path, "1.2.3"))
    assert checks(run)[-1] == ("manifest", False)
    assert failed_check(run)["detail"] == (
        "plugin.yaml says payments 1.2.3, the run is for payments 1.2.4"
    )
    run = await staged(runner, "1.2.3", release(tmp_path, "1.2.3", name="billing"))
    assert failed_check(run)["detail"] == (
        "plugin.yaml says billing 1.2.3, the run is for payments 1.2.3"
    )


async def test_unusable_artifact_locations_fail_at_fetch(runner: Server, tmp_path: Path) -> None:
    missing = tmp_path / "missing.tar.gz"
    use = ": use http(s)://, file:// or an absolute path"
    cases = [
        (missing.as_uri(), f"{missing}: No such file or directory"),
        ("relative/payments.tar.gz", f"unsupported artifact location (a relative path){use}"),
        ("ftp://releases.example/payments.tar.gz", f"unsupported artifact location (ftp){use}"),
        ("file://elsewhere/payments.tar.gz", "file URL on another host (elsewhere)"),
    ]
    for artifact, detail in cases:
        run = await staged(runner, "1.2.3", artifact)
        assert failed_check(run) == {"name": "fetch", "passed": False, "detail": detail}
    # A plain absolute path and a zip are fine.
    zipped = release(tmp_path, suffix=".zip").removeprefix("file://")
    assert (await staged(runner, "1.2.3", zipped))["status"] == "passed"


class ArtifactHandler(SimpleHTTPRequestHandler):
    def do_GET(self) -> None:
        redirects = {
            "/moved.tar.gz": "/payments-1.2.3.tar.gz",
            "/to-a-file": "file:///etc/passwd",
        }
        target = redirects.get(self.path.split("?")[0])
        if target is None:
            super().do_GET()
            return
        self.send_response(302)
        self.send_header("Location", target)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def http_folder(folder: Path) -> Iterator[str]:
    server = ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(ArtifactHandler, directory=str(folder))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


async def test_an_http_artifact_is_fetched_and_its_capability_never_shown(
    runner: Server, tmp_path: Path
) -> None:
    release(tmp_path)
    with http_folder(tmp_path) as base:
        run = await staged(runner, "1.2.3", f"{base}/payments-1.2.3.tar.gz?token=s3cret")
        assert run["status"] == "passed", run
        fetch = run["report"]["checks"][0]["detail"]
        assert f"from {base}/payments-1.2.3.tar.gz?..., sha256 " in fetch
        assert "s3cret" not in json.dumps(run)
        assert (await staged(runner, "1.2.3", f"{base}/moved.tar.gz"))["status"] == "passed"
        missing = await staged(runner, "1.2.3", f"{base}/nope.tar.gz?token=s3cret")
        assert failed_check(missing)["detail"] == f"HTTP 404 from {base}/nope.tar.gz?..."
        elsewhere = await staged(runner, "1.2.3", f"{base}/to-a-file")
        assert failed_check(elsewhere)["detail"] == (
            f"{base}/to-a-file redirects to a file URL: refused"
        )


async def test_simulated_plugins_pass_without_a_truth_file(runner: Server, tmp_path: Path) -> None:
    run = await staged(runner, "1.2.3", release(tmp_path, simulated=True))
    assert run["status"] == "passed"
    assert checks(run) == [("fetch", True), ("unpack", True), ("manifest", True), ("smoke", True)]
    assert run["report"]["checks"][-1]["detail"] == "simulated plugin, no truth file"


async def test_simulated_plugins_follow_the_truth_file_read_on_every_run(tmp_path: Path) -> None:
    truth = tmp_path / "truth.json"
    options = ["--truth-file", str(truth), "--delay-s", "0"]
    with running(["sim", "staging-runner"], RUNNER_TOKEN, *options) as runner:
        bad, good = (
            release(tmp_path, "1.3.0", simulated=True),
            release(tmp_path, "1.3.1", simulated=True),
        )
        run = await staged(runner, "1.3.0", bad)
        assert run["report"]["checks"][-1]["detail"].endswith("not written yet")
        truth.write_text(
            json.dumps(
                {
                    "payments": {
                        "1.3.0": {
                            "passes_staging": False,
                            "detail": "crashes on start: KeyError 'DB_URL'",
                        }
                    }
                }
            )
        )
        run = await staged(runner, "1.3.0", bad)
        assert run["status"] == "failed"
        assert failed_check(run) == {
            "name": "smoke",
            "passed": False,
            "detail": "crashes on start: KeyError 'DB_URL'",
        }
        assert run["report"]["summary"] == (
            "payments 1.2.2 -> 1.3.0: smoke check failed: crashes on start: KeyError 'DB_URL'"
        )
        run = await staged(runner, "1.3.1", good)
        assert run["report"]["checks"][-1] == {
            "name": "smoke",
            "passed": True,
            "detail": "simulated plugin, not listed in the truth file: passes",
        }
        truth.write_text(json.dumps({"payments": {"1.3.1": {"passes_staging": False}}}))
        run = await staged(runner, "1.3.1", good)
        assert failed_check(run)["detail"] == "simulated plugin fails per the truth file"
        truth.write_text("[not, json")
        run = await staged(runner, "1.3.1", good)
        assert failed_check(run)["name"] == "truth"


async def test_a_forced_failure_skips_the_artifact(runner: Server, tmp_path: Path) -> None:
    runner.control(fail_versions=["1.2.4"], delay_s=0.1)
    failing = start_run(runner, "1.2.4", "https://releases.example/never-fetched.tar.gz")
    passing = start_run(runner, "1.2.3", release(tmp_path))
    failed = await wait_for_run(runner, failing["id"])
    assert failed["report"] == {
        "summary": "payments 1.2.2 -> 1.2.4: forced check failed:"
        " forced by _control: fail_versions includes 1.2.4",
        "checks": [
            {
                "name": "forced",
                "passed": False,
                "detail": "forced by _control: fail_versions includes 1.2.4",
            }
        ],
    }
    assert (await wait_for_run(runner, passing["id"]))["status"] == "passed"


async def test_staging_runner_refuses_strangers_and_unknown_runs(runner: Server) -> None:
    assert httpx.post(f"{runner.url}/runs", json={}).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert httpx.get(f"{runner.url}/runs/x", headers=wrong).status_code == 401
    assert httpx.get(f"{runner.url}/runs/x", headers=runner.auth).status_code == 404
    assert httpx.get(f"{runner.url}/health").json() == {"status": "ok"}


async def test_staging_runner_error_mode(runner: Server) -> None:
    runner.control(mode="error")
    try:
        response = httpx.post(
            f"{runner.url}/runs",
            json={"plugin": "p", "from_version": "1", "to_version": "2", "artifact": "a"},
            headers=runner.auth,
        )
        assert response.status_code == 500
    finally:
        runner.control(mode="normal")


def test_the_runner_keeps_a_bounded_number_of_runs() -> None:
    state = RunnerState(config=RunnerConfig(max_runs=2))
    request = RunRequest(plugin="p", to_version="2", artifact="/a.tar.gz")
    for run_id in ("a", "b", "c"):
        state.remember(Run(id=run_id, request=request, ready_at=0))
    assert list(state.runs) == ["b", "c"]


def test_decision_service_needs_a_token_to_start() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sim.decision_service", "--port", "1"],
        cwd=REPO,
        capture_output=True,
        env={k: v for k, v in os.environ.items() if k != "SIRA_API_TOKEN"},
        check=False,
    )
    assert result.returncode == 2
    assert b"--token or $SIRA_API_TOKEN is required" in result.stderr


# --- artifacts -------------------------------------------------------------------------------

MANIFEST_123 = b"name: payments\nversion: 1.2.3\nentry_point: src.main:Plugin\n"


def file_member(name: str, body: bytes) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.size = len(body)
    return info, body


def link_member(name: str, target: str, *, hard: bool = False) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.LNKTYPE if hard else tarfile.SYMTYPE
    info.linkname = target
    return info, None


def tar_gz(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for info, body in members:
            tar.addfile(info, None if body is None else io.BytesIO(body))
    return out.getvalue()


def device_member(name: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    info.devmajor, info.devminor = 1, 3
    return info, None


GOOD = [
    file_member("payments/plugin.yaml", MANIFEST_123),
    file_member("payments/src/main.py", b"class Plugin: pass\n"),
]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (file_member("/tmp/evil.py", b"x"), "refused member '/tmp/evil.py': absolute path"),
        (file_member("payments/../../evil.py", b"x"), "path traversal ('..')"),
        (link_member("payments/out", "../../etc"), "-> '../../etc': leaves the folder"),
        (link_member("payments/passwd", "/etc/passwd"), "absolute target"),
        (link_member("payments/hard", "../x", hard=True), "leaves the folder"),
        (device_member("payments/null"), "device, fifo or other special file"),
    ],
)
def test_unsafe_tar_members_are_refused(
    tmp_path: Path, extra: tuple[tarfile.TarInfo, bytes | None], message: str
) -> None:
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(tar_gz([*GOOD, extra]))
    with pytest.raises(UnsafeArtifact, match=re.escape(message)):
        unpack_artifact(archive, tmp_path / "out")
    assert not (tmp_path / "evil.py").exists()


def test_a_path_through_a_link_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "a.tar.gz"
    # Each member alone stays inside; together they would write next to the folder.
    members = [*GOOD, link_member("payments/here", "."), link_member("payments/here/up", "..")]
    archive.write_bytes(tar_gz([*members, file_member("payments/here/up/x", b"x")]))
    with pytest.raises(UnsafeArtifact, match="goes through a link"):
        unpack_artifact(archive, tmp_path / "out")


def test_links_inside_the_folder_are_fine(tmp_path: Path) -> None:
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(tar_gz([*GOOD, link_member("payments/src/alias.py", "main.py")]))
    root = unpack_artifact(archive, tmp_path / "out")
    assert (root / "src" / "alias.py").read_text() == "class Plugin: pass\n"


def zip_bytes(entries: dict[str, bytes], modes: dict[str, int] | None = None) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, body in entries.items():
            info = zipfile.ZipInfo(name)
            if modes and name in modes:
                info.external_attr = modes[name] << 16
            archive.writestr(info, body)
    return out.getvalue()


@pytest.mark.parametrize(
    ("entries", "modes", "message"),
    [
        ({"../evil.py": b"x"}, None, "path traversal"),
        ({"/evil.py": b"x"}, None, "absolute path"),
        ({"link": b"/etc/passwd"}, {"link": stat.S_IFLNK | 0o777}, "a link in a zip"),
    ],
)
def test_unsafe_zip_members_are_refused(
    tmp_path: Path, entries: dict[str, bytes], modes: dict[str, int] | None, message: str
) -> None:
    archive = tmp_path / "a.zip"
    archive.write_bytes(zip_bytes({"plugin.yaml": MANIFEST_123, **entries}, modes))
    with pytest.raises(UnsafeArtifact, match=message):
        unpack_artifact(archive, tmp_path / "out")


def test_a_plugin_folder_at_the_archive_root_is_found(tmp_path: Path) -> None:
    archive = tmp_path / "a.zip"
    archive.write_bytes(zip_bytes({"plugin.yaml": MANIFEST_123, "src/main.py": b""}))
    root = unpack_artifact(archive, tmp_path / "out")
    assert root == tmp_path / "out"
    assert read_manifest(root).version == "1.2.3"


def test_archives_without_a_plugin_or_too_big_are_refused(tmp_path: Path) -> None:
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(tar_gz([file_member("a/x.py", b""), file_member("b/y.py", b"")]))
    with pytest.raises(ManifestError, match=re.escape("no plugin.yaml at the archive root")):
        unpack_artifact(archive, tmp_path / "out1")
    archive.write_bytes(tar_gz(GOOD))
    with pytest.raises(UnsafeArtifact, match="unpacks to more than 10 bytes"):
        unpack_artifact(archive, tmp_path / "out2", max_bytes=10)
    archive.write_bytes(b"just some bytes")
    with pytest.raises(UnsafeArtifact, match=re.escape("not a tar.gz or zip archive")):
        unpack_artifact(archive, tmp_path / "out3")


def test_built_artifacts_are_deterministic(tmp_path: Path) -> None:
    def digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    first = build_plugin_artifact(tmp_path / "one.tar.gz", name="payments", version="1.2.3")
    (tmp_path / "later").mkdir()
    again = build_plugin_artifact(tmp_path / "later", name="payments", version="1.2.3")
    assert again == tmp_path / "later" / "payments-1.2.3.tar.gz"
    assert digest(first) == digest(again)
    other = build_plugin_artifact(tmp_path / "two.tar.gz", name="payments", version="1.2.4")
    assert digest(other) != digest(first)
    zipped = [
        build_plugin_artifact(tmp_path / f"{n}.zip", name="payments", version="1.2.3")
        for n in range(2)
    ]
    assert digest(zipped[0]) == digest(zipped[1])
    root = unpack_artifact(first, tmp_path / "out")
    assert read_manifest(root) == read_manifest(unpack_artifact(zipped[0], tmp_path / "zout"))
    assert (root / "plugin.yaml").read_text() == (
        "name: payments\nversion: 1.2.3\nentry_point: src.main:Plugin\n"
    )
    simulated = build_plugin_artifact(
        tmp_path / "sim.tar.gz", name="payments", version="1.2.3", simulated=True
    )
    assert read_manifest(unpack_artifact(simulated, tmp_path / "sout")).simulated is True
    with pytest.raises(ValueError, match="not a safe file name"):
        build_plugin_artifact(tmp_path / "x.tar.gz", name="../x", version="1")
