"""Blue/green model rollout on a real broker and a real Redis server.

The registry's gate refuses a worse challenger (nothing changes) and promotes a better
one; the workers re-embed the catalog with it into a new index while the old one keeps
answering; one switch moves the queries over; a rollback returns the same way. A stream
of queries runs through all of it and must get only ``ok`` replies, each answered by an
index of the model that embedded it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lookalike import rollout
from lookalike.artifacts import ModelCard, ModelStore
from lookalike.catalog import iter_catalog
from lookalike.errors import ReplyTimeout
from lookalike.registry import Registry
from tests.conftest import Cluster
from tests.images import jpeg_bytes
from tests.integration.conftest import Pipeline, start_pipeline, stop_pipeline, wait_status, warm_up
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

ROLLOUT_ENV = {
    "LOOKALIKE_ROLLOUT_POLL_S": "0.3",
    "LOOKALIKE_ROLLOUT_GRACE_S": "5",
    "LOOKALIKE_STATUS_INTERVAL_S": "0.3",
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelStore, ModelCard, ModelCard, ModelCard]:
    """Three tiny models on the same generated catalog and split: the first (made champion by
    the gate, there being none), a worse one (fewer channels and epochs), a better one."""
    from training.synthetic import make_synthetic_catalog
    from training.train import TrainConfig, train

    root = tmp_path_factory.mktemp("rollout-models")
    data = make_synthetic_catalog(root / "data", classes=6, per_class=16, size=32, seed=3)
    store = ModelStore(root / "models")

    def tiny(epochs: int, channels: tuple[int, ...]) -> ModelCard:
        config = TrainConfig(data=data, min_count=2, size=32, channels=channels, embedding_dim=256, epochs=epochs,
                             batch_size=16, patience=None, cache_dir=root / "cache", threads=1,
                             shoot_augment=False)  # flips only, as the worse/better models were calibrated
        return train(config, store, progress=False)

    first, worse, better = tiny(2, (4, 16)), tiny(1, (4, 8)), tiny(4, (8, 16))
    return store, first, worse, better


class QueryStream(threading.Thread):
    """Asks for catalog images one after another until stopped; keeps every reply."""

    def __init__(self, pipeline: Pipeline, images: list[bytes]) -> None:
        super().__init__(daemon=True)
        self.pipeline, self.images = pipeline, images
        self.replies: list[dict] = []
        self.timeouts = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        with self.pipeline.client() as client:
            i = 0
            while not self.stopping.is_set():
                try:
                    self.replies.append(client.ask(self.images[i % len(self.images)], timeout_s=10))
                except ReplyTimeout:
                    self.timeouts += 1
                i += 1

    def versions_seen(self) -> list[str]:
        """The model versions of the replies, consecutive repeats collapsed."""
        out: list[str] = []
        for reply in self.replies:
            if not out or out[-1] != reply["model_version"]:
                out.append(reply["model_version"])
        return out

    def wait_for_version(self, version: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.replies and self.replies[-1]["model_version"] == version:
                return
            time.sleep(0.1)
        raise AssertionError(f"no reply from model {version} within {timeout_s}s; seen {self.versions_seen()}")


@pytest.fixture
def running(cluster: Cluster, models, tmp_path: Path) -> Iterator[Pipeline]:  # type: ignore[no-untyped-def]
    running = start_pipeline(cluster, models[0].root, tmp_path, ROLLOUT_ENV)
    try:
        warm_up(running, jpeg_bytes(seed=999, size=(32, 32)))
        yield running
    finally:
        stop_pipeline(running)


def test_gate_then_blue_green_switch_and_rollback(running: Pipeline, models) -> None:  # type: ignore[no-untyped-def]
    store, first, worse, better = models
    p5 = {card.version: card.metrics["precision_at_5"] for card in (first, worse, better)}
    assert p5[worse.version] < p5[first.version] < p5[better.version], p5  # the premise of the test
    registry = Registry(store)
    redis_client = rollout.redis_client(running.settings)

    images = {f"item-{i:03d}": jpeg_bytes(seed=i, size=(32, 32)) for i in range(40)}
    feed = running.feed()
    for item_id, image in images.items():
        feed.publish(item_id, image, {"title": item_id})
    feed.flush()
    with running.client() as client:
        assert client.ask(images["item-000"], min_position=feed.positions, timeout_s=20)["status"] == "ok"
    wait_status(running, lambda s: s.model_version == first.version and s.items == 41, 30, "the first index")

    stream = QueryStream(running, list(images.values()))
    stream.start()
    try:
        # A worse challenger is refused, its numbers recorded, and nothing moves.
        refused = registry.propose(worse.version)
        assert not refused.accepted and "does not beat" in refused.reason
        assert registry.decisions()[-1]["challenger"] == worse.version and not registry.decisions()[-1]["accepted"]
        time.sleep(2)
        state = rollout.read_state(redis_client, running.settings)
        assert state is not None and state.serving == first.version and state.target is None
        assert set(running.status().versions) == {first.version}

        # A better one is promoted: the catalog is re-embedded into its own index, then one switch.
        accepted = registry.propose(better.version)
        assert accepted.accepted, accepted.reason
        status = wait_status(running, lambda s: s.model_version == better.version, 90, "the switch to the better model")
        assert status.items == 41 and status.target_version == ""
        stream.wait_for_version(better.version, 30)
        with running.client() as client:
            for item_id in list(images)[:10]:
                reply = client.ask(images[item_id], timeout_s=10)
                assert reply["model_version"] == better.version
                assert reply["results"][0]["item_id"] == item_id

        # Rollback goes back the same way (the first model's topic and offsets are still there).
        registry.rollback()
        wait_status(running, lambda s: s.model_version == first.version, 90, "the switch back")
        stream.wait_for_version(first.version, 30)
        # An item published after the rollback is served by the restored index.
        feed.publish("item-late", jpeg_bytes(seed=1000, size=(32, 32)), {"title": "late"})
        feed.flush()
        with running.client() as client:
            reply = client.ask(jpeg_bytes(seed=1000, size=(32, 32)), min_position=feed.positions, timeout_s=20)
        assert reply["status"] == "ok" and reply["results"][0]["item_id"] == "item-late"
        assert reply["model_version"] == first.version
    finally:
        stream.stopping.set()
        stream.join(timeout=30)

    bad = [r for r in stream.replies if r["status"] != "ok"]
    assert not bad, f"{len(bad)} of {len(stream.replies)} replies were not ok, e.g. {bad[:3]}"
    assert stream.timeouts == 0
    # Each reply was answered by an index of the model that embedded its query.
    assert all(r["index_version"].startswith(r["model_version"] + "/") for r in stream.replies)
    assert stream.versions_seen() == [first.version, better.version, first.version]
    assert len(stream.replies) > 50
    events = [e["event"] for e in reversed(rollout.read_events(redis_client, running.settings))]
    assert events == ["init", "start", "switch", "start", "switch"], events


FEEDBACK_ENV = {
    **ROLLOUT_ENV,
    "LOOKALIKE_POLICY_INTERVAL_S": "0.5",
    "LOOKALIKE_TRIGGER_MIN_FEEDBACK": "20",  # the one reason on: 20 feedback events since the last training
    "LOOKALIKE_TRIGGER_DROP_FRACTION": "0",
    "LOOKALIKE_TRIGGER_CATALOG_GROWTH": "0",
    "LOOKALIKE_TRIGGER_DRIFT": "0",
    "LOOKALIKE_TRAINER_EPOCHS": "4",  # the champion's recipe (2 epochs) trained longer: a better challenger
    "LOOKALIKE_TRAINER_THREADS": "1",
}


def test_feedback_triggers_training_promotion_and_a_live_switch(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The whole loop on the real broker and Redis: feedback over the threshold -> one
    trigger -> the trainer trains a challenger and the gate promotes it -> the catalog is
    re-embedded into a new index -> replies come from the new model; a query stream gets
    only ok replies, each from a consistent model/index pair."""
    from producers.feedback import FeedbackProducer
    from training.synthetic import make_synthetic_catalog
    from training.train import TrainConfig, train

    data = make_synthetic_catalog(tmp_path / "data", classes=6, per_class=16, size=32, seed=3)
    store = ModelStore(tmp_path / "models")
    champion = train(TrainConfig(data=data, min_count=2, size=32, channels=(4, 16), embedding_dim=256, epochs=2,
                                 batch_size=16, patience=None, cache_dir=tmp_path / "cache", threads=1),
                     store, progress=False)
    (tmp_path / "run").mkdir()
    running = start_pipeline(cluster, store.root, tmp_path / "run", FEEDBACK_ENV)
    stream = None
    try:
        warm_up(running, jpeg_bytes(seed=999, size=(32, 32)))
        running.start("feedback")
        running.start("trainer")
        # The live catalog is the training data, so clicks name items the trainer knows.
        items = list(iter_catalog(data))
        images = {item.item_id: Path(item.image_path).read_bytes() for item in items}
        feed = running.feed()
        feed.publish_items(items)
        feed.flush()
        with running.client() as client:
            def served() -> dict | None:  # a loaded box may need more than one min-position wait (not_ready)
                reply = client.ask(images[items[0].item_id], min_position=feed.positions, timeout_s=20)
                assert reply["status"] == "ok" or reply["error"]["code"] == "not_ready", reply
                return reply if reply["status"] == "ok" else None

            wait_for(served, 120, "the published catalog served", running)
        stream = QueryStream(running, list(images.values()))
        stream.start()

        # Shoppers click: 10 "more like this" replies, two clicks each -> 20 events.
        feedback = FeedbackProducer(running.settings)
        with running.client() as client:
            for item_id in list(images)[:10]:
                reply = client.ask(None, item_id=item_id, timeout_s=10)
                assert reply["status"] == "ok" and reply["model_version"] == champion.version
                for hit in reply["results"][:2]:
                    feedback.emit("click", request_id=reply["request_id"], item_id=hit["item_id"], user_id="sess-1")
        feedback.flush(10)

        registry = Registry(store)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(d["action"] == "promote" and d["challenger"] != champion.version
                                                      for d in registry.decisions()):
            assert running.alive(), running.logs_tail()
            time.sleep(0.5)
        decision = [d for d in registry.decisions() if d["challenger"] != champion.version][-1]
        assert decision["accepted"], decision
        challenger = decision["challenger"]
        assert decision["challenger_value"] >= decision["champion_value"] + decision["margin"]
        status = wait_status(running, lambda s: s.model_version == challenger, 90, "the switch to the retrained model")
        assert status.items == len(items) + 1  # and the warm-up item
        stream.wait_for_version(challenger, 30)
        assert store.card(challenger).training["feedback_pairs"]["used"] > 0  # it learned from the clicks
    finally:
        if stream is not None:
            stream.stopping.set()
            stream.join(timeout=30)
        stop_pipeline(running)

    assert stream is not None and len(stream.replies) > 20
    bad = [r for r in stream.replies if r["status"] != "ok"]
    assert not bad, f"{len(bad)} of {len(stream.replies)} replies were not ok, e.g. {bad[:3]}"
    assert all(r["index_version"].startswith(r["model_version"] + "/") for r in stream.replies)
    assert stream.versions_seen() == [champion.version, challenger]
