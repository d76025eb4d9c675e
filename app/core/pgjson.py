"""JSON that PostgreSQL will store. jsonb refuses the NUL character (\\u0000) and text columns
refuse NUL bytes; orjson refuses integers beyond 64 bits. Checked in the request that sent the
value, so a bad value is that request's 422, never a 500 or a failed batch."""

from __future__ import annotations

from typing import Any

import orjson


class UnstorableValue(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(has_nul(k) or has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(has_nul(v) for v in value)
    return False


def json_for_postgres(field: str, value: Any) -> str:
    try:
        text = orjson.dumps(value)
    except TypeError as exc:  # e.g. an integer beyond 64 bits
        if has_nul(value):
            raise UnstorableValue(field, "strings cannot contain NUL characters") from None
        raise UnstorableValue(field, str(exc)) from None
    # orjson writes a NUL as \u0000, so a document without that sequence has none; walking
    # the value (has_nul) is needed only when it appears (a NUL, or an escaped backslash
    # followed by "u0000"). This runs for every heartbeat.
    if b"\\u0000" in text and has_nul(value):
        raise UnstorableValue(field, "strings cannot contain NUL characters")
    return text.decode()
