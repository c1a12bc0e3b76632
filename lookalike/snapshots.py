"""What an index snapshot says about itself: the typed manifest, where snapshots live, and
the key that authenticates manifests.

Snapshots are written and read by the indexer (``indexer/snapshot.py``: chunks in Redis,
checksums, the atomic switch); this is their self-description, one model for every
writer and reader (the indexer, ``benchmarks.snapshots``, tests), so a manifest is
assembled in one place and a loader refuses what does not fit with a clear reason.

A manifest is stored with an HMAC-SHA256 made with a key that is *not* in Redis
(:func:`load_snapshot_key`): whoever can write to Redis can delete snapshots (the indexer
then replays from Kafka) but cannot make the indexer load bytes of their choosing.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from lookalike.errors import ConfigError

log = logging.getLogger(__name__)

FORMAT = 2  # 2: manifests carry a MAC (format 1 snapshots are refused: one full replay after upgrading)
MIN_KEY_BYTES = 16


def snapshot_namespace(query_group: str, version: str) -> str:
    """The Redis key prefix of one model version's snapshots. Each shard snapshots its own
    slice, so the namespace is per query group (one per shard)."""
    return f"lookalike:snapshots:{query_group}:{version}"


def load_snapshot_key(key: SecretStr | None, key_file: Path | None, home: Path) -> bytes:
    """The manifest key: ``LOOKALIKE_SNAPSHOT_KEY``, else the file ``LOOKALIKE_SNAPSHOT_KEY_FILE``,
    else ``<home>/secrets/snapshot.key``, created (mode 0600, 32 random bytes, hex) on first
    use, which is how the local stack gets one: every process sharing ``LOOKALIKE_HOME``
    shares it. Replicas on separate hosts must be given the same key (a mounted secret)."""
    if key is not None:
        raw = key.get_secret_value().encode()
        source = "LOOKALIKE_SNAPSHOT_KEY"
    else:
        path = key_file or home / "secrets" / "snapshot.key"
        source = str(path)
        if key_file is None and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:  # another process made it first: use theirs
                pass
            else:
                with os.fdopen(fd, "w") as fh:
                    fh.write(secrets.token_hex(32) + "\n")
                log.info("created the snapshot key %s", path)
        try:
            raw = path.read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the snapshot key {path}: {exc}") from exc
    if len(raw) < MIN_KEY_BYTES:
        raise ConfigError(f"the snapshot key from {source} is {len(raw)} bytes; at least {MIN_KEY_BYTES} are needed")
    return raw


def manifest_mac(key: bytes, namespace: str, manifest_json: bytes) -> str:
    """HMAC-SHA256 of a manifest's exact bytes, bound to its namespace (a manifest copied to
    another shard's or model's keys does not verify there)."""
    return hmac.new(key, namespace.encode() + b"\n" + manifest_json, hashlib.sha256).hexdigest()


def mac_matches(key: bytes, namespace: str, manifest_json: bytes, mac: str) -> bool:
    return hmac.compare_digest(manifest_mac(key, namespace, manifest_json), mac)


def too_old(created_at: float, now: float, delete_retention_ms: int, margin_s: float) -> str | None:
    """Why a snapshot made at ``created_at`` cannot be trusted to see every delete, or None.

    Compaction drops a tombstone ``delete.retention.ms`` after cleaning it, at the earliest;
    a snapshot whose position is older than that (less a margin for clocks and for the
    replay itself) may have a delete behind it that its topic no longer holds, so the item
    would come back. A snapshot is written only once its feed has caught up, so its
    creation time stands for its position's age."""
    max_age_s = delete_retention_ms / 1000 - margin_s
    age_s = now - created_at
    if age_s > max_age_s:
        return (f"{age_s / 3600:.1f} h old, over delete.retention.ms ({delete_retention_ms / 3_600_000:.1f} h) less "
                f"{margin_s / 3600:.1f} h: tombstones compacted since may be missing")
    if age_s < -margin_s:
        return f"made {-age_s:.0f} s in the future (clock skew or a forged time)"
    return None


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

    format: Literal[2] = FORMAT
    id: str
    created_at: float
    model_version: str
    index_version: str | None = None
    index: SnapshotPart
    items: SnapshotPart

    def facts(self) -> IndexFacts:
        return IndexFacts.model_validate(self.model_dump(include=set(IndexFacts.model_fields)))
