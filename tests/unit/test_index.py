from __future__ import annotations

import threading

import numpy as np
import pytest

from indexer.index import Delete, Upsert, VectorIndex
from lookalike.errors import UnknownItem


def unit(rng: np.random.Generator, n: int, dim: int = 16) -> np.ndarray:
    vecs = rng.normal(size=(n, dim)).astype(np.float32)
    return vecs / np.linalg.norm(vecs, axis=1, keepdims=True)


def test_upsert_search_delete_replace() -> None:
    rng = np.random.default_rng(0)
    vecs = unit(rng, 50)
    index = VectorIndex(16, capacity=16)
    index.apply([Upsert(f"item-{i}", v, {"i": i}) for i, v in enumerate(vecs)])
    assert len(index) == 50
    assert index.capacity >= 50  # grew from 16
    hits = index.search(vecs[7], 5)
    assert hits[0].item_id == "item-7" and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert hits[0].metadata == {"i": 7}
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)

    index.apply([Delete("item-7")])
    assert "item-7" not in index and len(index) == 49
    assert all(h.item_id != "item-7" for h in index.search(vecs[7], 10))

    index.apply([Upsert("item-7", vecs[8], {"i": "again"})])  # comes back with another vector
    assert "item-7" in index
    top = index.search(vecs[8], 2)
    assert {h.item_id for h in top} == {"item-7", "item-8"}
    np.testing.assert_allclose(index.vector("item-7"), vecs[8], atol=1e-6)

    index.apply([Upsert("item-3", vecs[9], {})])  # replace in place
    assert len(index) == 50
    assert index.search(vecs[3], 1)[0].item_id != "item-3"


def test_k_is_clamped_to_live_items_and_empty_index() -> None:
    index = VectorIndex(16)
    assert index.search(np.ones(16, np.float32), 5) == []
    vecs = unit(np.random.default_rng(1), 3)
    index.apply([Upsert(str(i), v, {}) for i, v in enumerate(vecs)])
    index.apply([Delete("0")])
    assert len(index.search(vecs[1], 100)) == 2


def test_more_like_this_excludes_the_item() -> None:
    vecs = unit(np.random.default_rng(2), 10)
    index = VectorIndex(16)
    index.apply([Upsert(str(i), v, {}) for i, v in enumerate(vecs)])
    hits = index.search(index.vector("4"), 3, exclude="4")
    assert len(hits) == 3 and "4" not in {h.item_id for h in hits}
    with pytest.raises(UnknownItem):
        index.vector("nope")


def test_readers_and_one_writer_concurrently() -> None:
    """Searches during growth (resize) and deletes neither crash nor see torn state."""
    rng = np.random.default_rng(3)
    vecs = unit(rng, 3001)
    index = VectorIndex(16, capacity=16)
    index.apply([Upsert("seed", vecs[0], {})])
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        local = np.random.default_rng()
        while not stop.is_set():
            try:
                hits = index.search(vecs[local.integers(0, 3000)], 5)
                assert 1 <= len(hits) <= 5
            except BaseException as exc:  # reported by the assertion below
                errors.append(exc)
                return

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for start in range(1, 3001, 100):
        index.apply([Upsert(f"i{j}", vecs[j], {}) for j in range(start, start + 100)])
        index.apply([Delete(f"i{j}") for j in range(start, start + 10)])
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[:1]
    assert len(index) == 1 + 3000 - 300


def test_deleted_slots_are_reused_before_growing() -> None:
    vecs = unit(np.random.default_rng(4), 120)
    index = VectorIndex(16, capacity=100)
    index.apply([Upsert(str(i), vecs[i], {}) for i in range(100)])
    assert index.capacity == 100
    index.apply([Delete(str(i)) for i in range(20)])
    assert index.free_slots == 20
    index.apply([Upsert(f"new{i}", vecs[100 + i], {}) for i in range(20)])
    assert index.capacity == 100 and index.free_slots == 0, "new items took the deleted slots"
    assert index.search(vecs[105], 1)[0].item_id == "new5"
    assert all(h.item_id not in {str(i) for i in range(20)} for h in index.search(vecs[3], 50))


def test_rebuild_when_deleted_slots_pass_the_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(VectorIndex, "REBUILD_MIN_FREE", 10)
    vecs = unit(np.random.default_rng(5), 100)
    index = VectorIndex(16, rebuild_ratio=0.3)
    index.apply([Upsert(str(i), vecs[i], {"i": i}) for i in range(100)])
    index.apply([Delete(str(i)) for i in range(25)])
    assert index.rebuilds == 0 and index.free_slots == 25
    index.apply([Delete(str(i)) for i in range(25, 40)])  # 40 of 100 slots deleted > 30 %
    assert index.rebuilds == 1 and index.free_slots == 0 and len(index) == 60
    hit = index.search(vecs[77], 1)[0]
    assert (hit.item_id, hit.metadata) == ("77", {"i": 77})
    index.apply([Upsert("3", vecs[3], {})])  # a deleted item comes back
    assert index.search(vecs[3], 1)[0].item_id == "3"


def test_export_restore_round_trip() -> None:
    vecs = unit(np.random.default_rng(6), 60)
    index = VectorIndex(16, ef_search=50)
    index.apply([Upsert(str(i), vecs[i], {"i": i}) for i in range(60)], {0: 60})
    index.apply([Delete("7")], {0: 61, 1: 3})
    restored = VectorIndex.restore(*index.export())
    assert restored.item_ids() == index.item_ids() and restored.position == {0: 61, 1: 3}
    assert restored.free_slots == 1 and restored.ef_search == 50
    for i in (0, 13, 59):
        assert [h.item_id for h in restored.search(vecs[i], 5)] == [h.item_id for h in index.search(vecs[i], 5)]
    assert VectorIndex.restore(*index.export(), ef_search=80).ef_search == 80  # the restoring indexer's setting
    restored.apply([Upsert("new", vecs[7], {})])  # the deleted slot is reused after a restore too
    assert restored.free_slots == 0 and restored.search(vecs[7], 1)[0].item_id == "new"


def test_bulk_add_takes_new_ids_only() -> None:
    vecs = unit(np.random.default_rng(7), 30)
    index = VectorIndex(16, capacity=8)
    index.bulk_add([str(i) for i in range(30)], vecs, [{"i": i} for i in range(30)])
    assert len(index) == 30 and index.capacity >= 30
    assert index.search(vecs[12], 1)[0].metadata == {"i": 12}
    with pytest.raises(ValueError):
        index.bulk_add(["3"], vecs[:1])
    index.apply([Upsert("3", vecs[4], {})])  # and it stays an ordinary index
    assert {h.item_id for h in index.search(vecs[4], 2)} == {"3", "4"}
