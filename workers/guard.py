"""Who may ask, and how often: the query path's admission check, before any image is decoded.

With ``query_auth`` a query must be signed by a known client (:mod:`lookalike.auth`);
with ``rate_limit`` each client id has a token bucket in Redis
(:mod:`lookalike.ratelimit`). Both are off by default (the local demo) and on in
docker-compose.yml. A refused query gets an ``unauthorized`` or ``rate_limited`` error reply.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

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
            TokenBucket(redis_client(settings, socket_timeout=settings.rate_limit_redis_timeout_s,
                                     socket_connect_timeout=settings.rate_limit_redis_timeout_s),
                        rate_per_s=settings.rate_limit_per_s, burst=settings.rate_limit_burst,
                        namespace=f"lookalike:ratelimit:{settings.worker_group}",
                        redis_retry_s=settings.rate_limit_redis_retry_s)
            if settings.rate_limit else None
        )

    def admit(self, key: bytes | None, value: bytes | None, headers: Mapping[str, bytes]) -> str:
        """The client id a query is served as. Raises Unauthorized or RateLimited."""
        client_id = self.authenticate(key, value, headers)
        self.limit(client_id)
        return client_id

    def authenticate(self, key: bytes | None, value: bytes | None, headers: Mapping[str, bytes]) -> str:
        """The client id a query is signed by (query_auth), else the one it claims. Raises Unauthorized."""
        if self.settings.query_auth:
            return auth.verify(self.keys, key or b"", headers, value, window_s=self.settings.query_replay_window_s)
        # unsigned: the id is only a claim, good enough to share buckets in a demo
        return headers.get(auth.H_CLIENT_ID, b"")[:128].decode("utf-8", "replace") or ANONYMOUS

    def authentic(self, key: bytes | None, value: bytes | None, headers: Mapping[str, bytes]) -> bool:
        """May this query's own headers (its reply-to) be trusted? Always, without query_auth."""
        try:
            self.authenticate(key, value, headers)
        except Exception:  # Unauthorized, or anything else: not trusted either way
            return False
        return True

    def limit(self, client_id: str) -> None:
        """Take a token from the client's bucket. Raises RateLimited."""
        if self.bucket is None:
            return
        decision = self.bucket.take(client_id)
        if not decision.allowed:
            raise RateLimited(f"client {client_id!r} is over {self.settings.rate_limit_per_s:g} queries/s "
                              f"(burst {self.settings.rate_limit_burst}); retry in {decision.retry_after_s:.2f}s")
