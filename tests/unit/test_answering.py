"""The indexer's query path without Kafka: what waits, for how long, and what a big answer becomes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import numpy as np

from indexer.index import Upsert, VectorIndex
from indexer.service import Indexer
from indexer.versions import VersionIndex
from lookalike import contracts as c
from lookalike.rollout import RolloutState
from lookalike.settings import IndexerSettings

DIM = 8


def indexer(items: int = 20, metadata_bytes: int = 0, caught_up: bool = True, **settings) -> Indexer:  # type: ignore[no-untyped-def]
    ix = Indexer(IndexerSettings(_env_file=None, **settings))
    vi = VersionIndex(ix.settings, "m", ix.pools)
    vi.index = VectorIndex(DIM, capacity=64)
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(items, DIM)).astype(np.float32)
    vi.index.apply([Upsert(f"item-{i}", v, {"title": "x" * metadata_bytes} if metadata_bytes else {})
                    for i, v in enumerate(vectors)], {0: items}, {0: items})
    vi.index_version = "m/x"
    if caught_up:
        vi.caught_up.set()
    ix.versions["m"] = vi
    ix.state = RolloutState(serving="m")
    ix.started.set()
    ix.catalog_partitions = 4
    return ix


def query_headers(**extra: bytes) -> dict[str, bytes]:
    return {c.H_MODEL_VERSION: b"m", c.H_VECTOR_DIM: str(DIM).encode(), c.H_K: b"5", **extra}


VECTOR = c.encode_vector(np.ones(DIM, dtype=np.float32) / np.sqrt(DIM))


def test_a_position_on_a_partition_the_catalog_lacks_is_refused_at_once() -> None:
    ix = indexer(min_position_wait_s=30)
    headers = query_headers(**{c.H_MIN_POSITION: b"999:0"})
    started = time.monotonic()
    asyncio.run(ix.ready_for(headers))
    assert time.monotonic() - started < 5  # not the 30 s a reachable position may wait
    ((_topic, _key, value, _h),) = ix.answer(b"q1", VECTOR, headers)
    reply = json.loads(value)
    assert reply["error"]["code"] == "bad_header" and "partition 999" in reply["error"]["message"]


def test_a_reachable_position_waits_at_most_its_bound_then_not_ready() -> None:
    ix = indexer(min_position_wait_s=0.2)
    headers = query_headers(**{c.H_MIN_POSITION: b"1:5"})
    asyncio.run(ix.ready_for(headers))
    reply = json.loads(ix.answer(b"q1", VECTOR, headers)[0][2])
    assert reply["error"]["code"] == "not_ready"
    reached = query_headers(**{c.H_MIN_POSITION: b"0:19"})  # offset 19 is applied (next offset 20)
    assert json.loads(ix.answer(b"q2", VECTOR, reached)[0][2])["status"] == "ok"


def test_an_index_still_catching_up_answers_not_ready_after_the_bound() -> None:
    ix = indexer(caught_up=False, catch_up_wait_s=0.1)
    asyncio.run(ix.ready_for(query_headers()))  # returns: the wait is bounded
    reply = json.loads(ix.answer(b"q1", VECTOR, query_headers())[0][2])
    assert reply["error"]["code"] == "not_ready" and "catching up" in reply["error"]["message"]


def test_a_big_answer_fits_the_reply_budget() -> None:
    ix = indexer(metadata_bytes=60_000, max_reply_bytes=300_000)
    ((_topic, _key, value, _h),) = ix.answer(b"q1", VECTOR, query_headers(**{c.H_K: b"20"}))
    reply = json.loads(value)
    assert len(value) <= 300_000 and reply["status"] == "ok" and len(reply["results"]) == 20
    assert reply["metadata_trimmed"] is True and reply["results"][0]["metadata"]["title"]


def test_hostile_query_vector_headers_get_error_replies() -> None:
    ix = indexer()
    for name, raw in [(c.H_K, b"9" * 400), (c.H_QUERY_TS, b"9" * 400), (c.H_TIMINGS, b"[" * 50_000),
                      (c.H_TIMINGS, b'{"a": "b"}'), (c.H_MIN_POSITION, b"0:" + b"9" * 5000)]:
        ((topic, _key, value, _h),) = ix.answer(b"q1", VECTOR, query_headers(**{name: raw}))
        assert topic == ix.settings.replies_topic
        assert json.loads(value)["error"]["code"] == "bad_header", name
    nan = c.encode_vector(np.full(DIM, np.nan, dtype=np.float32))
    assert json.loads(ix.answer(b"q1", nan, query_headers())[0][2])["error"]["code"] == "bad_vector"


def test_the_partition_lookup_survives_the_broker_being_away(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The lookup runs beside the loops: a broker that is away must not end it (and the indexer with it)."""
    from confluent_kafka import KafkaError, KafkaException

    import indexer.answering as answering

    answers = [KafkaException(KafkaError(KafkaError._TRANSPORT)), [0, 1, 2]]

    class FakeSource:
        def __init__(self, *_a, **_k) -> None: ...

        async def partitions(self, *_a, **_k):  # type: ignore[no-untyped-def]
            answer = answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer

        async def close(self) -> None: ...

    async def fast_sleep(_s: float) -> None:
        if not answers:
            raise asyncio.CancelledError  # both looked up: stop the endless loop
    monkeypatch.setattr(answering, "Source", FakeSource)
    monkeypatch.setattr(answering.asyncio, "sleep", fast_sleep)
    ix = indexer()
    ix.catalog_partitions = None

    async def run() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await ix.watch_catalog_partitions()
    asyncio.run(run())
    assert ix.catalog_partitions == 3
