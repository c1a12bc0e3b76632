"""Index shards on a real broker and Redis: two shards answer exactly as one index does, and
a late shard gives a partial reply at the deadline.

One worker embeds; first one unsharded indexer answers a fixed set of queries (images of
catalog items, images of no item, "more like this" items, an unknown item); then it stops,
two shards of the same catalog start (each reading half of the catalog's 2 partitions),
and the same queries must get the same replies: the same items in the same order with the same scores (to 1e-5), the
same errors, and the whole catalog position. Then one shard stops, and a query is answered
after the deadline from the other shard's half alone, flagged ``partial``.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from lookalike.artifacts import ModelCard
from tests.conftest import Cluster
from tests.images import jpeg_bytes
from tests.integration.conftest import Pipeline, start_pipeline, stop_pipeline, wait_status, warm_up

pytestmark = pytest.mark.integration

ITEMS = 40
DEADLINE_MS = 400


@pytest.fixture(scope="module")
def single(cluster: Cluster, tiny_model: tuple[Path, ModelCard],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    models, _card = tiny_model
    shard_env = {"LOOKALIKE_INDEX_SHARDS": "2", "LOOKALIKE_SHARD_DEADLINE_MS": str(DEADLINE_MS)}
    pipeline = start_pipeline(cluster, models, tmp_path_factory.mktemp("shards"), service_env={
        "shard-0": {**shard_env, "LOOKALIKE_INDEX_SHARD": "0"},
        "shard-1": {**shard_env, "LOOKALIKE_INDEX_SHARD": "1"},
    })
    try:
        warm_up(pipeline, jpeg_bytes(seed=999))
        yield pipeline
    finally:
        stop_pipeline(pipeline)


def comparable(reply: dict) -> dict:
    """What must be the same whichever way the index is laid out (scores: see same_scores)."""
    return {
        "status": reply["status"],
        "results": [(r["item_id"], r["metadata"]) for r in reply["results"]],
        "error": (reply.get("error") or {}).get("code"),
        "model_version": reply["model_version"],
        "index_position": reply["index_position"],
    }


def ask_all(pipeline: Pipeline, queries: list[dict]) -> list[dict]:
    with pipeline.client() as client:
        sent = [client.send(q.get("image"), k=q.get("k", 5), item_id=q.get("item_id")) for q in queries]
        return [client.wait(request_id, timeout_s=30) for request_id in sent]


def start_shard(pipeline: Pipeline, shard: int) -> None:
    pipeline.start(f"shard-{shard}")
    wait_status(pipeline, lambda s: s.caught_up and s.shard == f"{shard}/2", 90,
                f"shard {shard} caught up", name=f"shard-{shard}")


def test_two_shards_answer_exactly_as_one_index(single: Pipeline) -> None:
    pipeline = single
    run = uuid.uuid4().hex[:6]
    feed = pipeline.feed()
    items = {f"shard-{run}-{i}": jpeg_bytes(seed=3000 + i) for i in range(ITEMS)}
    for item_id, image in items.items():
        feed.publish(item_id, image, {"title": item_id, "n": int(item_id.rsplit("-", 1)[1])})
    feed.flush()
    ids = list(items)
    with pipeline.client() as client:  # read your writes: the index holds them all
        client.ask(None, item_id=ids[0], min_position=dict(feed.positions), timeout_s=30)

    queries = (
        [{"image": items[i]} for i in ids[:8]]  # catalog images: the item itself first
        + [{"image": jpeg_bytes(seed=9000 + i)} for i in range(6)]  # images of no item
        + [{"item_id": i} for i in ids[8:14]]  # more like this (the item lives on one shard)
        + [{"item_id": f"no-such-{run}"}, {"image": items[ids[20]], "k": ITEMS + 5}]  # unknown; the whole catalog
    )
    one = ask_all(pipeline, queries)
    assert [r["status"] for r in one].count("ok") == len(queries) - 1, one
    assert all(r["results"][0]["item_id"] == i for r, i in zip(one[:8], ids[:8], strict=True))
    assert one[-2]["error"]["code"] == "unknown_item"

    # The same catalog, in two shards.
    indexer = pipeline.procs.pop("indexer")
    indexer.send_signal(signal.SIGTERM)
    indexer.wait(timeout=30)
    start_shard(pipeline, 0)
    start_shard(pipeline, 1)
    halves = [pipeline.status(f"shard-{n}") for n in (0, 1)]
    assert all(h is not None and 0 < h.items < ITEMS for h in halves), halves
    whole = one[-1]["results"]
    assert sum(h.items for h in halves) == len(whole) == ITEMS + 1  # type: ignore[index]  # + warm-up item
    owned = [{str(p) for p in h.catalog_position} for h in halves]  # type: ignore[union-attr]
    assert owned == [{"0"}, {"1"}]

    two = ask_all(pipeline, queries)
    for query, a, b in zip(queries, one, two, strict=True):
        assert comparable(b) == comparable(a), (query.get("item_id"), a, b)
        # The query is embedded again for the second asking, maybe in a batch of another
        # size, and the model's float sums then differ in the 7th digit.
        assert [r["score"] for r in b["results"]] == pytest.approx([r["score"] for r in a["results"]], abs=1e-5)
        assert b["partial"] is False and b["shards"] == {"answered": [0, 1], "of": 2}
        assert "partial" not in a  # one index: no shard fields
    assert all("gather" in r["timings_ms"] for r in two if r["status"] == "ok")

    # Shard 1 goes away: the answer comes after the deadline, from shard 0's half, flagged.
    proc = pipeline.procs.pop("shard-1")
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    shard0_items = halves[0].items  # type: ignore[index]
    with pipeline.client() as client:
        started = time.monotonic()
        late = client.ask(items[ids[20]], k=ITEMS + 5, timeout_s=30)
        took = time.monotonic() - started
    assert late["status"] == "ok" and late["partial"] is True, late
    assert late["shards"] == {"answered": [0], "of": 2}
    assert late["timings_ms"]["gather"] >= DEADLINE_MS and took >= DEADLINE_MS / 1000
    held = [r["item_id"] for r in late["results"]]
    assert len(held) == shard0_items
    assert held == [r["item_id"] for r in whole if r["item_id"] in set(held)]  # the same order, one half
    assert set(late["index_position"]) == owned[0]
