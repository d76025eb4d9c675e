"""The public surface Agent and AsyncAgent share: counting, handler registration, read-only
state. None of it does I/O, so it is the same (synchronous) for both."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from plugin_client._core import (
    DEFAULT_INTERVAL_S,
    DEFAULT_MAX_ARTIFACT_BYTES,
    AgentCore,
    AgentStats,
    Updater,
    resolve_settings,
)
from plugin_client.telemetry import EarlyReport

if TYPE_CHECKING:
    from plugin_client.middleware import ASGIApp, SelfhealMiddleware

UpdateHandlerT = TypeVar("UpdateHandlerT", bound=Callable[[str, Path], object])
RollbackHandlerT = TypeVar("RollbackHandlerT", bound=Callable[[str], object])
ConfigHandlerT = TypeVar("ConfigHandlerT", bound=Callable[[dict[str, Any]], object])
HoldsT = TypeVar("HoldsT", bound=Callable[[str, str | None], bool])
UpdaterT = TypeVar("UpdaterT", bound=Updater)


class WebhookScope:
    """`with agent.webhook():` (or `async with`) around one webhook call: one attempt, and a
    failure when the block raises (the exception goes on) or calls `failed()` (for a call
    that returned an error status without raising). A cancelled block counts nothing."""

    def __init__(self, agent: AgentBase) -> None:
        self._agent = agent
        self._failed = False

    def failed(self) -> None:
        self._failed = True

    def __enter__(self) -> WebhookScope:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None and not isinstance(exc, Exception):
            return  # cancelled or interrupted: the webhook neither succeeded nor failed
        self._agent.record_webhook(ok=exc is None and not self._failed)

    async def __aenter__(self) -> WebhookScope:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)


class AgentBase:
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
        uptime: Callable[[], float] | None = None,
        meta: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
        installed_artifact: str | os.PathLike[str] | None = None,
        installed_sha256: str | None = None,
        interval_s: float = DEFAULT_INTERVAL_S,
        max_artifact_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES,
        rng: random.Random | None = None,
        early_report: EarlyReport | bool = True,
    ) -> None:
        settings = resolve_settings(
            base_url=base_url,
            plugin_id=plugin_id,
            secret=secret,
            plugin=plugin,
            version=version,
            public_keys=public_keys,
            state_dir=state_dir,
            env=env,
        )
        self._core = AgentCore(
            settings,
            uptime=uptime,
            meta=meta,
            installed_artifact=installed_artifact,
            installed_sha256=installed_sha256,
            interval_s=interval_s,
            max_artifact_bytes=max_artifact_bytes,
            rng=rng,
            early_report=(
                EarlyReport()
                if early_report is True
                else early_report
                if isinstance(early_report, EarlyReport)
                else None
            ),
        )

    # -- read-only state -----------------------------------------------------------------

    @property
    def version(self) -> str:
        """The version running now (changes after a successful update or rollback)."""
        return self._core.version

    @property
    def plugin(self) -> str:
        return self._core.settings.plugin

    @property
    def plugin_id(self) -> str:
        return self._core.settings.plugin_id

    @property
    def state_dir(self) -> Path | None:
        return self._core.settings.state_dir

    @property
    def stats(self) -> AgentStats:
        """A copy of the counters of what the agent did."""
        return self._core.stats

    @property
    def next_heartbeat_s(self) -> float:
        """The interval the control plane asked for last (before jitter)."""
        return self._core.next_heartbeat_s

    # -- counting ------------------------------------------------------------------------

    def record_request(self, count: int = 1) -> None:
        self._core.counters.add_requests(count)

    def record_error(self, exc: BaseException | None = None, count: int = 1) -> None:
        """Count `count` errors; `exc` is accepted for symmetry with logging and not sent."""
        self._core.counters.add_errors(count)

    def record_webhook(self, ok: bool = True, count: int = 1) -> None:
        self._core.counters.add_webhooks(ok=ok, count=count)

    def record_latency(self, ms: float) -> None:
        """One request's latency in milliseconds; the next heartbeat sends their p95."""
        self._core.counters.add_latency(ms)

    def pending_telemetry(self) -> dict[str, Any]:
        """The telemetry the next heartbeat would carry (what is owed since the last accepted
        one)."""
        return self._core.counters.snapshot().telemetry()

    def webhook(self) -> WebhookScope:
        return WebhookScope(self)

    # -- handlers ------------------------------------------------------------------------

    def on_update(self, fn: UpdateHandlerT) -> UpdateHandlerT:
        """Decorator: fn(version, artifact_path) installs a verified artifact; raise to fail."""
        self._core.handlers["update"] = fn
        return fn

    def on_rollback(self, fn: RollbackHandlerT) -> RollbackHandlerT:
        """Decorator: fn(version) switches back to a version this plugin ran and holds."""
        self._core.handlers["rollback"] = fn
        return fn

    def on_config(self, fn: ConfigHandlerT) -> ConfigHandlerT:
        """Decorator: fn(values) applies configuration values."""
        self._core.handlers["config"] = fn
        return fn

    def holds_version(self, fn: HoldsT) -> HoldsT:
        """Decorator: fn(version, sha256 or None) -> bool, whether that version can still be
        switched back to. Without it, a rollback needs only the agent's own record."""
        self._core.holds = fn
        return fn

    def use(self, updater: UpdaterT) -> UpdaterT:
        """Let `updater` (a FolderUpdater) handle updates and rollbacks, and answer "do we
        still hold this version?"."""
        self._core.handlers["update"] = updater.on_update
        self._core.handlers["rollback"] = updater.on_rollback
        self._core.holds = updater.holds
        return updater

    def asgi_middleware(self, app: ASGIApp) -> SelfhealMiddleware:
        """`app = agent.asgi_middleware(app)`: count requests, 5xx, exceptions and latency."""
        from plugin_client.middleware import SelfhealMiddleware

        return SelfhealMiddleware(app, agent=self)
