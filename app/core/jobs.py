"""arq jobs and their results as JSON, never pickle.

arq stores each job (function name, arguments, tries, enqueue time) and each result in Redis,
pickled by default: whoever can write to that Redis could then run code in every worker that
unpickles. Here both go through `dump_job` / `load_job` (the worker's and every enqueuing
pool's `job_serializer` / `job_deserializer`):
- a job's arguments must be strings (a UUID is passed as str and parsed back in the job):
  anything else fails at enqueue time (arq raises SerializationError);
- a result is made JSON-safe: an exception becomes "<Type>: <message>";
- bytes that are not a JSON object of the job shape are refused before anything is built from
  them; the worker logs `job_refused_not_json` with the job id and drops the job (arq records it
  as failed). Nothing in the refused bytes is executed: JSON parsing builds plain values only."""

from __future__ import annotations

import contextvars
from typing import Any

import orjson
import structlog

log = structlog.get_logger("selfheal.worker")

# The job a worker is deserialising (set by the worker around each job): names it in the log.
current_job_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "current_job_id", default=None
)

_JOB_KEYS = frozenset({"t", "f", "a", "k", "et"})


class NotAJsonJob(ValueError):
    """Bytes under a job key that are not a JSON job (pickle, garbage)."""


def dump_job(data: dict[str, Any]) -> bytes:
    """arq's `job_serializer`: a job (keys t, f, a, k, et) or a result (those plus s, r, ...)."""
    if "s" in data:  # a result: whatever the job returned or raised, made JSON-safe
        return orjson.dumps(data, default=_jsonable_result)
    arguments = [*data.get("a", ()), *dict(data.get("k") or {}).values()]
    for value in arguments:
        if not isinstance(value, str):
            raise TypeError(
                f"job {data.get('f')!r}: arguments must be strings, not {type(value).__name__}"
            )
    return orjson.dumps(data)


def load_job(raw: bytes) -> dict[str, Any]:
    """arq's `job_deserializer`: JSON only. Anything else (a pickle injected into Redis) is
    refused and logged, never unpickled."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        data = None
    if not isinstance(data, dict) or not _JOB_KEYS <= data.keys():
        job_id = current_job_id.get()
        log.warning(
            "job_refused_not_json",
            job_id=job_id,
            starts_with=bytes(raw[:8]).hex(),
            size=len(raw),
        )
        raise NotAJsonJob(f"job {job_id or '?'} is not a JSON job; refused")
    return data


def _jsonable_result(value: object) -> Any:
    if isinstance(value, BaseException):
        return f"{type(value).__name__}: {value}"
    return str(value)
