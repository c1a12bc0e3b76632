"""The worker's and the indexer's pure stages, without Kafka."""

from __future__ import annotations

import json

import numpy as np
import pytest

from indexer import stages as istages
from indexer.index import Delete, Upsert, VectorIndex
from lookalike import contracts as c
from lookalike.embedder import Embedder
from lookalike.errors import InvalidMessage, ModelMismatch
from lookalike.imaging import PreprocessSpec
from lookalike.settings import WorkerSettings
from tests.images import jpeg_bytes
from workers import stages
from workers.stages import CatalogImage, CatalogRemoval, Rejected, Source

SETTINGS = WorkerSettings(_env_file=None)
SRC = Source("lookalike.catalog", 1, 42, 1_700_000_000_000)
INPUT = PreprocessSpec(size=32)  # the test model's


def test_catalog_image_and_tombstone() -> None:
    parsed = stages.parse_catalog(b"1163", jpeg_bytes(1), {c.H_METADATA: b'{"title": "t"}'}, SRC, SETTINGS, INPUT)
    assert isinstance(parsed, CatalogImage) and parsed.item_id == "1163"
    assert parsed.pixels.shape == (32, 32, 3) and parsed.pixels.dtype == np.uint8  # the model's input, not the picture
    assert stages.parse_catalog(b"1163", None, {}, SRC, SETTINGS, INPUT) == CatalogRemoval("1163", SRC)


@pytest.mark.parametrize(
    ("key", "value", "headers", "code"),
    [
        (b"1", b"garbage", {}, "bad_image"),
        (None, jpeg_bytes(1), {}, "bad_key"),
        (b"\xff", jpeg_bytes(1), {}, "bad_key"),
        (b"1", jpeg_bytes(1), {c.H_METADATA: b"not json"}, "bad_header"),
        (b"1", jpeg_bytes(1), {c.H_METADATA: b"[" * 50_000}, "bad_header"),
        (b"1", jpeg_bytes(1), {f"h{i}": b"" for i in range(100)}, "too_large"),
        (b"1", b"\xff" * (SETTINGS.max_image_bytes + 1), {}, "too_large"),
    ],
)
def test_catalog_refusals(key, value, headers, code) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidMessage) as err:
        stages.parse_catalog(key, value, headers, SRC, SETTINGS, INPUT)
    assert err.value.code == code


def test_catalog_vectors_are_unit_and_carry_headers(embedder: Embedder) -> None:
    images = [stages.parse_catalog(str(i).encode(), jpeg_bytes(i), {}, SRC, SETTINGS, INPUT) for i in range(3)]
    records = stages.embed_catalog(embedder, images)  # type: ignore[arg-type]
    key, value, headers = records[0]
    assert key == b"0"
    vec = c.decode_vector(value, 256)  # type: ignore[arg-type]
    assert np.linalg.norm(vec) == pytest.approx(1.0, abs=1e-5)
    h = dict(headers)
    assert h[c.H_MODEL_VERSION] == b"test-v1" and h[c.H_VECTOR_DIM] == b"256"
    assert h[c.H_SOURCE_OFFSET] == b"1:42"


def test_same_image_same_vector_as_query(embedder: Embedder) -> None:
    """Catalog and query go through one preprocessing: the same bytes give the same vector."""
    image = jpeg_bytes(5)
    cat = stages.embed_catalog(embedder, [stages.parse_catalog(b"x", image, {}, SRC, SETTINGS, INPUT)])  # type: ignore[list-item]
    query = stages.parse_query(b"req", image, {}, SRC, SETTINGS, INPUT)
    assert query.pixels is not None and query.pixels.shape == (INPUT.size, INPUT.size, 3)  # no picture held
    q_key, q_value, q_headers = stages.embed_queries(embedder, [query])[0]
    assert q_key == b"req"
    np.testing.assert_allclose(c.decode_vector(q_value, 256), c.decode_vector(cat[0][1], 256), atol=1e-6)  # type: ignore[arg-type]
    assert {"decode", "embed", "queue"} <= set(json.loads(dict(q_headers)[c.H_TIMINGS]))


def test_more_like_this_query_needs_no_image(embedder: Embedder) -> None:
    query = stages.parse_query(b"req", None, {c.H_ITEM_ID: b"1163"}, SRC, SETTINGS)
    assert query.pixels is None
    _key, value, headers = stages.embed_queries(embedder, [query])[0]
    assert value is None and dict(headers)[c.H_ITEM_ID] == b"1163"


def test_deadletter_keeps_original_and_says_why() -> None:
    error = InvalidMessage("broken", code="bad_image")
    key, value, headers = stages.deadletter_record(Rejected(b"k", b"v", {"metadata": b"{}"}, error, SRC))
    h = dict(headers)
    assert (key, value) == (b"k", b"v")
    assert h[c.H_ERROR_CODE] == b"bad_image" and h[c.H_SOURCE_OFFSET] == b"42" and h["metadata"] == b"{}"


def test_error_reply_for_unreadable_key_is_still_keyed_by_it() -> None:
    rejected = Rejected(b"\xff\xfe", b"x", {}, InvalidMessage("bad", code="bad_key"), SRC)
    key, value, _ = stages.error_reply_record(rejected, "m")
    reply = json.loads(value)  # type: ignore[arg-type]
    assert key == b"\xff\xfe" and reply["status"] == "error" and reply["error"]["code"] == "bad_key"


def test_reply_destination_falls_back_when_reply_to_is_not_allowed() -> None:
    assert stages.reply_destination({c.H_REPLY_TO: b"elsewhere"}, SETTINGS) == SETTINGS.replies_topic
    assert stages.reply_destination({c.H_REPLY_TO: b"lookalike.replies.mine"}, SETTINGS) == "lookalike.replies.mine"
    # The pipeline's own topics are not reply topics: no JSON replies injected into the catalog.
    assert stages.reply_destination({c.H_REPLY_TO: b"lookalike.catalog"}, SETTINGS) == SETTINGS.replies_topic
    assert stages.reply_destination({c.H_REPLY_TO: SETTINGS.catalog_vectors_topic.encode()}, SETTINGS) == SETTINGS.replies_topic
    # Nor is any model version's vector topic, even under a prefix that would allow it.
    wide = WorkerSettings(_env_file=None, reply_topic_prefix="lookalike.")
    with pytest.raises(InvalidMessage, match="own topics"):
        stages.parse_query(b"r", jpeg_bytes(1), {c.H_REPLY_TO: b"lookalike.catalog.vectors.v1"}, SRC, wide)


@pytest.mark.parametrize("topic", ["catalog_topic", "queries_topic", "deadletter_topic", "catalog_vectors_topic",
                                   "query_vectors_topic"])
def test_a_query_cannot_reply_into_lookalikes_own_topics(topic: str) -> None:
    """Even where they share the reply prefix; a reply keyed by an item id would overwrite that item."""
    wide = WorkerSettings(_env_file=None, reply_topic_prefix="lookalike.")
    with pytest.raises(InvalidMessage, match="own topics") as err:
        stages.parse_query(b"r", jpeg_bytes(1), {c.H_REPLY_TO: getattr(wide, topic).encode()}, SRC, wide)
    assert err.value.code == "bad_header"


def test_queries_have_their_own_size_limit() -> None:
    settings = WorkerSettings(_env_file=None, max_query_image_bytes=2048)
    image = jpeg_bytes(1, size=(200, 200))
    assert len(image) > 2048
    stages.parse_catalog(b"1", image, {}, SRC, settings, INPUT)  # the catalog limit is another one
    with pytest.raises(InvalidMessage) as err:
        stages.parse_query(b"r", image, {}, SRC, settings)
    assert err.value.code == "too_large"


def test_an_unexpected_failure_is_an_internal_refusal_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_args, **_kwargs):  # type: ignore[no-untyped-def]
        raise ZeroDivisionError("a decoder bug")

    monkeypatch.setattr(stages, "decode_pixels", broken)
    with pytest.raises(InvalidMessage, match="ZeroDivisionError: a decoder bug") as err:
        stages.parse_query(b"r", jpeg_bytes(1), {}, SRC, SETTINGS)
    assert err.value.code == "internal"


def test_deadletter_of_a_too_large_message_drops_the_value() -> None:
    error = InvalidMessage("too big", code="too_large")
    key, value, headers = stages.deadletter_record(Rejected(b"k", b"v" * 5000, {"metadata": b"{}"}, error, SRC))
    h = dict(headers)
    assert (key, value) == (b"k", None)
    assert h[c.H_ORIGINAL_VALUE_BYTES] == b"5000" and h[c.H_ERROR_CODE] == b"too_large" and "metadata" not in h


def test_indexer_applies_vector_records_and_answers() -> None:
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(4, 8)).astype(np.float32)
    index = VectorIndex(8)
    events = [
        istages.parse_vector_record(str(i).encode(), c.encode_vector(v), {c.H_VECTOR_DIM: b"8", c.H_MODEL_VERSION: b"m"})
        for i, v in enumerate(vecs)
    ]
    assert isinstance(events[0].mutation, Upsert) and events[0].model_version == "m"
    index.apply([e.mutation for e in events])
    tomb = istages.parse_vector_record(b"3", None, {c.H_MODEL_VERSION: b"m"})
    assert tomb.mutation == Delete("3")
    index.apply([tomb.mutation])

    headers = {c.H_K: b"2", c.H_MODEL_VERSION: b"m", c.H_TIMINGS: b'{"embed": 1.0}', c.H_QUERY_TS: b"1"}
    query = istages.parse_query_vector(b"r", c.encode_vector(vecs[1]), headers, dim=8, default_reply_to="replies")
    reply = istages.answer(index, query, model_version="m", index_version="m/1", index_position={0: 4})
    assert reply["results"][0]["item_id"] == "1"
    assert len(reply["results"]) == 2
    assert reply["timings_ms"]["embed"] == 1.0 and "search" in reply["timings_ms"]
    assert reply["query_item_id"] is None  # an image query
    by_item = istages.parse_query_vector(b"r2", None, {**headers, c.H_ITEM_ID: b"2"}, dim=8, default_reply_to="r")
    more_like = istages.answer(index, by_item, model_version="m", index_version="m/1", index_position={0: 4})
    assert more_like["query_item_id"] == "2" and "2" not in [r["item_id"] for r in more_like["results"]]
    with pytest.raises(ModelMismatch):
        istages.answer(index, query, model_version="other", index_version=None, index_position={})
