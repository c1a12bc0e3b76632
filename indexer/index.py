"""The HNSW index of catalog vectors, keyed by item id.

hnswlib stores integer labels; this class keeps the item id <-> label map, each item's
metadata, and a readers-writer lock: many searches at once, one writer, and resizing
only under the writer's lock.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
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
        self.ef_search = ef_search
        self._index = hnswlib.Index(space="cosine", dim=dim)
        self._index.init_index(max_elements=capacity, M=m, ef_construction=ef_construction)
        self._index.set_ef(ef_search)
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

    def item_ids(self) -> set[str]:
        with self._lock.read():
            return {self._item_ids[label] for label in self._live}

    def apply(self, mutations: Sequence[Mutation]) -> None:
        """Apply upserts and deletes in order, under the writer's lock."""
        if not mutations:
            return
        with self._lock.write():
            for mutation in mutations:
                if isinstance(mutation, Upsert):
                    self._upsert(mutation)
                else:
                    self._delete(mutation.item_id)

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
