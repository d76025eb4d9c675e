"""The worker's client of the staging runner (docs/contracts.md, "Staging runner").

Each call has one total deadline covering its retries (app/core/retry.py): connect errors
and 5xx are retried with a short exponential backoff; 4xx is not, nor a timeout (each try
may take all the time left, so a timeout means the deadline is reached). What the healing
loop needs to tell apart:
- `StagingUnavailable`: the runner could not be asked (down, slow, 5xx, nonsense, an answer
  longer than SELFHEAL_SERVICE_ANSWER_MAX_BYTES, which is not read past that). The attempt
  keeps its place and the step is tried again later, a bounded number of times, then the
  attempt fails safe: nothing was changed in production.
- `RunLost`: the runner answers but no longer knows the run (404, e.g. it restarted): start
  a new one.
- a `StagingRun` with status running, passed or failed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import httpx
import orjson

from app.core.retry import GaveUp, Retryable, retry_within_deadline

RunStatus = Literal["running", "passed", "failed"]
_STATUSES = ("running", "passed", "failed")
# Default of SELFHEAL_SERVICE_ANSWER_MAX_BYTES: an answer is read no further than this.
MAX_ANSWER_BYTES = 64 * 1024
# Of a refusal (4xx), only the start is read, for the error message.
_REFUSAL_READ_BYTES = 4096


class StagingUnavailable(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RunLost(StagingUnavailable):
    pass


@dataclass(frozen=True, slots=True)
class StagingRun:
    id: str
    status: RunStatus
    report: dict[str, Any]

    @property
    def summary(self) -> str:
        summary = self.report.get("summary")
        return summary if isinstance(summary, str) else self.status


class StagingClient:
    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        base_url: str | None,
        token: str | None,
        deadline_s: float = 5.0,
        max_attempts: int = 3,
        backoff_base_s: float = 0.1,
        max_answer_bytes: int = MAX_ANSWER_BYTES,
    ) -> None:
        self._http = http
        self._base_url = base_url.rstrip("/") if base_url else None
        self._token = token
        self.deadline_s = deadline_s
        self.max_attempts = max_attempts
        self.backoff_base_s = backoff_base_s
        self.max_answer_bytes = max_answer_bytes

    @property
    def configured(self) -> bool:
        return self._base_url is not None

    async def start(
        self, *, plugin: str, from_version: str | None, to_version: str, artifact: str
    ) -> StagingRun:
        body = {
            "plugin": plugin,
            "from_version": from_version,
            "to_version": to_version,
            "artifact": artifact,
        }
        return await self._call("POST", "/runs", orjson.dumps(body))

    async def status(self, run_id: str) -> StagingRun:
        return await self._call("GET", f"/runs/{run_id}", None)

    async def _call(self, method: str, path: str, content: bytes | None) -> StagingRun:
        if self._base_url is None:
            raise StagingUnavailable("no staging runner configured (STAGING_RUNNER_URL is unset)")
        headers = {"Content-Type": "application/json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        url = self._base_url + path

        async def attempt(remaining: float) -> _Answer:
            try:
                async with self._http.stream(
                    method, url, content=content, headers=headers, timeout=remaining
                ) as response:
                    status = response.status_code
                    if status >= 500:
                        raise Retryable(f"HTTP {status} from the staging runner")
                    if not response.is_success:
                        excerpt, _ = await _read_at_most(response, _REFUSAL_READ_BYTES)
                        return _Answer(status, excerpt)
                    body, complete = await _read_at_most(response, self.max_answer_bytes)
                    if not complete:
                        raise StagingUnavailable(
                            "the staging runner's answer is too large (more than"
                            f" {self.max_answer_bytes} bytes)"
                        )
                    return _Answer(status, body)
            except httpx.TimeoutException:
                # httpx's timeout is the time left: the deadline is reached, stop.
                raise TimeoutError from None
            except httpx.HTTPError as error:
                raise Retryable(
                    f"cannot reach the staging runner ({type(error).__name__}: {error})"
                ) from None

        try:
            response = await retry_within_deadline(
                attempt,
                deadline_s=self.deadline_s,
                max_attempts=self.max_attempts,
                backoff_base_s=self.backoff_base_s,
            )
        except GaveUp as gave_up:
            raise StagingUnavailable(gave_up.reason) from None
        if response.status == 404 and method == "GET":
            raise RunLost(f"the staging runner no longer knows run {path.rsplit('/', 1)[-1]}")
        return _parse(response)


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    body: bytes  # of a refusal, only its start


async def _read_at_most(response: httpx.Response, limit: int) -> tuple[bytes, bool]:
    """At most `limit` bytes of the body, and whether that is all of it. Reading stops past
    the limit: a runner streaming without end is not read further (leaving the `stream`
    block closes the response)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        if size + len(chunk) > limit:
            chunks.append(chunk[: limit - size])
            return b"".join(chunks), False
        size += len(chunk)
        chunks.append(chunk)
    return b"".join(chunks), True


def _parse(response: _Answer) -> StagingRun:
    if not 200 <= response.status < 300:
        excerpt = response.body[:200].decode("utf-8", "replace")
        raise StagingUnavailable(
            f"the staging runner refused the request (HTTP {response.status}: {excerpt})"
        )
    try:
        body = orjson.loads(response.body)
    except orjson.JSONDecodeError:
        raise StagingUnavailable("the staging runner's answer is not JSON") from None
    if not isinstance(body, dict):
        raise StagingUnavailable("the staging runner's answer is not a JSON object")
    run_id, status, report = body.get("id"), body.get("status"), body.get("report")
    if not isinstance(run_id, str) or not run_id or len(run_id) > 200:
        raise StagingUnavailable("the staging runner's answer has no run id")
    if status not in _STATUSES:
        raise StagingUnavailable(f"the staging runner's answer has an unknown status {status!r}")
    if report is None:
        report = {}
    if not isinstance(report, dict):
        report = {"detail": report}
    return StagingRun(run_id, status, report)
