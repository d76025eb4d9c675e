"""The asyncio agent: the same behaviour as Agent, as a task on the running event loop.

Handlers may be coroutine functions (awaited on the loop) or plain functions (run in a
worker thread, so a FolderUpdater unpacking an archive does not stall the loop). Journal
writes (fsync) also go to a thread. Many agents can share one httpx.AsyncClient: the fleet
simulator runs thousands in one process."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, ParamSpec, TypeVar

import httpx

from plugin_client._base import AgentBase
from plugin_client._core import (
    DEFAULT_INTERVAL_S,
    DEFAULT_MAX_ARTIFACT_BYTES,
    MAX_RESPONSE_BYTES,
    HeartbeatOutcome,
    Plan,
    Prepared,
    Refuse,
    Resend,
    UpdatePlan,
    remove_quietly,
)
from plugin_client.errors import CommandRefused, HeartbeatFailed
from plugin_client.state import Report
from plugin_client.telemetry import EarlyReport

log = logging.getLogger("plugin_client")

_REPORT_RESPONSE_BYTES = 64 * 1024
P = ParamSpec("P")
T = TypeVar("T")


class ResponseTooLarge(Exception):
    pass


def _is_async_callable(fn: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - an object with an async __call__
    )


class AsyncAgent(AgentBase):
    """Heartbeats, telemetry and commands for one plugin installation (asyncio).

    Same arguments and environment variables as Agent; `http` is an httpx.AsyncClient (never
    closed by the agent when given) and `wait(delay) -> Awaitable[bool]` replaces the pause
    between heartbeats (True stops the loop).

    `await agent.start()` creates the loop task and returns at once; `await agent.stop()`
    ends it; `async with AsyncAgent(...) as agent:` does both (and closes its own client)."""

    def __init__(
        self,
        base_url: str | None = None,
        plugin_id: str | None = None,
        secret: str | None = None,
        *,
        plugin: str | None = None,
        version: str | None = None,
        public_keys: Sequence[str] | str | None = None,
        state_dir: str | os.PathLike[str] | None = None,
        env: str = "prod",
        http: httpx.AsyncClient | None = None,
        uptime: Callable[[], float] | None = None,
        meta: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
        installed_artifact: str | os.PathLike[str] | None = None,
        installed_sha256: str | None = None,
        interval_s: float = DEFAULT_INTERVAL_S,
        timeout_s: float = 10.0,
        max_artifact_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES,
        rng: random.Random | None = None,
        wait: Callable[[float], Awaitable[bool]] | None = None,
        early_report: EarlyReport | bool = True,
    ) -> None:
        super().__init__(
            base_url,
            plugin_id,
            secret,
            plugin=plugin,
            version=version,
            public_keys=public_keys,
            state_dir=state_dir,
            env=env,
            uptime=uptime,
            meta=meta,
            installed_artifact=installed_artifact,
            installed_sha256=installed_sha256,
            interval_s=interval_s,
            max_artifact_bytes=max_artifact_bytes,
            rng=rng,
            early_report=early_report,
        )
        self._owns_http = http is None
        self._http = http if http is not None else httpx.AsyncClient(timeout=timeout_s)
        self._custom_wait = wait
        self._beat_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._stopped: asyncio.Future[None] | None = None
        # The early-report alarm (it may ring from any thread the host counts in).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._woken: asyncio.Future[None] | None = None
        self._core.wake = self._ring

    async def _io(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """State writes fsync: off the loop, unless there is no state_dir (memory only)."""
        if self._core.state.directory is None:
            return fn(*args, **kwargs)
        return await asyncio.to_thread(fn, *args, **kwargs)

    # -- one heartbeat -------------------------------------------------------------------

    async def beat(self) -> dict[str, Any]:
        """Deliver pending acks/fails, send one heartbeat, run the commands it returns; the
        parsed answer. HeartbeatFailed when the heartbeat was not accepted (its counters
        stay for the next one)."""
        core = self._core
        async with self._beat_lock:
            core.beat_soon = False
            await self._flush_outbox()
            prepared, snapshot = core.heartbeat_request()
            try:
                status, headers, body = await self._exchange(prepared, MAX_RESPONSE_BYTES)
            except (httpx.HTTPError, ResponseTooLarge) as exc:
                raise core.heartbeat_unreachable(exc) from exc
            outcome = core.heartbeat_result(status, headers, body, snapshot)
            for refusal in outcome.refusals:
                await self._refuse(refusal)
            if outcome.error is not None:
                raise outcome.error
            for raw in outcome.commands:
                if self._stopping() and asyncio.current_task() is self._task:
                    break  # stopping: what is left is delivered again later
                await self._handle(raw, outcome)
            return outcome.body or {}

    async def _exchange(self, prepared: Prepared, limit: int) -> tuple[int, httpx.Headers, bytes]:
        async with self._http.stream(
            prepared.method,
            prepared.url,
            content=prepared.body or None,
            headers=prepared.headers,
            follow_redirects=False,
        ) as response:
            chunks, size = [], 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > limit:
                    raise ResponseTooLarge(f"answer larger than {limit} bytes")
                chunks.append(chunk)
            return response.status_code, response.headers, b"".join(chunks)

    # -- commands ------------------------------------------------------------------------

    async def _handle(self, raw: Any, outcome: HeartbeatOutcome) -> None:
        decision = self._core.check_command(raw, outcome.server_now)
        if decision is None:
            return
        if isinstance(decision, Resend):
            await self._deliver(decision.report)
        elif isinstance(decision, Refuse):
            await self._refuse(decision)
        else:
            await self._execute(decision)

    async def _refuse(self, refusal: Refuse) -> None:
        report = self._core.refusal_report(refusal)
        if refusal.record:
            await self._io(
                self._core.state.mark_done, refusal.command_id, refusal.command_type, report
            )
        await self._deliver(report)

    async def _execute(self, plan: Plan) -> None:
        core = self._core
        command = plan.command
        artifact: Path | None = None
        if isinstance(plan, UpdatePlan):
            try:
                artifact = await self._download(plan)
            except CommandRefused as exc:
                refusal = Refuse(
                    command.id, command.type, exc.reason, exc.retryable, record=not exc.retryable
                )
                await self._refuse(refusal)
                return
        try:
            # From here on the command never runs again, whatever happens to this process.
            await self._io(core.state.mark_started, command.id, command.type)
            handler = core.handlers[command.type]
            args = core.handler_args(plan, artifact)
            try:
                if _is_async_callable(handler):
                    await handler(*args)
                else:
                    result = await asyncio.to_thread(handler, *args)
                    if inspect.isawaitable(result):
                        await result
            except Exception as exc:
                report = await self._io(core.handler_failed, plan, exc)
            else:
                report = await self._io(core.applied, plan)
        finally:
            remove_quietly(artifact)
        await self._deliver(report)

    async def _download(self, plan: UpdatePlan) -> Path:
        """Stream the artifact to state_dir, hashing as it comes; CommandRefused when it
        cannot be fetched, is too large, or is not the signed bytes."""
        core = self._core
        request = core.download_request(plan)
        path = core.download_path(plan)
        digest = hashlib.sha256()
        size = 0
        stream: IO[bytes] | None = None
        try:
            async with self._http.stream(
                "GET",
                request.url,
                headers=request.headers,
                follow_redirects=not plan.signed_download,
            ) as response:
                if response.status_code != 200:
                    detail = b""
                    async for chunk in response.aiter_bytes():
                        detail = chunk[:300]
                        break
                    raise core.download_failed(
                        response.status_code, detail.decode("utf-8", "replace")
                    )
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > core.max_artifact_bytes:
                    raise core.too_large(int(declared))
                stream = await asyncio.to_thread(path.open, "wb")
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > core.max_artifact_bytes:
                        raise core.too_large(0)
                    digest.update(chunk)
                    stream.write(chunk)
                stream.close()
            core.check_artifact(plan, digest.hexdigest())
        except httpx.HTTPError as exc:
            _close(stream)
            remove_quietly(path)
            raise core.download_failed(None, f"{type(exc).__name__}: {exc}") from exc
        except BaseException:
            _close(stream)
            remove_quietly(path)
            raise
        return path

    # -- acks and fails ------------------------------------------------------------------

    async def _send_report(self, report: Report) -> bool:
        try:
            status, _, body = await self._exchange(
                self._core.report_request(report), _REPORT_RESPONSE_BYTES
            )
        except (httpx.HTTPError, ResponseTooLarge) as exc:
            log.warning(
                "plugin_client: could not send %s of command %s (%s); kept for later",
                report.action,
                report.command_id,
                exc,
            )
            return False
        return self._core.report_answered(report, status, body)

    async def _deliver(self, report: Report) -> None:
        if await self._send_report(report):
            await self._io(self._core.state.report_delivered, report.command_id)
        else:
            await self._io(self._core.state.queue_report, report)

    async def _flush_outbox(self) -> None:
        for report in self._core.state.pending_reports():
            if not await self._send_report(report):
                return  # the server is still away: keep the rest in order
            await self._io(self._core.state.report_delivered, report.command_id)

    # -- the loop ------------------------------------------------------------------------

    async def start(self, *, delay: float = 0.0) -> None:
        """Create the loop task and return; its first heartbeat goes out after `delay`
        seconds (default: at once). Calling start() on a running agent does nothing."""
        if self._task is not None and not self._task.done():
            return
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stopped = loop.create_future()
        self._woken = loop.create_future()
        self._task = loop.create_task(self._run(delay), name=f"selfheal-agent-{self.plugin}")

    async def stop(self, wait_s: float | None = 30.0) -> None:
        """End the loop: no heartbeat goes out after this returns. A command being applied is
        finished first; after `wait_s` seconds the task is cancelled."""
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)
        task = self._task
        if task is None or task is asyncio.current_task():
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), wait_s)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def aclose(self) -> None:
        """stop(), then close the HTTP client if the agent created it."""
        await self.stop()
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncAgent:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _stopping(self) -> bool:
        return self._stopped is not None and self._stopped.done()

    async def _custom_pause(self, delay: float) -> bool:
        """The host's own `wait` (a simulator's clock, a test's schedule), which the
        early-report alarm still interrupts: the host's pause is cancelled and the heartbeat
        goes out as soon as the spacing allows."""
        assert self._custom_wait is not None
        if self._woken is None or self._stopped is None or self._core.early_report is None:
            return await self._custom_wait(delay) or self._stopping()
        loop = asyncio.get_running_loop()
        pause = asyncio.ensure_future(self._custom_wait(delay))
        try:
            done, _ = await asyncio.wait(
                (pause, self._woken, self._stopped), return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            if not pause.done():
                pause.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pause
        if pause in done and not pause.cancelled():
            return pause.result() or self._stopping()
        if self._stopping():
            return True
        self._woken = loop.create_future()
        spacing = self._core.early_beat_at() - time.monotonic()
        if spacing > 0:
            stopped, _ = await asyncio.wait((self._stopped,), timeout=spacing)
            return bool(stopped)
        return False

    def _ring(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._set_woken()
        else:
            loop.call_soon_threadsafe(self._set_woken)

    def _set_woken(self) -> None:
        if self._woken is not None and not self._woken.done():
            self._woken.set_result(None)

    async def _wait(self, delay: float) -> bool:
        """Pause until the next heartbeat is due; True when stopping. Counts that look like
        trouble (the early-report alarm) end the pause early, though never sooner than the
        spacing after the last heartbeat."""
        if self._custom_wait is not None:
            return await self._custom_pause(delay)
        if self._stopped is None or self._woken is None:
            await asyncio.sleep(delay)
            return False
        loop = asyncio.get_running_loop()
        due = loop.time() + delay
        while True:
            # asyncio.wait on futures: no task per pause (thousands of agents share a loop).
            done, _ = await asyncio.wait(
                (self._stopped, self._woken),
                timeout=max(0.0, due - loop.time()),
                return_when=asyncio.FIRST_COMPLETED,
            )
            if self._stopped.done():
                return True
            if not done:
                return False
            self._woken = loop.create_future()
            due = min(due, loop.time() + (self._core.early_beat_at() - time.monotonic()))
            if loop.time() >= due:
                return False

    async def _run(self, delay: float) -> None:
        core = self._core
        failures = 0
        while True:
            if delay > 0 and await self._wait(delay):
                return
            if self._stopping():
                return
            try:
                await self.beat()
            except HeartbeatFailed as exc:
                failures += 1
                delay = core.backoff_delay(failures, exc.retry_after)
                continue
            except Exception:
                log.exception("plugin_client: heartbeat loop error")
                failures += 1
                delay = core.backoff_delay(failures, None)
                continue
            failures = 0
            # Right after a command took effect, so the control plane sees the new version.
            delay = 0.0 if core.beat_soon else core.next_delay()


def _close(stream: IO[bytes] | None) -> None:
    if stream is not None:
        with contextlib.suppress(OSError):
            stream.close()
