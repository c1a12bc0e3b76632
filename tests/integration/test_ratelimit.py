"""The token bucket against the real Redis: burst, refill, independence, atomicity under contention."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from lookalike.ratelimit import TokenBucket
from tests.conftest import Cluster

pytestmark = pytest.mark.integration


@pytest.fixture
def bucket_factory(cluster: Cluster):  # type: ignore[no-untyped-def]
    client = redis.Redis.from_url(cluster.redis_url)
    namespace = f"test-ratelimit:{uuid.uuid4().hex[:8]}"
    yield lambda **kw: TokenBucket(client, namespace=namespace, **kw)
    keys = list(client.scan_iter(f"{namespace}:*"))
    if keys:
        client.delete(*keys)


def test_burst_then_refused_then_refilled(bucket_factory) -> None:  # type: ignore[no-untyped-def]
    bucket = bucket_factory(rate_per_s=5.0, burst=3)
    decisions = [bucket.take("shop") for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert 0 < decisions[-1].retry_after_s <= 0.2 + 1e-6
    time.sleep(decisions[-1].retry_after_s + 0.05)
    assert bucket.take("shop").allowed
    assert bucket.take("another-shop").allowed  # buckets are per client


def test_tokens_never_exceed_the_burst(bucket_factory) -> None:  # type: ignore[no-untyped-def]
    bucket = bucket_factory(rate_per_s=100.0, burst=2)
    bucket.take("idle")
    time.sleep(0.2)  # would earn 20 tokens without the cap
    assert [bucket.take("idle").allowed for _ in range(3)] == [True, True, False]


def test_concurrent_takes_are_atomic(bucket_factory) -> None:  # type: ignore[no-untyped-def]
    """400 takes from 8 threads against a bucket of 50 that earns ~nothing: exactly 50 pass."""
    bucket = bucket_factory(rate_per_s=0.001, burst=50)
    with ThreadPoolExecutor(8) as pool:
        allowed = list(pool.map(lambda _: bucket.take("crowd").allowed, range(400)))
    assert sum(allowed) == 50
