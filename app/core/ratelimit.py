"""Rate limits shared by every API process, in Redis: one round trip per request, whatever the
number of limits it counts against.

The algorithm is GCRA (the generic cell rate algorithm, a token bucket kept as one timestamp
per key): a limit of N requests per W seconds lets a client send up to N at once, then one
every W/N seconds. Each key holds its "theoretical arrival time"; a request is allowed when
that time, pushed by one interval, is no more than W ahead of now. The Lua script below checks
every limit of a request first and counts the request against all of them only when all allow
it, so a refused request costs nothing: a flooding installation keeps getting 429 without
eating its tenant's budget. Redis's own clock is the only clock (API hosts may disagree).
The answer is the wait, in milliseconds, before the request would be allowed: the
Retry-After.

When Redis cannot be reached, the limiter fails open: requests are let through and the
limiter says so in the log (once per outage) and in `selfheal_rate_limiter_unavailable_total`;
for `PAUSE_AFTER_FAILURE_S` after a failure it does not even try, so a Redis that hangs costs
one timeout, not one per request. Heartbeats must land without Redis (they never needed it),
and ops must reach the API during a Redis outage.

docs/decisions.md says why this script and not the `limits` library."""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from dataclasses import dataclass

import structlog
from prometheus_client import Counter
from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.core.errors import ApiError
from app.core.settings import Settings

log = structlog.get_logger("selfheal.ratelimit")

PAUSE_AFTER_FAILURE_S = 5.0

RATE_LIMITED = Counter(
    "selfheal_rate_limited_total", "Requests refused with 429, by limit", ["limit"]
)
LIMITER_UNAVAILABLE = Counter(
    "selfheal_rate_limiter_unavailable_total",
    "Requests let through unchecked because Redis could not be reached",
)

# Several requests' checks in one call (those that arrived in the same turn of the event
# loop). ARGV[1]: the number of requests; then per request its number of limits n, then n pairs
# (interval in ms between requests, burst window in ms). KEYS: the requests' limit keys, in
# order. Requests are decided one after the other, so two requests of one installation in the
# same call count as two. Returns, per request, {0, 0} when allowed (and counted), else {wait in
# ms, the index (from 1, within the request) of the limit that needs the longest wait}.
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local requests = tonumber(ARGV[1])
local arg = 2
local key = 1
local answers = {}
for r = 1, requests do
  local n = tonumber(ARGV[arg])
  arg = arg + 1
  local wait = 0
  local refusing = 0
  local next_tat = {}
  for i = 1, n do
    local interval = tonumber(ARGV[arg])
    local window = tonumber(ARGV[arg + 1])
    arg = arg + 2
    local tat = tonumber(redis.call('GET', KEYS[key + i - 1])) or now
    if tat < now then tat = now end
    local candidate = tat + interval
    local allowed_at = candidate - window
    if allowed_at > now and allowed_at - now > wait then
      wait = allowed_at - now
      refusing = i
    end
    next_tat[i] = candidate
  end
  if wait == 0 then
    for i = 1, n do
      redis.call('SET', KEYS[key + i - 1], next_tat[i], 'PX', math.max(1, next_tat[i] - now))
    end
  end
  answers[r] = {wait, refusing}
  key = key + n
end
return answers
"""


@dataclass(frozen=True, slots=True)
class Limit:
    """`count` requests per `window_s` for one key (`name` labels the metric)."""

    name: str
    key: str
    count: int
    window_s: float


class RateLimited(Exception):
    def __init__(self, limit: str, retry_after_s: int) -> None:
        super().__init__(f"{limit} rate limit: retry after {retry_after_s} s")
        self.limit = limit
        self.retry_after_s = retry_after_s


class RateLimiter:
    """Checks limits in Redis. The checks of the requests that arrive in one turn of the event
    loop go to Redis together, in one script call: under load a process makes one round trip
    for many requests instead of one each (a heartbeat's share of a Redis call was most of the
    limiter's cost), and a lone request still makes exactly one."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        self._script = redis.register_script(_GCRA)
        self._prefix = f"{prefix}ratelimit:"
        self._paused_until = 0.0
        self._down = False
        self._pending: list[tuple[list[Limit], asyncio.Future[tuple[int, int]]]] = []

    def limit(self, name: str, subject: str, count: int, window_s: float) -> Limit | None:
        """The limit `name` for `subject` (an installation id, a tenant, a token's digest);
        None when `count` is 0 (that limit is off)."""
        if count <= 0:
            return None
        return Limit(name, f"{self._prefix}{name}:{subject}", count, window_s)

    async def check(self, *limits: Limit | None) -> None:
        """Count one request against every limit, or raise RateLimited (nothing counted)
        naming the limit that refused and the seconds to wait. Fails open (see above)."""
        active = [limit for limit in limits if limit is not None]
        if not active or time.monotonic() < self._paused_until:
            if active:
                LIMITER_UNAVAILABLE.inc()
            return
        answer: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append((active, answer))
        wait_ms, refusing = await answer
        if wait_ms > 0:
            name = active[refusing - 1].name
            RATE_LIMITED.labels(name).inc()
            raise RateLimited(name, max(1, math.ceil(wait_ms / 1000)))

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        asyncio.get_running_loop().create_task(self._decide(batch))

    async def _decide(
        self, batch: list[tuple[list[Limit], asyncio.Future[tuple[int, int]]]]
    ) -> None:
        keys: list[str] = []
        args: list[int] = [len(batch)]
        for active, _ in batch:
            args.append(len(active))
            for limit in active:
                window_ms = max(1, round(limit.window_s * 1000))
                args += [max(1, window_ms // limit.count), window_ms]
                keys.append(limit.key)
        try:
            answers = await self._script(keys=keys, args=args)
        except (RedisError, OSError, TimeoutError) as exc:
            self._paused_until = time.monotonic() + PAUSE_AFTER_FAILURE_S
            LIMITER_UNAVAILABLE.inc(len(batch))
            if not self._down:
                self._down = True
                log.warning(
                    "rate_limiter_unavailable",
                    error=f"{type(exc).__name__}: {exc}"[:300],
                    action="requests are let through unchecked until Redis answers",
                )
            answers = [(0, 0)] * len(batch)
        except BaseException as exc:  # cancelled with the process: the waiters must not hang
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            raise
        else:
            if self._down:
                self._down = False
                log.info("rate_limiter_available")
        for (_, future), (wait_ms, refusing) in zip(batch, answers, strict=True):
            if not future.done():  # its request may have been cancelled meanwhile
                future.set_result((int(wait_ms), int(refusing)))


def too_many(exc: RateLimited, what: str) -> ApiError:
    return ApiError(
        429,
        "rate_limited",
        f"too many requests {what}; retry after {exc.retry_after_s} s",
        headers={"Retry-After": str(exc.retry_after_s)},
    )


async def limit_plugin_request(
    limiter: RateLimiter, settings: Settings, installation_id: str, tenant_id: str
) -> None:
    """A signed plugin request: per installation and per tenant (429 with Retry-After)."""
    try:
        await limiter.check(
            limiter.limit(
                "installation",
                installation_id,
                settings.rate_per_installation,
                settings.rate_window_s,
            ),
            limiter.limit("tenant", tenant_id, settings.rate_per_tenant, settings.rate_window_s),
        )
    except RateLimited as exc:
        raise too_many(exc, f"from this {exc.limit}") from None


async def limit_ops_token(limiter: RateLimiter, settings: Settings, token: str) -> None:
    """An ops API request, per bearer token (its digest), before the token is looked up."""
    digest = hashlib.sha256(token.encode()).hexdigest()[:32]
    try:
        await limiter.check(
            limiter.limit("ops_token", digest, settings.rate_per_ops_token, settings.rate_window_s)
        )
    except RateLimited as exc:
        raise too_many(exc, "with this token") from None
