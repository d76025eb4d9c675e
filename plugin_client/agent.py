"""The synchronous agent: a background thread that sends heartbeats and runs commands."""

from __future__ import annotations

import hashlib
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

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


class ResponseTooLarge(Exception):
    pass


class Agent(AgentBase):
    """Heartbeats, telemetry and commands for one plugin installation (threads).

    Every argument left out is read from the environment (see docs/plugin_client.md):
    base_url SELFHEAL_URL, plugin_id SELFHEAL_PLUGIN_ID, secret SELFHEAL_PLUGIN_SECRET,
    plugin SELFHEAL_PLUGIN_NAME, version SELFHEAL_PLUGIN_VERSION, public_keys
    SELFHEAL_PUBLIC_KEYS (comma-separated), state_dir SELFHEAL_STATE_DIR.

    `http`: an httpx.Client to use (never closed by the agent); `wait(delay) -> bool` replaces
    the pause between heartbeats (True stops the loop), for tests and simulators."""

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
        http: httpx.Client | None = None,
        uptime: Callable[[], float] | None = None,
        meta: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
        installed_artifact: str | os.PathLike[str] | None = None,
        installed_sha256: str | None = None,
        interval_s: float = DEFAULT_INTERVAL_S,
        timeout_s: float = 10.0,
        max_artifact_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES,
        rng: random.Random | None = None,
        wait: Callable[[float], bool] | None = None,
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
        self._http = http if http is not None else httpx.Client(timeout=timeout_s)
        self._custom_wait = wait
        self._beat_lock = threading.Lock()
        self._stop = threading.Event()
        # Set by stop() and by the early-report alarm: either ends the pause between beats.
        self._wake = threading.Event()
        self._core.wake = self._wake.set
        self._thread: threading.Thread | None = None

    # -- one heartbeat -------------------------------------------------------------------

    def beat(self) -> dict[str, Any]:
        """Deliver pending acks/fails, send one heartbeat, run the commands it returns; the
        parsed answer. HeartbeatFailed when the heartbeat was not accepted (its counters
        stay for the next one)."""
        core = self._core
        with self._beat_lock:
            core.beat_soon = False
            self._flush_outbox()
            prepared, snapshot = core.heartbeat_request()
            try:
                status, headers, body = self._exchange(prepared, MAX_RESPONSE_BYTES)
            except (httpx.HTTPError, ResponseTooLarge) as exc:
                raise core.heartbeat_unreachable(exc) from exc
            outcome = core.heartbeat_result(status, headers, body, snapshot)
            for refusal in outcome.refusals:
                self._refuse(refusal)
            if outcome.error is not None:
                raise outcome.error
            for raw in outcome.commands:
                if self._stop.is_set() and threading.current_thread() is self._thread:
                    break  # stopping: what is left is delivered again later
                self._handle(raw, outcome)
            return outcome.body or {}

    def _exchange(self, prepared: Prepared, limit: int) -> tuple[int, httpx.Headers, bytes]:
        with self._http.stream(
            prepared.method,
            prepared.url,
            content=prepared.body or None,
            headers=prepared.headers,
            follow_redirects=False,
        ) as response:
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > limit:
                    raise ResponseTooLarge(f"answer larger than {limit} bytes")
                chunks.append(chunk)
            return response.status_code, response.headers, b"".join(chunks)

    # -- commands ------------------------------------------------------------------------

    def _handle(self, raw: Any, outcome: HeartbeatOutcome) -> None:
        decision = self._core.check_command(raw, outcome.server_now)
        if decision is None:
            return
        if isinstance(decision, Resend):
            self._deliver(decision.report)
        elif isinstance(decision, Refuse):
            self._refuse(decision)
        else:
            self._execute(decision)

    def _refuse(self, refusal: Refuse) -> None:
        report = self._core.refusal_report(refusal)
        if refusal.record:
            self._core.state.mark_done(refusal.command_id, refusal.command_type, report)
        self._deliver(report)

    def _execute(self, plan: Plan) -> None:
        core = self._core
        command = plan.command
        artifact: Path | None = None
        if isinstance(plan, UpdatePlan):
            try:
                artifact = self._download(plan)
            except CommandRefused as exc:
                refusal = Refuse(
                    command.id, command.type, exc.reason, exc.retryable, record=not exc.retryable
                )
                self._refuse(refusal)
                return
        try:
            # From here on the command never runs again, whatever happens to this process.
            core.state.mark_started(command.id, command.type)
            handler = core.handlers[command.type]
            try:
                handler(*core.handler_args(plan, artifact))
            except Exception as exc:
                report = core.handler_failed(plan, exc)
            else:
                report = core.applied(plan)
        finally:
            remove_quietly(artifact)
        self._deliver(report)

    def _download(self, plan: UpdatePlan) -> Path:
        """Stream the artifact to state_dir, hashing as it comes; CommandRefused when it
        cannot be fetched, is too large, or is not the signed bytes."""
        core = self._core
        request = core.download_request(plan)
        path = core.download_path(plan)
        digest = hashlib.sha256()
        size = 0
        try:
            with self._http.stream(
                "GET",
                request.url,
                headers=request.headers,
                follow_redirects=not plan.signed_download,
            ) as response:
                if response.status_code != 200:
                    detail = next(response.iter_bytes(), b"")[:300]
                    raise core.download_failed(
                        response.status_code, detail.decode("utf-8", "replace")
                    )
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > core.max_artifact_bytes:
                    raise core.too_large(int(declared))
                with path.open("wb") as stream:
                    for chunk in response.iter_bytes():
                        size += len(chunk)
                        if size > core.max_artifact_bytes:
                            raise core.too_large(0)
                        digest.update(chunk)
                        stream.write(chunk)
            core.check_artifact(plan, digest.hexdigest())
        except httpx.HTTPError as exc:
            remove_quietly(path)
            raise core.download_failed(None, f"{type(exc).__name__}: {exc}") from exc
        except BaseException:
            remove_quietly(path)
            raise
        return path

    # -- acks and fails ------------------------------------------------------------------

    def _send_report(self, report: Report) -> bool:
        try:
            status, _, body = self._exchange(
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

    def _deliver(self, report: Report) -> None:
        if self._send_report(report):
            self._core.state.report_delivered(report.command_id)
        else:
            self._core.state.queue_report(report)

    def _flush_outbox(self) -> None:
        for report in self._core.state.pending_reports():
            if not self._send_report(report):
                return  # the server is still away: keep the rest in order
            self._core.state.report_delivered(report.command_id)

    # -- the loop ------------------------------------------------------------------------

    def start(self, *, delay: float = 0.0) -> None:
        """Start the background thread; its first heartbeat goes out after `delay` seconds
        (default: at once). Calling start() on a running agent does nothing."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._wake.clear()
        self._thread = threading.Thread(
            target=self._run, args=(delay,), name=f"selfheal-agent-{self.plugin}", daemon=True
        )
        self._thread.start()

    def stop(self, wait_s: float | None = 30.0) -> None:
        """Stop the loop: no heartbeat goes out after this returns. A command being applied
        is finished first (waiting at most `wait_s` seconds)."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(wait_s)

    def close(self) -> None:
        """stop(), then close the HTTP client if the agent created it."""
        self.stop()
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Agent:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _wait(self, delay: float) -> bool:
        """Pause until the next heartbeat is due; True when stopping. Counts that look like
        trouble (the early-report alarm) end the pause early, though never sooner than the
        spacing after the last heartbeat."""
        if self._custom_wait is not None:
            return self._custom_wait(delay) or self._stop.is_set()
        due = time.monotonic() + delay
        while True:
            woken = self._wake.wait(max(0.0, due - time.monotonic()))
            if self._stop.is_set():
                return True
            if not woken:
                return False
            self._wake.clear()
            due = min(due, self._core.early_beat_at())
            if time.monotonic() >= due:
                return False

    def _run(self, delay: float) -> None:
        core = self._core
        failures = 0
        while True:
            if delay > 0 and self._wait(delay):
                return
            if self._stop.is_set():
                return
            try:
                self.beat()
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
