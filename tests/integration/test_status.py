"""Indexer statuses in a real Redis: found through the group's registry, never by a SCAN of
the keyspace (which holds a key per reply of the last day)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import redis

from lookalike.settings import IndexerSettings
from lookalike.status import IndexerStatus, indexer_status, register, status_key
from tests.conftest import Cluster

pytestmark = pytest.mark.integration


def scans(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_scan", {}).get("calls", 0))


def test_statuses_come_from_the_registry_without_scanning(cluster: Cluster, throwaway: Callable[[], str]) -> None:
    settings = IndexerSettings(redis_url=cluster.redis_url)
    client = redis.Redis.from_url(cluster.redis_url, decode_responses=True)
    group = throwaway()
    now = time.time()
    pipe = client.pipeline(transaction=True)
    for instance, items in (("b-2", 20), ("a-1", 10)):
        key = status_key(group, instance)
        pipe.hset(key, mapping=IndexerStatus(instance=instance, items=items, caught_up=True).to_redis()).expire(key, 60)
        register(pipe, group, instance, now)
    register(pipe, group, "gone-3", now)  # registered, its status expired: not live
    register(pipe, group, "silent-4", now - 7200)  # silent for two hours: dropped by the next publish
    register(pipe, group, "a-1", now)
    pipe.execute()
    for n in range(300):  # replies' join keys, as the aggregator leaves them
        client.set(f"lookalike:feedback:{group}:req:r{n}", "1", ex=60)

    before = scans(client)
    statuses = indexer_status(settings, group)
    assert [(s.instance, s.items) for s in statuses] == [("a-1", 10), ("b-2", 20)]
    assert scans(client) == before
    assert client.zscore(f"lookalike:indexers:{group}", "silent-4") is None
    assert indexer_status(settings, f"{group}-other") == []
