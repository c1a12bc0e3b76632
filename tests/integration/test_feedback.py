"""The feedback loop on a real broker and a real Redis server: the aggregator's numbers, the
trigger de-duplication, and the trainer's gate decisions (refused and accepted).

The aggregator runs as its own process (``python -m feedback``); replies and query vectors
are produced here as the indexer and the worker would write them, so the expected numbers
are known exactly and computed in this file, not by the aggregator's code.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from confluent_kafka import Consumer, Producer, TopicPartition

from feedback.policy import PolicyInputs, TriggerPolicy, due_reasons
from feedback.service import Aggregator as AggregatorService
from feedback.store import FeedbackStore
from feedback.windows import ReplyFacts, window
from lookalike import contracts as c
from lookalike.artifacts import CHAMPION, ModelCard, ModelStore
from lookalike.clients import confluent_config, producer_config
from lookalike.events import Reason, make_feedback, make_trigger
from lookalike.registry import Registry
from lookalike.settings import FeedbackSettings, TrainerSettings
from lookalike.status import register, status_key
from lookalike.topics import ensure_topics, ensure_vectors_topic, vectors_topic
from producers.feedback import FeedbackProducer
from tests.conftest import Cluster
from tests.images import jpeg_bytes
from tests.integration.conftest import start_pipeline, stop_pipeline, stop_services, topic_env, warm_up
from tests.waiting import wait_for
from training.data import Split

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
CATALOG_ITEMS = 50


def env_for(cluster: Cluster, prefix: str, workdir: Path, **extra: str) -> dict[str, str]:
    return {
        "LOOKALIKE_KAFKA_BOOTSTRAP": cluster.kafka_bootstrap,
        "LOOKALIKE_REDIS_URL": cluster.redis_url,
        "LOOKALIKE_HOME": str(workdir),
        **topic_env(prefix),  # the pipeline's topic and group names, the feedback loop's included
        "LOOKALIKE_POLICY_INTERVAL_S": "0.5",
        # every trigger reason off unless a test turns it on
        "LOOKALIKE_TRIGGER_MIN_FEEDBACK": "0",
        "LOOKALIKE_TRIGGER_DROP_FRACTION": "0",
        "LOOKALIKE_TRIGGER_CATALOG_GROWTH": "0",
        "LOOKALIKE_TRIGGER_DRIFT": "0",
        "LOOKALIKE_TRIGGER_COOLDOWN_S": "0",
        **extra,
    }


def settings_from(env: dict[str, str], cls: type = FeedbackSettings) -> Any:
    fields = cls.model_fields
    return cls(**{k[len("LOOKALIKE_"):].lower(): v for k, v in env.items()
                  if k.startswith("LOOKALIKE_") and k[len("LOOKALIKE_"):].lower() in fields})


class Aggregator:
    """``python -m feedback`` as a child process on the test's topics."""

    def __init__(self, cluster: Cluster, prefix: str, workdir: Path, **extra: str) -> None:
        self.env = env_for(cluster, prefix, workdir, **extra)
        self.settings: FeedbackSettings = settings_from(self.env)
        ensure_topics(self.settings)
        ensure_vectors_topic(self.settings, "mB")  # one model version's catalog-vector topic
        self.store = FeedbackStore.connect(self.settings)
        self.producer = Producer(producer_config(self.settings))
        self.log = workdir / "feedback.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log.open("ab") as fh:
            self.proc = subprocess.Popen([sys.executable, "-m", "feedback"], env={**os.environ, **self.env,
                                         "PYTHONUNBUFFERED": "1"}, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def indexer_reports(self, items: int) -> None:
        """What a live indexer of this group publishes: the catalog size the aggregator reads."""
        instance = f"test-{os.getpid()}"
        key = status_key(self.settings.indexer_group, instance)
        pipe = self.store.r.pipeline(transaction=True)
        pipe.hset(key, mapping={"instance": "test", "items": items, "position": "{}", "caught_up": "1"})
        pipe.expire(key, 600)
        register(pipe, self.settings.indexer_group, instance, time.time()).execute()

    def reply(self, request_id: str, model: str, items: list[str], query_item: str | None = None) -> None:
        results = [{"item_id": i, "score": 1.0 - n / 10, "metadata": {}} for n, i in enumerate(items)]
        doc = c.ok_reply(request_id, results, model_version=model, index_version=f"{model}/x", index_position={0: 1},
                         timings_ms={"total": 1.0}, query_item_id=query_item)
        self.producer.produce(self.settings.replies_topic, key=request_id.encode(), value=c.encode_reply(doc))

    def query_vector(self, request_id: str, model: str, item_id: str | None, vector: np.ndarray | None) -> None:
        headers = [(c.H_MODEL_VERSION, model.encode()), (c.H_K, b"6")]
        if item_id is not None:
            headers.append((c.H_ITEM_ID, item_id.encode()))
        if vector is not None:
            headers.append((c.H_VECTOR_DIM, str(len(vector)).encode()))
        self.producer.produce(self.settings.query_vectors_topic, key=request_id.encode(),
                              value=None if vector is None else c.encode_vector(vector), headers=headers)

    def raw_feedback(self, key: bytes | None, value: bytes | None) -> None:
        self.producer.produce(self.settings.feedback_topic, key=key, value=value)

    def flush(self) -> None:
        assert self.producer.flush(30) == 0


@pytest.fixture
def aggregator_factory(cluster: Cluster, tmp_path: Path, throwaway: Callable[[], str]
                       ) -> Iterator[Callable[..., Aggregator]]:
    started: list[Aggregator] = []

    def make(**extra: str) -> Aggregator:
        agg = Aggregator(cluster, throwaway(), tmp_path / f"agg-{len(started)}", **extra)
        (tmp_path / f"agg-{len(started)}").mkdir()
        started.append(agg)
        agg.start()
        return agg

    yield make
    for agg in started:
        agg.stop()


def read_all(settings: FeedbackSettings, topic: str, idle_s: float = 2.0) -> list[Any]:
    """Every record of a (test-owned) topic, read until nothing new arrives for ``idle_s``."""
    consumer = Consumer(confluent_config(settings, **{"group.id": f"read-{uuid.uuid4().hex}",
                                                      "enable.auto.commit": False}))
    meta = consumer.list_topics(topic, timeout=10).topics[topic]
    consumer.assign([TopicPartition(topic, p, 0) for p in meta.partitions])
    out, last = [], time.monotonic()
    while time.monotonic() - last < idle_s:
        msg = consumer.poll(0.2)
        if msg is not None and msg.error() is None:
            out.append(msg)
            last = time.monotonic()
    consumer.close()
    return out


def test_aggregator_metrics_are_exact(aggregator_factory: Callable[..., Aggregator]) -> None:
    agg = aggregator_factory(LOOKALIKE_CATALOG_SAMPLE_RATE="1")
    agg.indexer_reports(CATALOG_ITEMS)
    s, store = agg.settings, agg.store
    a = [f"a{i}" for i in range(9)]
    shown = {  # request -> (model, items in rank order)
        "r1": ("mA", a[0:6]), "r2": ("mA", a[3:9]), "r3": ("mA", a[0:6]), "r4": ("mA", [f"b{i}" for i in range(6)]),
        "r5": ("mB", [f"c{i}" for i in range(6)]), "r6": ("mB", [f"c{i}" for i in range(6)]),
    }
    image_vector = np.linspace(-1, 1, 8, dtype=np.float32)
    agg.query_vector("r1", "mA", "q1", None)  # "more like this q1"
    agg.query_vector("r5", "mB", "q5", None)
    agg.query_vector("r6", "mB", None, image_vector)  # an image query: a vector, no query item
    catalog_vectors = {f"k{i}": np.roll(image_vector, i) for i in range(3)}
    for item_id, vector in catalog_vectors.items():
        agg.producer.produce(vectors_topic(s, "mB"), key=item_id.encode(), value=c.encode_vector(vector),
                             headers=[(c.H_MODEL_VERSION, b"mB"), (c.H_VECTOR_DIM, str(len(vector)).encode())])
    agg.producer.produce(vectors_topic(s, "mB"), key=b"k2", value=None, headers=[(c.H_MODEL_VERSION, b"mB")])
    for request, (model, items) in shown.items():
        if request != "r6":  # r6's reply comes after its feedback
            agg.reply(request, model, items)
    agg.flush()
    wait_for(lambda: store.totals().get("replies") == 5 and store.r.hget(store.key("req", "r1"), "query_item")
             and store.r.hget(store.key("req", "r5"), "query_item"), 60, "replies and query items", logs=agg.log)

    fb = FeedbackProducer(s)
    now = int(time.time() * 1000)
    for request, (_, items) in shown.items():
        for item in items:
            fb.emit("impression", request_id=request, item_id=item, user_id="u1", timestamp_ms=now)
    actions = [("r1", "a1", "click"), ("r1", "a1", "click"),  # the same click twice: counted once
               ("r1", "a4", "dismiss"), ("r2", "a8", "click"), ("r2", "a8", "purchase"), ("r3", "a0", "add_to_cart"),
               ("r4", "nope", "click"),  # an item the reply did not show
               ("r5", "c0", "click"), ("r6", "c2", "click"), ("r6", "c5", "dismiss")]
    for request, item, event in actions:
        fb.emit(event, request_id=request, item_id=item, user_id="u2", timestamp_ms=now + 1)
    agg.raw_feedback(b"u3", b"{not json")
    agg.raw_feedback(None, json.dumps({"request_id": "r1", "item_id": "a1", "event": "click", "timestamp": now}).encode())
    agg.raw_feedback(b"u3", json.dumps({"request_id": "r1", "item_id": "a1", "event": "like", "timestamp": now}).encode())
    fb.flush()
    agg.flush()
    # r6's 6 impressions and 2 actions wait for its reply
    wait_for(lambda: store.totals().get("pending", 0) >= 8 and store.totals().get("invalid") == 3, 60,
             "r6 feedback pending and invalid feedback counted", logs=agg.log)
    agg.reply("r6", "mB", shown["r6"][1])
    agg.flush()
    wait_for(lambda: store.totals().get("events") == 45, 60, "every valid event joined", logs=agg.log)
    time.sleep(1.0)  # anything counted twice would show now
    assert agg.alive(), agg.log.read_text()[-3000:]

    # Expected numbers, by hand from the scenario above.
    mA = store.window_metrics("mA", store.buckets("mA"), CATALOG_ITEMS)
    assert mA["replies"] == 4 and mA["events"] == 24 + 6 and mA["impressions"] == 24
    assert mA["clicks"] == 3  # a1 (rank 2), a8 (rank 6 in r2), nope (unshown)
    assert mA["ctr_at_5"] == pytest.approx(1 / 20)  # only a1 was clicked in a top 5; 4 x 5 top-5 impressions
    assert mA["mean_click_rank"] == pytest.approx((2 + 6) / 2)
    assert mA["purchase_rate"] == pytest.approx(1 / 24)
    assert mA["add_to_cart_rate"] == pytest.approx(1 / 24)
    assert mA["dismiss_rate"] == pytest.approx(1 / 24)
    assert mA["distinct_items_shown"] == 15 and mA["coverage"] == pytest.approx(15 / CATALOG_ITEMS)
    mB = store.window_metrics("mB", store.buckets("mB"), CATALOG_ITEMS)
    assert mB["replies"] == 2 and mB["events"] == 12 + 3 and mB["impressions"] == 12
    assert mB["ctr_at_5"] == pytest.approx(2 / 10)  # c0 (rank 1), c2 (rank 3)
    assert mB["mean_click_rank"] == pytest.approx((1 + 3) / 2)
    assert mB["dismiss_rate"] == pytest.approx(1 / 12)
    assert mB["coverage"] == pytest.approx(6 / CATALOG_ITEMS)
    totals = store.totals()
    assert totals["labelled"] == 9 and totals["duplicates"] == 1
    assert totals["invalid:bad_feedback"] == 2 and totals["invalid:bad_key"] == 1
    # training pairs: only "more like this" queries have a query item
    pairs = {(p["query_item"], p["item_id"], p["label"]) for p in store.pairs()}
    assert pairs == {("q1", "a1", 1), ("q1", "a4", -1), ("q5", "c0", 1)}
    samples = store.query_samples("mB", window(int(time.time() * 1000), 10, s.bucket_s))
    assert samples.shape == (1, 8) and np.allclose(samples[0], image_vector)

    # drift: the one image query against the catalog sample (k2 was removed by its tombstone)
    wait_for(lambda: len(store.catalog_sample("mB")) == 2, 30, "the catalog sample", logs=agg.log)
    inputs = AggregatorService(s, store).policy_inputs(int(time.time() * 1000))
    mean = (catalog_vectors["k0"] + catalog_vectors["k1"]) / 2
    expected = 1 - float(image_vector @ mean) / (np.linalg.norm(image_vector) * np.linalg.norm(mean))
    assert inputs.model_version == "mB" and inputs.drift_queries == 1
    assert inputs.drift == pytest.approx(expected, abs=1e-6)
    assert inputs.new_feedback == 9 and inputs.catalog_items == CATALOG_ITEMS

    dead = read_all(s, s.deadletter_topic)
    codes = sorted(dict(m.headers())[c.H_ERROR_CODE].decode() for m in dead)
    assert codes == ["bad_feedback", "bad_feedback", "bad_key"]
    assert all(dict(m.headers())[c.H_SOURCE_TOPIC].decode() == s.feedback_topic for m in dead)

    out = subprocess.run([sys.executable, "-m", "control.cli", "metrics", "--json"], env={**os.environ, **agg.env},
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["models"]["mB"]["ctr_at_5"] == pytest.approx(0.2) and report["catalog_items"] == CATALOG_ITEMS


def test_feedback_over_the_threshold_raises_exactly_one_trigger(aggregator_factory: Callable[..., Aggregator]) -> None:
    agg = aggregator_factory(LOOKALIKE_TRIGGER_MIN_FEEDBACK="5", LOOKALIKE_TRIGGER_CATALOG_GROWTH="0.5")
    s, store = agg.settings, agg.store
    # the catalog had 20 items at the last training, two hours ago (past the cool-down)
    store.r.hset(store.key("last-training"), mapping={"catalog_items": 20, "at": f"{time.time() - 7200:.3f}"})
    agg.reply("t1", "mA", [f"i{n}" for n in range(5)])
    agg.flush()
    # the serving model is known from the replies: read before anything is due (the aggregator's
    # fetches wait up to 500 ms for more, and a trigger raised before would name no model)
    wait_for(lambda: store.totals().get("replies") == 1, 60, "the reply counted", logs=agg.log)
    agg.indexer_reports(CATALOG_ITEMS)  # now 50: growth 1.5, due as well
    fb = FeedbackProducer(s)
    for n in range(4):
        fb.emit("click", request_id="t1", item_id=f"i{n}", user_id="u", timestamp_ms=None)
    fb.flush()
    wait_for(lambda: store.totals().get("labelled") == 4, 60, "4 clicks counted", logs=agg.log)
    # catalog growth alone is due already: the trigger carries it; now cross the feedback threshold too
    fb.emit("dismiss", request_id="t1", item_id="i4", user_id="u")
    fb.emit("click", request_id="t1", item_id="i4", user_id="u")
    fb.flush()
    wait_for(lambda: store.totals().get("labelled") == 6, 60, "6 feedback events counted", logs=agg.log)
    wait_for(lambda: store.totals().get("absorbed:trigger_pending", 0) >= 4, 60,
             "several more evaluations with a trigger due", logs=agg.log)
    triggers = read_all(s, s.triggers_topic)
    assert len(triggers) == 1, [m.value() for m in triggers]
    doc = json.loads(triggers[0].value())
    reasons = {r["reason"]: r for r in doc["reasons"]}
    assert "catalog_growth" in reasons
    assert reasons["catalog_growth"]["numbers"]["catalog_items"] == CATALOG_ITEMS
    assert doc["generation"] == 0 and doc["model_version"] == "mA"
    assert store.trigger_pending() == doc["trigger_id"]
    assert store.trigger_record(doc["trigger_id"])["state"] == "pending"  # its record, for the trainer to update

    # A trainer holding its lease: a training ends, the next due trigger is absorbed while it runs.
    assert store.acquire_lease("a-trainer", 30)
    store.record_training(outcome="refused", catalog_items=20, labelled=0)  # feedback 6 >= 5 again, growth again
    wait_for(lambda: store.totals().get("absorbed:training_running", 0) >= 3, 60, "absorbed while training", logs=agg.log)
    assert len(read_all(s, s.triggers_topic, idle_s=1.0)) == 1
    store.release_lease("a-trainer")
    second = wait_for(lambda: [m for m in read_all(s, s.triggers_topic, idle_s=0.5) if m.key() != triggers[0].key()],
                      60, "a trigger once the lease is released", logs=agg.log)
    assert len(second) == 1 and json.loads(second[0].value())["generation"] == 1
    assert agg.alive()


def test_a_label_is_a_pair_when_counted_even_before_the_query_vector_is_read(
    aggregator_factory: Callable[..., Aggregator],
) -> None:
    """A "more like this" reply names its query item, so the label that a trigger counts is a
    training pair at once: a trainer started by that trigger learns from it, however far the
    aggregator's query-vector loop lags (here its record never comes at all)."""
    agg = aggregator_factory(LOOKALIKE_TRIGGER_MIN_FEEDBACK="2", LOOKALIKE_TRIGGER_CATALOG_GROWTH="0")
    s, store = agg.settings, agg.store
    agg.reply("p1", "mA", ["i0", "i1", "i2"], query_item="q1")
    agg.flush()
    wait_for(lambda: store.totals().get("replies") == 1, 60, "the reply recorded", logs=agg.log)
    fb = FeedbackProducer(s)
    fb.emit("click", request_id="p1", item_id="i1", user_id="u")
    fb.emit("dismiss", request_id="p1", item_id="i2", user_id="u")
    fb.flush()
    trigger = wait_for(lambda: read_all(s, s.triggers_topic, idle_s=0.5), 60, "the feedback trigger", logs=agg.log)
    assert len(trigger) == 1
    pairs = {(p["query_item"], p["item_id"], p["label"]) for p in store.pairs()}
    assert pairs == {("q1", "i1", 1), ("q1", "i2", -1)}
    assert agg.alive()


def test_feedback_waiting_for_its_reply_survives_redis_going_away_mid_join(
        cluster: Cluster, tmp_path: Path, throwaway: Callable[[], str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Feedback that came before its reply waits in Redis (its Kafka offsets committed). The reply
    joins it; when Redis goes away after the first events are applied, the batch's retry (what
    ``until_done`` does) applies the rest and none twice: every event counted exactly once."""
    store = FeedbackStore.connect(settings_from(env_for(cluster, throwaway(), tmp_path)))
    items = [f"i{n}" for n in range(5)]
    events = [make_feedback("impression", request_id="r1", item_id=i, user_id="u") for i in items]
    events += [make_feedback("click", request_id="r1", item_id="i1", user_id="u"),
               make_feedback("purchase", request_id="r1", item_id="i1", user_id="u")]
    assert [store.record_feedback(e) for e in events] == ["pending"] * 7
    applied, real_apply = [], store._apply

    def redis_goes_away_at_the_third(*args: Any, **kwargs: Any) -> Any:
        if len(applied) == 2:
            applied.append("failed")
            raise redis.ConnectionError("Connection reset by peer")
        applied.append(real_apply(*args, **kwargs))
        return applied[-1]

    monkeypatch.setattr(store, "_apply", redis_goes_away_at_the_third)
    reply = [(ReplyFacts("r1", "mA", tuple(items)), int(time.time() * 1000))]
    with pytest.raises(redis.ConnectionError):
        store.record_replies(reply)
    store.record_replies(reply)  # the retry, Redis back
    totals = store.totals()
    assert (totals.get("events"), totals.get("replies")) == (7, 1), totals
    assert applied.count("applied") == 7 and applied.count("duplicate") == 2  # the two done before: not again
    assert store.r.exists(store.key("pending", "r1")) == 0


def test_loading_the_first_catalog_is_not_growth(cluster: Cluster, tmp_path: Path, throwaway: Callable[[], str]) -> None:
    """Growth is measured from the catalog the serving model was indexed with, once settled
    (its first TRIGGER_BASELINE_MINUTES), or from the catalog at the last training, whichever
    is larger. Seen on fresh stacks: 703 -> 1,596 items in a first load had triggered a
    retraining, and so had a training recorded while the catalog was still loading."""
    env = env_for(cluster, throwaway(), tmp_path, LOOKALIKE_TRIGGER_BASELINE_MINUTES="1")
    store = FeedbackStore.connect(settings_from(env))
    policy = TriggerPolicy(catalog_growth=0.2, cooldown_s=0)

    def due(model: str, items: int, now: float) -> list[str]:
        store.note_catalog(model, items, now)
        inputs = PolicyInputs(model, catalog_items=items, catalog_baseline=store.catalog_baseline(model))
        return [r.reason for r in due_reasons(inputs, policy)]

    t0 = 1_000_000.0
    assert due("v1", 703, t0) == [] and due("v1", 1596, t0 + 10) == [] and due("v1", 9583, t0 + 59) == []
    assert store.catalog_baseline("v1") == 9583  # the load, in the model's first minute
    assert due("v1", 11_000, t0 + 120) == []  # 14.8 % after the load: under the threshold
    assert due("v1", 11_500, t0 + 180) == ["catalog_growth"]  # 20.0 %: growth
    # A training recorded while its catalog was still loading (703 items), then its model
    # promoted: the new model's own index, settled, is the baseline.
    store.record_training(outcome="promoted", catalog_items=703, labelled=0)
    assert due("v2", 5_000, t0 + 200) == [] and due("v2", 11_500, t0 + 230) == []
    assert store.catalog_baseline("v2") == 11_500
    assert due("v2", 13_800, t0 + 300) == ["catalog_growth"]
    # A refused challenger trained on the grown catalog answered the growth too.
    store.record_training(outcome="refused", catalog_items=13_800, labelled=0)
    assert due("v2", 13_900, t0 + 360) == [] and store.catalog_baseline("v2") == 13_800


def test_a_fresh_stack_loading_its_first_catalog_raises_no_trigger(  # type: ignore[no-untyped-def]
        cluster: Cluster, tiny_model: tuple[Path, ModelCard], tmp_path: Path) -> None:
    """What `make demo` does to a fresh stack, with the real worker, indexer, aggregator and
    trainer and the aggregator's default trigger knobs (no cool-down, so nothing hides a
    trigger): the catalog arrives in two loads, 10 then 40 items, with a training recorded
    between them (a trainer that finished while the catalog was loading). Growth counted
    from that training's 10 items would be 400 %; from the model's settled index it is 0."""
    models_src, card = tiny_model
    models = tmp_path / "models"
    shutil.copytree(models_src, models)
    running = start_pipeline(cluster, models, tmp_path, {"LOOKALIKE_POLICY_INTERVAL_S": "0.5",
                                                         "LOOKALIKE_TRIGGER_COOLDOWN_S": "0"})
    for name in ("feedback", "trainer"):
        running.logs[name] = tmp_path / f"{name}.log"
        running.start(name)
    settings: FeedbackSettings = settings_from(running.env)
    store = FeedbackStore.connect(settings)
    try:
        warm_up(running, jpeg_bytes(seed=999, size=(32, 32)))  # one item, the warm-up's
        feed = running.feed()

        def load(ids: range, indexed: int) -> None:
            for n in ids:
                feed.publish(f"item-{n:03d}", jpeg_bytes(seed=n, size=(32, 32)), {"title": f"item {n}"})
            feed.flush()
            wait_for(lambda: (running.status() or {}) and running.status().items == indexed, 120,
                     f"{indexed} items indexed", logs=running.logs["indexer"])

        load(range(10), 11)
        store.record_training(outcome="refused", catalog_items=11, labelled=0)
        load(range(10, 50), 51)
        wait_for(lambda: store.r.hget(store.key("catalog-baseline"), f"{card.version}:items") == b"51", 60,
                 "the aggregator noting the 51-item index", logs=tmp_path / "feedback.log")
        evaluations = store.totals().get("policy_evaluations", 0)
        wait_for(lambda: store.totals().get("policy_evaluations", 0) >= evaluations + 6, 60,
                 "six more policy evaluations", logs=tmp_path / "feedback.log")
        assert running.procs["feedback"].poll() is None and running.procs["trainer"].poll() is None
        stop_services(running)  # nothing can raise a trigger now; the topics and keys are still there
        assert store.triggers() == [] and read_all(settings, settings.triggers_topic, idle_s=0.5) == []
        assert "trigger" not in (tmp_path / "feedback.log").read_text().replace("triggers", "")
        status = subprocess.run([sys.executable, "-m", "control.cli", "status"], env=running.env, cwd=REPO,
                                capture_output=True, text=True, timeout=60)
        assert "last retraining trigger: none" in status.stdout, status.stdout + status.stderr
    finally:
        stop_pipeline(running)


@pytest.fixture
def trainer_setup(cluster: Cluster, tiny_model: tuple[Path, ModelCard], tmp_path: Path, throwaway):  # type: ignore[no-untyped-def]
    """A copy of the tiny model store (the trainer changes aliases) and the settings of a trainer on fresh topics."""
    models_src, card = tiny_model
    models = tmp_path / "models"
    shutil.copytree(models_src, models)
    env = env_for(cluster, throwaway(), tmp_path, LOOKALIKE_MODEL_DIR=str(models), LOOKALIKE_TRAINER_THREADS="2",
                  LOOKALIKE_LEASE_TTL_S="5")
    settings: TrainerSettings = settings_from(env, TrainerSettings)
    ensure_topics(settings)
    store = FeedbackStore.connect(settings)
    split = Split.load(models / card.training["split_file"])
    yield settings, ModelStore(models), store, split, card, env


def make_pairs(store: FeedbackStore, split: Split, labels: dict[str, str]) -> int:
    """Feedback on "more like this" replies through the store's join: same class clicked, other class dismissed."""
    train_ids = list(split.train_ids)
    n = 0
    for q in train_ids[:6]:
        same = [i for i in train_ids if labels[i] == labels[q] and i != q][:2]
        other = [i for i in train_ids if labels[i] != labels[q]][:2]
        request = f"mlt-{q}"
        store.record_query(request, "v", q, None, int(time.time() * 1000))
        store.record_reply(ReplyFacts(request, "v", tuple(same + other)), int(time.time() * 1000))
        for item in same:
            store.record_feedback(make_feedback("click", request_id=request, item_id=item, user_id="u"))
            n += 1
        for item in other:
            store.record_feedback(make_feedback("dismiss", request_id=request, item_id=item, user_id="u"))
            n += 1
    return n


def labels_of(card: ModelCard) -> dict[str, str]:
    from lookalike.catalog import iter_catalog

    return {item.item_id: item.metadata["articleType"] for item in iter_catalog(Path(card.training["config"]["data"]))}


def run_trainer(settings: TrainerSettings) -> tuple[threading.Event, threading.Thread]:
    from training.service import Trainer

    stop = threading.Event()
    thread = threading.Thread(target=Trainer(settings).run, args=(stop,), daemon=True)
    thread.start()
    return stop, thread


def publish_trigger(settings: TrainerSettings, generation: int) -> str:
    trigger = make_trigger("v", generation, [Reason("manual", "a test asks for a training", {"n": 1})])
    key, value = trigger.encode()
    producer = Producer(producer_config(settings))
    producer.produce(settings.triggers_topic, key=key, value=value)
    assert producer.flush(30) == 0
    return trigger.trigger_id


def test_trainer_refused_then_accepted(trainer_setup) -> None:  # type: ignore[no-untyped-def]
    settings, models, store, split, card, _ = trainer_setup
    assert make_pairs(store, split, labels_of(card)) == 24
    champion = models.aliases()[CHAMPION]
    versions_before = set(models.versions())

    # 1. a gate no challenger can pass: refused, and the champion stays
    refusing = settings.model_copy(update={"gate_margin": 1.0})
    stop, thread = run_trainer(refusing)
    try:
        first = publish_trigger(settings, generation=0)
        outcomes = wait_for(lambda: read_all(settings, settings.models_topic, idle_s=0.5), 240, "the trainer's outcome")
    finally:
        stop.set()
        thread.join(60)
    (msg,) = outcomes
    refused = json.loads(msg.value())
    assert refused["trigger_id"] == first and refused["outcome"] == "refused" and not refused["accepted"]
    assert "does not beat" in refused["reason"]
    assert refused["pairs"]["used"] > 0 and refused["pairs"]["given"] == 24
    assert models.aliases()[CHAMPION] == champion
    challenger = refused["challenger"]
    assert set(models.versions()) == versions_before | {challenger}
    recorded = Registry(models).decisions()[-1]
    assert recorded["challenger"] == challenger and not recorded["accepted"] and recorded["reason"] == refused["reason"]
    assert models.card(challenger).training["feedback_pairs"]["used"] == refused["pairs"]["used"]
    # same recipe, same seed: only the feedback pairs can have made other weights
    assert models.card(challenger).weights_sha256 != models.card(champion).weights_sha256
    last = store.last_training()
    assert last["generation"] == 1 and last["outcome"] == "refused"
    assert store.lease_holder() is None

    # 2. a stale trigger (raised before that training) is skipped; one read while another
    # trainer holds the lease waits for it (a killed trainer's lease expires), then trains
    stale = publish_trigger(settings, generation=0)
    assert store.acquire_lease("another-trainer", 30)
    busy = publish_trigger(settings, generation=1)
    accepting = settings.model_copy(update={"gate_margin": -1.0})
    stop, thread = run_trainer(accepting)
    try:
        wait_for(lambda: (store.trigger_record(busy) or {}).get("state") == "waiting", 60, "the trigger waiting")
        assert store.totals().get("trainer_skipped:stale") == 1 and store.trigger_record(stale)["state"] == "stale"
        assert store.trigger_record(busy)["holder"] == "another-trainer"
        assert len(read_all(settings, settings.models_topic, idle_s=0.5)) == 1  # no training meanwhile
        store.release_lease("another-trainer")
        outcomes = wait_for(lambda: [m for m in read_all(settings, settings.models_topic, idle_s=0.5)
                                     if json.loads(m.value())["trigger_id"] == busy], 240, "the second outcome")
    finally:
        stop.set()
        thread.join(60)
    accepted = json.loads(outcomes[0].value())
    assert accepted["outcome"] == "promoted" and accepted["accepted"]
    assert models.aliases()[CHAMPION] == accepted["challenger"] != champion
    assert accepted["champion_before"] == champion
    assert store.last_training()["generation"] == 2
    record = store.trigger_record(busy)
    assert (record["state"], record["outcome"], record["challenger"]) == ("done", "promoted", accepted["challenger"])
    assert stale not in {json.loads(m.value())["trigger_id"] for m in read_all(settings, settings.models_topic)}


def start_trainer(env: dict[str, str], log: Path, **extra: str) -> subprocess.Popen:
    """``python -m training.service`` as a child process, as the stack runs it."""
    with log.open("ab") as fh:
        return subprocess.Popen([sys.executable, "-m", "training.service"],
                                env={**os.environ, **env, "PYTHONUNBUFFERED": "1", **extra}, cwd=REPO,
                                stdout=fh, stderr=subprocess.STDOUT)


def staging_folders(models: ModelStore) -> list[str]:
    return [p.name for p in models.root.iterdir() if p.name.startswith(".")]


def test_sigterm_stops_a_training_within_10_s_and_the_next_start_trains_its_trigger(  # type: ignore[no-untyped-def]
        trainer_setup, tmp_path: Path) -> None:
    settings, models, store, _, _, env = trainer_setup
    versions_before = set(models.versions())
    log = tmp_path / "trainer-1.log"
    endless = start_trainer(env, log, LOOKALIKE_TRAINER_EPOCHS="100000")
    try:
        trigger = publish_trigger(settings, generation=0)
        wait_for(lambda: "epoch 3/100000" in log.read_text(), 120, "the training under way", logs=log)
        assert store.trigger_record(trigger)["state"] == "training"
        started = time.monotonic()
        endless.send_signal(signal.SIGTERM)
        code = endless.wait(30)
        took = time.monotonic() - started
    finally:
        if endless.poll() is None:
            endless.kill()
    assert code == 0 and took < 10, (code, took, log.read_text()[-2000:])
    assert set(models.versions()) == versions_before and not staging_folders(models)  # no half model
    record = store.trigger_record(trigger)
    assert record["state"] == "interrupted" and record["attempts"] == 1
    assert store.lease_holder() is None and store.last_training()["generation"] == 0
    assert read_all(settings, settings.models_topic, idle_s=0.5) == []

    again = start_trainer(env, tmp_path / "trainer-2.log")  # the recipe's 3 epochs
    try:
        outcomes = wait_for(lambda: read_all(settings, settings.models_topic, idle_s=0.5), 240, "the outcome",
                            logs=tmp_path / "trainer-2.log")
    finally:
        again.send_signal(signal.SIGTERM)
        again.wait(30)
    (outcome,) = outcomes
    assert json.loads(outcome.value())["trigger_id"] == trigger
    record = store.trigger_record(trigger)
    assert record["state"] == "done" and record["attempts"] == 2 and store.last_training()["generation"] == 1


def test_a_trainer_killed_after_storing_its_model_does_not_train_again(  # type: ignore[no-untyped-def]
        trainer_setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed between storing (and promoting) its challenger and recording the training:
    the trigger is read again; the next trainer waits out the dead one's lease, finds the
    model made for the trigger and finishes the bookkeeping with it; once recorded, reading
    the trigger yet again does nothing."""
    from training.service import Trainer

    settings, models, store, _, _, _ = trainer_setup
    settings = settings.model_copy(update={"gate_margin": -1.0})
    versions_before = set(models.versions())
    trigger = make_trigger("v", 0, [Reason("manual", "a test asks for a training", {"n": 1})])
    first = Trainer(settings)

    def killed(**_: Any) -> int:
        raise RuntimeError("killed before recording the training")

    monkeypatch.setattr(first.store, "record_training", killed)
    with pytest.raises(RuntimeError, match="killed"):
        first.handle(trigger)
    (challenger,) = set(models.versions()) - versions_before
    assert models.aliases()[CHAMPION] == challenger  # promoted before the kill
    assert store.acquire_lease(first.owner, settings.lease_ttl_s)  # a killed trainer's lease outlives it

    second = Trainer(settings)
    outcome = second.handle(trigger)
    assert outcome is not None and outcome["challenger"] == challenger and outcome["outcome"] == "promoted"
    assert set(models.versions()) == versions_before | {challenger}  # not trained again
    assert [d["challenger"] for d in Registry(models).decisions()].count(challenger) == 1  # nor judged again
    assert store.trigger_record(trigger.trigger_id)["state"] == "done" and store.last_training()["generation"] == 1
    assert Trainer(settings).handle(trigger) is None and store.totals()["trainer_skipped:handled"] == 1
    (published,) = read_all(settings, settings.models_topic, idle_s=0.5)
    assert json.loads(published.value())["challenger"] == challenger


def test_a_trigger_answered_by_something_newer_is_not_trained(trainer_setup) -> None:  # type: ignore[no-untyped-def]
    from lookalike.events import Trigger
    from training.service import Trainer

    settings, models, store, _, card, env = trainer_setup
    trainer = Trainer(settings)
    reasons = (Reason("manual", "a test asks for a training", {"n": 1}),)
    made_ms = int(datetime.fromisoformat(card.created_at).timestamp() * 1000)
    before_the_champion = Trigger(uuid.uuid4().hex, "v", 0, reasons, made_ms - 60_000)
    assert trainer.handle(before_the_champion) is None
    record = store.trigger_record(before_the_champion.trigger_id)
    assert record["state"] == "superseded" and card.version in record["why"]

    older = make_trigger("v", 0, reasons)
    newer = Trigger(uuid.uuid4().hex, "v", 0, reasons, older.timestamp_ms + 1)
    store.note_trigger(newer)  # raised by the aggregator, not yet read
    assert trainer.handle(older) is None
    record = store.trigger_record(older.trigger_id)
    assert record["state"] == "superseded" and newer.trigger_id in record["why"]
    assert store.totals()["trainer_skipped:superseded"] == 2 and store.lease_holder() is None
    assert [r["trigger_id"] for r in store.triggers()] == [newer.trigger_id, older.trigger_id,
                                                           before_the_champion.trigger_id]
    assert models.aliases()[CHAMPION] == card.version and read_all(settings, settings.models_topic, idle_s=0.5) == []
    listed = subprocess.run([sys.executable, "-m", "control.cli", "models", "list"], env={**os.environ, **env},
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.split("retraining triggers, newest first:")[1].strip().splitlines()
    assert [line.split()[0] for line in lines] == [newer.trigger_id[:12], older.trigger_id[:12],
                                                   before_the_champion.trigger_id[:12]]
    assert ": pending" in lines[0] and f"superseded (trigger {newer.trigger_id}" in lines[1]
    assert f"superseded (the champion {card.version}" in lines[2]


def test_cli_and_query_client_publish_feedback(cluster: Cluster, tmp_path: Path, throwaway: Callable[[], str]) -> None:
    from lookalike.settings import ClientSettings
    from producers.query_client import QueryClient

    env = env_for(cluster, throwaway(), tmp_path)
    settings: ClientSettings = settings_from(env, ClientSettings)
    ensure_topics(settings)
    run = [sys.executable, "-m", "control.cli", "feedback"]
    out = subprocess.run([*run, "click", "--request-id", "r9", "--item-id", "a", "b", "--user", "sess-1"],
                         env={**os.environ, **env}, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    bad = subprocess.run([*run, "click", "--request-id", "", "--item-id", "a", "--user", "sess-1"],
                         env={**os.environ, **env}, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "bad_feedback" in bad.stderr and "request_id" in bad.stderr

    reply = c.ok_reply("r10", [{"item_id": i, "score": 0.9, "metadata": {}} for i in ("x", "y", "z")],
                       model_version="v", index_version="v/1", index_position={}, timings_ms={})
    with QueryClient(settings, impressions_for="sess-2") as client:
        assert client.emit_impressions(reply, "sess-2") == 3
        assert client.emit_impressions({**reply, "status": "error"}, "sess-2") == 0

    records = read_all(settings, settings.feedback_topic)
    got = sorted((m.key().decode(), json.loads(m.value())["event"], json.loads(m.value())["item_id"]) for m in records)
    assert got == [("sess-1", "click", "a"), ("sess-1", "click", "b"), ("sess-2", "impression", "x"),
                   ("sess-2", "impression", "y"), ("sess-2", "impression", "z")]
