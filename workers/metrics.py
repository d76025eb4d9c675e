"""The worker's own Prometheus metrics, served by each worker process on
SELFHEAL_WORKER_METRICS_HOST:SELFHEAL_WORKER_METRICS_PORT (0: off), next to the API's /metrics.

A registry of its own, not prometheus_client's default one: the worker imports the API's
metric objects too (app/core/metrics.py, through the modules they live in), and serving those
zeros from the worker would only mislead. Each worker serves its own numbers; Prometheus adds
them up across workers (`sum by (lane)`), as it does for any fleet of processes.

Lanes (workers/lanes.py): `ticks` (detect, heal, deliver, prune, seal: run in-process, never
queued behind per-incident work) and `steps` (arq's queue: one `advance` job per incident)."""

from __future__ import annotations

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = structlog.get_logger("selfheal.worker")

REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

JOB_DELAY = Histogram(
    "selfheal_worker_job_delay_seconds",
    "Time from when a job was due (its tick, or its enqueue time) to when it started, by lane",
    ["lane", "job"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
JOB_DURATION = Histogram(
    "selfheal_worker_job_duration_seconds",
    "How long a job ran, by lane",
    ["lane", "job"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
JOBS = Counter(
    "selfheal_worker_jobs_total",
    "Jobs run, by lane and outcome (ok, refused, failed, timeout)",
    ["lane", "job", "outcome"],
    registry=REGISTRY,
)
TICKS_SKIPPED = Counter(
    "selfheal_worker_ticks_skipped_total",
    "Ticks this worker did not claim because its run of the previous tick had not ended",
    ["job"],
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge(
    "selfheal_worker_queue_depth",
    "Jobs waiting: the arq queue of per-incident steps (fleet-wide, as this worker last read it),"
    " and the ticks this worker is running",
    ["lane"],
    registry=REGISTRY,
)
BREAKER_STATE = Gauge(
    "selfheal_worker_decision_breaker_state",
    "This worker's decision-service circuit breaker: 1 for its current state, 0 for the others",
    ["state"],
    registry=REGISTRY,
)
BREAKER_STATES = ("closed", "open", "half_open")
# Where this process already serves REGISTRY: a worker rebuilt after a Redis restart
# (workers/reconnect.py) keeps the server it started with.
_serving: tuple[str, int] | None = None


def set_breaker_state(state: str) -> None:
    for known in BREAKER_STATES:
        BREAKER_STATE.labels(known).set(1 if known == state else 0)


def serve_metrics(host: str, port: int) -> bool:
    """Serve REGISTRY on http://host:port/metrics (a daemon thread); False, with a warning, when
    the port is taken (say a second worker on the same machine with the same setting): the
    worker runs on without its metrics rather than not at all."""
    global _serving
    if port == 0:
        return False
    if _serving == (host, port):
        return True
    try:
        start_http_server(port, addr=host, registry=REGISTRY)
    except OSError as exc:
        log.warning(
            "worker_metrics_unavailable",
            host=host,
            port=port,
            error=f"{type(exc).__name__}: {exc}"[:200],
            hint="give each worker on this machine its own SELFHEAL_WORKER_METRICS_PORT",
        )
        return False
    _serving = (host, port)
    log.info("worker_metrics_serving", url=f"http://{host}:{port}/metrics")
    return True
