"""The indexer service: keeps one HNSW index per live model version current and answers
queries from the index of the model that embedded them.

* Per model version (:class:`VersionIndex`): a feed, a runtime loop assigned to
  *every* partition of that version's catalog-vector topic (each indexer replica holds the
  whole catalog), applies upserts and tombstones in order and records the offsets it has
  applied; its snapshots live in Redis under the version's own namespace.
* The rollout task (:mod:`lookalike.rollout`) decides which versions are live: the
  serving one, the one being built, and the previous one for a grace period after a
  switch. It creates and drops :class:`VersionIndex` objects to match.
* The query loop on the query-vector topic (partitions shared by the replicas of the
  consumer group) searches the index of the query's model version and produces each
  reply to the query's reply-to topic. Each query is handled on its own (up to
  ``query_concurrency`` at once), so one that waits for its ``min-position`` waits alone.
* With index shards (``LOOKALIKE_INDEX_SHARDS`` > 1, :mod:`indexer.shards`) the feeds read
  only this shard's partitions, the query loop sends partial answers instead of replies,
  and a gatherer loop merges every shard's partial answers into the replies.

Queries wait until their version's feed has caught up with the end of its topic as it
was at start-up, so a restarted indexer never answers from a half-loaded index. The
indexer's position and size are published in Redis for the CLI, the demo and the
rollout controller; when Redis is away, queries are still answered from memory.

Modules: :mod:`indexer.versions` (one version's index: feed and snapshots),
:mod:`indexer.lifecycle` (which versions live, the rollout step, the snapshot schedule),
:mod:`indexer.answering` (the query path); this one assembles them with the status and
runs the loops (:mod:`lookalike.runtime`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable

import redis

from indexer.answering import Answering
from indexer.lifecycle import Lifecycle
from indexer.shards import gather_loop
from indexer.versions import Pools, VersionIndex
from lookalike.clients import redis_client
from lookalike.health import HEARTBEAT_EVERY_S, beat, heartbeat_path
from lookalike.rollout import RolloutState
from lookalike.runtime import Sender, run_forever
from lookalike.settings import IndexerSettings
from lookalike.status import STATUS_TTL_S, IndexerStatus, register, status_key

log = logging.getLogger(__name__)


class Indexer(Lifecycle, Answering):
    """The live versions' indexes, which one serves, and the queries' entry point."""

    def __init__(self, settings: IndexerSettings) -> None:
        self.settings = settings
        self.pools = Pools()
        self.versions: dict[str, VersionIndex] = {}
        self.state: RolloutState | None = None
        self.started = asyncio.Event()  # the first state is known and its indexes exist
        self.instance = f"{socket.gethostname()}-{os.getpid()}"
        self.sender: Sender | None = None  # made when the loops start (run)
        self.catalog_partitions: int | None = None  # the catalog topic's, once looked up

    # -- status -------------------------------------------------------------------
    def status(self) -> IndexerStatus:
        """The serving index's figures at the top level (what the CLI and the demo read), every
        live version's under ``versions``, and which versions this replica has caught up on."""
        vi = self.serving
        state = self.state or RolloutState()
        digest = None
        if self.settings.status_digest and vi is not None and vi.index is not None:
            digest = vi.index.items_digest()
        return IndexerStatus(
            instance=self.instance,
            shard=f"{self.settings.index_shard}/{self.settings.index_shards}",
            items=len(vi) if vi else 0,
            model_version=state.serving or "",
            target_version=state.target or "",
            index_version=(vi.index_version if vi else None) or "",
            position=vi.position if vi else {},
            catalog_position=vi.catalog_position if vi else {},
            snapshot=(vi.last_snapshot_id if vi else None) or "",
            snapshot_at=(vi.last_snapshot_at if vi else None) or 0.0,
            snapshot_items=vi.last_snapshot_items if vi else 0,
            caught_up=vi is not None and vi.caught_up.is_set(),
            skipped=sum(v.skipped for v in self.versions.values()),
            versions={v: vi_.facts() for v, vi_ in self.versions.items()},
            ready_versions=[v for v in self.versions if self.ready(v)],
            updated_at=time.time(),
            items_digest=digest,
        )

    async def publish_status(self) -> None:
        s = self.settings
        client = redis_client(s, asyncio=True, socket_timeout=2)
        key = status_key(s.indexer_group, self.instance)
        redis_ok = True
        while True:
            try:
                async with client.pipeline(transaction=True) as pipe:
                    pipe.hset(key, mapping=self.status().to_redis()).expire(key, STATUS_TTL_S)
                    await register(pipe, s.indexer_group, self.instance, time.time()).execute()
                if not redis_ok:
                    log.info("Redis is back")
                redis_ok = True
            except (redis.RedisError, OSError) as exc:
                if redis_ok:
                    log.warning("cannot publish status to Redis (%s); serving from memory meanwhile", exc)
                redis_ok = False
            await asyncio.sleep(s.status_interval_s)

    async def heartbeat(self) -> None:
        while True:
            vi = self.serving
            beat(heartbeat_path(self.settings, "indexer"), items=len(vi) if vi else 0,
                 caught_up=vi is not None and vi.caught_up.is_set(),
                 model_version=self.state.serving if self.state else None)
            await asyncio.sleep(HEARTBEAT_EVERY_S)

    async def run(self, extra: Callable[[], dict[str, Awaitable[None]]] | None = None) -> None:
        """The query loop plus the rollout, snapshot, status and heartbeat tasks (and the
        gatherer with shards), until cancelled. ``extra``: more jobs, made once the sender
        exists (``python -m onehop`` adds its query loop)."""
        s = self.settings
        self.sender = Sender(s, **{"linger.ms": 0})  # replies and partial answers: at once, never lingering
        jobs = {"rollout": self.run_rollout(), "status": self.publish_status(), "heartbeat": self.heartbeat(),
                "queries": self.query_loop().run(), "catalog-partitions": self.watch_catalog_partitions()}
        if s.snapshots:
            jobs["snapshots"] = self.run_snapshots()
        if s.sharded:
            jobs["gather"] = gather_loop(s, self.sender).run()
        jobs.update(extra() if extra else {})
        try:
            await run_forever(*jobs.values(), names=list(jobs))
        finally:
            self.sender.close()
