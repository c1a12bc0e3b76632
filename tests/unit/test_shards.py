"""Index shards without Kafka: partition ownership, what a shard sends for each kind of
query, and the gatherer's merge, deadline, lookups and commit offsets."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
from pydantic import ValidationError

from indexer.index import Upsert, VectorIndex
from indexer.service import Indexer
from indexer.shards import Gatherer, merge, own_position
from indexer.versions import VersionIndex
from lookalike import contracts as c
from lookalike.errors import InvalidMessage
from lookalike.rollout import RolloutState
from lookalike.settings import IndexerSettings
from lookalike.status import IndexerStatus, VersionFacts, whole_index

DIM = 8


def shard_settings(shard: int, shards: int = 2, **extra) -> IndexerSettings:  # type: ignore[no-untyped-def]
    return IndexerSettings(_env_file=None, index_shards=shards, index_shard=shard, **extra)


def ok(results: list[tuple[str, float]], position: dict[int, int], search_ms: float = 0.2) -> dict:
    return c.ok_reply("r1", [{"item_id": i, "score": s, "metadata": {}} for i, s in results], model_version="m",
                      index_version=f"m/{next(iter(position), 0)}", index_position=position,
                      timings_ms={"embed": 3.0, "search": search_ms})


def part_headers(shard: int, *, shards: int = 2, phase: str = "search", k: int = 3,
                 wait_ms: int = 250) -> dict[str, bytes]:
    return {c.H_SHARD: f"{shard}/{shards}".encode(), c.H_SHARD_PHASE: phase.encode(), c.H_REPLY_TO: b"replies",
            c.H_K: str(k).encode(), c.H_GATHER_WAIT_MS: str(wait_ms).encode()}


def test_partitions_are_dealt_round_robin_to_shards() -> None:
    s0, s1 = shard_settings(0), shard_settings(1)
    assert [p for p in range(6) if s0.owns(p)] == [0, 2, 4] and [p for p in range(6) if s1.owns(p)] == [1, 3, 5]
    assert own_position(s1, {0: 10, 1: 7, 3: 2}) == {1: 7, 3: 2} and own_position(s1, None) is None
    assert s1.query_group == "lookalike-indexer.shard-1" and s1.gather_group == "lookalike-indexer.gather"
    single = IndexerSettings(_env_file=None)
    assert not single.sharded and single.query_group == "lookalike-indexer" and all(single.owns(p) for p in range(4))
    with pytest.raises(ValidationError, match="index_shard"):
        shard_settings(2)
    with pytest.raises(ValidationError, match="one index shard"):  # every shard would embed every query
        shard_settings(0, query_embedding="indexer")
    assert IndexerSettings(_env_file=None, query_embedding="indexer").query_embedding == "indexer"


def test_merge_keeps_the_best_k_of_all_shards() -> None:
    merged = merge({0: ok([("a", 0.9), ("c", 0.5)], {0: 10}, search_ms=0.3),
                    1: ok([("b", 0.9), ("d", 0.7), ("e", 0.1)], {1: 4}, search_ms=0.6)}, 3, 2, "r1")
    assert [r["item_id"] for r in merged["results"]] == ["a", "b", "d"]  # tie on 0.9: by item id
    assert merged["status"] == "ok" and merged["partial"] is False
    assert merged["shards"] == {"answered": [0, 1], "of": 2}
    assert merged["index_position"] == {"0": 10, "1": 4} and merged["index_version"] == "m/0+m/1"
    assert merged["timings_ms"]["search"] == 0.6  # the slowest shard's
    assert merged["query_item_id"] is None
    jsonschema.validate(merged, c.schema("reply"))
    by_item = {i: {**ok([("a", 0.9)], {i: 1}), "query_item_id": "q"} for i in (0, 1)}
    assert merge(by_item, 3, 2, "r1")["query_item_id"] == "q"
    jsonschema.validate(merged, c.schema("reply"))
    # An empty shard does not sink the answer; any other error does.
    empty = c.error_reply("r1", "empty_index", "empty", model_version="m")
    assert merge({0: ok([("a", 0.9)], {0: 1}), 1: empty}, 3, 2, "r1")["status"] == "ok"
    not_ready = c.error_reply("r1", "not_ready", "behind", model_version="m")
    assert merge({0: ok([("a", 0.9)], {0: 1}), 1: not_ready}, 3, 2, "r1")["error"]["code"] == "not_ready"
    assert merge({0: empty, 1: empty}, 3, 2, "r1")["error"]["code"] == "empty_index"


def test_gatherer_answers_once_every_shard_has_and_drops_late_copies() -> None:
    g = Gatherer(2)
    assert g.add(0, 5, b"r1", c.encode_reply(ok([("a", 0.8)], {0: 3})), part_headers(0), None, 100.0) is None
    assert g.commit_offsets() == {0: 5}  # the open request's record is where a restart begins
    done = g.add(0, 6, b"r1", c.encode_reply(ok([("b", 0.9)], {1: 2})), part_headers(1), None, 100.01)
    assert done is not None and done.reply_to == "replies" and done.key == b"r1"
    assert [r["item_id"] for r in done.reply["results"]] == ["b", "a"] and done.reply["partial"] is False
    assert done.reply["timings_ms"]["gather"] == pytest.approx(10.0, abs=0.01)
    assert json.loads(done.value)["request_id"] == "r1"
    assert g.commit_offsets() == {0: 7}
    # A redelivered partial of an answered request is not answered again.
    assert g.add(0, 7, b"r1", c.encode_reply(ok([("b", 0.9)], {1: 2})), part_headers(1), None, 100.02) is None
    assert g.late == 1 and not g.pending and g.commit_offsets() == {0: 8}


def test_a_late_shard_gives_a_partial_reply_at_the_deadline() -> None:
    g = Gatherer(2)
    g.add(3, 0, b"r2", c.encode_reply(ok([("a", 0.8)], {0: 3})), part_headers(0, wait_ms=250), None, 10.0)
    assert g.next_deadline() == pytest.approx(10.25)
    assert g.expired(10.2) == []
    (late,) = g.expired(10.25)
    assert late.reply["status"] == "ok" and late.reply["partial"] is True
    assert late.reply["shards"] == {"answered": [0], "of": 2} and [r["item_id"] for r in late.reply["results"]] == ["a"]
    assert g.commit_offsets() == {3: 1} and g.next_deadline() is None
    jsonschema.validate(late.reply, c.schema("reply"))


def test_more_like_this_items_are_looked_up_then_searched_everywhere() -> None:
    g = Gatherer(2)
    unknown = c.error_reply("r3", "unknown_item", "not in shard 1", model_version="m")
    # Shard 1 does not hold the item; shard 0 does and sent its vector to every shard instead.
    assert g.add(0, 0, b"r3", c.encode_reply(unknown), part_headers(1, phase="lookup"), None, 1.0) is None
    assert g.add(0, 1, b"r3", c.encode_reply(ok([("x", 0.7)], {0: 1})), part_headers(0), None, 1.01) is None
    done = g.add(0, 2, b"r3", c.encode_reply(ok([("y", 0.6)], {1: 1})), part_headers(1), None, 1.02)
    assert done is not None and [r["item_id"] for r in done.reply["results"]] == ["x", "y"]
    assert g.commit_offsets() == {0: 3}
    # No shard holds it: unknown_item, as from one index.
    g.add(1, 0, b"r4", c.encode_reply(unknown), part_headers(0, phase="lookup"), None, 2.0)
    done = g.add(1, 1, b"r4", c.encode_reply(unknown), part_headers(1, phase="lookup"), None, 2.0)
    assert done is not None and done.reply["error"]["code"] == "unknown_item" and done.reply["partial"] is False
    # A shard that is behind says more than one that does not hold the item.
    not_ready = c.error_reply("r5", "not_ready", "behind", model_version="m")
    g.add(1, 2, b"r5", c.encode_reply(unknown), part_headers(0, phase="lookup"), None, 3.0)
    done = g.add(1, 3, b"r5", c.encode_reply(not_ready), part_headers(1, phase="lookup"), None, 3.0)
    assert done is not None and done.reply["error"]["code"] == "not_ready"


def test_bad_partials_are_refused_not_fatal() -> None:
    g = Gatherer(2)
    good = c.encode_reply(ok([("a", 0.8)], {0: 3}))
    bad = [
        (b"r", b"{not json", part_headers(0)),
        (b"r", good, part_headers(0, shards=3)),  # another shard count
        (b"r", good, {c.H_SHARD: b"0/2"}),  # headers missing
        (None, good, part_headers(0)),
        (b"r", good, part_headers(0, phase="guess")),
        (b"r", good, {**part_headers(0), c.H_GATHER_WAIT_MS: b"soon"}),
        (b"r", good, {**part_headers(0), c.H_QUERY_TS: b"\xff"}),
        (b"r", good, {**part_headers(0), c.H_GATHER_WAIT_MS: b"9" * 400}),  # digits bounded before int()
        (b"r", good, {**part_headers(0), c.H_SHARD: b"0/" + b"9" * 5000}),
        (b"r", b"[" * 100_000 + b"]" * 100_000, part_headers(0)),  # nesting bounded before json.loads
        (b"r", json.dumps({**json.loads(good), "results": [{"item_id": "a"}]}).encode(), part_headers(0)),  # no score
        (b"r", json.dumps({**json.loads(good), "index_position": {"x": 1}}).encode(), part_headers(0)),
        (b"r", json.dumps({**json.loads(good), "timings_ms": {"a": "slow"}}).encode(), part_headers(0)),
        (b"r", json.dumps([1, 2]).encode(), part_headers(0)),
    ]
    for offset, (key, value, headers) in enumerate(bad):
        with pytest.raises(InvalidMessage):
            g.add(0, offset, key, value, headers, None, 1.0)
    assert g.dropped == len(bad) and not g.pending and g.commit_offsets() == {0: len(bad)}


def test_a_huge_gather_wait_is_capped() -> None:
    g = Gatherer(2, max_wait_s=2.0)
    good = c.encode_reply(ok([("a", 0.8)], {0: 3}))
    assert g.add(0, 0, b"r", good, {**part_headers(0), c.H_GATHER_WAIT_MS: b"9" * 18}, None, 1.0) is None
    assert g.next_deadline() == 3.0
    (late,) = g.expired(3.0)
    assert late.reply["partial"] is True and late.reply["shards"] == {"answered": [0], "of": 2}


def test_revoked_partitions_forget_their_requests() -> None:
    g = Gatherer(2)
    g.add(0, 0, b"r1", c.encode_reply(ok([("a", 0.8)], {0: 3})), part_headers(0), None, 1.0)
    g.add(1, 0, b"r2", c.encode_reply(ok([("a", 0.8)], {0: 3})), part_headers(0), None, 1.0)
    g.revoke([0])
    assert set(g.pending) == {b"r2"} and g.commit_offsets() == {1: 0}


def shard_indexer(shard: int, items: dict[str, np.ndarray]) -> Indexer:
    """An indexer of shard ``shard`` of 2 holding ``items`` (no Kafka: answer() alone)."""
    indexer = Indexer(shard_settings(shard))
    vi = VersionIndex(indexer.settings, "m", indexer.pools)
    vi.index = VectorIndex(DIM, capacity=16)
    vi.index.apply([Upsert(i, v, {}) for i, v in items.items()], {shard: len(items)}, {shard: len(items)})
    vi.index_version = "m/x"
    vi.caught_up.set()  # its feed has read to the end seen at start
    indexer.versions["m"] = vi
    indexer.state = RolloutState(serving="m")
    return indexer


def test_what_a_shard_sends_for_each_kind_of_query() -> None:
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(4, DIM)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    s0 = shard_indexer(0, {"a": vecs[0], "b": vecs[1]})
    s1 = shard_indexer(1, {"c": vecs[2], "d": vecs[3]})
    base = {c.H_MODEL_VERSION: b"m", c.H_K: b"2", c.H_REPLY_TO: b"replies", c.H_QUERY_TS: b"1700000000000"}

    # A vector: each shard's own top-k goes to the partials topic.
    (out,) = s1.answer(b"q1", c.encode_vector(vecs[2]), dict(base))
    topic, key, value, headers = out
    assert topic == s1.settings.partials_topic and key == b"q1"
    assert dict(headers)[c.H_SHARD] == b"1/2" and dict(headers)[c.H_SHARD_PHASE] == b"search"
    assert [r["item_id"] for r in json.loads(value)["results"]] == ["c", "d"]

    # "More like this" item a: shard 0 holds it and sends its vector for every shard to search ...
    (fwd,) = s0.answer(b"q2", None, {**base, c.H_ITEM_ID: b"a"})
    assert fwd[0] == s0.settings.query_vectors_topic and fwd[1] == b"q2"
    fwd_headers = dict(fwd[3])
    assert fwd_headers[c.H_LOOKUP_OF] == b"a" and c.H_ITEM_ID not in fwd_headers
    np.testing.assert_allclose(np.frombuffer(fwd[2], "<f4"), vecs[0], atol=1e-6)
    # ... which leaves the item itself out, on the shard that holds it too.
    (searched,) = s0.answer(b"q2", fwd[2], fwd_headers)
    assert [r["item_id"] for r in json.loads(searched[2])["results"]] == ["b"]
    # ... and shard 1 says it does not hold it.
    (lookup,) = s1.answer(b"q2", None, {**base, c.H_ITEM_ID: b"a"})
    assert dict(lookup[3])[c.H_SHARD_PHASE] == b"lookup" and json.loads(lookup[2])["error"]["code"] == "unknown_item"

    # A malformed record: shard 0 answers it straight away, the other shards stay silent.
    bad = {**base, c.H_K: b"many"}
    assert s1.answer(b"q3", c.encode_vector(vecs[0]), bad) == []
    (direct,) = s0.answer(b"q3", c.encode_vector(vecs[0]), bad)
    assert direct[0] == s0.settings.replies_topic and json.loads(direct[2])["error"]["code"] == "bad_header"


def test_whole_index_adds_up_one_caught_up_instance_per_shard() -> None:
    def st(shard: str, items: int, caught_up: bool = True) -> IndexerStatus:
        return IndexerStatus(shard=shard, items=items, caught_up=caught_up, instance=f"h-{shard}-{items}")

    assert whole_index([st("0/2", 10)]) is None  # shard 1 not there yet
    assert whole_index([st("0/2", 10), st("1/2", 7, False)]) is None
    assert whole_index([st("0/2", 10), st("0/2", 12), st("1/2", 7)]).items == 19  # type: ignore[union-attr]
    assert whole_index([IndexerStatus(instance="h", items=5, caught_up=True)]).items == 5  # type: ignore[union-attr]


def test_the_status_record_round_trips_through_its_redis_form() -> None:
    status = IndexerStatus(instance="h-1", shard="1/2", items=7, model_version="m", position={0: 5, 1: 3},
                           catalog_position={1: 9}, caught_up=True, snapshot_at=12.5, ready_versions=["m"],
                           versions={"m": VersionFacts(items=7, caught_up=True, catalog_position={1: 9})},
                           updated_at=100.0)
    raw = status.to_redis()
    assert raw["caught_up"] == "1" and raw["items"] == "7" and json.loads(raw["position"]) == {"0": 5, "1": 3}
    assert "items_digest" not in raw  # only written when asked for
    assert IndexerStatus.from_redis(raw) == status
