"""The HNSW index of catalog vectors, keyed by item id.

hnswlib stores integer labels; this class keeps the item id <-> label map, each item's
metadata, and a readers-writer lock: many searches at once, one writer, and resizing
only under the writer's lock.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hnswlib
import numpy as np

from indexer.hnsw_file import check_file
from lookalike.errors import UnknownItem
from lookalike.snapshots import IndexFacts


class ReadWriteLock:
    """Many readers or one writer; a waiting writer blocks new readers (no starvation)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


@dataclass(frozen=True)
class Hit:
    item_id: str
    score: float  # cosine similarity
    metadata: Mapping[str, Any]


@dataclass(frozen=True)
class Upsert:
    item_id: str
    vector: np.ndarray  # (dim,) float32
    metadata: Mapping[str, Any]


@dataclass(frozen=True)
class Delete:
    item_id: str


Mutation = Upsert | Delete


class VectorIndex:
    """Cosine HNSW index over unit vectors with upsert/delete by item id.

    A deleted item's slot is marked deleted and reused by the next new item
    (``allow_replace_deleted``); the index grows geometrically only when no slot is free,
    and is rebuilt from its live vectors when deleted slots pass ``rebuild_ratio`` of all.
    Labels are never reused, so a label always names one version of one item.
    """

    REBUILD_MIN_FREE = 1024  # rebuilding a small index buys nothing

    def __init__(self, dim: int, *, m: int = 16, ef_construction: int = 200, ef_search: int = 64,
                 capacity: int = 1024, rebuild_ratio: float = 0.3):
        self.dim = dim
        self.m = m
        self.ef_construction = ef_construction
        self.ef_search = ef_search
        self.rebuild_ratio = rebuild_ratio
        self.rebuilds = 0
        self._index = self._new_hnsw(capacity)
        self._position: dict[int, int] = {}  # vector-topic partition -> next offset applied
        self._catalog_position: dict[int, int] = {}  # catalog partition -> next catalog offset reflected
        self._labels: dict[str, int] = {}  # live item id -> label
        self._item_of: dict[int, str] = {}  # live label -> item id
        self._metadata: dict[int, Mapping[str, Any]] = {}
        self._next_label = 0
        self._free_slots = 0  # deleted elements waiting to be replaced
        self._lock = ReadWriteLock()

    def _new_hnsw(self, capacity: int) -> hnswlib.Index:
        index = hnswlib.Index(space="cosine", dim=self.dim)
        index.init_index(max_elements=capacity, M=self.m, ef_construction=self.ef_construction,
                         allow_replace_deleted=True)
        index.set_ef(self.ef_search)
        return index

    def __len__(self) -> int:
        return len(self._labels)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._labels

    @property
    def capacity(self) -> int:
        return self._index.get_max_elements()

    @property
    def free_slots(self) -> int:
        return self._free_slots

    def items_digest(self) -> str:
        """SHA-256 of the sorted live item ids: equal digests, equal item sets."""
        return hashlib.sha256("\n".join(sorted(self.item_ids())).encode()).hexdigest()

    def item_ids(self) -> set[str]:
        with self._lock.read():
            return set(self._labels)

    @property
    def position(self) -> dict[int, int]:
        """Per vector-topic partition, the next offset after what the index holds."""
        with self._lock.read():
            return dict(self._position)

    @property
    def catalog_position(self) -> dict[int, int]:
        """Per catalog partition, the next catalog offset after what the index reflects."""
        with self._lock.read():
            return dict(self._catalog_position)

    def apply(self, mutations: Sequence[Mutation], position: Mapping[int, int] | None = None,
              catalog_position: Mapping[int, int] | None = None) -> None:
        """Apply upserts and deletes in order, and record the offsets they bring the index to,
        in one step under the writer's lock (so a snapshot sees both or neither)."""
        if not mutations and not position and not catalog_position:
            return
        with self._lock.write():
            for mutation in mutations:
                if isinstance(mutation, Upsert):
                    self._upsert(mutation)
                else:
                    self._delete(mutation.item_id)
            self._position.update(position or {})
            for partition, offset in (catalog_position or {}).items():
                self._catalog_position[partition] = max(offset, self._catalog_position.get(partition, 0))
            total = len(self._labels) + self._free_slots
            if self._free_slots >= self.REBUILD_MIN_FREE and self._free_slots > self.rebuild_ratio * total:
                self._rebuild()

    def bulk_add(self, item_ids: Sequence[str], vectors: np.ndarray,
                 metadata: Sequence[Mapping[str, Any]] | None = None) -> None:
        """Add many *new* items in one multi-threaded hnswlib call (loading, benchmarks)."""
        vectors = np.asarray(vectors, dtype=np.float32).reshape(len(item_ids), self.dim)
        with self._lock.write():
            if any(item_id in self._labels for item_id in item_ids) or len(set(item_ids)) != len(item_ids):
                raise ValueError("bulk_add takes new, distinct item ids only")
            labels = np.arange(self._next_label, self._next_label + len(item_ids), dtype=np.int64)
            self._next_label += len(item_ids)
            self._ensure_capacity(self._index.get_current_count() + len(item_ids))
            self._index.add_items(vectors, labels, num_threads=-1)
            for i, (item_id, label) in enumerate(zip(item_ids, labels.tolist(), strict=True)):
                self._labels[item_id] = label
                self._item_of[label] = item_id
                self._metadata[label] = dict(metadata[i]) if metadata else {}

    def _upsert(self, upsert: Upsert) -> None:
        vector = np.asarray(upsert.vector, dtype=np.float32).reshape(1, self.dim)
        label = self._labels.get(upsert.item_id)
        if label is not None:  # a live item: its vector is replaced in place
            self._index.add_items(vector, np.asarray([label]), num_threads=1)
        else:
            label = self._next_label
            self._next_label += 1
            if self._free_slots:
                self._index.add_items(vector, np.asarray([label]), num_threads=1, replace_deleted=True)
                self._free_slots -= 1
            else:
                self._ensure_capacity(self._index.get_current_count() + 1)
                self._index.add_items(vector, np.asarray([label]), num_threads=1)
            self._labels[upsert.item_id] = label
            self._item_of[label] = upsert.item_id
        self._metadata[label] = dict(upsert.metadata)

    def _delete(self, item_id: str) -> None:
        label = self._labels.pop(item_id, None)
        if label is None:
            return
        self._index.mark_deleted(label)
        del self._item_of[label]
        self._metadata.pop(label, None)
        self._free_slots += 1

    def _ensure_capacity(self, needed: int) -> None:
        capacity = self._index.get_max_elements()
        if needed > capacity:
            self._index.resize_index(max(needed, capacity * 2))

    def _rebuild(self) -> None:
        """A fresh graph of the live vectors (under the writer's lock): deleted nodes no longer
        sit in the graph as detours."""
        labels = np.fromiter(self._item_of, dtype=np.int64, count=len(self._item_of))
        fresh = self._new_hnsw(max(1024, int(len(labels) * 1.25)))
        if len(labels):
            vectors = np.asarray(self._index.get_items(labels), dtype=np.float32)
            fresh.add_items(vectors, labels)
        self._index = fresh
        self._free_slots = 0
        self.rebuilds += 1

    def vector(self, item_id: str) -> np.ndarray:
        """The stored (unit) vector of an item, for "more like this"."""
        with self._lock.read():
            label = self._labels.get(item_id)
            if label is None:
                raise UnknownItem(f"item {item_id!r} is not in the index")
            return np.asarray(self._index.get_items([label]), dtype=np.float32)[0]

    def metadata(self, item_id: str) -> Mapping[str, Any]:
        """The metadata stored with an item."""
        with self._lock.read():
            label = self._labels.get(item_id)
            if label is None:
                raise UnknownItem(f"item {item_id!r} is not in the index")
            return self._metadata.get(label, {})

    def search(self, vector: np.ndarray, k: int, exclude: str | None = None) -> list[Hit]:
        """The k nearest live items by cosine similarity, best first. k is clamped to the live count."""
        query = np.asarray(vector, dtype=np.float32).reshape(1, self.dim)
        with self._lock.read():
            live = len(self._labels)
            want = min(k + (1 if exclude is not None else 0), live)
            if want <= 0:
                return []
            # hnswlib searches with max(ef, k), so a large k needs no set_ef (which would race).
            labels, distances = self._index.knn_query(query, k=want, num_threads=1)
            hits = []
            for label, distance in zip(labels[0].tolist(), distances[0].tolist(), strict=True):
                item_id = self._item_of[label]
                if item_id == exclude:
                    continue
                hits.append(Hit(item_id, 1.0 - float(distance), self._metadata.get(label, {})))
            return hits[:k]

    # -- serialisation (no pickle) ---------------------------------------------------
    def export(self) -> tuple[bytes, bytes, IndexFacts]:
        """(hnswlib index bytes, items JSON bytes, facts) of one consistent state.

        Runs under the *read* lock: searches go on, only the writer waits.
        """
        with self._lock.read():
            with tempfile.TemporaryDirectory(prefix="lookalike-index-") as tmp:
                path = Path(tmp) / "index.bin"
                self._index.save_index(str(path))
                index_bytes = path.read_bytes()
            items = {
                "items": {str(label): item_id for label, item_id in self._item_of.items()},
                "metadata": {str(label): meta for label, meta in self._metadata.items()},
                "next_label": self._next_label,
                "free_slots": self._free_slots,
            }
            facts = IndexFacts(dim=self.dim, m=self.m, ef_construction=self.ef_construction, ef_search=self.ef_search,
                               item_count=len(self._labels), capacity=self._index.get_max_elements(),
                               position=dict(self._position), catalog_position=dict(self._catalog_position))
        return index_bytes, json.dumps(items, separators=(",", ":")).encode(), facts

    @classmethod
    def restore(cls, index_bytes: bytes, items_bytes: bytes, facts: IndexFacts,
                ef_search: int | None = None) -> VectorIndex:
        """Rebuild from :meth:`export` output. ef is set again (hnswlib does not save it):
        ``ef_search`` when given (the setting of the restoring indexer), else the snapshot's.

        The hnswlib bytes are checked against ``facts`` and the items map before hnswlib's
        loader sees them (:func:`indexer.hnsw_file.check_file`); raises HnswFileError or
        ValueError saying what does not fit."""
        items = json.loads(items_bytes)
        item_of = {int(label): str(item_id) for label, item_id in items["items"].items()}
        free_slots = int(items["free_slots"])
        if len(item_of) != facts.item_count or len(set(item_of.values())) != len(item_of) or free_slots < 0:
            raise ValueError(f"snapshot items ({len(item_of)}, {free_slots} free slots) do not match the manifest's "
                             f"{facts.item_count} items")
        layout = check_file(index_bytes, dim=facts.dim, m=facts.m, ef_construction=facts.ef_construction,
                            capacity=facts.capacity, elements=facts.item_count + free_slots)
        if layout.live_labels() != set(item_of) or int(layout.deleted.sum()) != free_slots:
            raise ValueError("the hnswlib file's live labels are not the snapshot's items")
        index = cls(facts.dim, m=facts.m, ef_construction=facts.ef_construction,
                    ef_search=ef_search or facts.ef_search, capacity=16)
        with tempfile.TemporaryDirectory(prefix="lookalike-index-") as tmp:
            path = Path(tmp) / "index.bin"
            path.write_bytes(index_bytes)
            index._index = hnswlib.Index(space="cosine", dim=index.dim)
            index._index.load_index(str(path), max_elements=facts.capacity, allow_replace_deleted=True)
        index._index.set_ef(index.ef_search)
        index._item_of = item_of
        index._labels = {item_id: label for label, item_id in item_of.items()}
        index._metadata = {int(label): meta for label, meta in items["metadata"].items()}
        index._next_label = int(items["next_label"])
        index._free_slots = free_slots
        index._position = dict(facts.position)
        index._catalog_position = dict(facts.catalog_position)
        if (len(layout.labels) and int(layout.labels.max()) >= index._next_label) or index._index.dim != index.dim:
            raise ValueError("snapshot items do not match the index they came with")
        return index
