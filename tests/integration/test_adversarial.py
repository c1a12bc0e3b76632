"""Hostile records on every topic the services consume, interleaved with good traffic (issue #13).

The fuzz test (test_fuzz.py) reaches the two public topics through the worker. This suite
writes straight to every topic a service reads, as anyone with write access to it could:
the catalog and the queries (worker), the query vectors (both index shards and the
feedback aggregator), one model version's catalog vectors (the shards' feeds and the
aggregator), the shards' partial answers (the gatherer), the replies (the aggregator),
feedback (the aggregator) and triggers (the trainer). Each hostile record carries one
defect: huge and tiny values, bad and huge headers, deep JSON, wrong types, wrong vector
sizes and NaN vectors, unknown partitions and versions, oversized answers.

The run is seeded (``LOOKALIKE_ADVERSARIAL_SEED``, else a random seed; printed either
way). Pass:

* every service is still running (no loop crashed: a crashed loop ends its process), and
  no record reached the runtime's guard as an unclassified exception (a ``Traceback`` in
  a log means a parser let an exception through instead of naming the defect);
* every hostile record on a topic whose records are answered or refused is accounted
  for: a reply keyed by its key (queries, query vectors) or a dead letter naming its
  topic, partition and offset (catalog, catalog vectors, partial answers, feedback,
  triggers). Replies are read by the aggregator as a bystander: a bad one is skipped;
* the good traffic between them is served: every good query is answered ``ok`` with its
  own item first, every good catalog item is indexed, every good click is counted.

Counts per topic go to stdout and ``$LOOKALIKE_HOME/adversarial-counts.json``.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from feedback.store import FeedbackStore
from lookalike import contracts as c
from lookalike.artifacts import ModelCard
from lookalike.clients import confluent_config, producer_config
from lookalike.errors import InvalidMessage
from lookalike.settings import FeedbackSettings
from lookalike.status import wait_for_index
from lookalike.topics import vectors_topic
from producers.feedback import FeedbackProducer
from tests.conftest import Cluster
from tests.images import jpeg_bytes
from tests.integration.conftest import Pipeline, start_pipeline, stop_pipeline, warm_up

pytestmark = pytest.mark.integration

SEED = int(os.environ.get("LOOKALIKE_ADVERSARIAL_SEED") or secrets.randbits(32))
GOOD_ITEMS = 24
EVERY = 40  # a round of good traffic after this many hostile records
DEEP = b"[" * 60_000 + b"]" * 60_000  # 120 kB: nested far past any parser's recursion limit
SHARDS = {"LOOKALIKE_INDEX_SHARDS": "2", "LOOKALIKE_SHARD_DEADLINE_MS": "10000"}  # whole answers on a loaded box


@dataclass
class Hostile:
    topic: str  # the role: catalog, queries, query-vectors, vectors, partials, replies, feedback, triggers
    defect: str
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes] = field(default_factory=dict)
    partition: int | None = None  # where the broker put it (None: the broker refused it)
    offset: int | None = None


# Where each topic's bad records must end: a reply keyed by the record's key, or a dead letter.
EXPECT = {"catalog": "dead letter", "queries": "reply", "query-vectors": "reply", "vectors": "dead letter",
          "partials": "dead letter", "feedback": "dead letter", "triggers": "dead letter", "replies": "skipped"}
COUNTS = {"catalog": 100, "queries": 100, "query-vectors": 250, "vectors": 200, "partials": 150,
          "feedback": 150, "triggers": 100, "replies": 100}


class Generators:
    """One hostile record per call, for each topic: a defect drawn from that topic's list."""

    def __init__(self, rng: random.Random, version: str, dim: int, partitions: int) -> None:
        self.rng, self.version, self.dim, self.partitions = rng, version, dim, partitions
        self.n = 0

    def key(self, prefix: str) -> bytes:
        self.n += 1
        return f"adv-{prefix}-{self.n}".encode()

    def unit(self, dim: int | None = None) -> bytes:
        v = np.asarray([self.rng.gauss(0, 1) for _ in range(dim or self.dim)], dtype=np.float32)
        return c.encode_vector(v / np.linalg.norm(v))

    def pick(self, options: dict[str, Callable[[], Hostile]]) -> Hostile:
        return options[self.rng.choice(sorted(options))]()

    # -- the public topics -----------------------------------------------------------------
    def catalog(self) -> Hostile:
        k = self.key("catalog")
        img = jpeg_bytes(seed=self.rng.randrange(10**6), size=(48, 48))
        return self.pick({
            "corrupt image": lambda: Hostile("catalog", "corrupt image", k, img[: len(img) // 3]),
            "not an image": lambda: Hostile("catalog", "not an image", k, self.rng.randbytes(200)),
            "deep metadata": lambda: Hostile("catalog", "deep metadata", k, img, {c.H_METADATA: b"[" * 5000}),
            "metadata not json": lambda: Hostile("catalog", "metadata not json", k, img, {c.H_METADATA: b"{x"}),
            "control key": lambda: Hostile("catalog", "control key", b"adv\x00" + k, img),
            "huge key": lambda: Hostile("catalog", "huge key", k * 40, img),
            "too many headers": lambda: Hostile("catalog", "too many headers", k, img,
                                                {f"h{i}": b"x" for i in range(80)}),
        })

    def queries(self) -> Hostile:
        k = self.key("query")
        img = jpeg_bytes(seed=self.rng.randrange(10**6), size=(48, 48))
        return self.pick({
            "k of 400 digits": lambda: Hostile("queries", "k of 400 digits", k, img, {c.H_K: b"9" * 400}),
            "min-position on partition 999": lambda: Hostile("queries", "min-position on partition 999", k, img,
                                                             {c.H_MIN_POSITION: b"999:0"}),
            "min-position of 5000 digits": lambda: Hostile("queries", "min-position of 5000 digits", k, img,
                                                           {c.H_MIN_POSITION: b"0:" + b"9" * 5000}),
            "corrupt image": lambda: Hostile("queries", "corrupt image", k, img[:40]),
            "empty value": lambda: Hostile("queries", "empty value", k, b""),
            "item-id with control characters": lambda: Hostile("queries", "item-id with control characters", k, None,
                                                               {c.H_ITEM_ID: b"\x01\x02"}),
            "unknown item": lambda: Hostile("queries", "unknown item", k, None, {c.H_ITEM_ID: b"no-such-item"}),
        })

    # -- the internal topics ---------------------------------------------------------------
    def query_vectors(self) -> Hostile:
        k = self.key("qv")
        base = {c.H_MODEL_VERSION: self.version.encode(), c.H_VECTOR_DIM: str(self.dim).encode(), c.H_K: b"5"}

        def bad(defect: str, value: bytes | None = None, key: bytes = k, **headers: bytes) -> Callable[[], Hostile]:
            return lambda: Hostile("query-vectors", defect, key, self.unit() if value is None else value,
                                   {**base, **{n.replace("_", "-"): v for n, v in headers.items()}})

        nan = c.encode_vector(np.full(self.dim, np.nan, dtype=np.float32))
        return self.pick({
            "k of 400 digits": bad("k of 400 digits", k=b"9" * 400),
            "k zero": bad("k zero", k=b"0"),
            "timestamp of 400 digits": bad("timestamp of 400 digits", query_timestamp_ms=b"9" * 400),
            "deep timings": bad("deep timings", timings=b"[" * 50_000),
            "timings of strings": bad("timings of strings", timings=b'{"embed": "slow"}'),
            "min-position on partition 999": bad("min-position on partition 999", min_position=b"999:0"),
            "min-position of 5000 digits": bad("min-position of 5000 digits", min_position=b"0:" + b"9" * 5000),
            "vector one float short": bad("vector one float short", value=self.unit()[:-4]),
            "NaN vector": bad("NaN vector", value=nan),
            "1 MB vector": bad("1 MB vector", value=b"\x00" * 1_000_000),
            "unknown model version": bad("unknown model version", model_version=b"no-such-version"),
            "model version not UTF-8": bad("model version not UTF-8", model_version=b"\xff\xfe"),
            "unknown item": bad("unknown item", item_id=b"no-such-item"),
            "reply-to not a topic name": bad("reply-to not a topic name", reply_to=b"not a topic!"),
            "control key": bad("control key", key=b"adv\x00" + k),
        })

    def vectors(self) -> Hostile:
        k = self.key("vec")
        base = {c.H_MODEL_VERSION: self.version.encode(), c.H_VECTOR_DIM: str(self.dim).encode(),
                c.H_VECTOR_DTYPE: b"float32"}

        def bad(defect: str, value: bytes | None = None, key: bytes = k, **headers: bytes) -> Callable[[], Hostile]:
            return lambda: Hostile("vectors", defect, key, self.unit() if value is None else value,
                                   {**base, **{n.replace("_", "-"): v for n, v in headers.items()}})

        return self.pick({
            "dim of 400 digits": bad("dim of 400 digits", vector_dim=b"9" * 400),
            "dim zero": bad("dim zero", vector_dim=b"0"),
            "dim not a number": bad("dim not a number", vector_dim=b"many"),
            "value shorter than dim": bad("value shorter than dim", value=self.unit()[:-8]),
            "another dim than the index": bad("another dim than the index", value=self.unit(self.dim // 2),
                                              vector_dim=str(self.dim // 2).encode()),
            "NaN vector": bad("NaN vector", value=c.encode_vector(np.full(self.dim, np.nan, dtype=np.float32))),
            "two source offsets": bad("two source offsets", source_offset=b"0:1,1:2"),
            "source offset of 400 digits": bad("source offset of 400 digits", source_offset=b"0:" + b"9" * 400),
            "deep metadata": bad("deep metadata", metadata=b"[" * 5000),
            "metadata not an object": bad("metadata not an object", metadata=b"[1,2]"),
            "another model version": bad("another model version", model_version=b"another-version"),
            "control key": bad("control key", key=b"adv\x00" + k),
            "huge key": bad("huge key", key=k * 40),
        })

    def partials(self) -> Hostile:
        k = self.key("partial")
        reply = c.ok_reply(k.decode(), [{"item_id": "x", "score": 0.5, "metadata": {}}], model_version=self.version,
                           index_version=None, index_position={0: 1}, timings_ms={})
        good = c.encode_reply(reply)
        base = {c.H_SHARD: b"0/2", c.H_SHARD_PHASE: b"search", c.H_REPLY_TO: b"REPLIES", c.H_K: b"5",
                c.H_GATHER_WAIT_MS: b"100"}

        def bad(defect: str, value: bytes = good, **headers: bytes) -> Callable[[], Hostile]:
            return lambda: Hostile("partials", defect, k, value,
                                   {**base, **{n.replace("_", "-"): v for n, v in headers.items()}})

        return self.pick({
            "gather wait of 400 digits": bad("gather wait of 400 digits", gather_wait_ms=b"9" * 400),
            "shard of 5000 digits": bad("shard of 5000 digits", shard=b"0/" + b"9" * 5000),
            "another shard count": bad("another shard count", shard=b"0/3"),
            "shard out of range": bad("shard out of range", shard=b"7/2"),
            "unknown phase": bad("unknown phase", shard_phase=b"guess"),
            "deep document": bad("deep document", value=DEEP),
            "not JSON": bad("not JSON", value=b"\xff{"),
            "results without scores": bad("results without scores",
                                          value=json.dumps({**reply, "results": [{"item_id": "x"}]}).encode()),
            "position not numbers": bad("position not numbers",
                                        value=json.dumps({**reply, "index_position": {"p": "q"}}).encode()),
            "timings of lists": bad("timings of lists",
                                    value=json.dumps({**reply, "timings_ms": {"t": [1]}}).encode()),
            "timestamp of 400 digits": bad("timestamp of 400 digits", query_timestamp_ms=b"9" * 400),
        })

    def feedback(self) -> Hostile:
        k = self.key("user")
        event = {"request_id": "r", "item_id": "i", "event": "click", "timestamp": int(time.time() * 1000)}
        return self.pick({
            "deep JSON": lambda: Hostile("feedback", "deep JSON", k, b"[" * 15_000 + b"]" * 15_000),
            "not JSON": lambda: Hostile("feedback", "not JSON", k, b"click!"),
            "over 16 kB": lambda: Hostile("feedback", "over 16 kB", k,
                                          json.dumps({**event, "item_id": "i" * 20_000}).encode()),
            "unknown event": lambda: Hostile("feedback", "unknown event", k, json.dumps({**event, "event": "x"}).encode()),
            "timestamp of 400 digits": lambda: Hostile("feedback", "timestamp of 400 digits", k,
                                                       json.dumps(event).replace(str(event["timestamp"]),
                                                                                 "9" * 400).encode()),
            "boolean timestamp": lambda: Hostile("feedback", "boolean timestamp", k,
                                                 json.dumps({**event, "timestamp": True}).encode()),
            "no key": lambda: Hostile("feedback", "no key", None, json.dumps(event).encode()),
            "null value": lambda: Hostile("feedback", "null value", k, None),
        })

    def triggers(self) -> Hostile:
        k = self.key("trigger")
        return self.pick({
            "deep JSON": lambda: Hostile("triggers", "deep JSON", k, DEEP),
            "not JSON": lambda: Hostile("triggers", "not JSON", k, b"retrain now"),
            "missing fields": lambda: Hostile("triggers", "missing fields", k, b'{"trigger_id": "t"}'),
            "wrong types": lambda: Hostile("triggers", "wrong types", k, json.dumps(
                {"trigger_id": 1, "model_version": [], "generation": "x", "reasons": {}, "timestamp": None}).encode()),
            "null value": lambda: Hostile("triggers", "null value", k, None),
        })

    def replies(self) -> Hostile:
        k = self.key("reply")
        return self.pick({
            "deep JSON": lambda: Hostile("replies", "deep JSON", k, DEEP),
            "results of strings": lambda: Hostile("replies", "results of strings", k, json.dumps(
                {"request_id": "r", "status": "ok", "model_version": self.version, "results": ["a", "b"]}).encode()),
            "not JSON": lambda: Hostile("replies", "not JSON", k, b"\x00\x01"),
            "null value": lambda: Hostile("replies", "null value", k, None),
        })


@dataclass
class Run:
    pipeline: Pipeline
    version: str
    dim: int


@pytest.fixture(scope="module")
def run(cluster: Cluster, tiny_model: tuple[Path, ModelCard], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    models_src, card = tiny_model
    workdir = tmp_path_factory.mktemp("adversarial")
    models = workdir / "models"
    shutil.copytree(models_src, models)  # the trainer may write aliases
    pipeline = start_pipeline(cluster, models, workdir, {"LOOKALIKE_STATUS_DIGEST": "1", "LOOKALIKE_SNAPSHOTS": "0"},
                              service_env={"indexer": {**SHARDS, "LOOKALIKE_INDEX_SHARD": "0"},
                                           "shard-1": {**SHARDS, "LOOKALIKE_INDEX_SHARD": "1"}})
    try:
        pipeline.start("shard-1")
        pipeline.start("feedback")
        pipeline.start("trainer")
        warm_up(pipeline, jpeg_bytes(seed=999), timeout_s=240)  # five services start at once
        yield Run(pipeline, card.version, card.embedding_dim)
    finally:
        stop_pipeline(pipeline)


def topic_of(pipeline: Pipeline, role: str, version: str) -> str:
    s = pipeline.settings
    return {"catalog": s.catalog_topic, "queries": s.queries_topic, "query-vectors": s.query_vectors_topic,
            "vectors": vectors_topic(s, version), "partials": s.partials_topic, "replies": s.replies_topic,
            "feedback": s.feedback_topic, "triggers": s.triggers_topic}[role]


def test_hostile_records_on_every_topic_are_answered_or_dead_lettered(run: Run) -> None:
    pipeline, s = run.pipeline, run.pipeline.settings
    print(f"\nadversarial seed {SEED} (replay: LOOKALIKE_ADVERSARIAL_SEED={SEED})")
    rng = random.Random(SEED)
    gen = Generators(rng, run.version, run.dim, s.partitions)
    hostile = [getattr(gen, role.replace("-", "_"))() for role, n in COUNTS.items() for _ in range(n)]
    rng.shuffle(hostile)
    for h in hostile:  # the partial answers' reply-to: this test's own replies topic
        if h.headers.get(c.H_REPLY_TO) == b"REPLIES":
            h.headers[c.H_REPLY_TO] = s.replies_topic.encode()
    assert len(hostile) >= 1000

    producer = Producer(producer_config(s, **{"linger.ms": 5}))
    refused: Counter[str] = Counter()

    def delivered(h: Hostile) -> Callable[..., None]:
        def report(err: KafkaError | None, msg) -> None:  # type: ignore[no-untyped-def]
            if err is None:
                h.partition, h.offset = msg.partition(), msg.offset()
            else:
                refused[f"{h.topic}: {err.str()}"] += 1
        return report

    feed = pipeline.feed()
    good_items = {f"good-{i}": jpeg_bytes(seed=50_000 + i, size=(64, 64)) for i in range(GOOD_ITEMS)}
    good_queue = list(good_items.items())
    good_requests: dict[str, str] = {}  # request id -> the item it must find first (the warm-up item)
    clicks = 0
    warm = jpeg_bytes(seed=999)
    with pipeline.client() as client:
        for i, h in enumerate(hostile):
            producer.produce(topic_of(pipeline, h.topic, run.version), key=h.key, value=h.value,
                             headers=list(h.headers.items()), on_delivery=delivered(h))
            producer.poll(0)
            if i % EVERY == EVERY - 1:  # good traffic in between: a catalog item, a query, a click
                if good_queue:
                    feed.publish(*good_queue.pop(), {"title": "good"})
                good_requests[client.send(warm)] = "warm-up"
        producer.flush(60)
        feed.flush()
        clicker = FeedbackProducer(s)
        for request_id, expected in good_requests.items():
            reply = client.wait(request_id, timeout_s=60)
            assert reply["status"] == "ok" and reply["results"][0]["item_id"] == expected, reply
            clicker.emit("click", request_id=request_id, item_id=expected, user_id="adversarial-shopper")
            clicks += 1
        clicker.flush()
        # Every good catalog item is indexed; each finds itself first.
        wait_for_index(1 + GOOD_ITEMS, 120, settings=s, group=pipeline.env["LOOKALIKE_INDEXER_GROUP"])
        for item_id, image in good_items.items():
            reply = client.ask(image, timeout_s=30)
            assert reply["status"] == "ok" and reply["results"][0]["item_id"] == item_id, reply

    # Every hostile record that reached the broker is accounted for.
    sent = [h for h in hostile if h.offset is not None]
    want_reply = {h.key or b"" for h in sent if EXPECT[h.topic] == "reply"}
    want_dead = {(topic_of(pipeline, h.topic, run.version), h.partition, h.offset)
                 for h in sent if EXPECT[h.topic] == "dead letter"}
    replies, dead = read_until(pipeline, want_reply, want_dead, timeout_s=180)
    missing_replies = want_reply - set(replies)
    missing_dead = want_dead - set(dead)
    by_key = {h.key or b"": h for h in sent}
    by_coord = {(topic_of(pipeline, h.topic, run.version), h.partition, h.offset): h for h in sent}
    assert not missing_replies, [(by_key[k].topic, by_key[k].defect) for k in list(missing_replies)[:20]]
    assert not missing_dead, [(by_coord[d].topic, by_coord[d].defect) for d in list(missing_dead)[:20]]

    # The good clicks were counted (the aggregator kept working through the hostile feedback).
    store = FeedbackStore.connect(FeedbackSettings(**{k[len("LOOKALIKE_"):].lower(): v for k, v in pipeline.env.items()
                                                      if k.startswith("LOOKALIKE_")
                                                      and k[len("LOOKALIKE_"):].lower() in FeedbackSettings.model_fields}))
    deadline = time.monotonic() + 60
    counted = 0
    while time.monotonic() < deadline:
        counted = store.window_metrics(run.version, store.buckets(run.version), None)["clicks"]
        if counted >= clicks:
            break
        time.sleep(0.5)
    assert counted >= clicks, (counted, clicks)

    # No service died, and no record reached the guard as an unclassified exception.
    crashed = [name for name, proc in pipeline.procs.items() if proc.poll() is not None]
    tracebacks = {name: pipeline.log_text(name).count("Traceback") for name in pipeline.logs}
    counts: dict[str, dict[str, int]] = defaultdict(dict)
    for role in COUNTS:
        mine = [h for h in hostile if h.topic == role]
        counts[role] = {
            "sent": len(mine),
            "refused by the broker": sum(h.offset is None for h in mine),
            "replies": sum(1 for h in mine if h.offset is not None and EXPECT[role] == "reply"
                           and (h.key or b"") in replies),
            "dead letters": sum(1 for h in mine if (topic_of(pipeline, role, run.version), h.partition, h.offset) in dead),
            "defects": len({h.defect for h in mine}),
        }
    summary = {"seed": SEED, "records": len(hostile), "good queries": len(good_requests) + GOOD_ITEMS,
               "good items": GOOD_ITEMS, "good clicks": clicks, "clicks counted": counted,
               "crashed": crashed, "tracebacks": tracebacks, "per topic": counts, "refused": dict(refused),
               "dead-letter codes": dict(Counter(code for code, _ in dead.values()))}
    print(json.dumps(summary, indent=1))
    (Path(pipeline.env["LOOKALIKE_HOME"]) / "adversarial-counts.json").write_text(json.dumps(summary, indent=1))
    assert not crashed, pipeline.logs_tail()
    assert not any(tracebacks.values()), {n: t for n, t in tracebacks.items() if t}


def read_until(pipeline: Pipeline, want_reply: set[bytes], want_dead: set[tuple[str, int, int]],
               timeout_s: float) -> tuple[dict[bytes, str], dict[tuple[str, int, int], tuple[str, str]]]:
    """Replies (key -> status) and dead letters ((source topic, partition, offset) -> (code,
    source topic)) read from the start, until every wanted one is there or the time is up."""
    s = pipeline.settings
    consumer = Consumer(confluent_config(s, **{"group.id": f"adv-{uuid.uuid4().hex}", "enable.auto.commit": False,
                                               "auto.offset.reset": "earliest"}))
    tps = []
    for topic in (s.replies_topic, s.deadletter_topic):
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        tps += [TopicPartition(topic, p, 0) for p in meta.partitions]
    consumer.assign(tps)
    replies: dict[bytes, str] = {}
    dead: dict[tuple[str, int, int], tuple[str, str]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and not (want_reply <= set(replies) and want_dead <= set(dead)):
            assert pipeline.alive(), pipeline.logs_tail()
            for msg in consumer.consume(500, 1.0):
                if msg.error():
                    continue
                if msg.topic() == s.replies_topic:
                    try:
                        replies[msg.key() or b""] = c.parse_reply(msg.value())["status"]
                    except InvalidMessage:
                        replies.setdefault(msg.key() or b"", "not a reply")  # one of this test's hostile replies
                    continue
                h = c.headers_to_dict(msg.headers())
                source = (h[c.H_SOURCE_TOPIC].decode(), int(h[c.H_SOURCE_PARTITION]), int(h[c.H_SOURCE_OFFSET]))
                dead[source] = (h[c.H_ERROR_CODE].decode(), source[0])
    finally:
        consumer.close()
    return replies, dead
