"""The token bucket against the real Redis: burst, refill, independence, atomicity under contention;
and against a Redis that hangs: a short timeout, then this process's bucket."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from lookalike.ratelimit import TokenBucket
from lookalike.settings import WorkerSettings
from tests.conftest import Cluster
from workers.guard import QueryGuard

pytestmark = pytest.mark.integration


@pytest.fixture
def bucket_factory(cluster: Cluster, throwaway: Callable[[], str]):  # type: ignore[no-untyped-def]
    """Buckets in a namespace of the test's own (a worker group's, as the worker names it); ``throwaway`` removes them."""
    client = redis.Redis.from_url(cluster.redis_url)
    namespace = f"lookalike:ratelimit:{throwaway()}"
    return lambda **kw: TokenBucket(client, namespace=namespace, **kw)


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
    # What the bucket says it holds, not how many takes pass: takes in a row on a loaded box are
    # milliseconds apart, and at 100/s each millisecond earns a tenth of a token.
    after = bucket.take("idle")
    assert after.allowed and after.tokens_left == pytest.approx(1.0)  # the burst of 2 less this one, not ~20


def test_concurrent_takes_are_atomic(bucket_factory) -> None:  # type: ignore[no-untyped-def]
    """400 takes from 8 threads against a bucket of 50 that earns ~nothing: exactly 50 pass."""
    bucket = bucket_factory(rate_per_s=0.001, burst=50)
    with ThreadPoolExecutor(8) as pool:
        allowed = list(pool.map(lambda _: bucket.take("crowd").allowed, range(400)))
    assert sum(allowed) == 50


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A TCP server that accepts connections and never answers: a hung Redis."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                accepted.append(listener.accept()[0])  # held open, never read from or written to

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    listener.close()


def test_a_hung_redis_costs_one_short_timeout_then_the_local_bucket_limits(silent_server: str) -> None:
    """The worker's client settings (guard.py) against a server that never answers: decisions
    come back at once from this process's bucket, still limited to the burst."""
    settings = WorkerSettings(_env_file=None, redis_url=silent_server, rate_limit=True, rate_limit_per_s=0.001,
                              rate_limit_burst=5)
    bucket = QueryGuard(settings).bucket
    assert bucket is not None
    timings, decisions = [], []
    for _ in range(50):
        started = time.monotonic()
        decisions.append(bucket.take("shop"))
        timings.append(time.monotonic() - started)
    # The first take waits for the timeout (and no retries on top of it); the other 49 do not try Redis.
    assert timings[0] < settings.rate_limit_redis_timeout_s * 4, timings[0]
    assert sum(timings[1:]) < 0.5, sum(timings[1:])
    assert bucket.redis_failures == 1
    assert all(d.local for d in decisions)
    assert [d.allowed for d in decisions] == [True] * 5 + [False] * 45
    assert decisions[-1].retry_after_s > 0
    assert bucket.take("another-shop").allowed  # still one bucket per client
