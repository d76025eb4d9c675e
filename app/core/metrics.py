"""Prometheus metrics. With several API processes (`selfheal api --workers N`) the CLI sets
PROMETHEUS_MULTIPROC_DIR, and /metrics aggregates every process's samples."""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as prometheus_multiprocess

HEARTBEATS_ACCEPTED = Counter(
    "selfheal_heartbeats_accepted_total", "Heartbeats stored and answered with 200"
)
HEARTBEATS_REJECTED = Counter(
    "selfheal_heartbeats_rejected_total", "Heartbeats refused, by reason", ["reason"]
)
# Not a refusal: the plugin is told, verifiably, that this heartbeat was stored before.
HEARTBEATS_ALREADY_STORED = Counter(
    "selfheal_heartbeats_already_stored_total",
    "Copies of a stored heartbeat (a plugin sending again after a lost answer, or a replay),"
    " answered with the signed 401 replay",
)
REQUEST_LATENCY = Histogram(
    "selfheal_http_request_duration_seconds",
    "HTTP request latency by route template and status",
    ["method", "route", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
INGEST_BATCH_SIZE = Histogram(
    "selfheal_ingest_batch_size",
    "Heartbeats written per database statement",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
DB_POOL = Gauge(
    "selfheal_db_pool_connections",
    "SQLAlchemy pool connections by state",
    ["state"],
    multiprocess_mode="livesum",
)
COMMANDS_DELIVERED = Counter(
    "selfheal_commands_delivered_total", "Commands handed to plugins in heartbeat responses"
)
DECISION_BREAKER = Gauge(
    "selfheal_decision_breaker_workers",
    "Workers whose decision-service circuit breaker is in each state (as /health last read)",
    ["state"],
    multiprocess_mode="livemax",
)
OPEN_INCIDENTS = Gauge(
    "selfheal_incidents_open",
    "Open incidents by status and severity (read from PostgreSQL at scrape time)",
    ["status", "severity"],
    multiprocess_mode="livemax",
)
ATTEMPTS_IN_FLIGHT = Gauge(
    "selfheal_attempts_in_flight",
    "Healing attempts that may still change production, by status",
    ["status"],
    multiprocess_mode="livemax",
)
OUTBOX_WAITING = Gauge(
    "selfheal_outbox_waiting",
    "Notifications and feedback not delivered yet (waiting) or given up (dead), by kind",
    ["kind", "state"],
    multiprocess_mode="livemax",
)


def render_metrics() -> tuple[bytes, str]:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        prometheus_multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
