"""Structured logs go to the standard error the process has when the line is written, even
after the stream it had when logging was configured is closed (structlog caches its loggers on
first use; a harness or host may swap sys.stderr)."""

from __future__ import annotations

import io
import json
import logging
import sys

import pytest
import structlog

from app.core.logging import configure_logging

pytestmark = pytest.mark.no_services


def test_logs_follow_sys_stderr_after_the_configured_one_is_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    configure_logging("info")
    log = structlog.get_logger("selfheal.test")
    log.info("first_line")  # cached on first use, while `first` is sys.stderr
    assert json.loads(first.getvalue())["event"] == "first_line"
    first.close()

    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    log.warning("second_line")
    # A logger of our own: a library's (uvicorn's) may have been given handlers by another test.
    logging.getLogger("selfheal.test.stdlib").warning("from the standard library")
    lines = [json.loads(line) for line in second.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["second_line", "from the standard library"]
