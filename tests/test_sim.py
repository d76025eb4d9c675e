"""End to end: the reference decision service and staging runner as real processes on
loopback, and DecisionClient against the decision service in each of its moods, killed,
and restarted."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
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
from tests.test_decisions import incident

REPO = Path(__file__).resolve().parent.parent
SIRA_TOKEN = "sim-sira-token"
RUNNER_TOKEN = "sim-runner-token"
CANDIDATES = ["1.2.3", "1.10.0", "1.9.0"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Server:
    """A reference service in its own process, started with `python -m <module>`."""

    def __init__(self, module: list[str], token: str, port: int | None = None) -> None:
        self.module = module
        self.token = token
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", *self.module, "--port", str(self.port), "--token", self.token],
            cwd=REPO,
        )
        deadline = time.monotonic() + 15
        while True:
            assert self.proc.poll() is None, f"{self.module} exited with {self.proc.returncode}"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/health", timeout=0.5).status_code == 200:
                    return
            assert time.monotonic() < deadline, f"{self.module} did not answer within 15 s"
            time.sleep(0.05)

    def kill(self) -> None:
        """Down hard, as a crashed host would be: no graceful close of anything."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(5)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def control(self, **changes: Any) -> dict[str, Any]:
        response = httpx.post(f"{self.url}/_control", json=changes, headers=self.auth)
        response.raise_for_status()
        state: dict[str, Any] = response.json()
        return state

    def decide_calls(self) -> int:
        response = httpx.get(f"{self.url}/_control", headers=self.auth)
        calls: int = response.json()["calls"].get("/api/sira/decide", 0)
        return calls


@contextlib.contextmanager
def running(module: list[str], token: str) -> Iterator[Server]:
    server = Server(module, token)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def sira_process() -> Iterator[Server]:
    with running(["sim.decision_service"], SIRA_TOKEN) as server:
        yield server


@pytest.fixture
def sira(sira_process: Server) -> Server:
    sira_process.control(mode="normal", slow_s=30)
    return sira_process


@pytest.fixture(scope="module")
def runner() -> Iterator[Server]:
    with running(["sim", "staging-runner"], RUNNER_TOKEN) as server:
        yield server


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
        (incident(), [], ("escalate", None, 0.5)),
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


# --- staging runner --------------------------------------------------------------------------


async def wait_for_run(runner: Server, run_id: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=runner.url, headers=runner.auth) as http:
        for _ in range(100):
            run: dict[str, Any] = (await http.get(f"/runs/{run_id}")).json()
            if run["status"] != "running":
                return run
            await asyncio.sleep(0.05)
    raise AssertionError(f"run {run_id} still running after 5 s")


def start_run(runner: Server, to_version: str) -> dict[str, Any]:
    response = httpx.post(
        f"{runner.url}/runs",
        json={
            "plugin": "payments",
            "from_version": "1.2.2",
            "to_version": to_version,
            "artifact": f"https://releases.example/payments-{to_version}.zip",
        },
        headers=runner.auth,
    )
    assert response.status_code == 202
    run: dict[str, Any] = response.json()
    return run


async def test_staging_run_passes_after_its_delay(runner: Server) -> None:
    runner.control(fail_versions=[], delay_s=0.3, mode="normal")
    started = time.monotonic()
    run = start_run(runner, "1.2.3")
    assert run["status"] == "running"
    finished = await wait_for_run(runner, run["id"])
    assert time.monotonic() - started >= 0.3
    assert finished == {
        "id": run["id"],
        "status": "passed",
        "report": {
            "summary": "payments 1.2.2 -> 1.2.3: all checks passed",
            "checks": [{"name": "install", "passed": True}, {"name": "smoke", "passed": True}],
        },
    }


async def test_staging_run_fails_for_a_failing_version(runner: Server) -> None:
    runner.control(fail_versions=["1.2.4"], delay_s=0.1, mode="normal")
    failing, passing = start_run(runner, "1.2.4"), start_run(runner, "1.2.3")
    assert (await wait_for_run(runner, failing["id"]))["status"] == "failed"
    assert (await wait_for_run(runner, passing["id"]))["status"] == "passed"


async def test_staging_runner_refuses_strangers_and_unknown_runs(runner: Server) -> None:
    assert httpx.post(f"{runner.url}/runs", json={}).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert httpx.get(f"{runner.url}/runs/x", headers=wrong).status_code == 401
    assert httpx.get(f"{runner.url}/runs/x", headers=runner.auth).status_code == 404


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
