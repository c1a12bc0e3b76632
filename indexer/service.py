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
  reply to the query's reply-to topic. Each query is handled on its own (up to 64 at
  once), so one that waits for its ``min-position`` waits alone.
* With index shards (``LOOKALIKE_INDEX_SHARDS`` > 1, :mod:`indexer.shards`) the feeds read
  only this shard's partitions, the agent sends partial answers instead of replies, and a
  gatherer task merges every shard's partial answers into the replies.

Queries wait until their version's feed has caught up with the end of its topic as it
was at start-up, so a restarted indexer never answers from a half-loaded index. The
indexer's position and size are published in Redis for the CLI, the demo and the
rollout controller; when Redis is away, queries are still answered from memory.
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
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from typing import Any

import redis

from indexer import stages
from indexer.index import Mutation, VectorIndex
from indexer.shards import LOOKUP, SEARCH, gather_loop, own_position, partial_headers
from indexer.snapshot import SnapshotError, SnapshotStore
from lookalike import contracts as c
from lookalike import metrics, rollout
from lookalike.artifacts import ModelStore
from lookalike.clients import redis_client
from lookalike.errors import ConfigError, InvalidMessage, ModelArtifactError, ModelMismatch, UnknownItem
from lookalike.health import HEARTBEAT_EVERY_S, beat, heartbeat_path
from lookalike.rollout import RolloutController, RolloutState
from lookalike.runtime import Loop, Output, Record, Sender, SendFailed, Source, run_forever
from lookalike.settings import IndexerSettings
from lookalike.topics import ensure_vectors_topic, vectors_topic

log = logging.getLogger(__name__)

STATUS_KEY = "lookalike:indexer:{group}:{instance}"
STATUS_TTL_S = 15
Out = tuple[str, bytes, bytes | None, list[tuple[str, bytes]]]  # a record to produce: topic, key, value, headers


class Pools:
    """The threads every version's index shares: searches, the one writer, snapshots."""

    def __init__(self) -> None:
        self.search = ThreadPoolExecutor(max_workers=4, thread_name_prefix="search")
        self.write = ThreadPoolExecutor(max_workers=1, thread_name_prefix="apply")
        self.snapshot = ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapshot")


class VersionIndex:
    """The index of one model version, its position in that version's vector topic, and
    its snapshots."""

    def __init__(self, settings: IndexerSettings, version: str, pools: Pools) -> None:
        self.settings = settings
        self.version = version
        self.pools = pools
        self.topic = vectors_topic(settings, version)
        self.index: VectorIndex | None = None
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
        self.task: asyncio.Task[None] | None = None

    # -- feed ---------------------------------------------------------------------
    def apply_records(self, records: list[Record]) -> None:
        """Decode and apply a batch of fetched records, in order (runs in the writer thread)."""
        mutations: list[Mutation] = []
        catalog_position: dict[int, int] = {}
        position: dict[int, int] = {}
        for record in records:
            position[record.partition] = record.offset + 1
            try:
                event = stages.parse_vector_record(record.key, record.value, record.headers)
            except InvalidMessage as exc:
                self.skipped += 1
                log.warning("vector %s@%d skipped: %s", record.partition, record.offset, exc)
                continue
            if event.source is not None:
                catalog_position[event.source[0]] = max(event.source[1] + 1, catalog_position.get(event.source[0], 0))
            if event.model_version != self.version and event.dim is not None:
                self.skipped += 1
                log.warning("vector for %s from model %s skipped: %s holds model %s",
                            event.mutation.item_id, event.model_version, self.topic, self.version)
                continue
            if event.dim is not None and self.index is None:
                self._create_index(event.dim)
            mutations.append(event.mutation)
        if self.index is not None:
            self.index.apply(mutations, position, catalog_position)
            self.applied_since_snapshot += len(mutations)
            metrics.observe_batch("indexer", "vector", len(mutations))
        else:  # only tombstones so far: nothing to delete, but the positions move on
            self.pending_position.update(position)
            self.pending_catalog_position.update(catalog_position)

    def _create_index(self, dim: int) -> None:
        s = self.settings
        self.index = VectorIndex(
            dim, m=s.hnsw_m, ef_construction=s.hnsw_ef_construction, ef_search=s.hnsw_ef_search,
            capacity=s.initial_capacity,
        )
        self.index.apply([], self.pending_position, self.pending_catalog_position)
        self.index_version = f"{self.version}/{uuid.uuid4().hex[:8]}"
        log.info("new index %s (dim %d)", self.index_version, dim)

    @property
    def position(self) -> dict[int, int]:
        """Vector-topic offsets applied (where the feed resumes)."""
        return self.index.position if self.index is not None else dict(self.pending_position)

    @property
    def catalog_position(self) -> dict[int, int]:
        """Catalog offsets reflected (what replies report and queries may wait for)."""
        return self.index.catalog_position if self.index is not None else dict(self.pending_catalog_position)

    def __len__(self) -> int:
        return len(self.index) if self.index is not None else 0

    async def wait_for_position(self, required: dict[int, int] | None, timeout_s: float) -> None:
        """Return once the index includes ``required`` catalog offsets (of this shard's
        partitions), or after the timeout."""
        required = own_position(self.settings, required)
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not stages.reached(self.catalog_position, required):
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return
            self.position_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.position_changed.wait(), timeout=min(left, 0.1))

    async def run_feed(self, sender: Sender) -> None:
        """Restore the newest usable snapshot, then read this version's vector topic from the
        offsets it covers (from the beginning without one), forever. Assigned partitions, no
        group and no commits: the position lives in the index and its snapshots."""
        s = self.settings
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, ensure_vectors_topic, s, self.version)
        if s.snapshots:
            await loop.run_in_executor(self.pools.write, self.restore)
        source = Source(s, group=f"{s.query_group}.feed", name=f"feed-{self.version}",
                        **{"max.partition.fetch.bytes": 4 * 1024 * 1024})
        partitions = [p for p in await source.partitions(self.topic) if s.owns(p)]
        if not partitions:
            await source.close()
            raise ConfigError(f"topic {self.topic} does not exist: create it with `lookalike topics create`")
        restored = self.position
        await source.assign(self.topic, {p: restored.get(p) for p in partitions})
        start_ends = await source.ends(self.topic, partitions)
        log.info("feed %s: %d partitions (shard %d of %d), %d records to replay", self.topic, len(partitions),
                 s.index_shard, s.index_shards, sum(start_ends[p] - restored.get(p, 0) for p in partitions))

        async def apply(records: list[Record]) -> list[Output]:
            await loop.run_in_executor(self.pools.write, self.apply_records, records)
            self.position_changed.set()
            return []

        async def check_caught_up(_records: list[Record]) -> None:
            """Caught up once every record up to the ends seen at start is read *and* applied."""
            if self.caught_up.is_set() or feed.offsets.pending():
                return
            read = await source.positions(self.topic, partitions)
            if all(read[p] >= start_ends[p] or self.position.get(p, 0) >= start_ends[p] for p in partitions):
                self.caught_up.set()
                log.info("feed %s caught up: %d items", self.topic, len(self))

        feed = Loop(name=f"feed-{self.version}", service="indexer", source=source, sender=sender, handle=apply,
                    commit=False, batch_max=2000, fetch_wait_s=0.2, after_fetch=check_caught_up)
        await feed.run()

    # -- snapshots ----------------------------------------------------------------
    @cached_property
    def snapshots(self) -> SnapshotStore:
        """One client (and connection pool) for every snapshot read, write and check."""
        s = self.settings
        client = redis_client(s, socket_timeout=30)
        return SnapshotStore(client, snapshot_namespace(s, self.version),
                             chunk_bytes=s.snapshot_chunk_bytes, keep=s.snapshot_keep)

    def expected_dim(self) -> int | None:
        """The embedding size of this version's model card, when the model store is reachable."""
        try:
            return ModelStore(self.settings.models_path).card(self.version).embedding_dim
        except (ModelArtifactError, OSError, ValueError):
            return None

    def restore(self) -> None:
        """Load the newest usable snapshot (runs before the feed starts). Falls back to older
        ones, then to a full replay; every refusal is logged with its reason."""
        try:
            store = self.snapshots
            candidates = store.history()
        except (redis.RedisError, OSError) as exc:
            log.warning("snapshots unavailable (%s): full replay of %s", exc, self.topic)
            return
        dim = self.expected_dim()
        for snapshot_id in candidates:
            try:
                snap = store.read(snapshot_id)
                facts = snap.manifest
                if facts.get("model_version") != self.version or (dim is not None and facts.get("dim") != dim):
                    raise SnapshotError(f"snapshot {snapshot_id} holds model {facts.get('model_version')} "
                                        f"(dim {facts.get('dim')}), this index is for {self.version} (dim {dim})")
                index = VectorIndex.restore(snap.index_bytes, snap.items_bytes, facts, ef_search=self.settings.hnsw_ef_search)
            except Exception as exc:  # whatever is wrong with a snapshot, the next one or a replay is right
                log.warning("snapshot %s refused: %s", snapshot_id, exc)
                continue
            self.index = index
            self.index_version = facts.get("index_version")
            self.last_snapshot_id, self.last_snapshot_at = snapshot_id, float(facts["created_at"])
            self.last_snapshot_items = len(index)
            log.info("restored snapshot %s: %d items of model %s at %s", snapshot_id, len(index),
                     self.version, index.position)
            break
        else:
            log.info("no usable snapshot of %s (%d tried): full replay of %s", self.version, len(candidates), self.topic)
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
        facts.update(model_version=self.version, index_version=self.index_version)
        manifest = self.snapshots.write(index_bytes, items_bytes, facts)
        self.applied_since_snapshot -= applied
        self.last_snapshot_id, self.last_snapshot_at = manifest["id"], manifest["created_at"]
        self.last_snapshot_items = int(facts["item_count"])
        log.info("snapshot %s of %s: %d items, %.1f MB, writer paused %.0f ms, written in %.0f ms", manifest["id"],
                 self.version, facts["item_count"], (len(index_bytes) + len(items_bytes)) / 1e6,
                 (exported - started) * 1000, (time.perf_counter() - exported) * 1000)
        return manifest

    def snapshot_lost(self) -> bool:
        """Is our last snapshot no longer current (Redis restarted empty, or it was deleted)?"""
        if self.index is None or self.last_snapshot_id is None:
            return self.index is not None
        return self.snapshots.current() != self.last_snapshot_id

    def facts(self) -> dict[str, Any]:
        return {
            "items": len(self),
            "index_version": self.index_version or "",
            "caught_up": self.caught_up.is_set(),
            "catalog_position": {str(p): o for p, o in sorted(self.catalog_position.items())},
            "snapshot_items": self.last_snapshot_items,
        }


def snapshot_namespace(settings: IndexerSettings, version: str) -> str:
    """Each shard snapshots its own slice: the namespace is per query group (one per shard)."""
    return f"lookalike:snapshots:{settings.query_group}:{version}"


class Indexer:
    """The live versions' indexes, which one serves, and the queries' entry point."""

    def __init__(self, settings: IndexerSettings) -> None:
        self.settings = settings
        self.pools = Pools()
        self.versions: dict[str, VersionIndex] = {}
        self.state: RolloutState | None = None
        self.started = asyncio.Event()  # the first state is known and its indexes exist
        self.instance = f"{socket.gethostname()}-{os.getpid()}"
        self.sender: Sender | None = None  # made when the loops start (run)

    # -- which versions live --------------------------------------------------------
    @property
    def serving(self) -> VersionIndex | None:
        return self.versions.get(self.state.serving) if self.state and self.state.serving else None

    def ready(self, version: str) -> bool:
        """Has this replica's index of ``version`` caught up with the serving one?"""
        target, serving = self.versions.get(version), self.serving
        if target is None or not target.caught_up.is_set():
            return False
        return serving is None or stages.covers(target.catalog_position, serving.catalog_position)

    def all_ready(self, client: redis.Redis, version: str) -> bool:
        """Ready here and on every other live replica of the group (blocking)."""
        if not self.ready(version):
            return False
        pattern = STATUS_KEY.format(group=self.settings.indexer_group, instance="*")
        for key in client.scan_iter(pattern):
            if key.endswith(f":{self.instance}"):
                continue
            raw = client.hget(key, "ready_versions")
            if raw is not None and version not in json.loads(raw):
                return False
        return True

    def rollout_step(self, client: redis.Redis | None, controller: RolloutController | None) -> RolloutState | None:
        """Advance the rollout and read the state (blocking). None when Redis is away."""
        desired = rollout.desired_version(self.settings)
        if client is None or controller is None:
            return RolloutState(serving=desired) if desired else None
        try:
            controller.tick(desired, lambda v: self.all_ready(client, v))
            return rollout.read_state(client, self.settings)
        except (redis.RedisError, OSError) as exc:
            log.warning("rollout state unavailable (%s); keeping %s", exc, self.state)
            return self.state if self.state else (RolloutState(serving=desired) if desired else None)

    def reconcile(self, state: RolloutState) -> None:
        """Create the indexes the state needs and drop the ones it no longer does."""
        if state != self.state:
            log.info("rollout state: serving %s, building %s, previous %s", state.serving, state.target,
                     state.previous)
        self.state = state
        live = state.active(time.time(), self.settings.rollout_grace_s)
        for version in live:
            if version not in self.versions:
                vi = VersionIndex(self.settings, version, self.pools)
                assert self.sender is not None, "reconcile runs inside run()"
                vi.task = asyncio.create_task(vi.run_feed(self.sender), name=f"feed-{version}")
                vi.task.add_done_callback(self._feed_done)
                self.versions[version] = vi
                log.info("index of model %s: started", version)
        for version in [v for v in self.versions if v not in live]:
            vi = self.versions.pop(version)
            if vi.task is not None:
                vi.task.cancel()
            log.info("index of model %s: dropped (%d items); no longer serving or building", version, len(vi))

    def _feed_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("feed %s stopped: %r; it restarts on the next rollout tick", task.get_name(), task.exception())
            for version, vi in list(self.versions.items()):
                if vi.task is task:
                    del self.versions[version]

    async def run_rollout(self) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        try:
            client: redis.Redis | None = rollout.redis_client(s)
            controller: RolloutController | None = RolloutController(client, s)  # type: ignore[arg-type]
        except (redis.RedisError, ValueError) as exc:
            log.warning("no Redis for the rollout state (%s): serving the champion only", exc)
            client = controller = None
        try:
            while True:
                state = await loop.run_in_executor(None, self.rollout_step, client, controller)
                if state is not None:
                    self.reconcile(state)
                    self.started.set()
                elif not self.started.is_set():
                    log.warning("no model to serve yet: no champion in %s and none pinned", s.models_path)
                await asyncio.sleep(s.rollout_poll_s)
        finally:  # stopping: end the feeds (their consumers close) rather than leave them pending
            feeds = [vi.task for vi in self.versions.values() if vi.task is not None]
            for task in feeds:
                task.cancel()
            await asyncio.gather(*feeds, return_exceptions=True)

    # -- snapshots --------------------------------------------------------------------
    async def run_snapshots(self) -> None:
        """Snapshot each version on a schedule and on mutation counts; Redis being away only delays it."""
        s = self.settings
        loop = asyncio.get_running_loop()
        last: dict[str, float] = {}
        while True:
            await asyncio.sleep(0.5)
            for version, vi in list(self.versions.items()):
                last.setdefault(version, time.monotonic())
                changed = vi.applied_since_snapshot
                interval_over = time.monotonic() - last[version] >= s.snapshot_interval_s
                due = changed >= s.snapshot_every_items or (changed and interval_over)
                if not vi.caught_up.is_set() or not (due or interval_over):
                    continue
                try:
                    if not due and not await loop.run_in_executor(self.pools.snapshot, vi.snapshot_lost):
                        last[version] = time.monotonic()
                        continue
                    await loop.run_in_executor(self.pools.snapshot, vi.snapshot)
                except (redis.RedisError, OSError) as exc:
                    log.warning("snapshot of %s failed (%s); queries go on from memory, next try in %.0fs",
                                version, exc, s.snapshot_interval_s)
                last[version] = time.monotonic()

    # -- queries ------------------------------------------------------------------
    def version_for(self, headers: Mapping[str, bytes]) -> VersionIndex | None:
        version = headers.get(c.H_MODEL_VERSION, b"").decode("utf-8", "replace")
        return self.versions.get(version)

    async def ready_for(self, headers: Mapping[str, bytes]) -> None:
        """Wait (bounded only by the feed) until the query's version has caught up, then for
        its ``min-position`` (bounded by the setting)."""
        await self.started.wait()
        vi = self.version_for(headers)
        if vi is None:
            return  # answered with model_mismatch
        await vi.caught_up.wait()
        if c.H_MIN_POSITION in headers:  # read-your-writes: wait (bounded) for the index to get there
            with contextlib.suppress(InvalidMessage):  # a malformed one is answered by answer()
                required = c.parse_position(headers[c.H_MIN_POSITION])
                await vi.wait_for_position(required, self.settings.min_position_wait_s)

    def answer(self, key: bytes | None, value: bytes | None, headers: dict[str, bytes]) -> list[Out]:
        """One query vector -> the records to produce: its reply (one index), or this shard's
        partial answer or resolved item (shards, :mod:`indexer.shards`). Never raises."""
        s = self.settings
        vi = self.version_for(headers)
        serving = self.state.serving if self.state else None
        dim = vi.index.dim if vi is not None and vi.index is not None else None
        if dim is None and value and len(value) % 4 == 0:
            dim = len(value) // 4  # no index yet to check against: an empty index answers below
        try:
            query = stages.parse_query_vector(key, value, headers, dim=dim, default_reply_to=s.replies_topic)
        except InvalidMessage as exc:
            if s.sharded and s.index_shard != 0:
                return []  # every shard sees the same malformed record: shard 0 alone answers it
            reply = c.error_reply(key.decode("utf-8", "replace") if key else "(missing)", exc.code, str(exc))
            metrics.observe_reply(reply)
            return [(s.replies_topic, key or b"", c.encode_reply(reply), [])]
        version = vi.version if vi is not None else serving
        index_version = vi.index_version if vi is not None else None
        phase = LOOKUP if s.sharded and query.item_id is not None else SEARCH
        try:
            if vi is None:
                raise ModelMismatch(f"query embedded by model {query.model_version}; this indexer holds "
                                    f"{sorted(self.versions)} (serving {serving})")
            if vi.index is None or len(vi.index) == 0:
                raise InvalidMessage("the index is empty: no catalog item has been indexed yet", code="empty_index")
            position = vi.catalog_position
            if not stages.reached(position, own_position(s, query.min_position)):
                raise InvalidMessage(
                    f"the index has not reached position {query.min_position} within "
                    f"{s.min_position_wait_s}s (it is at {position})", code="not_ready")
            if phase == LOOKUP:
                return [self.resolve(vi, query, key, headers)]
            reply = stages.answer(vi.index, query, model_version=vi.version, index_version=index_version,
                                  index_position=position)
        except (InvalidMessage, UnknownItem) as exc:
            reply = c.error_reply(query.request_id, exc.code, str(exc), model_version=version,
                                  index_version=index_version, timings_ms=query.timings_ms)
        except Exception as exc:  # a bug must not stop the service; the client still gets an answer
            log.exception("query %s failed", query.request_id, extra={"request_id": query.request_id})
            reply = c.error_reply(query.request_id, "internal", f"{type(exc).__name__}: {exc}",
                                  model_version=version, index_version=index_version)
        if not s.sharded:
            metrics.observe_reply(reply)
            return [(query.reply_to, query.request_key, c.encode_reply(reply), [])]
        return [(s.partials_topic, query.request_key, c.encode_reply(reply),
                 partial_headers(s, phase=phase, reply_to=query.reply_to, k=query.k,
                                 query_ts=query.query_timestamp_ms, waits=query.min_position is not None))]

    def resolve(self, vi: VersionIndex, query: stages.QueryVector, key: bytes | None,
                headers: Mapping[str, bytes]) -> Out:
        """A "more like this" query on a shard: the item's vector as a new query vector for
        every shard to search (the item left out). Raises UnknownItem where this shard does
        not hold the item; the caller makes that its ``lookup`` answer."""
        s = self.settings
        assert vi.index is not None and query.item_id is not None
        if query.item_id not in vi.index:
            raise UnknownItem(f"item {query.item_id!r} is not in shard {s.index_shard} of {s.index_shards}")
        vector = vi.index.vector(query.item_id)
        forwarded = [(name, raw) for name, raw in headers.items() if name not in (c.H_ITEM_ID, c.H_LOOKUP_OF)]
        forwarded.append((c.H_LOOKUP_OF, query.item_id.encode()))
        return (s.query_vectors_topic, key or b"", c.encode_vector(vector), forwarded)

    # -- status -------------------------------------------------------------------
    def status(self) -> dict[str, str]:
        """The serving index's figures at the top level (what the CLI and the demo read), every
        live version's under ``versions``, and which versions this replica has caught up on."""
        vi = self.serving
        extra = {}
        if self.settings.status_digest and vi is not None and vi.index is not None:
            extra["items_digest"] = vi.index.items_digest()
        state = self.state or RolloutState()
        return {
            **extra,
            "instance": self.instance,
            "shard": f"{self.settings.index_shard}/{self.settings.index_shards}",
            "items": str(len(vi) if vi else 0),
            "model_version": state.serving or "",
            "target_version": state.target or "",
            "index_version": (vi.index_version if vi else None) or "",
            "position": json.dumps({str(p): o for p, o in sorted(vi.position.items())} if vi else {}),
            "catalog_position": json.dumps({str(p): o for p, o in sorted(vi.catalog_position.items())} if vi else {}),
            "snapshot": (vi.last_snapshot_id if vi else None) or "",
            "snapshot_at": f"{(vi.last_snapshot_at if vi else None) or 0:.3f}",
            "snapshot_items": str(vi.last_snapshot_items if vi else 0),
            "caught_up": "1" if vi is not None and vi.caught_up.is_set() else "0",
            "skipped": str(sum(v.skipped for v in self.versions.values())),
            "versions": json.dumps({v: vi_.facts() for v, vi_ in self.versions.items()}),
            "ready_versions": json.dumps([v for v in self.versions if self.ready(v)]),
            "updated_at": f"{time.time():.3f}",
        }

    async def publish_status(self) -> None:
        s = self.settings
        client = redis_client(s, asyncio=True, socket_timeout=2)
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


    # -- the loops ----------------------------------------------------------------
    async def answer_records(self, records: list[Record]) -> list[Output]:
        """Answer query vectors (one per call in practice: each waits alone for its version
        and ``min-position``, never holding another query)."""
        loop = asyncio.get_running_loop()
        metrics.observe_batch("indexer", "query", len(records))
        out: list[Output] = []
        for record in records:
            await self.ready_for(record.headers)
            answered = await loop.run_in_executor(self.pools.search, self.answer, record.key, record.value,
                                                  record.headers)
            out += [Output(topic, key, value, headers or None, answers=record) for topic, key, value, headers in answered]
        return out

    def answer_failed(self, record: Record, exc: Exception) -> list[Output]:
        """A query vector the stage failed on, or whose reply the broker refused (too large):
        an error reply to the replies topic (its reply-to may be what was refused)."""
        s = self.settings
        if s.sharded and s.index_shard != 0:
            return []  # shard 0 answers for all
        code = getattr(exc, "code", None) or "internal"
        request_id = record.key.decode("utf-8", "replace") if record.key else "(missing)"
        reply = c.error_reply(request_id, code, f"{exc}"[:500])
        metrics.observe_reply(reply)
        reply_to = s.replies_topic
        if not isinstance(exc, SendFailed):  # the reply-to itself is fine: use it when it parses
            with contextlib.suppress(InvalidMessage, KeyError, UnicodeDecodeError):
                reply_to = stages.parse_query_vector(record.key, record.value, record.headers, dim=None,
                                                     default_reply_to=s.replies_topic).reply_to
        return [Output(reply_to, record.key or b"", c.encode_reply(reply))]

    def query_loop(self) -> Loop:
        s = self.settings
        assert self.sender is not None, "the loops start inside run()"
        return Loop(name="answer-queries", service="indexer", source=Source(s, group=s.query_group, name="queries"),
                    topics=[s.query_vectors_topic], sender=self.sender, handle=self.answer_records,
                    on_error=self.answer_failed, batch_max=1, in_flight=64, fetch_wait_s=0.05)

    async def heartbeat(self) -> None:
        while True:
            vi = self.serving
            beat(heartbeat_path(self.settings, "indexer"), items=len(vi) if vi else 0,
                 caught_up=vi is not None and vi.caught_up.is_set(),
                 model_version=self.state.serving if self.state else None)
            await asyncio.sleep(HEARTBEAT_EVERY_S)

    async def run(self) -> None:
        """The query loop plus the rollout, snapshot, status and heartbeat tasks (and the
        gatherer with shards), until cancelled."""
        s = self.settings
        self.sender = Sender(s)
        jobs = {"rollout": self.run_rollout(), "status": self.publish_status(), "heartbeat": self.heartbeat(),
                "queries": self.query_loop().run()}
        if s.snapshots:
            jobs["snapshots"] = self.run_snapshots()
        if s.sharded:
            jobs["gather"] = gather_loop(s, self.sender).run()
        try:
            await run_forever(*jobs.values(), names=list(jobs))
        finally:
            self.sender.close()
