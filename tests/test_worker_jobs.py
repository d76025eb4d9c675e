"""No pickle (issue 10, item 4): arq jobs and results are JSON; a pickled job written into the
queue by someone who can reach Redis is refused, logged by its id, and runs nothing, while the
worker goes on with the next job."""

from __future__ import annotations

import contextlib
import pickle
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from arq import create_pool
from arq.connections import ArqRedis, RedisSettings
from arq.jobs import Job, SerializationError, deserialize_job_raw, serialize_result
from redis import Redis as SyncRedis

from app.core.jobs import NotAJsonJob, dump_job, load_job
from app.core.redis import queue_name
from app.core.settings import Settings
from tests.support.settings import REPO, settings_env
from workers.main import build_worker

pytestmark = pytest.mark.timeout(180)


class CreatesAFile:
    """What an attacker pickles: unpickling it calls open(path, "w"), which creates the file
    (any callable would do: os.system, subprocess.Popen...)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def pickled_job(function: str, marker: Path) -> bytes:
    """arq's own job format, pickled as arq does by default."""
    now_ms = int(time.time() * 1000)
    return pickle.dumps(
        {"t": 1, "f": function, "a": (CreatesAFile(marker),), "k": {}, "et": now_ms}
    )


def test_the_payload_is_live_when_unpickled(tmp_path: Path) -> None:
    """The control: arq's default (pickle.loads) would create the file."""
    marker = tmp_path / "unpickled"
    job = pickle.loads(pickled_job("prune", marker))
    job["a"][0].close()  # what unpickling built: the open file
    assert marker.exists()


def test_load_job_refuses_a_pickle_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    with pytest.raises(NotAJsonJob, match="not a JSON job"):
        load_job(pickled_job("prune", marker))
    assert not marker.exists()
    with pytest.raises(NotAJsonJob):
        load_job(b'["not", "a", "job"]')


def test_jobs_are_json_with_string_arguments_only() -> None:
    job: dict[str, Any] = {"t": None, "f": "advance", "a": ("c0ffee",), "k": {}, "et": 1}
    raw = dump_job(job)
    assert orjson.loads(raw) == {**job, "a": ["c0ffee"]}
    function, args, kwargs, _, _ = deserialize_job_raw(raw, deserializer=load_job)
    assert (function, list(args), kwargs) == ("advance", ["c0ffee"], {})
    with pytest.raises(TypeError, match="arguments must be strings, not UUID"):
        dump_job({**job, "a": (uuid.uuid4(),)})
    with pytest.raises(TypeError, match="arguments must be strings, not int"):
        dump_job({**job, "a": (), "k": {"n": 1}})


def test_results_are_json_an_exception_as_its_text() -> None:
    raw = serialize_result(
        "advance",
        ("x",),
        {},
        1,
        1,
        False,
        ValueError("boom"),
        2,
        3,
        "ref",
        "q",
        "id",
        serializer=dump_job,
    )
    assert raw is not None
    assert orjson.loads(raw)["r"] == "ValueError: boom"


async def test_the_worker_uses_json_for_jobs_and_results(settings: Settings) -> None:
    worker = build_worker(settings, handle_signals=False)
    assert (worker.job_serializer, worker.job_deserializer) == (dump_job, load_job)


@contextlib.contextmanager
def worker_logging_to(settings: Settings, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A real `selfheal worker` whose log (stderr, one JSON object a line) goes to `log`."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "worker"],
            env=settings_env(settings),
            cwd=REPO,
            stderr=out,
        )
    client = SyncRedis.from_url(settings.redis_url or "")
    try:
        deadline = time.monotonic() + 30
        while not client.exists(f"{queue_name(settings)}:health-check"):
            assert proc.poll() is None, f"worker exited with {proc.returncode}: {log.read_text()}"
            assert time.monotonic() < deadline, "the worker did not report healthy"
            time.sleep(0.05)
        yield proc
    finally:
        client.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError("the worker did not stop within 20 s of SIGTERM") from None


@contextlib.asynccontextmanager
async def json_pool(settings: Settings, *job_ids: str) -> AsyncIterator[ArqRedis]:
    pool = await create_pool(
        RedisSettings.from_dsn(settings.redis_url or ""),
        job_serializer=dump_job,
        job_deserializer=load_job,
        default_queue_name=queue_name(settings),
    )
    try:
        yield pool
    finally:
        # arq's job keys are not under our prefix: clean them up by hand.
        for job_id in job_ids:
            await pool.delete(*(f"arq:{kind}:{job_id}" for kind in ("job", "result", "retry")))
        await pool.aclose()


async def test_a_pickled_job_in_the_queue_does_nothing(settings: Settings, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    log = tmp_path / "worker.log"
    evil_id = f"{settings.redis_prefix}injected"
    good_id = f"{settings.redis_prefix}after-it"
    queue = queue_name(settings)
    async with json_pool(settings, evil_id, good_id) as pool:
        with worker_logging_to(settings, log) as proc:
            # As an attacker who can reach Redis would: the job's bytes under its key, its id
            # in the queue, due now.
            now_ms = int(time.time() * 1000)
            await pool.psetex(f"arq:job:{evil_id}", 60_000, pickled_job("prune", marker))
            await pool.zadd(queue, {evil_id: now_ms})
            good = await pool.enqueue_job("prune", _job_id=good_id)
            assert good is not None

            # The worker refuses the injected job (arq records it as failed)...
            evil = Job(evil_id, pool, _queue_name=queue, _deserializer=load_job)
            with pytest.raises(SerializationError, match="unable to deserialize job"):
                await evil.result(timeout=60, poll_delay=0.1)
            # ...and goes on with the next one.
            done = await good.result(timeout=60, poll_delay=0.1)
            assert set(done) == {"created", "dropped"} and done["dropped"] == 0
            assert proc.poll() is None
            assert await pool.zscore(queue, evil_id) is None
    assert not marker.exists()
    lines = [orjson.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    refused = [line for line in lines if line.get("event") == "job_refused_not_json"]
    assert refused and refused[0]["job_id"] == evil_id
    assert refused[0]["level"] == "warning"
    # arq's own traceback for it is left out: the warning says it.
    assert "deserializing job" not in log.read_text()
