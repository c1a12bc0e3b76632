"""Per-client rate limiting: a token bucket per client in Redis, taken atomically by one Lua script.

Every worker replica shares the buckets, and the clock is Redis' own (``TIME``), so
replicas with skewed clocks agree. A bucket holds at most ``burst`` tokens, earns
``rate_per_s`` per second, and a query costs one; a bucket nobody touched for a full
refill expires.

When Redis does not answer within the client's (short) socket timeout, or refuses, the
decision comes from a bucket of the same size in this process instead
(:class:`LocalBuckets`), and Redis is left alone for ``redis_retry_s`` so that a hung
server costs one timeout per retry period, not one per query. While Redis is away each
replica limits on its own: a client may get up to (replicas x rate).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import redis

log = logging.getLogger(__name__)

# KEYS[1]: the bucket (a hash: tokens, ts in microseconds). ARGV: rate per second, burst, cost.
# Returns {1 if taken else 0, tokens left (string), microseconds until `cost` tokens are there}.
TAKE = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil or ts == nil then
  tokens = burst
  ts = now
end
if now > ts then
  tokens = math.min(burst, tokens + (now - ts) * rate / 1000000)
  ts = now
end
local taken = 0
local wait_us = 0
if tokens >= cost then
  tokens = tokens - cost
  taken = 1
else
  wait_us = math.ceil((cost - tokens) / rate * 1000000)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(ts))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {taken, tostring(tokens), wait_us}
"""


@dataclass(frozen=True)
class Decision:
    allowed: bool
    tokens_left: float
    retry_after_s: float  # 0 when allowed
    local: bool = False  # decided by this process's bucket, Redis being away


class LocalBuckets:
    """Token buckets in this process, the same arithmetic as the Lua script on a monotonic
    clock; the least recently used are forgotten beyond ``max_clients``."""

    def __init__(self, *, rate_per_s: float, burst: int, max_clients: int = 100_000) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.max_clients = max_clients
        self._lock = threading.Lock()
        self._state: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, at)

    def take(self, client_id: str, cost: int = 1, *, now: float | None = None) -> Decision:
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, at = self._state.pop(client_id, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + max(0.0, now - at) * self.rate_per_s)
            allowed = tokens >= cost
            if allowed:
                tokens -= cost
            self._state[client_id] = (tokens, now)
            while len(self._state) > self.max_clients:
                self._state.popitem(last=False)
        wait_s = 0.0 if allowed else (cost - tokens) / self.rate_per_s
        return Decision(allowed, tokens, wait_s, local=True)


class TokenBucket:
    """``take(client)`` -> may this client send one more query now? Shared in Redis; in this
    process while Redis is away (module docstring). Give ``client`` a short socket timeout."""

    def __init__(self, client: Any, *, rate_per_s: float, burst: int, namespace: str = "lookalike:ratelimit",
                 redis_retry_s: float = 5.0) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate_per_s must be > 0 and burst >= 1")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.namespace = namespace
        self.redis_retry_s = redis_retry_s
        self.local = LocalBuckets(rate_per_s=rate_per_s, burst=burst)
        self.redis_failures = 0  # decisions Redis could not make
        self._take = client.register_script(TAKE)
        self._redis_away_until = 0.0
        self._warned_at = float("-inf")

    def take(self, client_id: str, cost: int = 1) -> Decision:
        if time.monotonic() >= self._redis_away_until:
            try:
                taken, left, wait_us = self._take(keys=[f"{self.namespace}:{client_id}"],
                                                  args=[repr(self.rate_per_s), self.burst, cost])
                return Decision(bool(taken), float(left), int(wait_us) / 1e6)
            except (redis.RedisError, OSError) as exc:
                self._redis_away(exc)
        return self.local.take(client_id, cost)

    def _redis_away(self, exc: BaseException) -> None:
        self.redis_failures += 1
        now = time.monotonic()
        self._redis_away_until = now + self.redis_retry_s
        if now - self._warned_at > 10:
            self._warned_at = now
            log.warning("rate limits from this process's buckets for %.0fs: Redis did not answer (%s: %s)",
                        self.redis_retry_s, type(exc).__name__, exc)
