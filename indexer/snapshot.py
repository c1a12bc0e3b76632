"""Index snapshots in Redis: chunked, checksummed, switched atomically, the last N kept.

Keys (``{ns}`` = ``lookalike:snapshots:<indexer group>``)::

    {ns}:current                 id of the snapshot to restore from
    {ns}:history                 list of snapshot ids, newest first (fallbacks)
    {ns}:{id}:manifest           JSON: model version, HNSW parameters, item count,
                                 source offsets, creation time, chunk checksums
    {ns}:{id}:index:{i}          the hnswlib index file, in chunks
    {ns}:{id}:items:{i}          the label <-> item id map and metadata (JSON), in chunks

A snapshot is written under a new id, chunks first and the manifest last, then one
MULTI/EXEC moves ``current`` and pushes the id on ``history``; snapshots beyond the
newest ``keep`` are deleted. A reader verifies every chunk's SHA-256 before use, so a
torn or corrupted snapshot is refused and the previous one is tried.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import redis
from pydantic import ValidationError

from lookalike.errors import LookalikeError
from lookalike.snapshots import FORMAT, IndexFacts, SnapshotManifest, SnapshotPart

log = logging.getLogger(__name__)


class SnapshotError(LookalikeError):
    """A snapshot is missing, incomplete, corrupt or does not fit this indexer."""


@dataclass(frozen=True)
class Snapshot:
    manifest: SnapshotManifest
    index_bytes: bytes
    items_bytes: bytes


def chunks(data: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


class SnapshotStore:
    def __init__(self, client: redis.Redis, namespace: str, *, chunk_bytes: int = 16 << 20, keep: int = 3) -> None:
        self.client = client
        self.ns = namespace
        self.chunk_bytes = chunk_bytes
        self.keep = keep

    def _key(self, *parts: str) -> str:
        return ":".join((self.ns, *parts))

    def write(self, index_bytes: bytes, items_bytes: bytes, facts: IndexFacts, *, model_version: str,
              index_version: str | None = None) -> SnapshotManifest:
        """Store a snapshot and make it current; returns its manifest."""
        snapshot_id = f"{int(time.time() * 1000)}-{uuid.uuid4().hex[:6]}"
        parts = {}
        for part, data in (("index", index_bytes), ("items", items_bytes)):
            digests = []
            for i, chunk in enumerate(chunks(data, self.chunk_bytes)):
                self.client.set(self._key(snapshot_id, part, str(i)), chunk)
                digests.append(hashlib.sha256(chunk).hexdigest())
            parts[part] = SnapshotPart(bytes=len(data), chunks=digests)
        manifest = SnapshotManifest(**facts.model_dump(), id=snapshot_id, created_at=time.time(),
                                    model_version=model_version, index_version=index_version, **parts)
        self.client.set(self._key(snapshot_id, "manifest"), manifest.model_dump_json())
        with self.client.pipeline(transaction=True) as pipe:
            pipe.set(self._key("current"), snapshot_id).lpush(self._key("history"), snapshot_id).execute()
        self.prune()
        return manifest

    def current(self) -> str | None:
        raw = self.client.get(self._key("current"))
        return raw.decode() if raw is not None else None

    def history(self) -> list[str]:
        """Snapshot ids, the current one first, then older ones, newest first."""
        current = self.client.get(self._key("current"))
        ids = [i.decode() for i in self.client.lrange(self._key("history"), 0, -1)]
        if current is not None:
            ids = [current.decode(), *[i for i in ids if i != current.decode()]]
        return ids

    def read(self, snapshot_id: str) -> Snapshot:
        """Fetch and verify a snapshot. Raises SnapshotError saying what is wrong."""
        raw = self.client.get(self._key(snapshot_id, "manifest"))
        if raw is None:
            raise SnapshotError(f"snapshot {snapshot_id}: no manifest (incomplete or pruned)")
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise SnapshotError(f"snapshot {snapshot_id}: manifest is not JSON") from exc
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
            raise SnapshotError(f"snapshot {snapshot_id}: format {found!r}, expected {FORMAT}")
        try:
            manifest = SnapshotManifest.model_validate(doc)
        except ValidationError as exc:
            raise SnapshotError(f"snapshot {snapshot_id}: manifest does not describe a snapshot: {exc}") from exc
        parts = {}
        for part in ("index", "items"):
            pieces = []
            stored = getattr(manifest, part)
            for i, digest in enumerate(stored.chunks):
                chunk = self.client.get(self._key(snapshot_id, part, str(i)))
                if chunk is None:
                    raise SnapshotError(f"snapshot {snapshot_id}: {part} chunk {i} is missing")
                if hashlib.sha256(chunk).hexdigest() != digest:
                    raise SnapshotError(f"snapshot {snapshot_id}: {part} chunk {i} fails its checksum")
                pieces.append(chunk)
            parts[part] = b"".join(pieces)
            if len(parts[part]) != stored.bytes:
                raise SnapshotError(f"snapshot {snapshot_id}: {part} is {len(parts[part])} bytes, manifest says "
                                    f"{stored.bytes}")
        return Snapshot(manifest, parts["index"], parts["items"])

    def delete(self, snapshot_id: str) -> None:
        keys = list(self.client.scan_iter(self._key(snapshot_id, "*"), count=1000))
        if keys:
            self.client.delete(*keys)
        self.client.lrem(self._key("history"), 0, snapshot_id)

    def prune(self) -> None:
        """Keep the newest ``keep`` snapshots; remove older ones."""
        ids = self.history()
        for old in ids[self.keep :]:
            self.delete(old)

    def remove_orphans(self) -> int:
        """Delete the chunks of snapshots that never became current (a crash mid-write)."""
        known = set(self.history())
        prefix = len(self.ns) + 1
        orphans = set()
        for key in self.client.scan_iter(self._key("*"), count=1000):
            snapshot_id = key.decode()[prefix:].split(":", 1)[0]
            if snapshot_id not in known and snapshot_id not in {"current", "history"}:
                orphans.add(snapshot_id)
        for snapshot_id in orphans:
            self.delete(snapshot_id)
        return len(orphans)
