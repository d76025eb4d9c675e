"""The shared Redis client (replay cache for non-heartbeat requests, later the arq queue)."""

from __future__ import annotations

from redis.asyncio import Redis

from app.core.settings import Settings


def create_redis(settings: Settings) -> Redis:
    if not settings.redis_url:
        raise RuntimeError("REDIS_URL is not set and no embedded Redis was started")
    client: Redis = Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
        health_check_interval=30,
        client_name="selfheal-api",
    )
    return client


def queue_name(settings: Settings) -> str:
    """The arq queue of this deployment (its Redis prefix keeps deployments apart)."""
    return f"{settings.redis_prefix}arq:queue"


def health_check_key(settings: Settings) -> str:
    """Where arq workers report they are alive; GET /health reads it."""
    return f"{queue_name(settings)}:health-check"


def decision_breaker_key(settings: Settings) -> str:
    """A hash: worker name -> its decision-service circuit breaker, with the time it wrote."""
    return f"{settings.redis_prefix}decision-breaker"
