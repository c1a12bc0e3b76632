"""The indexer service: keeps the HNSW index current and answers queries from it.

Two loops share one :class:`VectorIndex`:

* the catalog feed, an aiokafka consumer assigned to *every* partition of the
  catalog-vector topic (each indexer replica holds the whole catalog), applies
  upserts and tombstones in order and records the offsets it has applied;
* the faust agent on the query-vector topic (partitions shared by the replicas of the
  consumer group) searches and produces each reply to the query's reply-to topic.

Queries wait until the feed has caught up with the end of the vector topic as it was
at start-up, so a restarted indexer never answers from a half-loaded index. The
indexer's position and size are published in Redis for the CLI and the demo; when
Redis is away, queries are still answered from memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from typing import Any

import faust
import redis
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition
from confluent_kafka.admin import AdminClient

from indexer import stages
from indexer.index import Mutation, VectorIndex
from indexer.snapshot import SnapshotError, SnapshotStore
from lookalike import contracts as c
from lookalike import metrics
from lookalike.artifacts import ModelStore
from lookalike.clients import aiokafka_config, confluent_config, faust_app
from lookalike.errors import ConfigError, InvalidMessage, ModelArtifactError, UnknownItem
from lookalike.health import HEARTBEAT_EVERY_S, beat, heartbeat_path
from lookalike.settings import IndexerSettings

log = logging.getLogger(__name__)

STATUS_KEY = "lookalike:indexer:{group}:{instance}"
STATUS_TTL_S = 15


def topic_partitions(settings: IndexerSettings, topic: str) -> list[int]:
    """The partition ids of a topic (blocking: run it in an executor)."""
    meta = AdminClient(confluent_config(settings)).list_topics(topic, timeout=30)
    found = meta.topics.get(topic)
    if found is None or found.error is not None or not found.partitions:
        raise ConfigError(f"topic {topic} does not exist: create it with `lookalike topics create`")
    return sorted(found.partitions)


class Indexer:
    """The index, its model version and its position in the catalog-vector topic."""

    def __init__(self, settings: IndexerSettings) -> None:
        self.settings = settings
        self.index: VectorIndex | None = None
        self.model_version: str | None = None
        self.index_version: str | None = None
        self.pending_position: dict[int, int] = {}
        self.pending_catalog_position: dict[int, int] = {}
        self.position_changed = asyncio.Event()
        self.applied_since_snapshot = 0
        self.last_snapshot_id: str | None = None
        self.last_snapshot_at: float | None = None
        self.last_snapshot_items = 0
        self.caught_up = asyncio.Event()
        self.skipped = 0
        self.instance = f"{socket.gethostname()}-{os.getpid()}"
        self.search_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="search")
        self.write_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="apply")
        self.snapshot_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapshot")

    # -- catalog feed -------------------------------------------------------------
    def apply_records(self, partition: int, records: list[Any]) -> None:
        """Decode and apply one fetched batch of a partition (runs in the writer thread)."""
        mutations: list[Mutation] = []
        catalog_position: dict[int, int] = {}
        for record in records:
            try:
                event = stages.parse_vector_record(record.key, record.value, c.headers_to_dict(record.headers))
            except InvalidMessage as exc:
                self.skipped += 1
                log.warning("vector %s@%d skipped: %s", record.partition, record.offset, exc)
                continue
            if event.source is not None:
                catalog_position[event.source[0]] = max(event.source[1] + 1, catalog_position.get(event.source[0], 0))
            if event.dim is not None and self.index is None:
                self._create_index(event.dim, event.model_version)
            if event.model_version != self.model_version and event.dim is not None:
                self.skipped += 1
                log.warning("vector for %s from model %s skipped: index serves %s",
                            event.mutation.item_id, event.model_version, self.model_version)
                continue
            mutations.append(event.mutation)
        position = {partition: records[-1].offset + 1}
        if self.index is not None:
            self.index.apply(mutations, position, catalog_position)
            self.applied_since_snapshot += len(mutations)
            metrics.observe_batch("indexer", "vector", len(mutations))
        else:  # only tombstones so far: nothing to delete, but the positions move on
            self.pending_position.update(position)
            self.pending_catalog_position.update(catalog_position)

    def _create_index(self, dim: int, model_version: str | None) -> None:
        s = self.settings
        self.index = VectorIndex(
            dim, m=s.hnsw_m, ef_construction=s.hnsw_ef_construction, ef_search=s.hnsw_ef_search,
            capacity=s.initial_capacity,
        )
        self.index.apply([], self.pending_position, self.pending_catalog_position)
        self.model_version = model_version
        self.index_version = f"{model_version}/{uuid.uuid4().hex[:8]}"
        log.info("new index %s (dim %d)", self.index_version, dim)

    @property
    def position(self) -> dict[int, int]:
        """Vector-topic offsets applied (where the feed resumes)."""
        return self.index.position if self.index is not None else dict(self.pending_position)

    @property
    def catalog_position(self) -> dict[int, int]:
        """Catalog offsets reflected (what replies report and queries may wait for)."""
        return self.index.catalog_position if self.index is not None else dict(self.pending_catalog_position)

    async def wait_for_position(self, required: dict[int, int] | None, timeout_s: float) -> None:
        """Return once the index includes ``required`` catalog offsets, or after the timeout."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not stages.reached(self.catalog_position, required):
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return
            self.position_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.position_changed.wait(), timeout=min(left, 0.1))

    # -- snapshots ----------------------------------------------------------------
    @cached_property
    def snapshots(self) -> SnapshotStore:
        """One client (and connection pool) for every snapshot read, write and check."""
        s = self.settings
        client = redis.Redis.from_url(s.redis_url.get_secret_value(), socket_timeout=30)
        return SnapshotStore(client, f"lookalike:snapshots:{s.indexer_group}",
                             chunk_bytes=s.snapshot_chunk_bytes, keep=s.snapshot_keep)

    def expected_model(self) -> tuple[str, int | None] | None:
        """(model version, dim) this indexer must serve: the pinned version, else the store's
        champion; None when no model store is reachable from here (then any snapshot goes)."""
        try:
            card = ModelStore(self.settings.models_path).card(self.settings.model_version)
        except (ModelArtifactError, OSError, ValueError):
            if self.settings.model_version:
                return self.settings.model_version, None
            return None
        return card.version, card.embedding_dim

    def restore(self) -> None:
        """Load the newest usable snapshot (runs before the feed starts). Falls back to older
        ones, then to a full replay; every refusal is logged with its reason."""
        try:
            store = self.snapshots
            candidates = store.history()
        except (redis.RedisError, OSError) as exc:
            log.warning("snapshots unavailable (%s): full replay of the catalog", exc)
            return
        expected = self.expected_model()
        for snapshot_id in candidates:
            try:
                snap = store.read(snapshot_id)
                facts = snap.manifest
                if expected and (facts.get("model_version") != expected[0]
                                 or (expected[1] is not None and facts.get("dim") != expected[1])):
                    raise SnapshotError(f"snapshot {snapshot_id} holds model {facts.get('model_version')} "
                                        f"(dim {facts.get('dim')}), this indexer serves {expected[0]} (dim {expected[1]})")
                index = VectorIndex.restore(snap.index_bytes, snap.items_bytes, facts)
            except Exception as exc:  # whatever is wrong with a snapshot, the next one or a replay is right
                log.warning("snapshot %s refused: %s", snapshot_id, exc)
                continue
            self.index = index
            self.model_version = facts.get("model_version")
            self.index_version = facts.get("index_version")
            self.last_snapshot_id, self.last_snapshot_at = snapshot_id, float(facts["created_at"])
            self.last_snapshot_items = len(index)
            log.info("restored snapshot %s: %d items of model %s at %s", snapshot_id, len(index),
                     self.model_version, index.position)
            break
        else:
            log.info("no usable snapshot (%d tried): full replay of the catalog", len(candidates))
        try:
            removed = store.remove_orphans()
            if removed:
                log.info("removed %d unfinished snapshots", removed)
        except (redis.RedisError, OSError) as exc:
            log.warning("cannot clean unfinished snapshots: %s", exc)

    def snapshot(self) -> dict[str, Any] | None:
        """Write a snapshot of the current state (runs in the snapshot thread)."""
        if self.index is None:
            return None
        started = time.perf_counter()
        applied = self.applied_since_snapshot
        index_bytes, items_bytes, facts = self.index.export()
        exported = time.perf_counter()
        facts.update(model_version=self.model_version, index_version=self.index_version)
        manifest = self.snapshots.write(index_bytes, items_bytes, facts)
        self.applied_since_snapshot -= applied
        self.last_snapshot_id, self.last_snapshot_at = manifest["id"], manifest["created_at"]
        self.last_snapshot_items = int(facts["item_count"])
        log.info("snapshot %s: %d items, %.1f MB, writer paused %.0f ms, written in %.0f ms", manifest["id"],
                 facts["item_count"], (len(index_bytes) + len(items_bytes)) / 1e6, (exported - started) * 1000,
                 (time.perf_counter() - exported) * 1000)
        return manifest

    def snapshot_lost(self) -> bool:
        """Is our last snapshot no longer current (Redis restarted empty, or it was deleted)?"""
        if self.index is None or self.last_snapshot_id is None:
            return self.index is not None
        return self.snapshots.current() != self.last_snapshot_id

    async def run_snapshots(self) -> None:
        """Snapshot on a schedule and on mutation counts; Redis being away only delays it."""
        s = self.settings
        loop = asyncio.get_running_loop()
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.5)
            changed = self.applied_since_snapshot
            interval_over = time.monotonic() - last >= s.snapshot_interval_s
            due = changed >= s.snapshot_every_items or (changed and interval_over)
            if not self.caught_up.is_set() or not (due or interval_over):
                continue
            try:
                if not due and not await loop.run_in_executor(self.snapshot_pool, self.snapshot_lost):
                    last = time.monotonic()
                    continue
                await loop.run_in_executor(self.snapshot_pool, self.snapshot)
            except (redis.RedisError, OSError) as exc:
                log.warning("snapshot failed (%s); queries go on from memory, next try in %.0fs",
                            exc, s.snapshot_interval_s)
            last = time.monotonic()

    async def run_feed(self) -> None:
        """Restore the newest usable snapshot, then read the catalog-vector topic from the
        offsets it covers (from the beginning without one), forever."""
        s = self.settings
        consumer = AIOKafkaConsumer(
            **aiokafka_config(s), group_id=None, enable_auto_commit=False, auto_offset_reset="earliest",
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        loop = asyncio.get_running_loop()
        partitions = await loop.run_in_executor(None, topic_partitions, s, s.catalog_vectors_topic)
        if s.snapshots:
            await loop.run_in_executor(self.write_pool, self.restore)
        await consumer.start()
        try:
            tps = [TopicPartition(s.catalog_vectors_topic, p) for p in partitions]
            consumer.assign(tps)
            restored = self.position
            for tp in tps:
                if tp.partition in restored:
                    consumer.seek(tp, restored[tp.partition])
                else:
                    await consumer.seek_to_beginning(tp)
            start_ends = await consumer.end_offsets(tps)
            log.info("catalog feed: %d partitions, %d records to replay", len(tps),
                     sum(start_ends[tp] - restored.get(tp.partition, 0) for tp in tps))
            while True:
                batch = await consumer.getmany(timeout_ms=200, max_records=2000)
                for tp, records in batch.items():
                    await loop.run_in_executor(self.write_pool, self.apply_records, tp.partition, records)
                if batch:
                    self.position_changed.set()
                if not self.caught_up.is_set():
                    positions = {tp: await consumer.position(tp) for tp in tps}
                    if all(positions[tp] >= start_ends[tp] for tp in tps):
                        self.caught_up.set()
                        log.info("catalog feed caught up: %d items", len(self.index) if self.index else 0)
        finally:
            await consumer.stop()

    # -- queries ------------------------------------------------------------------
    def answer(self, key: bytes | None, value: bytes | None, headers: dict[str, bytes]) -> tuple[str, bytes, bytes]:
        """One query vector -> (reply topic, reply key, reply value). Never raises."""
        dim = self.index.dim if self.index else None
        try:
            query = stages.parse_query_vector(key, value, headers, dim=dim, default_reply_to=self.settings.replies_topic)
        except InvalidMessage as exc:
            reply = c.error_reply(key.decode("utf-8", "replace") if key else "(missing)", exc.code, str(exc))
            return self.settings.replies_topic, key or b"", c.encode_reply(reply)
        try:
            if self.index is None or len(self.index) == 0:
                raise InvalidMessage("the index is empty: no catalog item has been indexed yet", code="empty_index")
            position = self.catalog_position
            if not stages.reached(position, query.min_position):
                raise InvalidMessage(
                    f"the index has not reached position {query.min_position} within "
                    f"{self.settings.min_position_wait_s}s (it is at {position})", code="not_ready")
            reply = stages.answer(
                self.index, query, model_version=self.model_version, index_version=self.index_version,
                index_position=position,
            )
        except (InvalidMessage, UnknownItem) as exc:
            reply = c.error_reply(query.request_id, exc.code, str(exc), model_version=self.model_version,
                                  index_version=self.index_version, timings_ms=query.timings_ms)
        except Exception as exc:  # a bug must not stop the service; the client still gets an answer
            log.exception("query %s failed", query.request_id, extra={"request_id": query.request_id})
            reply = c.error_reply(query.request_id, "internal", f"{type(exc).__name__}: {exc}",
                                  model_version=self.model_version, index_version=self.index_version)
        metrics.observe_reply(reply)
        return query.reply_to, query.request_key, c.encode_reply(reply)

    # -- status -------------------------------------------------------------------
    def status(self) -> dict[str, str]:
        extra = {}
        if self.settings.status_digest and self.index is not None:
            extra["items_digest"] = self.index.items_digest()
        return {
            **extra,
            "instance": self.instance,
            "items": str(len(self.index) if self.index else 0),
            "model_version": self.model_version or "",
            "index_version": self.index_version or "",
            "position": json.dumps({str(p): o for p, o in sorted(self.position.items())}),
            "catalog_position": json.dumps({str(p): o for p, o in sorted(self.catalog_position.items())}),
            "snapshot": self.last_snapshot_id or "",
            "snapshot_at": f"{self.last_snapshot_at or 0:.3f}",
            "snapshot_items": str(self.last_snapshot_items),
            "caught_up": "1" if self.caught_up.is_set() else "0",
            "skipped": str(self.skipped),
            "updated_at": f"{time.time():.3f}",
        }

    async def publish_status(self) -> None:
        s = self.settings
        client = aioredis.Redis.from_url(s.redis_url.get_secret_value(), socket_timeout=2)
        key = STATUS_KEY.format(group=s.indexer_group, instance=self.instance)
        redis_ok = True
        while True:
            try:
                async with client.pipeline(transaction=True) as pipe:
                    await pipe.hset(key, mapping=self.status()).expire(key, STATUS_TTL_S).execute()
                if not redis_ok:
                    log.info("Redis is back")
                redis_ok = True
            except (redis.RedisError, OSError) as exc:
                if redis_ok:
                    log.warning("cannot publish status to Redis (%s); serving from memory meanwhile", exc)
                redis_ok = False
            await asyncio.sleep(s.status_interval_s)


def create_app(settings: IndexerSettings) -> faust.App:
    """The faust app: the query agent plus the catalog feed and status tasks."""
    indexer = Indexer(settings)
    app = faust_app(settings, settings.indexer_group)
    query_vectors = app.topic(settings.query_vectors_topic, key_type=bytes, value_type=bytes, allow_empty=True)

    @app.task
    async def catalog_feed() -> None:
        await indexer.run_feed()

    if settings.snapshots:
        @app.task
        async def snapshots() -> None:
            await indexer.run_snapshots()

    @app.task
    async def status() -> None:
        await indexer.publish_status()

    @app.task
    async def heartbeat() -> None:
        while True:
            beat(heartbeat_path(settings, "indexer"), items=len(indexer.index) if indexer.index else 0,
                 caught_up=indexer.caught_up.is_set())
            await asyncio.sleep(HEARTBEAT_EVERY_S)

    @app.agent(query_vectors, name="answer-queries")
    async def answer_queries(stream: faust.Stream) -> None:
        loop = asyncio.get_running_loop()

        async def handle(event: Any) -> tuple[str, bytes, bytes]:
            headers = c.headers_to_dict(event.headers)
            if c.H_MIN_POSITION in headers:  # read-your-writes: wait (bounded) for the index to get there
                with contextlib.suppress(InvalidMessage):  # a malformed one is answered by answer()
                    required = c.parse_position(headers[c.H_MIN_POSITION])
                    await indexer.wait_for_position(required, settings.min_position_wait_s)
            return await loop.run_in_executor(indexer.search_pool, indexer.answer, event.key, event.value, headers)

        async for events in stream.take_events(64, within=0.002):
            await indexer.caught_up.wait()
            metrics.observe_batch("indexer", "query", len(events))
            replies = await asyncio.gather(*(handle(e) for e in events))
            by_topic: dict[str, list[tuple[bytes, bytes]]] = defaultdict(list)
            for topic, key, value in replies:
                by_topic[topic].append((key, value))
            pending = []
            for topic, records in by_topic.items():
                for key, value in records:
                    pending.append(await app.producer.send(topic, key, value, None, None, None))
            await asyncio.gather(*pending)

    app.lookalike_indexer = indexer  # type: ignore[attr-defined]
    return app
