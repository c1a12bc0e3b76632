"""Snapshots one can trust, without servers: the manifest MAC, hnswlib's header checked
before loading, the snapshot key, and the retention rule that sends a restore back to a
full replay. (The writer lease's Lua scripts need a real Redis: tests/integration/test_snapshot_store.py.)"""

from __future__ import annotations

import json
import logging
import os
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from pydantic import SecretStr

from indexer.hnsw_file import HEADER, HnswFileError, check_file, read_header
from indexer.index import Delete, Upsert, VectorIndex
from indexer.snapshot import Snapshot, SnapshotError, SnapshotStore
from indexer.versions import Pools, VersionIndex
from lookalike.errors import ConfigError
from lookalike.settings import CommonSettings, IndexerSettings
from lookalike.snapshots import (
    FORMAT,
    SnapshotManifest,
    SnapshotPart,
    load_snapshot_key,
    manifest_mac,
    too_old,
)
from lookalike.topics import topic_specs, vectors_topic_spec

KEY = b"k" * 32
NS = "lookalike:snapshots:g:m"
DIM, M = 8, 8
HOUR = 3600.0


class GetOnly:
    """The part of a Redis client a reader uses (GET), over a dict."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def get(self, key: str) -> bytes | None:
        return self.data.get(key)

    def register_script(self, script: str) -> None:  # the writer's scripts are not run here
        return None


def small_index(n: int = 60, deleted: int = 10, seed: int = 0) -> VectorIndex:
    rng = np.random.default_rng(seed)
    index = VectorIndex(DIM, m=M, ef_construction=40, capacity=16)
    index.apply([Upsert(f"i{i}", rng.standard_normal(DIM).astype(np.float32), {"n": i}) for i in range(n)])
    index.apply([Delete(f"i{i}") for i in range(deleted)])
    return index


def manifest_for(snapshot_id: str, created_at: float | None = None, **facts_over: object) -> SnapshotManifest:
    _, _, facts = small_index().export()
    facts = facts.model_copy(update=facts_over)
    return SnapshotManifest(**facts.model_dump(), id=snapshot_id, created_at=created_at or time.time(),
                            model_version="m", index=SnapshotPart(bytes=0, chunks=[]),
                            items=SnapshotPart(bytes=0, chunks=[]))


def put_manifest(client: GetOnly, snapshot_id: str, body: str, *, key: bytes = KEY, ns: str = NS,
                 fmt: int = FORMAT) -> None:
    envelope = {"format": fmt, "mac": manifest_mac(key, ns, body.encode()), "manifest": body}
    client.data[f"{NS}:{snapshot_id}:manifest"] = json.dumps(envelope).encode()


# -- the manifest MAC ----------------------------------------------------------------
def test_a_manifest_with_a_good_mac_is_read() -> None:
    client = GetOnly()
    put_manifest(client, "s1", manifest_for("s1").model_dump_json())
    assert SnapshotStore(client, NS, key=KEY).read_manifest("s1").id == "s1"  # type: ignore[arg-type]


@pytest.mark.parametrize("how", ["tampered", "other key", "other namespace", "no mac", "moved to another id"])
def test_a_manifest_whose_mac_does_not_verify_is_refused(how: str) -> None:
    client = GetOnly()
    body = manifest_for("s1").model_dump_json()
    if how == "tampered":  # signed, then its item count changed
        put_manifest(client, "s1", body)
        envelope = json.loads(client.data[f"{NS}:s1:manifest"])
        envelope["manifest"] = body.replace('"item_count":50', '"item_count":51')
        assert envelope["manifest"] != body
        client.data[f"{NS}:s1:manifest"] = json.dumps(envelope).encode()
    elif how == "other key":
        put_manifest(client, "s1", body, key=b"x" * 32)
    elif how == "other namespace":  # a genuine manifest of another shard's (or model's) keys
        put_manifest(client, "s1", body, ns="lookalike:snapshots:g.shard-1:m")
    elif how == "no mac":
        client.data[f"{NS}:s1:manifest"] = json.dumps({"format": FORMAT, "manifest": body}).encode()
    else:  # snapshot s2's genuine manifest, copied under s1
        put_manifest(client, "s2", manifest_for("s2").model_dump_json())
        client.data[f"{NS}:s1:manifest"] = client.data[f"{NS}:s2:manifest"]
    expected = "is snapshot s2's" if how == "moved to another id" else "MAC does not verify"
    with pytest.raises(SnapshotError, match=expected):
        SnapshotStore(client, NS, key=KEY).read_manifest("s1")  # type: ignore[arg-type]


def test_a_format_1_manifest_without_mac_is_refused() -> None:
    client = GetOnly()
    doc = json.loads(manifest_for("s1").model_dump_json()) | {"format": 1}
    client.data[f"{NS}:s1:manifest"] = json.dumps(doc).encode()
    with pytest.raises(SnapshotError, match="format 1, expected 2"):
        SnapshotStore(client, NS, key=KEY).read_manifest("s1")  # type: ignore[arg-type]


# -- the snapshot key --------------------------------------------------------------------
def test_the_key_is_made_once_with_mode_0600_and_then_reused(tmp_path: Path) -> None:
    first = load_snapshot_key(None, None, tmp_path)
    path = tmp_path / "secrets" / "snapshot.key"
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_snapshot_key(None, None, tmp_path) == first and len(first) == 64
    assert load_snapshot_key(SecretStr("s" * 20), None, tmp_path) == b"s" * 20
    (tmp_path / "given").write_text("f" * 40 + "\n")
    assert load_snapshot_key(None, tmp_path / "given", tmp_path) == b"f" * 40


def test_a_short_or_missing_key_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least 16"):
        load_snapshot_key(SecretStr("short"), None, tmp_path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_snapshot_key(None, tmp_path / "absent.key", tmp_path)  # a named file is never invented
    assert not (tmp_path / "absent.key").exists()


# -- hnswlib's header, checked before loading -----------------------------------------
def exported(index: VectorIndex) -> tuple[bytes, bytes, object, int]:
    index_bytes, items_bytes, facts = index.export()
    return index_bytes, items_bytes, facts, json.loads(items_bytes)["free_slots"]


def test_a_real_file_passes_and_its_layout_names_the_live_items() -> None:
    index_bytes, items_bytes, facts, free = exported(small_index())
    layout = check_file(index_bytes, dim=DIM, m=M, ef_construction=40, capacity=facts.capacity,
                        elements=facts.item_count + free)
    assert layout.header.cur_element_count == 60 and int(layout.deleted.sum()) == 10 == free
    assert layout.live_labels() == {int(label) for label in json.loads(items_bytes)["items"]}
    restored = VectorIndex.restore(index_bytes, items_bytes, facts)
    assert restored.item_ids() == {f"i{i}" for i in range(10, 60)}


def patch_header(data: bytes, field: int, value: int) -> bytes:
    values = list(HEADER.unpack_from(data, 0))
    values[field] = value
    return HEADER.pack(*values) + data[HEADER.size :]


def crafted(data: bytes) -> dict[str, bytes]:
    h = read_header(data)
    level0 = HEADER.size
    first_id = level0 + 4  # element 0's first level-0 neighbour
    bad_neighbour = bytearray(data)
    struct.pack_into("<I", bad_neighbour, first_id, 10**6)
    too_many_links = bytearray(data)
    struct.pack_into("<H", too_many_links, level0, 2 * M + 1)
    return {
        "max_elements": patch_header(data, 1, h.max_elements * 1000),
        "cur_element_count": patch_header(data, 2, h.cur_element_count + 1),
        "size_data_per_element": patch_header(data, 3, h.size_data_per_element + 4),
        "label_offset": patch_header(data, 4, 1 << 40),
        "maxM0": patch_header(data, 9, 10**6),
        "entry point": patch_header(data, 7, h.cur_element_count + 5),
        "maxlevel": patch_header(data, 6, h.maxlevel + 1),
        "neighbour id": bytes(bad_neighbour),
        "link count": bytes(too_many_links),
        "truncated": data[:-3],
        "trailing bytes": data + b"\0" * 8,
        "header only": data[: HEADER.size - 1],
    }


@pytest.mark.parametrize("name", list(crafted(small_index().export()[0])))
def test_crafted_hnswlib_bytes_are_refused_before_hnswlib_loads_them(name: str) -> None:
    index_bytes, items_bytes, facts, free = exported(small_index())
    bad = crafted(index_bytes)[name]
    with pytest.raises(HnswFileError):
        check_file(bad, dim=DIM, m=M, ef_construction=40, capacity=facts.capacity, elements=facts.item_count + free)
    with pytest.raises(HnswFileError):
        VectorIndex.restore(bad, items_bytes, facts)


def test_a_file_of_another_dim_or_m_than_the_manifest_is_refused() -> None:
    index_bytes, items_bytes, facts, _ = exported(small_index())
    with pytest.raises(HnswFileError, match="size_data_per_element"):
        VectorIndex.restore(index_bytes, items_bytes, facts.model_copy(update={"dim": DIM * 2}))
    with pytest.raises(HnswFileError, match="maxM"):
        VectorIndex.restore(index_bytes, items_bytes, facts.model_copy(update={"m": M * 2}))


def test_items_that_do_not_match_the_file_are_refused() -> None:
    index_bytes, items_bytes, facts, _ = exported(small_index())
    items = json.loads(items_bytes)
    label, item_id = next(iter(items["items"].items()))
    del items["items"][label]
    items["items"]["999"] = item_id  # a label the file does not have live
    with pytest.raises(ValueError, match="live labels"):
        VectorIndex.restore(index_bytes, json.dumps(items).encode(), facts)


# -- retention: tombstones ---------------------------------------------------------------
def test_the_compacted_topics_set_delete_retention_explicitly() -> None:
    settings = CommonSettings(_env_file=None, delete_retention_ms=7_200_000)
    compacted = [s for s in topic_specs(settings) if s.config.get("cleanup.policy") == "compact"]
    assert {s.name for s in compacted} == {settings.catalog_topic}
    assert all(s.config["delete.retention.ms"] == "7200000" for s in compacted)
    assert vectors_topic_spec(settings, "m", 4).config["delete.retention.ms"] == "7200000"


def test_too_old_is_measured_against_retention_less_the_margin() -> None:
    now = 1_000_000.0
    day_ms = int(24 * HOUR * 1000)
    assert too_old(now - 22 * HOUR, now, day_ms, HOUR) is None
    assert "tombstones" in (too_old(now - 23.5 * HOUR, now, day_ms, HOUR) or "")
    assert too_old(now - 2 * HOUR, now, 2 * 3_600_000, 0) is None
    assert too_old(now - 2 * HOUR - 1, now, 2 * 3_600_000, 0) is not None
    assert "future" in (too_old(now + 2 * HOUR, now, day_ms, HOUR) or "")


class StubStore:
    """Snapshots by id, as :class:`SnapshotStore` hands them out (their MACs already checked)."""

    def __init__(self, snapshots: dict[str, Snapshot]) -> None:
        self.snapshots = snapshots

    def history(self) -> list[str]:
        return list(self.snapshots)

    def read_manifest(self, snapshot_id: str) -> SnapshotManifest:
        return self.snapshots[snapshot_id].manifest

    def read(self, snapshot_id: str) -> Snapshot:
        return self.snapshots[snapshot_id]


def snapshot_made(hours_ago: float, snapshot_id: str) -> Snapshot:
    index_bytes, items_bytes, facts = small_index().export()
    manifest = SnapshotManifest(**facts.model_dump(), id=snapshot_id, created_at=time.time() - hours_ago * HOUR,
                                model_version="m", index=SnapshotPart(bytes=len(index_bytes), chunks=[]),
                                items=SnapshotPart(bytes=len(items_bytes), chunks=[]))
    return Snapshot(manifest, index_bytes, items_bytes)


def version_index(snapshots: dict[str, Snapshot], retention_ms: int) -> VersionIndex:
    settings = IndexerSettings(_env_file=None, model_dir=Path(os.devnull), snapshot_retention_margin_s=HOUR)
    vi = VersionIndex(settings, "m", Pools(), owner="test")
    vi.snapshots = StubStore(snapshots)  # type: ignore[assignment]
    vi.tombstone_retention_ms = lambda: retention_ms  # type: ignore[method-assign]
    return vi


def test_a_snapshot_older_than_the_tombstone_retention_is_not_restored(caplog: pytest.LogCaptureFixture) -> None:
    day_ms = int(24 * HOUR * 1000)
    vi = version_index({"old": snapshot_made(23.5, "old"), "older": snapshot_made(30, "older")}, day_ms)
    with caplog.at_level(logging.INFO, logger="indexer.versions"):
        vi.restore()
    assert vi.index is None  # the feed starts from the beginning of the topic
    assert "snapshot old refused: 23.5 h old" in caplog.text and "full replay" in caplog.text
    assert "restored snapshot" not in caplog.text

    fresh = version_index({"new": snapshot_made(2, "new")}, day_ms)
    fresh.restore()
    assert fresh.index is not None and len(fresh.index) == 50 and fresh.last_snapshot_id == "new"

    # The same two-hour-old snapshot, on a topic whose tombstones live only 2 h (a rollback
    # to an old version's snapshot, or a topic made with a shorter retention): replay.
    short = version_index({"new": snapshot_made(2, "new")}, 2 * 3_600_000)
    short.restore()
    assert short.index is None
