"""The worker's client of the staging runner (docs/contracts.md, "Staging runner").

Each call has one total deadline covering its retries (app/core/retry.py): connect errors
and 5xx are retried with a short exponential backoff; 4xx is not, nor a timeout (each try
may take all the time left, so a timeout means the deadline is reached). What the healing
loop needs to tell apart:
- `StagingUnavailable`: the runner could not be asked (down, slow, 5xx, nonsense). The attempt
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
MAX_REPORT_BYTES = 64 * 1024


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
    ) -> None:
        self._http = http
        self._base_url = base_url.rstrip("/") if base_url else None
        self._token = token
        self.deadline_s = deadline_s
        self.max_attempts = max_attempts
        self.backoff_base_s = backoff_base_s

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

        async def attempt(remaining: float) -> httpx.Response:
            try:
                response = await self._http.request(
                    method, url, content=content, headers=headers, timeout=remaining
                )
            except httpx.TimeoutException:
                # httpx's timeout is the time left: the deadline is reached, stop.
                raise TimeoutError from None
            except httpx.HTTPError as error:
                raise Retryable(
                    f"cannot reach the staging runner ({type(error).__name__}: {error})"
                ) from None
            if response.status_code >= 500:
                raise Retryable(f"HTTP {response.status_code} from the staging runner")
            return response

        try:
            response = await retry_within_deadline(
                attempt,
                deadline_s=self.deadline_s,
                max_attempts=self.max_attempts,
                backoff_base_s=self.backoff_base_s,
            )
        except GaveUp as gave_up:
            raise StagingUnavailable(gave_up.reason) from None
        if response.status_code == 404 and method == "GET":
            raise RunLost(f"the staging runner no longer knows run {path.rsplit('/', 1)[-1]}")
        return _parse(response)


def _parse(response: httpx.Response) -> StagingRun:
    if not response.is_success:
        raise StagingUnavailable(
            f"the staging runner refused the request (HTTP {response.status_code}:"
            f" {response.text[:200]})"
        )
    if len(response.content) > MAX_REPORT_BYTES:
        raise StagingUnavailable("the staging runner's answer is too large")
    try:
        body = orjson.loads(response.content)
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
