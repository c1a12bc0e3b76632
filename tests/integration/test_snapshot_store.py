"""The snapshot store on a real Redis (its Lua scripts): one writer per namespace, fenced
writes, orphan cleanup by the writer only, and manifests that cannot be forged from Redis."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import redis

from indexer.index import Upsert, VectorIndex
from indexer.snapshot import NotTheWriter, SnapshotError, SnapshotStore
from tests.conftest import Cluster
from tests.waiting import wait_for

pytestmark = pytest.mark.integration
KEY = b"integration-test-snapshot-key-32b"


@pytest.fixture
def namespace(cluster: Cluster, throwaway: Callable[[], str]) -> Iterator[tuple[redis.Redis, str]]:
    """A snapshot namespace of the test's own; ``throwaway`` removes its keys."""
    yield redis.Redis.from_url(cluster.redis_url), f"lookalike:snapshots:{throwaway()}:m"


def exported(n: int = 40) -> tuple[bytes, bytes, object]:
    rng = np.random.default_rng(n)
    index = VectorIndex(8, m=8, ef_construction=40, capacity=16)
    index.apply([Upsert(f"i{i}", rng.standard_normal(8).astype(np.float32), {"n": i}) for i in range(n)])
    return index.export()


def keys_of(client: redis.Redis, ns: str, snapshot_id: str) -> list[bytes]:
    return list(client.scan_iter(f"{ns}:{snapshot_id}:*"))


def test_one_writer_per_namespace(namespace: tuple[redis.Redis, str]) -> None:
    client, ns = namespace
    a = SnapshotStore(client, ns, key=KEY, chunk_bytes=1024)
    b = SnapshotStore(client, ns, key=KEY, chunk_bytes=1024)
    lease_a, lease_b = a.lease("replica-a", ttl_s=30), b.lease("replica-b", ttl_s=30)
    index_bytes, items_bytes, facts = exported()

    assert lease_a.acquire() and lease_a.held
    assert not lease_b.acquire() and not lease_b.held and not lease_b.renew()
    assert not lease_b.release(), "a release by a non-holder deletes nothing"
    assert lease_b.holder() == lease_a.token

    with pytest.raises(NotTheWriter, match="not the snapshot writer"):
        b.write(index_bytes, items_bytes, facts, lease=lease_b, model_version="m")
    assert b.history() == [] and list(client.scan_iter(f"{ns}:*:index:*")) == []
    with pytest.raises(NotTheWriter):
        b.remove_orphans(lease_b)

    manifest = a.write(index_bytes, items_bytes, facts, lease=lease_a, model_version="m")
    assert b.current() == manifest.id
    assert b.read(manifest.id).index_bytes == index_bytes, "the other replica reads the writer's snapshot"

    assert lease_a.release() and lease_b.acquire(), "released: the other replica takes over at once"


def test_a_writer_that_lost_its_lease_cannot_write_a_chunk_or_switch(namespace: tuple[redis.Redis, str]) -> None:
    client, ns = namespace
    a = SnapshotStore(client, ns, key=KEY, chunk_bytes=1024)
    b = SnapshotStore(client, ns, key=KEY, chunk_bytes=1024)
    lease_a, lease_b = a.lease("replica-a", ttl_s=1), b.lease("replica-b", ttl_s=30)
    index_bytes, items_bytes, facts = exported()
    assert lease_a.acquire()
    first = a.write(index_bytes, items_bytes, facts, lease=lease_a, model_version="m")

    # A pauses past its TTL (a stop-the-world pause, a slow disk); B takes the lease.
    wait_for(lambda: lease_b.acquire(), 10, "the expired lease taken by B")
    # A resumes mid-write: its renew fails first; and should it get past that check, every
    # chunk it sets is refused by the script that compares the token.
    with pytest.raises(NotTheWriter):
        a.write(index_bytes, items_bytes, facts, lease=lease_a, model_version="m")
    with pytest.raises(NotTheWriter, match="lost"):
        a._set(lease_a, f"{ns}:late:index:0", b"x")
    assert client.get(f"{ns}:late:index:0") is None
    assert a.current() == first.id and a.history() == [first.id]

    # A crashed writer's leftovers (chunks, no manifest in the history) go, by the holder only.
    client.set(f"{ns}:crashed-1:index:0", b"half a snapshot")
    client.set(f"{ns}:crashed-1:manifest", b"{}")
    with pytest.raises(NotTheWriter):
        a.remove_orphans(lease_a)
    assert client.get(f"{ns}:crashed-1:index:0") is not None
    assert b.remove_orphans(lease_b) == 1
    assert keys_of(client, ns, "crashed-1") == [] and keys_of(client, ns, first.id) != []
    assert client.get(f"{ns}:writer") == lease_b.token.encode()


def test_a_manifest_rewritten_in_redis_is_refused(namespace: tuple[redis.Redis, str]) -> None:
    """Someone with write access to Redis swaps the index chunk and fixes up the checksum in
    the manifest: the MAC (made with a key Redis never sees) does not verify."""
    client, ns = namespace
    store = SnapshotStore(client, ns, key=KEY)
    lease = store.lease("replica-a", ttl_s=30)
    assert lease.acquire()
    index_bytes, items_bytes, facts = exported()
    manifest = store.write(index_bytes, items_bytes, facts, lease=lease, model_version="m")
    evil = index_bytes[:-4] + b"\xff\xff\xff\x7f"
    client.set(f"{ns}:{manifest.id}:index:0", evil)
    envelope = json.loads(client.get(f"{ns}:{manifest.id}:manifest"))
    body = json.loads(envelope["manifest"])
    body["index"]["chunks"] = [hashlib.sha256(evil).hexdigest()]
    envelope["manifest"] = json.dumps(body)
    client.set(f"{ns}:{manifest.id}:manifest", json.dumps(envelope))
    with pytest.raises(SnapshotError, match="MAC does not verify"):
        store.read(manifest.id)
    with pytest.raises(SnapshotError, match="MAC does not verify"):
        SnapshotStore(client, ns, key=b"another-key-of-32-bytes-for-test").read_manifest(manifest.id)
