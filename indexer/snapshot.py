"""Index snapshots in Redis: chunked, checksummed, authenticated, one writer per namespace,
switched atomically, the last N kept.

Keys (``{ns}`` = :func:`lookalike.snapshots.snapshot_namespace`)::

    {ns}:writer                  the lease: the token of the one process that may write here
    {ns}:current                 id of the snapshot to restore from
    {ns}:history                 list of snapshot ids, newest first (fallbacks)
    {ns}:{id}:manifest           JSON {"format", "mac", "manifest"}: the manifest (model version,
                                 HNSW parameters, item count, source offsets, creation time,
                                 chunk checksums) as a string, and its HMAC-SHA256
    {ns}:{id}:index:{i}          the hnswlib index file, in chunks
    {ns}:{id}:items:{i}          the label <-> item id map and metadata (JSON), in chunks

Only the holder of ``{ns}:writer`` writes: every chunk, the manifest and the switch of
``current`` are Lua scripts that check the lease token first, so a writer that lost its
lease (paused past the TTL) cannot write a byte or switch, and a second replica never
rewrites snapshots beside the first. A snapshot is written under a new id, chunks first
and the manifest last, then one script moves ``current`` and pushes the id on ``history``;
snapshots beyond the newest ``keep`` are deleted. Chunks of ids no manifest in the history
names are deleted only by the lease holder (nobody else can be writing then).

A reader checks the manifest's MAC (the key is not in Redis) and every chunk's SHA-256
before use, so a torn, corrupted or forged snapshot is refused and the previous one is tried.
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
from lookalike.snapshots import FORMAT, IndexFacts, SnapshotManifest, SnapshotPart, mac_matches, manifest_mac

log = logging.getLogger(__name__)

# KEYS[1] the lease; ARGV[1] the token, ARGV[2] the TTL in ms.
ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
return 0
"""
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# KEYS[1] the lease, KEYS[2] the key to set; ARGV[1] the token, ARGV[2] the value.
SET_IF_WRITER = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
return 1
"""
# KEYS[1] the lease, KEYS[2] current, KEYS[3] history; ARGV[1] the token, ARGV[2] the snapshot id.
SWITCH_IF_WRITER = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('LPUSH', KEYS[3], ARGV[2])
return 1
"""


class SnapshotError(LookalikeError):
    """A snapshot is missing, incomplete, corrupt, forged or does not fit this indexer."""


class NotTheWriter(SnapshotError):
    """This process does not hold (or no longer holds) the namespace's writer lease."""


@dataclass(frozen=True)
class Snapshot:
    manifest: SnapshotManifest
    index_bytes: bytes
    items_bytes: bytes


def chunks(data: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


class WriterLease:
    """The right to write one namespace's snapshots: ``{ns}:writer`` holds this process's
    token with a TTL; taken with SET NX, renewed and released only by compare-and-set (Lua),
    so a process never extends or deletes a lease another has taken since."""

    def __init__(self, client: redis.Redis, key: str, owner: str, ttl_s: float) -> None:
        self.client = client
        self.key = key
        self.token = f"{owner}/{uuid.uuid4().hex[:12]}"
        self.ttl_ms = max(1000, int(ttl_s * 1000))
        self._acquire = client.register_script(ACQUIRE)
        self._renew = client.register_script(RENEW)
        self._release = client.register_script(RELEASE)
        self.confirmed_at: float | None = None  # monotonic time the lease was last known ours

    @property
    def held(self) -> bool:
        """Ours at the last check, and that check is younger than the TTL."""
        return self.confirmed_at is not None and time.monotonic() - self.confirmed_at < self.ttl_ms / 1000

    def acquire(self) -> bool:
        """Take the lease if free (or renew it if ours). True: ours for the TTL."""
        started = time.monotonic()
        return self._confirm(started, self._acquire(keys=[self.key], args=[self.token, self.ttl_ms]))

    def renew(self) -> bool:
        """Extend the lease if still ours. False: expired or taken (stop writing)."""
        started = time.monotonic()
        return self._confirm(started, self._renew(keys=[self.key], args=[self.token, self.ttl_ms]))

    def release(self) -> bool:
        """Give the lease up if still ours (on shutdown: another replica need not wait the TTL)."""
        self.confirmed_at = None
        return bool(self._release(keys=[self.key], args=[self.token]))

    def holder(self) -> str | None:
        raw = self.client.get(self.key)
        return raw.decode() if raw is not None else None

    def _confirm(self, started: float, result: object) -> bool:
        self.confirmed_at = started if result else None
        return bool(result)


class SnapshotStore:
    def __init__(self, client: redis.Redis, namespace: str, *, key: bytes, chunk_bytes: int = 16 << 20,
                 keep: int = 3) -> None:
        self.client = client
        self.ns = namespace
        self.key = key
        self.chunk_bytes = chunk_bytes
        self.keep = keep
        self._set_if_writer = client.register_script(SET_IF_WRITER)
        self._switch_if_writer = client.register_script(SWITCH_IF_WRITER)

    def _key(self, *parts: str) -> str:
        return ":".join((self.ns, *parts))

    def lease(self, owner: str, ttl_s: float) -> WriterLease:
        """A writer lease on this namespace for ``owner`` (not yet taken)."""
        return WriterLease(self.client, self._key("writer"), owner, ttl_s)

    def _set(self, lease: WriterLease, key: str, value: bytes | str) -> None:
        if not self._set_if_writer(keys=[lease.key, key], args=[lease.token, value]):
            raise NotTheWriter(f"{self.ns}: the writer lease was lost (expired or taken) while writing")

    def write(self, index_bytes: bytes, items_bytes: bytes, facts: IndexFacts, *, lease: WriterLease,
              model_version: str, index_version: str | None = None) -> SnapshotManifest:
        """Store a snapshot and make it current, as the holder of ``lease``; returns its manifest.
        Raises :class:`NotTheWriter` (and leaves no chunks) when the lease is not ours."""
        if not lease.renew():
            raise NotTheWriter(f"{self.ns}: not the snapshot writer (lease held by {lease.holder()})")
        snapshot_id = f"{int(time.time() * 1000)}-{uuid.uuid4().hex[:6]}"
        try:
            parts = {}
            for part, data in (("index", index_bytes), ("items", items_bytes)):
                digests = []
                for i, chunk in enumerate(chunks(data, self.chunk_bytes)):
                    self._set(lease, self._key(snapshot_id, part, str(i)), chunk)
                    digests.append(hashlib.sha256(chunk).hexdigest())
                parts[part] = SnapshotPart(bytes=len(data), chunks=digests)
            manifest = SnapshotManifest(**facts.model_dump(), id=snapshot_id, created_at=time.time(),
                                        model_version=model_version, index_version=index_version, **parts)
            body = manifest.model_dump_json()
            envelope = {"format": FORMAT, "mac": manifest_mac(self.key, self.ns, body.encode()), "manifest": body}
            self._set(lease, self._key(snapshot_id, "manifest"), json.dumps(envelope))
            if not self._switch_if_writer(keys=[lease.key, self._key("current"), self._key("history")],
                                          args=[lease.token, snapshot_id]):
                raise NotTheWriter(f"{self.ns}: the writer lease was lost before the switch")
        except NotTheWriter:
            self.delete(snapshot_id)  # our own, never current: nobody else will clean it up sooner
            raise
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

    def read_manifest(self, snapshot_id: str) -> SnapshotManifest:
        """The manifest of ``snapshot_id``, once its MAC verifies. Raises SnapshotError saying why not."""
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
        body, mac = doc.get("manifest"), doc.get("mac")
        if not isinstance(body, str) or not isinstance(mac, str) or not mac_matches(self.key, self.ns, body.encode(), mac):
            raise SnapshotError(f"snapshot {snapshot_id}: manifest MAC does not verify (another key, or not "
                                "written by an indexer): not trusted")
        try:
            manifest = SnapshotManifest.model_validate_json(body)
        except ValidationError as exc:
            raise SnapshotError(f"snapshot {snapshot_id}: manifest does not describe a snapshot: {exc}") from exc
        if manifest.id != snapshot_id:
            raise SnapshotError(f"snapshot {snapshot_id}: its manifest is snapshot {manifest.id}'s")
        return manifest

    def read(self, snapshot_id: str) -> Snapshot:
        """Fetch and verify a snapshot. Raises SnapshotError saying what is wrong."""
        manifest = self.read_manifest(snapshot_id)
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

    def remove_orphans(self, lease: WriterLease) -> int:
        """Delete the chunks of snapshots that never became current (a writer crashed
        mid-write), as the lease holder only: while the lease is ours no other process can
        be writing, so an id outside the history is nobody's work in progress."""
        if not lease.renew():
            raise NotTheWriter(f"{self.ns}: orphans are removed by the snapshot writer only")
        known = set(self.history()) | {"current", "history", "writer"}
        prefix = len(self.ns) + 1
        orphans = set()
        for key in self.client.scan_iter(self._key("*"), count=1000):
            snapshot_id = key.decode()[prefix:].split(":", 1)[0]
            if snapshot_id not in known:
                orphans.add(snapshot_id)
        for snapshot_id in orphans:
            self.delete(snapshot_id)
        return len(orphans)
