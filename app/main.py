"""The application factory. Nothing connects at import time: the lifespan creates the engine,
Redis client, authenticator and heartbeat batcher, and disposes of them on shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
from collections.abc import AsyncIterator

import structlog
from fastapi import FastAPI

from app.core.bodylimit import BodyLimitMiddleware, BodyLimits
from app.core.crypto import SecretBox
from app.core.db import create_engine, create_sessionmaker, warn_about_privileges
from app.core.errors import install_error_handlers
from app.core.logging import configure_logging
from app.core.middleware import RequestContextMiddleware
from app.core.ratelimit import RateLimiter
from app.core.redis import create_redis
from app.core.settings import Settings, get_settings, libpq_url
from app.dashboard.routes import install as install_dashboard
from app.healing.routes import router as healing_router
from app.health.routes import router as health_router
from app.health.routes import update_pool_gauges
from app.incidents.routes import router as incidents_router
from app.maintenance.routes import router as maintenance_router
from app.plugins.auth import CredentialLoader, PluginAuthenticator, follow_credential_changes
from app.plugins.fastpath import HeartbeatFastPath, SelfhealAPI
from app.plugins.ingest import HeartbeatBatcher
from app.plugins.retention import make_partitions_ahead
from app.plugins.routes import router as plugins_router
from app.policy.routes import router as policy_router
from app.services import Services

_POOL_GAUGE_EVERY_S = 5.0


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings.log_level)
    # A missing, public or short SELFHEAL_SECRET_KEY stops the API here (WeakSecretKey says
    # what to do), not at the first plugin request.
    box = SecretBox.for_settings(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(settings, role="api")
        redis = create_redis(settings)
        assert settings.database_url is not None
        sessionmaker = create_sessionmaker(engine)
        batcher = HeartbeatBatcher(
            libpq_url(settings.database_url),
            interval_s=settings.heartbeat_interval_s,
            lease_s=settings.command_lease_s,
            batch_max=settings.ingest_batch_max,
            connections=settings.ingest_connections,
            connect_timeout_s=settings.db_timeout_s,
            statement_timeout_s=settings.db_timeout_s,
            pooled=settings.transaction_pooling,
            make_partitions=functools.partial(
                make_partitions_ahead, sessionmaker, settings, why="ingest"
            ),
        )
        batcher.start()
        loader = CredentialLoader(
            libpq_url(settings.database_url),
            box,
            timeout_s=settings.db_timeout_s,
            pooled=settings.transaction_pooling,
        )
        loader.start()
        svc = Services(
            settings=settings,
            engine=engine,
            sessionmaker=sessionmaker,
            redis=redis,
            box=box,
            authenticator=PluginAuthenticator(
                loader,
                tolerance_s=settings.signature_tolerance_s,
                cache_ttl_s=settings.auth_cache_ttl_s,
            ),
            batcher=batcher,
            limiter=RateLimiter(redis, settings.redis_prefix),
        )
        app.state.services = svc
        await warn_about_privileges(engine, settings.db_timeout_s)
        # Heartbeat partitions ahead, once (the workers keep them every minute): bounded by the
        # DB timeout, logged and skipped on failure.
        await make_partitions_ahead(sessionmaker, settings, why="startup")
        # Everything built so far lives as long as the process: keep it out of the cyclic
        # collector's full passes, which otherwise show up as latency spikes under load.
        gc.freeze()
        # A young-generation pass every 10,000 allocations instead of 700: each pass walks
        # the objects of the requests in flight, so under load the default threshold made
        # the collector a few per cent of the heartbeat path's CPU.
        gc.set_threshold(10_000, *gc.get_threshold()[1:])
        background = [asyncio.create_task(_refresh_pool_gauges(svc))]
        if settings.listen_url:
            background.append(
                asyncio.create_task(
                    follow_credential_changes(libpq_url(settings.listen_url), svc.authenticator)
                )
            )
            # Serve once credential changes are being followed (or after a bounded wait, when
            # the database is down: /health then says so).
            await svc.authenticator.wait_until_listening(timeout_s=3.0)
        else:
            # Behind a transaction pooler without DATABASE_DIRECT_URL: no LISTEN (it would
            # never hear a notification), credentials kept 5 s at most, /health degraded.
            structlog.get_logger(__name__).warning(
                "credential_changes_not_followed",
                reason="SELFHEAL_DB_POOLER=transaction and DATABASE_DIRECT_URL is unset",
            )
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await batcher.close()
            await loader.close()
            await redis.aclose()
            await engine.dispose()

    # Heartbeats are answered before FastAPI's stack (app/plugins/fastpath.py).
    app = SelfhealAPI(
        title="selfheal",
        version="0.1.0",
        lifespan=lifespan,
        docs_url="/api/docs",
        openapi_url="/api/openapi.json",
        redoc_url=None,
    )
    install_error_handlers(app)
    # Added last = outermost: request context wraps the heartbeat fast path too (it serves
    # the heartbeats SelfhealAPI passes on: chunked bodies and the like).
    app.add_middleware(HeartbeatFastPath, owner=app)
    # Every body is bounded before anything reads it, the heartbeat's too.
    app.add_middleware(BodyLimitMiddleware, limits=BodyLimits.from_settings(settings))
    app.add_middleware(RequestContextMiddleware)
    app.include_router(health_router)
    app.include_router(plugins_router)
    app.include_router(policy_router)
    app.include_router(incidents_router)
    app.include_router(healing_router)
    app.include_router(maintenance_router)
    install_dashboard(app)
    return app


async def _refresh_pool_gauges(svc: Services) -> None:
    while True:
        update_pool_gauges(svc)
        await asyncio.sleep(_POOL_GAUGE_EVERY_S)
