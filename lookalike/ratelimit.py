"""Per-client rate limiting: a token bucket per client in Redis, taken atomically by one Lua script.

Every worker replica shares the buckets, and the clock is Redis' own (``TIME``), so
replicas with skewed clocks agree. A bucket holds at most ``burst`` tokens, earns
``rate_per_s`` per second, and a query costs one; a bucket nobody touched for a full
refill expires.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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


class TokenBucket:
    """``take(client)`` -> may this client send one more query now?"""

    def __init__(self, client: Any, *, rate_per_s: float, burst: int, namespace: str = "lookalike:ratelimit") -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate_per_s must be > 0 and burst >= 1")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.namespace = namespace
        self._take = client.register_script(TAKE)

    def take(self, client_id: str, cost: int = 1) -> Decision:
        taken, left, wait_us = self._take(keys=[f"{self.namespace}:{client_id}"],
                                          args=[repr(self.rate_per_s), self.burst, cost])
        return Decision(bool(taken), float(left), int(wait_us) / 1e6)
