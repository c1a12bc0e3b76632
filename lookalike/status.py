"""What the indexers publish about themselves in Redis, as one typed record, and how to
read and wait on it.

Each indexer instance writes an :class:`IndexerStatus` as a hash under
``lookalike:indexer:{group}:{instance}`` (``STATUS_KEY``), refreshed every few seconds and
expiring when the instance stops, and names itself in its group's registry
(``REGISTRY_KEY``), where readers find the keys. The hash layout is the wire form (strings, JSON for the
maps); every reader (CLI, trainer, aggregator, rollout, tests, benchmarks) gets the model.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any

import redis
from pydantic import BaseModel, ConfigDict, Field

from lookalike.clients import redis_client
from lookalike.errors import StackError
from lookalike.settings import CommonSettings, IndexerSettings

STATUS_KEY = "lookalike:indexer:{group}:{instance}"
STATUS_TTL_S = 15
# The instances of a group that published a status lately: a sorted set, instance -> when it
# last published (its own clock). Readers look their statuses up from it instead of scanning
# the keyspace, which holds a key per reply of the last day (the feedback join): a SCAN of
# it every few seconds cost the aggregator 0.15 of a core at 156k keys.
REGISTRY_KEY = "lookalike:indexers:{group}"
REGISTRY_FORGET_S = 3600  # a member that has not published for this long is dropped
JSON_FIELDS = ("position", "catalog_position", "versions", "ready_versions")  # stored as JSON text


def status_key(group: str, instance: str) -> str:
    """The key of one instance's status (``instance="*"``: the pattern of the group's)."""
    return STATUS_KEY.format(group=group, instance=instance)


class VersionFacts(BaseModel):
    """One live model version's index on an instance."""

    model_config = ConfigDict(frozen=True)

    items: int = 0
    index_version: str = ""
    caught_up: bool = False
    catalog_position: dict[int, int] = Field(default_factory=dict)
    snapshot_items: int = 0


class IndexerStatus(BaseModel):
    """An indexer instance's figures: the serving index's at the top level, every live
    version's under ``versions``, and which versions it has caught up on."""

    model_config = ConfigDict(frozen=True)

    instance: str
    shard: str = "0/1"  # "i/N"
    items: int = 0
    model_version: str = ""
    target_version: str = ""
    index_version: str = ""
    position: dict[int, int] = Field(default_factory=dict)  # vector-topic offsets applied
    catalog_position: dict[int, int] = Field(default_factory=dict)  # catalog offsets reflected
    snapshot: str = ""
    snapshot_at: float = 0.0
    snapshot_items: int = 0
    caught_up: bool = False
    skipped: int = 0
    versions: dict[str, VersionFacts] = Field(default_factory=dict)
    ready_versions: list[str] = Field(default_factory=list)
    updated_at: float = 0.0
    items_digest: str | None = None  # with LOOKALIKE_STATUS_DIGEST (tests)

    def to_redis(self) -> dict[str, str]:
        """The hash as stored: numbers as text, ``caught_up`` as "1"/"0", maps as JSON."""
        doc = self.model_dump(mode="json", exclude_none=True)
        out = {}
        for name, value in doc.items():
            if name in JSON_FIELDS:
                out[name] = json.dumps(value, sort_keys=True)
            elif isinstance(value, bool):
                out[name] = "1" if value else "0"
            elif isinstance(value, float):
                out[name] = f"{value:.3f}"
            else:
                out[name] = str(value)
        return out

    @classmethod
    def from_redis(cls, raw: Mapping[str, str]) -> IndexerStatus:
        doc: dict[str, Any] = dict(raw)
        for name in JSON_FIELDS:
            if name in doc:
                doc[name] = json.loads(doc[name] or "null") or None
                if doc[name] is None:
                    del doc[name]
        if "caught_up" in doc:
            doc["caught_up"] = doc["caught_up"] == "1"
        return cls.model_validate(doc)

    @property
    def shards(self) -> int:
        return int(self.shard.partition("/")[2] or 1)


def register(pipe: Any, group: str, instance: str, now: float) -> Any:
    """Add the instance to its group's registry in a status write's pipeline, and drop the
    members that have been silent for ``REGISTRY_FORGET_S`` (both clocks: the publisher's)."""
    key = REGISTRY_KEY.format(group=group)
    return (pipe.zadd(key, {instance: now}).zremrangebyscore(key, "-inf", now - REGISTRY_FORGET_S)
            .expire(key, REGISTRY_FORGET_S))


def live_status_keys(client: redis.Redis, group: str) -> list[str]:
    """The status keys of the group's registered instances (one round trip, no SCAN); the
    status of a stopped one expires, and reading it then finds nothing."""
    members = client.zrange(REGISTRY_KEY.format(group=group), 0, -1)
    return sorted(status_key(group, m.decode() if isinstance(m, bytes) else m) for m in members)


def indexer_status(settings: CommonSettings | None = None, group: str | None = None) -> list[IndexerStatus]:
    """What each live indexer instance last published in Redis."""
    settings = settings or IndexerSettings()
    group = group or IndexerSettings().indexer_group
    client = redis_client(settings, socket_timeout=2, decode_responses=True)
    keys = live_status_keys(client, group)
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.hgetall(key)
    return [IndexerStatus.from_redis(raw) for raw in (pipe.execute() if keys else []) if raw]


def whole_index(statuses: list[IndexerStatus]) -> IndexerStatus | None:
    """The largest caught-up index among the statuses; with index shards, the sum of one
    caught-up instance per shard (None until every shard has one)."""
    best: dict[str, IndexerStatus] = {}
    for status in statuses:
        if status.caught_up and (status.shard not in best or status.items >= best[status.shard].items):
            best[status.shard] = status
    if not best:
        return None
    if len(best) < next(iter(best.values())).shards:
        return None
    return best[min(best)].model_copy(update={"items": sum(s.items for s in best.values())})


def wait_for_index(count: int, timeout_s: float, settings: CommonSettings | None = None,
                   group: str | None = None, check: Callable[[], None] | None = None,
                   model_version: str | None = None) -> IndexerStatus:
    """Block until the indexers report at least ``count`` items and are caught up (with index
    shards: every shard caught up and ``count`` items in all), serving ``model_version``
    when one is given (a stack that served another model first switches to it by a
    rollout: docs/rollout.md)."""
    deadline = time.monotonic() + timeout_s
    last: list[IndexerStatus] = []
    while time.monotonic() < deadline:
        try:
            last = indexer_status(settings, group)
        except redis.RedisError:
            last = []
        whole = whole_index(last)
        if whole is not None and whole.items >= count and model_version in (None, whole.model_version):
            return whole
        if check is not None:
            check()  # e.g. the caller's 'is the indexer process still alive', raising if not
        time.sleep(0.5)
    serving = f" served by model {model_version}" if model_version else ""
    raise StackError(f"the index did not reach {count} items{serving} within {timeout_s:.0f}s (last status: {last})")
