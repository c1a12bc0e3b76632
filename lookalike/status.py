"""What the indexers publish about themselves in Redis, and how to read and wait on it.

The indexer writes one hash per instance under ``lookalike:indexer:{group}:{instance}``;
every reader (CLI, trainer, aggregator, tests, benchmarks) reads it through this module.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import redis

from lookalike.clients import redis_client
from lookalike.errors import StackError
from lookalike.settings import CommonSettings, IndexerSettings


def indexer_status(settings: CommonSettings | None = None, group: str | None = None) -> list[dict[str, Any]]:
    """What each live indexer instance last published in Redis."""
    settings = settings or IndexerSettings()
    group = group or IndexerSettings().indexer_group
    client = redis_client(settings, socket_timeout=2, decode_responses=True)
    out = []
    for key in sorted(client.scan_iter(f"lookalike:indexer:{group}:*")):
        raw = client.hgetall(key)
        if raw:
            raw["items"] = int(raw.get("items", 0))
            raw["position"] = json.loads(raw.get("position") or "{}")
            out.append(raw)
    return out


def whole_index(statuses: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The largest caught-up index among the statuses; with index shards, the sum of one
    caught-up instance per shard (None until every shard has one)."""
    best: dict[str, dict[str, Any]] = {}
    for status in statuses:
        shard = status.get("shard") or "0/1"
        if status.get("caught_up") == "1" and status["items"] >= best.get(shard, {"items": -1})["items"]:
            best[shard] = status
    if not best:
        return None
    shards = int(next(iter(best)).partition("/")[2] or 1)
    if len(best) < shards:
        return None
    whole = dict(best[min(best)])
    whole["items"] = sum(s["items"] for s in best.values())
    return whole


def wait_for_index(count: int, timeout_s: float, settings: CommonSettings | None = None,
                   group: str | None = None, check: Callable[[], None] | None = None) -> dict[str, Any]:
    """Block until the indexers report at least ``count`` items and are caught up (with index
    shards: every shard caught up and ``count`` items in all)."""
    deadline = time.monotonic() + timeout_s
    last: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        try:
            last = indexer_status(settings, group)
        except redis.RedisError:
            last = []
        whole = whole_index(last)
        if whole is not None and whole["items"] >= count:
            return whole
        if check is not None:
            check()  # e.g. the caller's 'is the indexer process still alive', raising if not
        time.sleep(0.5)
    raise StackError(f"the index did not reach {count} items within {timeout_s:.0f}s (last status: {last})")
