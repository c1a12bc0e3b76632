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

from lookalike.errors import UnknownItem


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
    """Cosine HNSW index over unit vectors with upsert/delete by item id."""

    def __init__(self, dim: int, *, m: int = 16, ef_construction: int = 200, ef_search: int = 64, capacity: int = 1024):
        self.dim = dim
        self.m = m
        self.ef_construction = ef_construction
        self.ef_search = ef_search
        self._index = hnswlib.Index(space="cosine", dim=dim)
        self._index.init_index(max_elements=capacity, M=m, ef_construction=ef_construction)
        self._index.set_ef(ef_search)
        self._position: dict[int, int] = {}  # source partition -> next offset applied
        self._labels: dict[str, int] = {}
        self._item_ids: list[str] = []  # label -> item id
        self._live: set[int] = set()
        self._metadata: dict[int, Mapping[str, Any]] = {}
        self._lock = ReadWriteLock()

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, item_id: object) -> bool:
        label = self._labels.get(item_id)  # type: ignore[arg-type]
        return label is not None and label in self._live

    @property
    def capacity(self) -> int:
        return self._index.get_max_elements()

    def items_digest(self) -> str:
        """SHA-256 of the sorted live item ids: equal digests, equal item sets."""
        return hashlib.sha256("\n".join(sorted(self.item_ids())).encode()).hexdigest()

    def item_ids(self) -> set[str]:
        with self._lock.read():
            return {self._item_ids[label] for label in self._live}

    @property
    def position(self) -> dict[int, int]:
        """Per source partition, the next offset after what the index holds."""
        with self._lock.read():
            return dict(self._position)

    def apply(self, mutations: Sequence[Mutation], position: Mapping[int, int] | None = None) -> None:
        """Apply upserts and deletes in order, and record the source offsets they bring the
        index to, in one step under the writer's lock (so a snapshot sees both or neither)."""
        if not mutations and not position:
            return
        with self._lock.write():
            for mutation in mutations:
                if isinstance(mutation, Upsert):
                    self._upsert(mutation)
                else:
                    self._delete(mutation.item_id)
            self._position.update(position or {})

    def _upsert(self, upsert: Upsert) -> None:
        vector = np.asarray(upsert.vector, dtype=np.float32).reshape(1, self.dim)
        label = self._labels.get(upsert.item_id)
        if label is None:
            label = len(self._item_ids)
            self._ensure_capacity(label + 1)
            self._labels[upsert.item_id] = label
            self._item_ids.append(upsert.item_id)
        # hnswlib replaces the vector of an existing label, and un-deletes a deleted one.
        self._index.add_items(vector, np.asarray([label]), num_threads=1)
        self._live.add(label)
        self._metadata[label] = dict(upsert.metadata)

    def _delete(self, item_id: str) -> None:
        label = self._labels.get(item_id)
        if label is None or label not in self._live:
            return
        self._index.mark_deleted(label)
        self._live.discard(label)
        self._metadata.pop(label, None)

    def _ensure_capacity(self, needed: int) -> None:
        capacity = self._index.get_max_elements()
        if needed > capacity:
            self._index.resize_index(max(needed, capacity * 2))

    def vector(self, item_id: str) -> np.ndarray:
        """The stored (unit) vector of an item, for "more like this"."""
        with self._lock.read():
            label = self._labels.get(item_id)
            if label is None or label not in self._live:
                raise UnknownItem(f"item {item_id!r} is not in the index")
            return np.asarray(self._index.get_items([label]), dtype=np.float32)[0]

    def search(self, vector: np.ndarray, k: int, exclude: str | None = None) -> list[Hit]:
        """The k nearest live items by cosine similarity, best first. k is clamped to the live count."""
        query = np.asarray(vector, dtype=np.float32).reshape(1, self.dim)
        with self._lock.read():
            live = len(self._live)
            want = min(k + (1 if exclude is not None else 0), live)
            if want <= 0:
                return []
            # hnswlib searches with max(ef, k), so a large k needs no set_ef (which would race).
            labels, distances = self._index.knn_query(query, k=want, num_threads=1)
            hits = []
            for label, distance in zip(labels[0].tolist(), distances[0].tolist(), strict=True):
                item_id = self._item_ids[label]
                if item_id == exclude:
                    continue
                hits.append(Hit(item_id, 1.0 - float(distance), self._metadata.get(label, {})))
            return hits[:k]

    # -- serialisation (no pickle) ---------------------------------------------------
    def export(self) -> tuple[bytes, bytes, dict[str, Any]]:
        """(hnswlib index bytes, items JSON bytes, facts) of one consistent state.

        Runs under the *read* lock: searches go on, only the writer waits.
        """
        with self._lock.read():
            with tempfile.TemporaryDirectory(prefix="lookalike-index-") as tmp:
                path = Path(tmp) / "index.bin"
                self._index.save_index(str(path))
                index_bytes = path.read_bytes()
            items = {
                "labels": self._item_ids,
                "live": sorted(self._live),
                "metadata": {str(label): meta for label, meta in self._metadata.items()},
            }
            facts = {
                "dim": self.dim, "space": "cosine", "m": self.m, "ef_construction": self.ef_construction,
                "ef_search": self.ef_search, "item_count": len(self._live), "labels": len(self._item_ids),
                "capacity": self._index.get_max_elements(), "position": {str(p): o for p, o in self._position.items()},
            }
        return index_bytes, json.dumps(items, separators=(",", ":")).encode(), facts

    @classmethod
    def restore(cls, index_bytes: bytes, items_bytes: bytes, facts: Mapping[str, Any]) -> VectorIndex:
        """Rebuild from :meth:`export` output. ef is set again: hnswlib does not save it."""
        index = cls(int(facts["dim"]), m=int(facts["m"]), ef_construction=int(facts["ef_construction"]),
                    ef_search=int(facts["ef_search"]), capacity=16)
        with tempfile.TemporaryDirectory(prefix="lookalike-index-") as tmp:
            path = Path(tmp) / "index.bin"
            path.write_bytes(index_bytes)
            index._index = hnswlib.Index(space="cosine", dim=index.dim)
            index._index.load_index(str(path), max_elements=int(facts["capacity"]))
        index._index.set_ef(index.ef_search)
        items = json.loads(items_bytes)
        index._item_ids = list(items["labels"])
        index._labels = {item_id: label for label, item_id in enumerate(index._item_ids)}
        index._live = set(items["live"])
        index._metadata = {int(label): meta for label, meta in items["metadata"].items()}
        index._position = {int(p): int(o) for p, o in facts["position"].items()}
        if len(index._live) != int(facts["item_count"]) or index._index.element_count != len(index._item_ids):
            raise ValueError("snapshot items do not match the index they came with")
        return index
