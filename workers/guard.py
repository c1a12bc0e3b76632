"""Who may ask, and how often: the query path's admission check, before any image is decoded.

With ``query_auth`` a query must be signed by a known client (:mod:`lookalike.auth`);
with ``rate_limit`` each client id has a token bucket in Redis
(:mod:`lookalike.ratelimit`). Both are off by default (the local demo) and on in
docker-compose.yml. A refused query gets an ``unauthorized`` or ``rate_limited`` error reply.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import redis

from lookalike import auth
from lookalike.clients import redis_client
from lookalike.errors import RateLimited
from lookalike.ratelimit import TokenBucket
from lookalike.settings import WorkerSettings

log = logging.getLogger(__name__)
ANONYMOUS = "anonymous"


class QueryGuard:
    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.keys = auth.load_keys(settings.query_keys, settings.query_keys_file) if settings.query_auth else {}
        if settings.query_auth and not self.keys:
            log.warning("query_auth is on but no client keys are configured: every query will be refused")
        self.bucket = (
            TokenBucket(redis_client(settings, socket_timeout=2), rate_per_s=settings.rate_limit_per_s,
                        burst=settings.rate_limit_burst, namespace=f"lookalike:ratelimit:{settings.worker_group}")
            if settings.rate_limit else None
        )
        self._redis_warned_at = 0.0

    def admit(self, key: bytes | None, value: bytes | None, headers: Mapping[str, bytes]) -> str:
        """The client id a query is served as. Raises Unauthorized or RateLimited."""
        if self.settings.query_auth:
            client_id = auth.verify(self.keys, key or b"", headers, value, window_s=self.settings.query_replay_window_s)
        else:  # unsigned: the id is only a claim, good enough to share buckets in a demo
            client_id = headers.get(auth.H_CLIENT_ID, b"").decode("utf-8", "replace")[:128] or ANONYMOUS
        if self.bucket is not None:
            try:
                decision = self.bucket.take(client_id)
            except (redis.RedisError, OSError) as exc:
                # Redis away: serve rather than refuse everyone (availability over limiting), say so.
                if time.monotonic() - self._redis_warned_at > 10:
                    self._redis_warned_at = time.monotonic()
                    log.warning("rate limiting skipped, Redis unavailable: %s", exc)
                return client_id
            if not decision.allowed:
                raise RateLimited(f"client {client_id!r} is over {self.settings.rate_limit_per_s:g} queries/s "
                                  f"(burst {self.settings.rate_limit_burst}); retry in {decision.retry_after_s:.2f}s")
        return client_id
