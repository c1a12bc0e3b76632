"""One model version's index: its feed (the version's vector topic, applied in order, from
the offsets a snapshot covers) and its snapshots in Redis."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property

import redis

from indexer import stages
from indexer.index import Mutation, VectorIndex
from indexer.shards import own_position
from indexer.snapshot import SnapshotError, SnapshotStore, WriterLease
from lookalike import metrics
from lookalike.artifacts import ModelStore
from lookalike.clients import redis_client
from lookalike.errors import ConfigError, ErrorCode, InvalidMessage, ModelArtifactError, ModelMismatch
from lookalike.runtime import Loop, Output, Record, Sender, Source, dead_letter
from lookalike.settings import IndexerSettings
from lookalike.snapshots import SnapshotManifest, load_snapshot_key, snapshot_namespace, too_old
from lookalike.status import VersionFacts
from lookalike.topics import ensure_vectors_topic, topic_delete_retention_ms, vectors_topic

log = logging.getLogger(__name__)


class Pools:
    """The threads every version's index shares: searches, the one writer, snapshots."""

    def __init__(self) -> None:
        self.search = ThreadPoolExecutor(max_workers=4, thread_name_prefix="search")
        self.write = ThreadPoolExecutor(max_workers=1, thread_name_prefix="apply")
        self.snapshot = ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapshot")


class VersionIndex:
    """The index of one model version, its position in that version's vector topic, and
    its snapshots."""

    def __init__(self, settings: IndexerSettings, version: str, pools: Pools, owner: str = "") -> None:
        self.settings = settings
        self.owner = owner or f"{socket.gethostname()}-{os.getpid()}"  # names the writer lease's holder
        self._next_lease_try = 0.0
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
        self.model_dim: int | None = None  # from the model card, once read: no record sets another
        self.skipped = 0
        self.task: asyncio.Task[None] | None = None

    # -- feed ---------------------------------------------------------------------
    def apply_records(self, records: list[Record]) -> list[tuple[Record, InvalidMessage]]:
        """Decode and apply a batch of fetched records, in order (runs in the writer thread);
        returns the records skipped, with why (the feed dead-letters them)."""
        mutations: list[Mutation] = []
        catalog_position: dict[int, int] = {}
        position: dict[int, int] = {}
        skipped: list[tuple[Record, InvalidMessage]] = []
        for record in records:
            position[record.partition] = record.offset + 1
            try:
                event = stages.parse_vector_record(record.key, record.value, record.headers)
                if event.model_version != self.version and event.dim is not None:
                    raise ModelMismatch(f"vector for {event.mutation.item_id} from model {event.model_version}: "
                                        f"{self.topic} holds model {self.version}")
                want = self.index.dim if self.index is not None else self.model_dim
                if event.dim is not None and want is not None and event.dim != want:
                    raise InvalidMessage(f"vector of dim {event.dim}; model {self.version} embeds in {want} "
                                         "dimensions", code=ErrorCode.BAD_VECTOR)
            except InvalidMessage as exc:
                self.skipped += 1
                log.warning("vector %s@%d skipped: %s", record.partition, record.offset, exc)
                skipped.append((record, exc))
                continue
            if event.source is not None:
                catalog_position[event.source[0]] = max(event.source[1] + 1, catalog_position.get(event.source[0], 0))
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
        return skipped

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
        self.model_dim = await loop.run_in_executor(None, self.expected_dim)
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
            skipped = await loop.run_in_executor(self.pools.write, self.apply_records, records)
            self.position_changed.set()
            return [dead_letter(s.deadletter_topic, record, exc) for record, exc in skipped]

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
        """One client (and connection pool) for every snapshot read, write and check. Raises
        ConfigError when there is no manifest key."""
        s = self.settings
        client = redis_client(s, socket_timeout=30)
        key = load_snapshot_key(s.snapshot_key, s.snapshot_key_file, s.home)
        return SnapshotStore(client, snapshot_namespace(s.query_group, self.version), key=key,
                             chunk_bytes=s.snapshot_chunk_bytes, keep=s.snapshot_keep)

    @cached_property
    def lease(self) -> WriterLease:
        return self.snapshots.lease(self.owner, self.settings.snapshot_lease_ttl_s)

    def expected_dim(self) -> int | None:
        """The embedding size of this version's model card, when the model store is reachable."""
        try:
            return ModelStore(self.settings.models_path).card(self.version).embedding_dim
        except (ModelArtifactError, OSError, ValueError):
            return None

    def tombstone_retention_ms(self) -> int:
        """How long this version's vector topic keeps tombstones: the setting, or the topic's
        own ``delete.retention.ms`` when that is shorter (a topic made before it was set)."""
        found = topic_delete_retention_ms(self.settings, self.topic)
        return min(self.settings.delete_retention_ms, found if found is not None else self.settings.delete_retention_ms)

    def restore(self) -> None:
        """Load the newest usable snapshot (runs before the feed starts). Falls back to older
        ones, then to a full replay; every refusal is logged with its reason."""
        try:
            store = self.snapshots
            candidates = store.history()
        except (redis.RedisError, OSError, ConfigError) as exc:
            log.warning("snapshots unavailable (%s): full replay of %s", exc, self.topic)
            return
        dim = self.expected_dim()
        retention_ms = self.tombstone_retention_ms() if candidates else self.settings.delete_retention_ms
        for snapshot_id in candidates:
            try:
                manifest = store.read_manifest(snapshot_id)
                stale = too_old(manifest.created_at, time.time(), retention_ms, self.settings.snapshot_retention_margin_s)
                if stale:  # the older ones are older still: replay from the start
                    log.warning("snapshot %s refused: %s; not trying older ones", snapshot_id, stale)
                    break
                snap = store.read(snapshot_id)
                manifest = snap.manifest
                if manifest.model_version != self.version or (dim is not None and manifest.dim != dim):
                    raise SnapshotError(f"snapshot {snapshot_id} holds model {manifest.model_version} "
                                        f"(dim {manifest.dim}), this index is for {self.version} (dim {dim})")
                index = VectorIndex.restore(snap.index_bytes, snap.items_bytes, manifest.facts(),
                                            ef_search=self.settings.hnsw_ef_search)
            except Exception as exc:  # whatever is wrong with a snapshot, the next one or a replay is right
                log.warning("snapshot %s refused: %s", snapshot_id, exc)
                continue
            self.index = index
            self.index_version = manifest.index_version
            self.last_snapshot_id, self.last_snapshot_at = snapshot_id, manifest.created_at
            self.last_snapshot_items = len(index)
            log.info("restored snapshot %s: %d items of model %s at %s", snapshot_id, len(index),
                     self.version, index.position)
            return
        log.info("no usable snapshot of %s (%d found): full replay of %s", self.version, len(candidates), self.topic)

    def keep_lease(self) -> bool:
        """Hold this namespace's writer lease: renew it every third of its TTL, or try to take
        it; on taking it, remove what crashed writers left. True: this replica is the writer
        (runs in the snapshot thread)."""
        lease, now = self.lease, time.monotonic()
        if lease.confirmed_at is not None and now - lease.confirmed_at < lease.ttl_ms / 3000:
            return True
        if self._next_lease_try > now:  # one Redis call per third of the TTL, also while Redis is away
            return lease.held
        self._next_lease_try = now + lease.ttl_ms / 3000
        if lease.held:
            if lease.renew():
                return True
            log.warning("snapshot writer lease of %s lost (expired or taken by %s)", self.version, lease.holder())
            return False
        if not lease.acquire():
            return False
        log.info("snapshot writer of %s (lease %s)", self.version, lease.token)
        try:
            removed = self.snapshots.remove_orphans(lease)
            if removed:
                log.info("removed %d unfinished snapshots", removed)
        except SnapshotError as exc:
            log.warning("cannot clean unfinished snapshots: %s", exc)
        return lease.held

    def release_lease(self) -> None:
        """Give the writer lease up (stopping), so another replica need not wait for its TTL."""
        if "lease" in self.__dict__ and self.lease.confirmed_at is not None:
            try:
                self.lease.release()
            except (redis.RedisError, OSError) as exc:
                log.warning("cannot release the snapshot writer lease of %s: %s", self.version, exc)

    def snapshot(self) -> SnapshotManifest | None:
        """Write a snapshot of the current state as the lease holder (runs in the snapshot thread)."""
        if self.index is None:
            return None
        started = time.perf_counter()
        applied = self.applied_since_snapshot
        index_bytes, items_bytes, facts = self.index.export()
        exported = time.perf_counter()
        manifest = self.snapshots.write(index_bytes, items_bytes, facts, lease=self.lease, model_version=self.version,
                                        index_version=self.index_version)
        self.applied_since_snapshot -= applied
        self.last_snapshot_id, self.last_snapshot_at = manifest.id, manifest.created_at
        self.last_snapshot_items = facts.item_count
        log.info("snapshot %s of %s: %d items, %.1f MB, writer paused %.0f ms, written in %.0f ms", manifest.id,
                 self.version, facts.item_count, (len(index_bytes) + len(items_bytes)) / 1e6,
                 (exported - started) * 1000, (time.perf_counter() - exported) * 1000)
        return manifest

    def snapshot_lost(self) -> bool:
        """Is our last snapshot no longer current (Redis restarted empty, or it was deleted)?
        Asked by the lease holder only: another replica's newer snapshot is not a loss to it."""
        if self.index is None or self.last_snapshot_id is None:
            return self.index is not None
        return self.snapshots.current() != self.last_snapshot_id

    def facts(self) -> VersionFacts:
        return VersionFacts(items=len(self), index_version=self.index_version or "", caught_up=self.caught_up.is_set(),
                            catalog_position=self.catalog_position, snapshot_items=self.last_snapshot_items)
