"""The staging runner's client without the network: the runner is stubbed at httpx's
transport (the healing tests run it for real). What is retried within the deadline and what
is not, and which error the healing loop gets."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from app.healing.staging import RunLost, StagingClient, StagingUnavailable
from tests.support.scripted import ScriptedPeer

pytestmark = pytest.mark.no_services

RUNNER = "http://staging.test"
Runner = ScriptedPeer  # a scripted staging runner


def run(status: str = "running") -> httpx.Response:
    return httpx.Response(200, json={"id": "run-1", "status": status, "report": {}})


def status(code: int) -> httpx.Response:
    return httpx.Response(code, json={"detail": "nope"})


async def hang(request: httpx.Request) -> httpx.Response:
    await asyncio.sleep(30)
    return run()


@contextlib.asynccontextmanager
async def staging_client(runner: Runner, **options: Any) -> AsyncIterator[StagingClient]:
    options.setdefault("base_url", RUNNER)
    options.setdefault("token", "staging-token")
    options.setdefault("backoff_base_s", 0.01)
    async with httpx.AsyncClient(transport=httpx.MockTransport(runner)) as http:
        yield StagingClient(http, **options)


async def start(client: StagingClient) -> Any:
    return await client.start(
        plugin="erp_crm", from_version="1.0.0", to_version="1.0.1", artifact="http://a/x"
    )


async def test_an_answer_is_a_run() -> None:
    runner = Runner(run("passed"))
    async with staging_client(runner) as client:
        started = await start(client)
    assert (started.id, started.status, runner.calls) == ("run-1", "passed", 1)
    assert runner.requests[0].headers["Authorization"] == "Bearer staging-token"


async def test_5xx_and_connect_errors_are_retried() -> None:
    runner = Runner(status(503), httpx.ConnectError("connection refused"), run())
    async with staging_client(runner) as client:
        assert (await client.status("run-1")).status == "running"
    assert runner.calls == 3


async def test_persistent_5xx_gives_up_after_max_attempts() -> None:
    runner = Runner(status(502))
    async with staging_client(runner, max_attempts=3) as client:
        with pytest.raises(StagingUnavailable) as failure:
            await start(client)
    assert failure.value.reason == "HTTP 502 from the staging runner"
    assert not isinstance(failure.value, RunLost)
    assert runner.calls == 3


async def test_unreachable_runner_says_why() -> None:
    runner = Runner(httpx.ConnectError("connection refused"))
    async with staging_client(runner, max_attempts=2) as client:
        with pytest.raises(StagingUnavailable) as failure:
            await start(client)
    assert failure.value.reason == (
        "cannot reach the staging runner (ConnectError: connection refused)"
    )
    assert runner.calls == 2


async def test_an_httpx_timeout_is_not_retried() -> None:
    runner = Runner(httpx.ReadTimeout("slow"), run())
    async with staging_client(runner, deadline_s=5.0) as client:
        with pytest.raises(StagingUnavailable) as failure:
            await start(client)
    assert failure.value.reason == "no answer within the 5 s deadline"
    assert runner.calls == 1


async def test_a_slow_runner_is_cut_off_at_the_deadline() -> None:
    runner = Runner(hang)
    async with staging_client(runner, deadline_s=0.3) as client:
        started = time.monotonic()
        with pytest.raises(StagingUnavailable) as failure:
            await start(client)
        elapsed = time.monotonic() - started
    assert elapsed < 0.3 + 0.1
    assert failure.value.reason == "no answer within the 0.3 s deadline"
    assert runner.calls == 1


async def test_the_deadline_covers_retries_and_backoff() -> None:
    async def slow_failure(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.1)
        return status(500)

    runner = Runner(slow_failure)
    # 0.1 s call, 0.15 s pause, 0.1 s call; the next pause (0.3 s) would reach the deadline.
    async with staging_client(
        runner, deadline_s=0.5, max_attempts=10, backoff_base_s=0.15
    ) as client:
        started = time.monotonic()
        with pytest.raises(StagingUnavailable) as failure:
            await start(client)
        elapsed = time.monotonic() - started
    assert elapsed < 0.5 + 0.1
    assert failure.value.reason == "HTTP 500 from the staging runner"
    assert runner.calls == 2


@pytest.mark.parametrize(
    ("response", "reason"),
    [
        (status(400), "the staging runner refused the request (HTTP 400: "),
        (httpx.Response(200, content=b"<html>"), "the staging runner's answer is not JSON"),
        (httpx.Response(200, json=[1]), "the staging runner's answer is not a JSON object"),
        (httpx.Response(200, json={"status": "running"}), "the staging runner's answer has no"),
        (
            httpx.Response(200, json={"id": "r", "status": "odd"}),
            "the staging runner's answer has an unknown status 'odd'",
        ),
    ],
)
async def test_4xx_and_nonsense_are_not_retried(response: httpx.Response, reason: str) -> None:
    runner = Runner(response, run())
    async with staging_client(runner) as client:
        with pytest.raises(StagingUnavailable) as failure:
            await start(client)
    assert failure.value.reason.startswith(reason)
    assert runner.calls == 1


async def test_a_run_the_runner_no_longer_knows_is_lost() -> None:
    runner = Runner(status(404))
    async with staging_client(runner) as client:
        with pytest.raises(RunLost, match="no longer knows run run-7"):
            await client.status("run-7")
        # Starting a run is not asking about one: a 404 there is a refusal.
        with pytest.raises(StagingUnavailable) as failure:
            await start(client)
    assert not isinstance(failure.value, RunLost)
    assert failure.value.reason.startswith("the staging runner refused the request (HTTP 404")
    assert runner.calls == 2


async def test_an_unconfigured_runner_is_unavailable() -> None:
    runner = Runner(run())
    async with staging_client(runner, base_url=None) as client:
        assert not client.configured
        with pytest.raises(StagingUnavailable, match="STAGING_RUNNER_URL is unset"):
            await start(client)
    assert runner.calls == 0


class Streamed:
    """An answer of `size` bytes streamed in pieces, counting what the client pulled."""

    def __init__(self, head: bytes, size: int, piece: int = 16 * 1024) -> None:
        self.head, self.size, self.piece = head, size, piece
        self.pulled = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.head
        self.pulled = len(self.head)
        while self.pulled < self.size:
            self.pulled += self.piece
            yield b"x" * self.piece


async def test_an_oversize_answer_is_not_read_past_the_limit() -> None:
    """A runner streaming megabytes is cut off at SELFHEAL_SERVICE_ANSWER_MAX_BYTES (here its
    default): the call fails (StagingUnavailable, not retried) and the rest is never read."""
    answer = Streamed(b'{"id": "run-1", "status": "passed", "report": {"log": "', 8 * 1024 * 1024)
    runner = Runner(httpx.Response(200, content=answer), run())
    async with staging_client(runner) as client:
        with pytest.raises(StagingUnavailable) as failure:
            await start(client)
    assert failure.value.reason == (
        "the staging runner's answer is too large (more than 65536 bytes)"
    )
    assert answer.pulled <= 65536 + answer.piece
    assert runner.calls == 1


async def test_the_answer_limit_is_the_setting() -> None:
    from app.core.settings import Settings
    from workers.main import service_clients

    settings = Settings(staging_runner_url=RUNNER, service_answer_max_bytes=2048, _env_file=None)
    report = {"log": "y" * 3000}
    big = httpx.Response(200, json={"id": "run-1", "status": "passed", "report": report})
    async with httpx.AsyncClient(transport=httpx.MockTransport(Runner(big))) as http:
        _, client = service_clients(settings, http)
        with pytest.raises(StagingUnavailable, match=r"too large \(more than 2048 bytes\)"):
            await start(client)


async def test_a_refusal_is_read_only_for_its_excerpt() -> None:
    refusal = Streamed(b"bad request: " + b"z" * 100, 8 * 1024 * 1024)
    runner = Runner(httpx.Response(400, content=refusal))
    async with staging_client(runner) as client:
        with pytest.raises(StagingUnavailable) as failure:
            await start(client)
    assert failure.value.reason.startswith("the staging runner refused the request (HTTP 400:")
    assert refusal.pulled <= 4096 + refusal.piece
