"""The walking skeleton's acceptance, on a real broker and a real Redis server."""

from __future__ import annotations

import json
import time
import uuid

import jsonschema
import pytest
from confluent_kafka import Consumer, TopicPartition
from PIL import ImageOps

from lookalike import contracts as c
from lookalike.clients import confluent_config
from tests.images import encode, jpeg_bytes, picture
from tests.integration.conftest import start_pipeline, stop_pipeline, warm_up

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=["worker", "indexer"], ids=["two-hop", "one-hop"])
def pipeline(request, cluster, tiny_model, tmp_path_factory):  # type: ignore[no-untyped-def]
    """Every test of this module runs on both query paths (LOOKALIKE_QUERY_EMBEDDING): queries
    embedded by the worker (two Kafka hops), and by the indexer (one hop, onehop/app.py).
    The wire contract must not tell them apart."""
    running = start_pipeline(cluster, tiny_model[0], tmp_path_factory.mktemp(f"pipeline-{request.param}"),
                             {"LOOKALIKE_QUERY_EMBEDDING": request.param})
    try:
        warm_up(running, jpeg_bytes(seed=999))
        yield running
    finally:
        stop_pipeline(running)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def ask_until(client, image, predicate, timeout_s: float, **kwargs):  # type: ignore[no-untyped-def]
    """Ask repeatedly until a reply satisfies ``predicate``; returns (reply, seconds)."""
    started = time.monotonic()
    reply = None
    while time.monotonic() - started < timeout_s:
        reply = client.ask(image, timeout_s=max(0.5, timeout_s - (time.monotonic() - started)), **kwargs)
        if predicate(reply):
            return reply, time.monotonic() - started
    raise AssertionError(f"no satisfying reply within {timeout_s}s; last: {reply}")


def first_id(reply) -> str | None:  # type: ignore[no-untyped-def]
    return reply["results"][0]["item_id"] if reply["status"] == "ok" and reply["results"] else None


def test_published_item_is_found_first_within_2s(pipeline) -> None:  # type: ignore[no-untyped-def]
    item_id, image = new_id("item"), jpeg_bytes(seed=1)
    with pipeline.client() as client:
        feed = pipeline.feed()
        published = time.monotonic()
        feed.publish(item_id, image, {"title": "red things", "articleType": "Tshirts"})
        feed.flush()
        reply, _ = ask_until(client, image, lambda r: first_id(r) == item_id, timeout_s=2.0)
        took = time.monotonic() - published
    assert took < 2.0
    jsonschema.validate(reply, c.schema("reply"))
    top = reply["results"][0]
    assert top["score"] > 0.999
    assert top["metadata"] == {"title": "red things", "articleType": "Tshirts"}
    assert reply["model_version"] and reply["index_version"].startswith(reply["model_version"])
    assert {"decode", "embed", "search", "total"} <= set(reply["timings_ms"])


def test_tombstone_removes_and_new_image_replaces(pipeline) -> None:  # type: ignore[no-untyped-def]
    item_id, first = new_id("item"), jpeg_bytes(seed=11)
    second = encode(ImageOps.invert(picture(seed=12)), "PNG")  # looks nothing like the first
    feed = pipeline.feed()
    with pipeline.client() as client:
        feed.publish(item_id, first, {"title": "first"})
        feed.flush()
        ask_until(client, first, lambda r: first_id(r) == item_id, timeout_s=10)

        feed.remove(item_id)
        feed.flush()
        reply, _ = ask_until(client, first, lambda r: item_id not in {h["item_id"] for h in r["results"]}, timeout_s=10)
        assert reply["status"] == "ok"

        feed.publish(item_id, second, {"title": "second"})
        feed.flush()
        reply, _ = ask_until(client, second, lambda r: first_id(r) == item_id, timeout_s=10)
        assert reply["results"][0]["metadata"] == {"title": "second"}
        # The old image no longer matches the item exactly (an identical image scores 1 - 1e-6 at
        # worst): the item's vector was replaced, not added beside the old one.
        old = client.ask(first, k=50, timeout_s=10)
        scores = {h["item_id"]: h["score"] for h in old["results"]}
        assert scores.get(item_id, 0.0) < 0.9999


def read_deadletters(pipeline, key: bytes, timeout_s: float):  # type: ignore[no-untyped-def]
    # no commits: with the default auto-commit, each read left a consumer group behind
    consumer = Consumer(confluent_config(pipeline.settings, **{"group.id": new_id(f"{pipeline.prefix}-dlq"),
                                                               "enable.auto.commit": False}))
    consumer.assign([TopicPartition(pipeline.settings.deadletter_topic, 0, 0)])
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None and msg.key() == key:
                return msg
    finally:
        consumer.close()
    raise AssertionError(f"no dead letter for {key!r} within {timeout_s}s")


def test_corrupt_catalog_image_goes_to_deadletter_and_service_keeps_running(pipeline) -> None:  # type: ignore[no-untyped-def]
    bad_id, good_id = new_id("corrupt"), new_id("good")
    feed = pipeline.feed()
    truncated = jpeg_bytes(seed=21)[:300]
    feed.publish(bad_id, truncated, {"title": "broken"})
    feed.publish(good_id, jpeg_bytes(seed=22), {"title": "fine"})
    feed.flush()
    msg = read_deadletters(pipeline, bad_id.encode(), timeout_s=15)
    headers = c.headers_to_dict(msg.headers())
    assert headers[c.H_ERROR_CODE] == b"bad_image"
    assert headers[c.H_SOURCE_TOPIC] == pipeline.settings.catalog_topic.encode()
    assert msg.value() == truncated, "the dead letter keeps the original bytes"
    assert headers[c.H_METADATA] == b'{"title": "broken"}'
    with pipeline.client() as client:
        ask_until(client, jpeg_bytes(seed=22), lambda r: first_id(r) == good_id, timeout_s=10)
    assert pipeline.alive()


def test_corrupt_query_gets_error_reply_and_service_keeps_running(pipeline) -> None:  # type: ignore[no-untyped-def]
    with pipeline.client() as client:
        reply = client.ask(b"\xff\xd8\xff\xe0 this is not really a jpeg", timeout_s=10)
        assert reply["status"] == "error"
        assert reply["error"]["code"] == "bad_image"
        jsonschema.validate(reply, c.schema("reply"))
        reply = client.ask(jpeg_bytes(seed=999), timeout_s=10)
        assert reply["status"] == "ok"
    assert pipeline.alive()


def test_bad_k_header_gets_error_reply(pipeline) -> None:  # type: ignore[no-untyped-def]
    with pipeline.client() as client:
        reply = client.ask(jpeg_bytes(seed=999), k=100_000, timeout_s=10)
    assert reply["status"] == "error"
    assert reply["error"]["code"] == "bad_header"


def test_more_like_this_item(pipeline) -> None:  # type: ignore[no-untyped-def]
    ids = [new_id("mlt") for _ in range(3)]
    feed = pipeline.feed()
    for seed, item_id in enumerate(ids, start=31):
        feed.publish(item_id, jpeg_bytes(seed=seed), {"title": item_id})
    feed.flush()
    with pipeline.client() as client:
        # all three in the index (they may sit in different partitions), then "more like" the first
        reply = client.ask(None, item_id=ids[0], k=3, timeout_s=10, min_position=feed.positions)
        assert reply["status"] == "ok", reply
        assert ids[0] not in [h["item_id"] for h in reply["results"]]
        assert len(reply["results"]) == 3
        missing = client.ask(None, item_id=new_id("nope"), timeout_s=10)
    assert missing["status"] == "error" and missing["error"]["code"] == "unknown_item"


def test_services_report_healthy(pipeline) -> None:  # type: ignore[no-untyped-def]
    from lookalike.health import check, heartbeat_path

    for service in ("worker", "indexer"):
        healthy, reason = check(heartbeat_path(pipeline.settings, service))
        assert healthy, f"{service}: {reason}"


def test_missing_reply_topic_gets_error_on_default_topic(pipeline) -> None:  # type: ignore[no-untyped-def]
    """A reply-to topic that does not exist must not stall the worker."""
    missing = pipeline.settings.reply_topic_prefix + "does-not-exist-" + uuid.uuid4().hex[:6]
    with pipeline.client() as client:
        request_id = client.send(jpeg_bytes(seed=999), headers={c.H_REPLY_TO: missing.encode()})
        reply = client.wait(request_id, timeout_s=15)
        assert reply["status"] == "error" and reply["error"]["code"] == "bad_header"
        assert "does not exist" in reply["error"]["message"]
        assert client.ask(jpeg_bytes(seed=999), timeout_s=10)["status"] == "ok"


def test_read_your_writes_with_min_position(pipeline) -> None:  # type: ignore[no-untyped-def]
    """A query carrying the catalog position of a write is answered by an index that has it."""
    item_id, image = new_id("ryw"), jpeg_bytes(seed=61)
    feed = pipeline.feed()
    with pipeline.client() as client:
        feed.publish(item_id, image, {"title": "just written"})
        feed.flush()
        reply = client.ask(image, min_position=feed.positions, timeout_s=10)  # no retrying
        assert reply["status"] == "ok", reply
        assert reply["results"][0]["item_id"] == item_id
        for partition, offset in feed.positions.items():
            assert reply["index_position"][str(partition)] > offset

        far = {p: o + 1_000_000 for p, o in feed.positions.items()}  # a position nobody wrote yet
        started = time.monotonic()
        late = client.ask(image, min_position=far, timeout_s=20)
        assert late["status"] == "error" and late["error"]["code"] == "not_ready"
        assert time.monotonic() - started >= float(pipeline.env["LOOKALIKE_MIN_POSITION_WAIT_S"]) * 0.9



def test_a_waiting_query_holds_no_other_query(pipeline) -> None:  # type: ignore[no-untyped-def]
    """Issue #13's first confirmed case, over the wire: a query waiting on a position holds
    nobody else, and a position on a partition the catalog lacks is refused at once."""
    image = jpeg_bytes(seed=999)
    with pipeline.client() as client:
        far = client.send(image, min_position={0: 10**12})  # reachable in principle: it waits its 2 s
        missing = client.send(image, min_position={999: 0})
        time.sleep(0.2)
        started = time.monotonic()
        plain = client.send(image)
        assert client.wait(plain, timeout_s=10)["status"] == "ok"
        print(f"\nthe plain query, sent 0.2 s after two waiting ones: answered in {(time.monotonic() - started) * 1000:.0f} ms")
        assert not client.book.has(far.encode())  # the plain query did not wait behind the far one
        refused = client.wait(missing, timeout_s=10)
        assert refused["error"]["code"] == "bad_header" and "partition 999" in refused["error"]["message"]
        assert client.wait(far, timeout_s=10)["error"]["code"] == "not_ready"


def test_a_big_answer_is_trimmed_not_lost(pipeline) -> None:  # type: ignore[no-untyped-def]
    """Issue #13's second confirmed case: twenty items with ~60 KB of metadata each, then a
    query whose answer holds them all; the ~1.2 MB answer is over the reply budget."""
    feed = pipeline.feed()
    run = uuid.uuid4().hex[:6]
    images = {f"big-{run}-{i}": jpeg_bytes(seed=7_000 + i) for i in range(20)}
    for item_id, image in images.items():
        feed.publish(item_id, image, {"title": item_id, "notes": "x" * 60_000})
    feed.flush()
    indexer_pid = pipeline.procs["indexer"].pid
    with pipeline.client() as client:  # k=100: this module's index holds fewer items, so all of them
        reply = client.ask(next(iter(images.values())), k=100, min_position=feed.positions, timeout_s=30)
        raw = client.last_reply_bytes
    assert reply["status"] == "ok", reply
    assert set(images) <= {r["item_id"] for r in reply["results"]}  # ~1.2 MB of metadata in the answer
    assert reply["metadata_trimmed"] is True
    assert raw is not None and len(raw) <= c.MAX_REPLY_BYTES
    jsonschema.validate(reply, c.schema("reply"))
    assert reply["results"][0]["metadata"]["notes"]  # the best keep their metadata
    assert pipeline.alive() and pipeline.procs["indexer"].pid == indexer_pid


def test_cli_query_prints_the_reply_json_exactly(pipeline, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    item_id, image = new_id("cli"), jpeg_bytes(seed=71)
    feed = pipeline.feed()
    feed.publish(item_id, image, {"title": "for the CLI"})
    feed.flush()
    path = tmp_path / "q.jpg"
    path.write_bytes(image)
    with pipeline.client() as client:  # wait until it is searchable
        ask_until(client, image, lambda r: first_id(r) == item_id, timeout_s=10)
    done = subprocess.run([sys.executable, "-m", "control.cli", "query", str(path), "--json"], env=pipeline.env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip()
    reply = json.loads(line)
    assert reply["results"][0]["item_id"] == item_id
    assert line == c.encode_reply(reply).decode(), "printed as the service wrote it (compact JSON)"


def test_the_query_path_embeds_where_it_is_told(pipeline) -> None:  # type: ignore[no-untyped-def]
    """Two hops: the worker embeds, the reply has the second hop's timing. One hop: the
    indexer embeds and answers at once (no ``hop``), the worker reads the catalog only, and
    the query vector is still published, marked answered, for the feedback aggregator; a
    query that must wait for its min-position takes the two-hop path and is answered once."""
    one_hop = pipeline.env["LOOKALIKE_QUERY_EMBEDDING"] == "indexer"
    settings = pipeline.settings
    with pipeline.client() as client:
        reply = client.ask(jpeg_bytes(seed=999), timeout_s=10)
        waited = client.ask(jpeg_bytes(seed=999), min_position={0: 10**12}, timeout_s=20)  # never reached
    assert reply["status"] == "ok" and {"decode", "embed", "search"} <= set(reply["timings_ms"])
    assert ("hop" in reply["timings_ms"]) is not one_hop, reply["timings_ms"]
    assert waited["error"]["code"] == "not_ready" and "hop" in waited["timings_ms"]  # waited its 2 s, on two hops
    assert ("catalog only" in pipeline.log_text("worker")) is one_hop

    consumer = Consumer(confluent_config(settings, **{"group.id": f"read-{uuid.uuid4().hex}",
                                                      "enable.auto.commit": False}))
    meta = consumer.list_topics(settings.query_vectors_topic, timeout=10).topics[settings.query_vectors_topic]
    consumer.assign([TopicPartition(settings.query_vectors_topic, p, 0) for p in meta.partitions])
    marks: dict[str, list[bool]] = {}
    idle = time.monotonic()
    while time.monotonic() - idle < 2.0:
        msg = consumer.poll(0.2)
        if msg is not None and msg.error() is None:
            marks.setdefault(msg.key().decode(), []).append(c.H_ANSWERED in dict(msg.headers() or []))
            idle = time.monotonic()
    consumer.close()
    assert marks[reply["request_id"]] == [one_hop]  # one vector record per query, either way
    assert marks[waited["request_id"]] == [False]  # answered by the indexers' query loop


def test_queries_past_their_deadline_get_deadline_exceeded_and_the_rest_are_answered(pipeline) -> None:  # type: ignore[no-untyped-def]
    """A backlog of queries already past their deadlines (deadline-ms) is answered, each once,
    deadline_exceeded; a query with time left between them is answered as usual."""
    image = jpeg_bytes(seed=999)
    past = str(int(time.time() * 1000) - 1000).encode()
    with pipeline.client() as client:
        late = [client.send(image, headers={c.H_DEADLINE: past}) for _ in range(100)]
        fresh = client.send(image, headers={c.H_DEADLINE: str(int(time.time() * 1000) + 60_000).encode()})
        late += [client.send(image, headers={c.H_DEADLINE: past}) for _ in range(100)]
        replies = {rid: client.wait(rid, timeout_s=60) for rid in [*late, fresh]}
    assert replies[fresh]["status"] == "ok", replies[fresh]
    codes = {replies[rid]["error"]["code"] for rid in late if replies[rid]["status"] == "error"}
    assert codes == {"deadline_exceeded"} and all(replies[rid]["status"] == "error" for rid in late)
    for rid in late[:3]:
        jsonschema.validate(replies[rid], c.schema("reply"))
        assert "not worked on" in replies[rid]["error"]["message"]
    assert pipeline.alive()
