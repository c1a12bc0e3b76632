"""Index durability: snapshots in Redis, exact recovery after kill -9, corrupt snapshots, Redis away."""

from __future__ import annotations

import hashlib
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from indexer.snapshot import SnapshotError, SnapshotStore
from lookalike.snapshots import snapshot_namespace
from tests.conftest import Cluster
from tests.images import jpeg_bytes
from tests.integration.conftest import Pipeline, start_pipeline, stop_pipeline, wait_status, warm_up
from tests.integration.steady import SteadyStream

pytestmark = pytest.mark.integration

SNAPSHOT_ENV = {
    "LOOKALIKE_SNAPSHOT_INTERVAL_S": "1",
    "LOOKALIKE_SNAPSHOT_EVERY_ITEMS": "200",
    "LOOKALIKE_SNAPSHOT_CHUNK_BYTES": "65536",  # many chunks: a snapshot takes long enough to be killed mid-write
    "LOOKALIKE_STATUS_DIGEST": "1",
    "LOOKALIKE_STATUS_INTERVAL_S": "0.5",
    "LOOKALIKE_CATALOG_BATCH_MAX": "128",
}


def digest(ids: set[str]) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()


def small_image(seed: int) -> bytes:
    return jpeg_bytes(seed, size=(32, 32))


def snapshot_store(pipeline: Pipeline, cluster_redis: str, version: str | None = None) -> SnapshotStore:
    """The snapshots of the serving model's index (or of ``version``'s)."""
    client = redis.Redis.from_url(cluster_redis)
    version = version or pipeline.status().model_version
    return SnapshotStore(client, snapshot_namespace(pipeline.env["LOOKALIKE_INDEXER_GROUP"], version))


@pytest.fixture
def snapshotting(cluster: Cluster, tiny_model, tmp_path: Path) -> Iterator[Pipeline]:  # type: ignore[no-untyped-def]
    running = start_pipeline(cluster, tiny_model[0], tmp_path, SNAPSHOT_ENV)
    try:
        warm_up(running, small_image(10_000))
        yield running
    finally:
        stop_pipeline(running)


def catalog_script(rng: random.Random, items: int) -> tuple[list[tuple[str, int | None]], dict[str, int]]:
    """Upserts of every item, then updates, tombstones and re-adds: (item id, image seed or None)."""
    events: list[tuple[str, int | None]] = [(f"c{i}", i) for i in range(items)]
    ids = [f"c{i}" for i in range(items)]
    for item_id in rng.sample(ids, items // 5):
        events.append((item_id, rng.randrange(10**6, 2 * 10**6)))
    removed = rng.sample(ids, items // 7)
    events += [(item_id, None) for item_id in removed]
    events += [(item_id, rng.randrange(2 * 10**6, 3 * 10**6)) for item_id in removed[: len(removed) // 5]]
    latest: dict[str, int] = {"warm-up": 10_000}
    for item_id, seed in events:
        if seed is None:
            latest.pop(item_id, None)
        else:
            latest[item_id] = seed
    return events, latest


def test_kill_9_at_random_moments_recovers_the_exact_catalog(snapshotting: Pipeline, cluster: Cluster) -> None:
    pipeline = snapshotting
    rng = random.Random(20261127)
    events, latest = catalog_script(rng, items=2000)
    store = snapshot_store(pipeline, cluster.redis_url)

    def publish() -> None:
        feed = pipeline.feed()
        for start in range(0, len(events), 150):
            for item_id, seed in events[start : start + 150]:
                if seed is None:
                    feed.remove(item_id)
                else:
                    feed.publish(item_id, small_image(seed), {"seed": seed})
            feed.flush()
            time.sleep(0.4)

    publisher = threading.Thread(target=publish)
    publisher.start()
    kills = {"random": 0, "mid_snapshot": 0}
    try:
        # Random kills while the catalog streams in.
        for _ in range(3):
            time.sleep(rng.uniform(0.5, 2.5))
            pipeline.kill("indexer")
            kills["random"] += 1
            pipeline.start("indexer")
        # Kills while a snapshot is being written: chunks of an id that is not (yet) in the history.
        deadline = time.monotonic() + 60
        while kills["mid_snapshot"] < 2 and time.monotonic() < deadline:
            known = set(store.history())
            writing = {k.decode().split(":")[3] for k in store.client.scan_iter(f"{store.ns}:*:index:*", count=1000)}
            if writing - known - {"current", "history"}:
                pipeline.kill("indexer")
                kills["mid_snapshot"] += 1
                pipeline.start("indexer")
                time.sleep(1.0)
            time.sleep(0.002)
    finally:
        publisher.join()

    status = wait_status(
        pipeline, lambda s: s.caught_up and s.items_digest == digest(set(latest)), 120,
        "the restarted indexer serving exactly the catalog",
    )
    assert status.items == len(latest)
    assert kills["random"] == 3
    assert kills["mid_snapshot"] >= 1, "no kill landed during a snapshot write"
    log = pipeline.log_text("indexer")
    assert "restored snapshot" in log

    # Each sampled item answers to its latest image, and removed items to nothing.
    removed = {item_id for item_id, seed in events if seed is None} - set(latest)
    with pipeline.client() as client:
        for item_id in rng.sample(sorted(latest), 25):
            reply = client.ask(small_image(latest[item_id]), k=3, timeout_s=10)
            assert reply["status"] == "ok"
            assert any(h["item_id"] == item_id and h["score"] > 0.9999 for h in reply["results"]), (item_id, reply)
        for item_id in rng.sample(sorted(removed), 10):
            seed = max(s for i, s in events if i == item_id and s is not None)
            reply = client.ask(small_image(seed), k=10, timeout_s=10)
            assert item_id not in {h["item_id"] for h in reply["results"]}


def test_corrupted_chunk_is_refused_and_recovery_is_still_exact(snapshotting: Pipeline, cluster: Cluster) -> None:
    pipeline = snapshotting
    latest = {"warm-up"}
    feed = pipeline.feed()
    for i in range(300):
        feed.publish(f"k{i}", small_image(50_000 + i), {})
        latest.add(f"k{i}")
    feed.flush()
    wait_status(pipeline, lambda s: s.snapshot_items == len(latest) and s.items_digest == digest(latest),
                60, "a snapshot of every item")
    store = snapshot_store(pipeline, cluster.redis_url)
    for snapshot_id in store.history():  # every snapshot is broken: recovery must replay the catalog
        store.client.setrange(f"{store.ns}:{snapshot_id}:index:0", 100, b"\x00\xff\x00\xff")
        with pytest.raises(SnapshotError, match="checksum"):
            store.read(snapshot_id)
    pipeline.kill("indexer")
    pipeline.start("indexer")
    wait_status(pipeline, lambda s: s.caught_up and s.items_digest == digest(latest), 60,
                "recovery from the catalog")
    log = pipeline.log_text("indexer")
    assert "fails its checksum" in log and "full replay" in log


def test_redis_away_30s_queries_go_on_and_snapshots_resume(cluster: Cluster, tiny_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import shutil

    from control.stack.local import RedisServer
    from lookalike.settings import StackSettings

    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server to start and stop a private Redis")
    private = RedisServer(StackSettings(redis_port=26399, state_dir=tmp_path / "redis"))
    private.up()
    pipeline = start_pipeline(cluster, tiny_model[0], tmp_path, {**SNAPSHOT_ENV, "LOOKALIKE_REDIS_URL": private.url})
    try:
        warm_up(pipeline, small_image(10_000))
        feed = pipeline.feed()
        for i in range(50):
            feed.publish(f"r{i}", small_image(70_000 + i), {})
        feed.flush()
        before = wait_status(pipeline, lambda s: s.snapshot_items == 51, 60, "a snapshot of 51 items").snapshot

        private.down()  # Redis away for 30 s, a steady stream of queries all along
        away_since = time.monotonic()
        known = [(small_image(70_000 + i), f"r{i}") for i in range(50)]
        stream = SteadyStream(pipeline.settings, known, rate=5, duration_s=30, drain_s=20).start()
        with pipeline.client() as client:
            for i in range(50, 70):
                feed.publish(f"r{i}", small_image(70_000 + i), {})
            feed.flush()
            deadline = time.monotonic() + 20
            answered = 0
            while time.monotonic() < deadline and answered < 20:
                reply = client.ask(small_image(70_000 + 50 + answered), timeout_s=10)
                assert reply["status"] == "ok"
                if reply["results"][0]["item_id"] == f"r{50 + answered}":
                    answered += 1
            assert answered == 20, "items published while Redis was away are served"
        report = stream.join()
        assert time.monotonic() - away_since >= 30 and not private.answers(), "Redis was away all along"
        print(f"\nRedis away for {time.monotonic() - away_since:.0f}s: steady stream {report}")
        assert report.sent >= 140
        assert report.answered == report.sent and report.ok_and_right == report.sent, report
        assert pipeline.alive()
        assert "cannot publish status to Redis" in pipeline.log_text("indexer")

        private.up()  # back, empty (no persistence): the next snapshot lands there
        status = wait_status(pipeline, lambda s: s.snapshot != before and s.snapshot_items == 71, 60,
                             "snapshots resuming")
        pipeline.kill("indexer")
        pipeline.start("indexer")
        wait_status(pipeline, lambda s: s.caught_up and s.items == 71, 60, "recovery after Redis returned")
        assert f"restored snapshot {status.snapshot}" in pipeline.log_text("indexer")
    finally:
        stop_pipeline(pipeline)
        private.down()


def test_snapshot_of_another_model_is_refused(snapshotting: Pipeline, cluster: Cluster) -> None:
    """Each model version's snapshots live under its own key; one that still claims another
    model (or dimension) there is refused, and the older, genuine one is used."""
    pipeline = snapshotting
    feed = pipeline.feed()
    for i in range(20):
        feed.publish(f"m{i}", small_image(90_000 + i), {})
    feed.flush()
    wait_status(pipeline, lambda s: s.snapshot_items == 21, 60, "a snapshot of every item")
    version = pipeline.status().model_version
    pipeline.kill("indexer")
    store = snapshot_store(pipeline, cluster.redis_url, version)
    genuine = store.read(store.current())
    forged = store.write(genuine.index_bytes, genuine.items_bytes, genuine.manifest.facts(),
                         model_version="20990101T000000Z-00000000")
    pipeline.start("indexer")
    status = wait_status(pipeline, lambda s: s.caught_up and s.items == 21, 60, "recovery")
    log = pipeline.log_text("indexer")
    assert f"snapshot {forged.id} refused" in log and f"this index is for {version}" in log
    assert f"restored snapshot {genuine.manifest.id}" in log
    assert status.model_version == version
