"""Query deadlines and load shedding without Kafka: the header and its default, the worker that
answers a late query at once and sheds what it would finish late, the indexer that neither
searches nor waits past a deadline, and the gateway's statuses for both codes."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from pydantic import SecretStr

from gateway.bus import Query as HttpQuery
from gateway.bus import record_headers
from gateway.statuses import http_status, retry_after_s
from lookalike import auth
from lookalike import contracts as c
from lookalike.embedder import Embedder
from lookalike.errors import BadHeader, DeadlineExceeded, ErrorCode
from lookalike.settings import WorkerSettings
from tests.images import jpeg_bytes
from tests.unit.test_answering import VECTOR, indexer, query_headers
from workers.stages import Source


def now_ms() -> int:
    return int(time.time() * 1000)


# -- the header -------------------------------------------------------------------
def test_the_header_wins_else_the_timestamp_plus_the_default() -> None:
    assert c.query_deadline_ms({c.H_DEADLINE: b"1700000000123"}, 5, 30_000) == 1_700_000_000_123
    assert c.query_deadline_ms({}, 1_000, 30_000) == 31_000
    assert c.query_deadline_ms({}, 1_000, 0) is None  # the default switched off
    assert c.query_deadline_ms({}, None, 30_000) is None  # no timestamp to count from
    for bad in (b"-5", b"soon", b"1" * 20, b""):
        with pytest.raises(BadHeader, match="deadline-ms"):
            c.query_deadline_ms({c.H_DEADLINE: bad}, 1_000, 30_000)


def test_check_deadline_refuses_only_after_the_deadline() -> None:
    c.check_deadline(None, 10**15, "worker")
    c.check_deadline(2_000, 2_000, "worker")  # at the deadline: still in time
    with pytest.raises(DeadlineExceeded, match="reached the indexer 5 ms after") as raised:
        c.check_deadline(2_000, 2_005, "indexer")
    assert raised.value.code == ErrorCode.DEADLINE_EXCEEDED


# -- the worker -------------------------------------------------------------------
def worker(embedder: Embedder, **settings):  # type: ignore[no-untyped-def]
    from workers.app import EmbeddingWorker, ModelSet

    s = WorkerSettings(_env_file=None, kafka_bootstrap="127.0.0.1:9", **settings)
    return EmbeddingWorker(s, ModelSet(s, embedder))


def replies(errors) -> dict[str, dict]:  # type: ignore[no-untyped-def]
    return {json.loads(rec[1])["request_id"]: json.loads(rec[1]) for _topic, rec in errors}


def test_the_worker_answers_a_late_query_at_once_and_embeds_the_others(embedder: Embedder) -> None:
    w = worker(embedder)
    limited: list[str] = []
    w.guard.limit = limited.append  # type: ignore[method-assign]  # what the rate limit was asked about
    image = jpeg_bytes(1)
    src = Source(w.settings.queries_topic, 0, 1)
    old = Source(w.settings.queries_topic, 0, 2, timestamp_ms=now_ms() - 31_000)  # over the 30 s default
    fresh = Source(w.settings.queries_topic, 0, 3, timestamp_ms=now_ms())
    records, errors = w.query_batch([
        (b"late", image, {c.H_DEADLINE: str(now_ms() - 1).encode()}, src),
        (b"old", image, {}, old),
        (b"fresh", image, {}, fresh),
        (b"asked", image, {c.H_DEADLINE: str(now_ms() + 60_000).encode()}, src),
        (b"garbled", image, {c.H_DEADLINE: b"tomorrow"}, src),
    ])
    assert [r[0] for r in records] == [b"fresh", b"asked"]
    got = replies(errors)
    assert {k: r["error"]["code"] for k, r in got.items()} == {
        "late": "deadline_exceeded", "old": "deadline_exceeded", "garbled": "bad_header"}
    assert "not worked on" in got["late"]["error"]["message"]
    assert len(limited) == 2  # the late ones never reached the rate limit (nor the decoder)
    deadlines = {r[0]: dict(r[2])[c.H_DEADLINE] for r in records}  # passed on to the indexer
    assert int(deadlines[b"fresh"]) == fresh.timestamp_ms + 30_000
    assert w.embed_s_per_query > 0  # the pace the next batches are judged by


def test_the_worker_sheds_what_it_would_finish_after_the_deadline(embedder: Embedder) -> None:
    w = worker(embedder)
    w.embed_s_per_query = 0.5  # as if each image took 0.5 s: the first done in 0.5 s, the second in 1 s, ...
    image = jpeg_bytes(2)
    src = Source(w.settings.queries_topic, 0, 1)
    soon = {c.H_DEADLINE: str(now_ms() + 900).encode()}
    later = {c.H_DEADLINE: str(now_ms() + 60_000).encode()}
    records, errors = w.query_batch([(b"a", image, soon, src), (b"b", image, later, src),
                                     (b"c", image, soon, src), (b"d", image, {}, src)])  # d: no deadline
    assert [r[0] for r in records] == [b"a", b"b", b"d"]  # a makes it as the first; c, the third, would not
    got = replies(errors)
    assert {k: r["error"]["code"] for k, r in got.items()} == {"c": "overloaded"}
    assert "present pace" in got["c"]["error"]["message"]
    # A pace that is far too slow (a stall) never sheds everything: one query goes on and measures it again.
    w.embed_s_per_query = 20.0
    ten_s = {c.H_DEADLINE: str(now_ms() + 10_000).encode()}  # both would be shed at 20 s an image
    records, errors = w.query_batch([(b"e", image, soon, src), (b"f", image, ten_s, src)])
    assert [r[0] for r in records] == [b"f"] and set(replies(errors)) == {"e"}  # the later deadline goes on
    assert w.embed_s_per_query < 20.0
    item = {c.H_DEADLINE: str(now_ms() + 1_000).encode(), c.H_ITEM_ID: b"15970"}
    records, errors = w.query_batch([(b"item", None, item, src)])  # nothing to embed: never shed
    assert [r[0] for r in records] == [b"item"] and not errors


def test_the_read_loop_answers_late_queries_without_the_inference_thread(embedder: Embedder) -> None:
    from lookalike.runtime import Record

    w = worker(embedder)
    topic = w.settings.queries_topic
    late = Record(topic, 0, 7, b"late", jpeg_bytes(1), {}, timestamp_ms=now_ms() - 60_000)
    [out] = w.late(late)
    assert out.topic == w.settings.replies_topic and out.key == b"late"
    assert json.loads(out.value)["error"]["code"] == "deadline_exceeded"
    assert w.late(Record(topic, 0, 8, b"fresh", jpeg_bytes(1), {}, timestamp_ms=now_ms())) is None
    assert w.late(Record(topic, 0, 9, b"garbled", jpeg_bytes(1), {c.H_DEADLINE: b"x"})) is None  # the stage: bad_header
    w.embed_s_per_query = 0.1
    assert w.late(Record(topic, 0, 13, b"alone", jpeg_bytes(1), {c.H_DEADLINE: str(now_ms() + 500).encode()})) is None
    # Over capacity: 20 queued ahead + a batch of 16 at 0.1 s an image is 3.6 s of work.
    w.embed_s_per_query, w.queued = 0.1, lambda: 20
    soon = {c.H_DEADLINE: str(now_ms() + 1_000).encode()}
    [out] = w.late(Record(topic, 0, 10, b"soon", jpeg_bytes(1), soon))
    reply = json.loads(out.value)
    assert reply["error"]["code"] == "overloaded" and "20 queries queued ahead" in reply["error"]["message"]
    assert w.late(Record(topic, 0, 11, b"later", jpeg_bytes(1), {c.H_DEADLINE: str(now_ms() + 60_000).encode()})) is None
    assert w.late(Record(topic, 0, 12, b"item", None, {**soon, c.H_ITEM_ID: b"15970"})) is None  # nothing to embed


# -- the indexer ------------------------------------------------------------------
def test_the_indexer_does_not_search_a_late_query_vector() -> None:
    ix = indexer()
    ((_topic, _key, value, _h),) = ix.answer(b"q1", VECTOR, query_headers(**{c.H_DEADLINE: str(now_ms() - 10).encode()}))
    reply = json.loads(value)
    assert reply["status"] == "error" and reply["error"]["code"] == "deadline_exceeded"
    ((_topic, _key, value, _h),) = ix.answer(b"q2", VECTOR, query_headers(**{c.H_DEADLINE: str(now_ms() + 60_000).encode()}))
    assert json.loads(value)["status"] == "ok"


def test_a_query_waits_for_its_position_no_longer_than_its_deadline() -> None:
    ix = indexer(min_position_wait_s=30)
    headers = query_headers(**{c.H_MIN_POSITION: b"1:5", c.H_DEADLINE: str(now_ms() + 300).encode()})
    started = time.monotonic()
    asyncio.run(ix.ready_for(headers))
    assert time.monotonic() - started < 10  # not the 30 s its position could wait
    ((_topic, _key, value, _h),) = ix.answer(b"q1", VECTOR, headers)
    assert json.loads(value)["error"]["code"] == "deadline_exceeded"


# -- the gateway ------------------------------------------------------------------
def test_the_gateway_sends_its_deadline_signed_and_maps_the_codes() -> None:
    query = HttpQuery(image=b"img", k="5", client_id="shop-1")
    secret = SecretStr(auth.new_key())
    signed = record_headers(query, "lookalike.replies.gateway-a", b"req-1", secret, deadline_ms=123)
    assert signed[c.H_DEADLINE] == b"123"
    assert auth.verify({"shop-1": secret}, b"req-1", signed, b"img", window_s=60) == "shop-1"
    altered = {**signed, c.H_DEADLINE: b"999999999999999"}
    with pytest.raises(Exception, match="signature"):
        auth.verify({"shop-1": secret}, b"req-1", altered, b"img", window_s=60)
    overloaded = c.error_reply("r", "overloaded", "shed")
    assert http_status(overloaded) == 503 and retry_after_s(overloaded) == 1
    assert http_status(c.error_reply("r", "deadline_exceeded", "late")) == 504
