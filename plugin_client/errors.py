"""Exceptions the client raises or that handlers may raise."""

from __future__ import annotations


class CommandRefused(Exception):
    """A command that must not run, or did not run. `reason` is what the control plane gets in
    the command's `fail` report; `retryable` tells it whether sending the command again may
    work (a download that timed out) or not (a bad signature).

    A handler may raise it too, to choose the reason and the retryable flag itself."""

    def __init__(self, reason: str, *, retryable: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable


class HeartbeatFailed(Exception):
    """A heartbeat that was not accepted: the control plane could not be reached, answered
    something else than 200, or answered 200 without a valid signature. The counters it
    carried stay and go out with the next heartbeat.

    `status_code` is None when no answer arrived; `retry_after` holds the server's
    Retry-After in seconds when it sent one."""

    def __init__(
        self, message: str, *, status_code: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.retry_after = retry_after


class UpdateFailed(Exception):
    """A FolderUpdater switch that did not take: the previous version is active again."""
