"""Is an index exactly what its topics say? The helpers of the recovery tests and the soak.

A fresh replay of a model version's vector topic, applied by the indexer's own code, is
what a new indexer without snapshots builds; the running indexer's index is read from the
snapshot it writes at a given position; two indexes are compared item by item (ids,
vectors within 1e-6, metadata).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np
import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from indexer.index import VectorIndex
from indexer.snapshot import SnapshotStore
from indexer.versions import Pools, VersionIndex
from lookalike import contracts as c
from lookalike.clients import confluent_config
from lookalike.runtime import Record
from lookalike.settings import IndexerSettings
from lookalike.snapshots import snapshot_namespace
from tests.integration.conftest import Pipeline
from tests.waiting import wait_for

SNAPSHOT_ENV = {
    "LOOKALIKE_SNAPSHOT_INTERVAL_S": "1",
    "LOOKALIKE_SNAPSHOT_EVERY_ITEMS": "200",
    "LOOKALIKE_SNAPSHOT_CHUNK_BYTES": "65536",  # many chunks: a snapshot takes long enough to be killed mid-write
    "LOOKALIKE_STATUS_DIGEST": "1",
    "LOOKALIKE_STATUS_INTERVAL_S": "0.5",
    "LOOKALIKE_CATALOG_BATCH_MAX": "128",
    "LOOKALIKE_SNAPSHOT_KEY": "recovery-test-snapshot-key-0123456789",
    "LOOKALIKE_SNAPSHOT_LEASE_TTL_S": "2",  # a killed writer's lease lapses soon: its successor snapshots
}
SNAPSHOT_KEY = SNAPSHOT_ENV["LOOKALIKE_SNAPSHOT_KEY"].encode()


def snapshot_store(pipeline: Pipeline, cluster_redis: str, version: str | None = None) -> SnapshotStore:
    """The snapshots of the serving model's index (or of ``version``'s)."""
    client = redis.Redis.from_url(cluster_redis)
    version = version or pipeline.status().model_version
    return SnapshotStore(client, snapshot_namespace(pipeline.env["LOOKALIKE_INDEXER_GROUP"], version), key=SNAPSHOT_KEY)


def indexer_settings(pipeline: Pipeline) -> IndexerSettings:
    fields = IndexerSettings.model_fields
    return IndexerSettings(**{k[len("LOOKALIKE_"):].lower(): v for k, v in pipeline.env.items()
                              if k.startswith("LOOKALIKE_") and k[len("LOOKALIKE_"):].lower() in fields})


def ends_of(settings: IndexerSettings, topic: str) -> dict[int, int]:
    """The end offset of each partition of ``topic`` now."""
    consumer = Consumer(confluent_config(settings, **{"group.id": f"ends-{uuid.uuid4().hex[:8]}"}))
    try:
        partitions = consumer.list_topics(topic, timeout=30).topics[topic].partitions
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1] for p in partitions}
    finally:
        consumer.close()


def fresh_replay(pipeline: Pipeline, version: str) -> tuple[VectorIndex, dict[int, int], int]:
    """What a new indexer without snapshots builds: ``version``'s vector topic read from its
    beginning to its end as of now, applied by the indexer's own code. Returns the index,
    the ends and how many upserts repeated the vector and metadata an item already had."""
    settings = indexer_settings(pipeline)
    vi = VersionIndex(settings, version, Pools(), owner="fresh-replay")
    ends = ends_of(settings, vi.topic)
    consumer = Consumer(confluent_config(settings, **{"group.id": f"replay-{uuid.uuid4().hex[:8]}",
                                                      "enable.auto.commit": False}))
    consumer.assign([TopicPartition(vi.topic, p, OFFSET_BEGINNING) for p in ends])
    read = dict.fromkeys(ends, 0)
    last: dict[str, tuple[bytes | None, bytes | None]] = {}
    repeats = 0
    deadline = time.monotonic() + 120
    try:
        while any(read[p] < ends[p] for p in ends):
            assert time.monotonic() < deadline, f"replay of {vi.topic} stuck at {read} of {ends}"
            records = []
            for msg in consumer.consume(1000, timeout=1.0):
                if msg.error() is not None or msg.offset() >= ends[msg.partition()]:
                    continue
                read[msg.partition()] = msg.offset() + 1
                record = Record.of(msg)
                seen = (record.value, record.headers.get(c.H_METADATA))
                repeats += record.value is not None and last.get(record.key.decode()) == seen
                last[record.key.decode()] = seen
                records.append(record)
            vi.apply_records(records)
    finally:
        consumer.close()
    assert vi.index is not None, f"{vi.topic} holds no vectors"
    return vi.index, ends, repeats


def snapshot_at(pipeline: Pipeline, store: SnapshotStore, position: dict[int, int], timeout_s: float) -> VectorIndex:
    """The running indexer's index, from the snapshot it writes once it has applied the vector
    topic up to ``position`` (restoring it also checks hnswlib's live elements are exactly
    the items: none lost, none left over)."""
    def current_at_position() -> str | None:
        current = store.current()
        if current is None or store.read_manifest(current).position != position:
            return None
        status = pipeline.status()
        return current if status is not None and status.snapshot == current else None

    snapshot_id = wait_for(current_at_position, timeout_s, f"a snapshot of the running indexer at {position}",
                           pipeline, alive=True)
    snap = store.read(snapshot_id)
    return VectorIndex.restore(snap.index_bytes, snap.items_bytes, snap.manifest.facts())


def contents(index: VectorIndex) -> dict[str, tuple[np.ndarray, Mapping[str, Any]]]:
    return {item_id: (index.vector(item_id), index.metadata(item_id)) for item_id in index.item_ids()}


def assert_same_items(recovered: VectorIndex, replayed: VectorIndex) -> None:
    """Every item's vector and metadata, not only the ids."""
    mine, theirs = contents(recovered), contents(replayed)
    assert mine.keys() == theirs.keys(), (sorted(mine.keys() - theirs.keys())[:10],
                                          sorted(theirs.keys() - mine.keys())[:10])
    other_metadata = [i for i in mine if mine[i][1] != theirs[i][1]]
    assert not other_metadata, [(i, mine[i][1], theirs[i][1]) for i in other_metadata[:5]]
    gaps = {i: float(np.abs(mine[i][0] - theirs[i][0]).max()) for i in mine}
    worst = max(gaps, key=gaps.__getitem__)
    assert gaps[worst] <= 1e-6, f"{worst}: vector differs by {gaps[worst]}"
