"""What an index snapshot says about itself: the typed manifest, and where snapshots live.

Snapshots are written and read by the indexer (``indexer/snapshot.py``: chunks in Redis,
checksums, the atomic switch); this is their self-description, one model for every
writer and reader (the indexer, ``benchmarks.snapshots``, tests), so a manifest is
assembled in one place and a loader refuses what does not fit with a clear reason.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

FORMAT = 1


def snapshot_namespace(query_group: str, version: str) -> str:
    """The Redis key prefix of one model version's snapshots. Each shard snapshots its own
    slice, so the namespace is per query group (one per shard)."""
    return f"lookalike:snapshots:{query_group}:{version}"


class IndexFacts(BaseModel):
    """One consistent state of an HNSW index: its parameters, size and the offsets it covers."""

    model_config = ConfigDict(frozen=True)

    dim: int = Field(ge=1)
    space: Literal["cosine"] = "cosine"
    m: int = Field(ge=2)
    ef_construction: int = Field(ge=1)
    ef_search: int = Field(ge=1)
    item_count: int = Field(ge=0)
    capacity: int = Field(ge=1)
    position: dict[int, int] = Field(default_factory=dict)  # vector-topic offsets applied
    catalog_position: dict[int, int] = Field(default_factory=dict)  # catalog offsets reflected


class SnapshotPart(BaseModel):
    """A blob stored in chunks: its size and each chunk's SHA-256."""

    model_config = ConfigDict(frozen=True)

    bytes: int = Field(ge=0)
    chunks: list[str]


class SnapshotManifest(IndexFacts):
    """The manifest stored beside a snapshot's chunks (JSON in Redis)."""

    format: Literal[1] = FORMAT
    id: str
    created_at: float
    model_version: str
    index_version: str | None = None
    index: SnapshotPart
    items: SnapshotPart

    def facts(self) -> IndexFacts:
        return IndexFacts.model_validate(self.model_dump(include=set(IndexFacts.model_fields)))
