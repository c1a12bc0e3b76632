"""Index durability: snapshots in Redis, exact recovery after kill -9 (of the indexer, and of
the worker mid-ingestion) checked item by item against a fresh replay, corrupt and forged
snapshots, one snapshot writer among replicas, Redis away."""

from __future__ import annotations

import hashlib
import json
import random
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from indexer.snapshot import SnapshotError
from lookalike.topics import topic_delete_retention_ms
from tests.conftest import Cluster
from tests.images import jpeg_bytes
from tests.integration.conftest import Pipeline, start_pipeline, stop_pipeline, wait_status, warm_up
from tests.integration.consistency import (
    SNAPSHOT_ENV,
    assert_same_items,
    ends_of,
    fresh_replay,
    indexer_settings,
    snapshot_at,
    snapshot_store,
)
from tests.integration.steady import SteadyStream
from tests.waiting import wait_for

pytestmark = pytest.mark.integration


def digest(ids: set[str]) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()


def small_image(seed: int) -> bytes:
    return jpeg_bytes(seed, size=(32, 32))


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
        # Kills while a snapshot is being written: chunks of an id that is not (yet) in the
        # history. (The id is the first part after the namespace; new items keep snapshots coming.)
        deadline = time.monotonic() + 90
        filler, next_filler = pipeline.feed(), time.monotonic()
        while kills["mid_snapshot"] < 2 and time.monotonic() < deadline:
            if time.monotonic() >= next_filler:
                item_id, seed = f"f{len(latest)}", 4 * 10**6 + len(latest)
                filler.publish(item_id, small_image(seed), {"seed": seed})
                filler.flush()
                latest[item_id] = seed
                next_filler = time.monotonic() + 0.5
            known = set(store.history())
            chunk_keys = store.client.scan_iter(f"{store.ns}:*:index:*", count=1000)
            writing = {k.decode()[len(store.ns) + 1 :].split(":", 1)[0] for k in chunk_keys}
            if writing - known:
                pipeline.kill("indexer")
                kills["mid_snapshot"] += 1
                pipeline.start("indexer")
                time.sleep(1.0)
            time.sleep(0.002)
    finally:
        publisher.join()

    # One item after the last kill: the snapshot that holds it is the running process's memory.
    feed = pipeline.feed()
    feed.publish("sentinel", small_image(3 * 10**6), {"seed": 3 * 10**6})
    feed.flush()
    latest["sentinel"] = 3 * 10**6
    settings = indexer_settings(pipeline)
    catalog_end = ends_of(settings, settings.catalog_topic)
    status = wait_status(
        pipeline, lambda s: s.caught_up and s.items_digest == digest(set(latest))
        and all(s.catalog_position.get(p, 0) >= end for p, end in catalog_end.items() if end), 120,
        "the restarted indexer serving exactly the catalog, every catalog record reflected",
    )
    assert status.items == len(latest)
    assert kills["random"] == 3
    assert kills["mid_snapshot"] >= 1, "no kill landed during a snapshot write"
    log = pipeline.log_text("indexer")
    assert "restored snapshot" in log

    # Item by item, vector and metadata: the recovered index is what a fresh replay builds.
    replayed, ends, repeats = fresh_replay(pipeline, status.model_version)
    recovered = snapshot_at(pipeline, store, ends, 120)
    assert_same_items(recovered, replayed)
    assert {i: recovered.metadata(i).get("seed") for i in latest if i != "warm-up"} == \
        {i: seed for i, seed in latest.items() if i != "warm-up"}
    print(f"\nkill -9 of the indexer: {kills}; {len(latest)} items equal to a fresh replay of {sum(ends.values())} "
          f"vector records ({repeats} repeated upserts)")

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
    pipeline.kill("indexer")  # first: a live writer would replace the broken snapshots with good ones
    current, *older = store.history()
    # The current one re-signed by someone without the key (its item count raised), every
    # older one with a corrupted chunk: recovery must replay the catalog.
    envelope = json.loads(store.client.get(f"{store.ns}:{current}:manifest"))
    body = json.loads(envelope["manifest"])
    body["item_count"] += 1
    envelope["manifest"] = json.dumps(body)
    envelope["mac"] = hashlib.sha256(envelope["manifest"].encode()).hexdigest()
    store.client.set(f"{store.ns}:{current}:manifest", json.dumps(envelope))
    with pytest.raises(SnapshotError, match="MAC does not verify"):
        store.read(current)
    for snapshot_id in older:
        store.client.setrange(f"{store.ns}:{snapshot_id}:index:0", 100, b"\x00\xff\x00\xff")
        with pytest.raises(SnapshotError, match="checksum"):
            store.read(snapshot_id)
    pipeline.start("indexer")
    wait_status(pipeline, lambda s: s.caught_up and s.items_digest == digest(latest), 60,
                "recovery from the catalog")
    log = pipeline.log_text("indexer")
    assert f"snapshot {current} refused: snapshot {current}: manifest MAC does not verify" in log
    assert all(f"snapshot {i} refused" in log for i in older) and "full replay" in log
    assert "restored snapshot" not in log
    if older:
        assert "fails its checksum" in log


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
    lease = store.lease("test", ttl_s=30)
    wait_for(lease.acquire, 30, "the killed indexer's writer lease lapsing")
    forged = store.write(genuine.index_bytes, genuine.items_bytes, genuine.manifest.facts(), lease=lease,
                         model_version="20990101T000000Z-00000000")
    lease.release()
    pipeline.start("indexer")
    status = wait_status(pipeline, lambda s: s.caught_up and s.items == 21, 60, "recovery")
    log = pipeline.log_text("indexer")
    assert f"snapshot {forged.id} refused" in log and f"this index is for {version}" in log
    assert f"restored snapshot {genuine.manifest.id}" in log
    assert status.model_version == version


def test_kill_9_of_the_worker_mid_ingestion_loses_and_duplicates_nothing(cluster: Cluster, tiny_model,  # type: ignore[no-untyped-def]
                                                                          tmp_path: Path) -> None:
    """The worker is killed while catalog records are waiting to be embedded; the restarted
    one takes over. Every live item ends up once, with its latest image's vector and
    metadata, equal item by item to a fresh replay; removed items stay removed."""
    pipeline = start_pipeline(cluster, tiny_model[0], tmp_path, {**SNAPSHOT_ENV, "LOOKALIKE_SESSION_TIMEOUT_S": "6"})
    try:
        warm_up(pipeline, small_image(10_000))
        rng = random.Random(20261130)
        events, latest = catalog_script(rng, items=900)
        settings = indexer_settings(pipeline)

        def publish() -> None:
            # Bursts of more than two catalog batches, spread over the kills: a worker that has
            # just moved the index still has the rest of its burst waiting. (Small steady chunks
            # let a fast worker keep up, or take the whole script before the third kill.)
            feed = pipeline.feed()
            for start in range(0, len(events), 150):
                for item_id, seed in events[start : start + 150]:
                    if seed is None:
                        feed.remove(item_id)
                    else:
                        feed.publish(item_id, small_image(seed), {"seed": seed})
                feed.flush()
                time.sleep(4.0)

        def reflected() -> int:
            status = pipeline.status()
            return sum(status.catalog_position.values()) if status else 0

        def waiting() -> int:
            return sum(ends_of(settings, settings.catalog_topic).values()) - reflected()

        publisher = threading.Thread(target=publish)
        publisher.start()
        waiting_at_kill = []
        try:
            for _ in range(3):  # kill a worker that is embedding: the index moved since it (re)started
                before = reflected()
                wait_for(lambda before=before: reflected() > before and waiting() > 0, 120,
                         "the worker making progress with records still waiting", pipeline, alive=True)
                waiting_at_kill.append(waiting())
                pipeline.kill("worker")
                pipeline.start("worker")
        finally:
            publisher.join()
        catalog_end = ends_of(settings, settings.catalog_topic)
        status = wait_status(pipeline, lambda s: all(s.catalog_position.get(p, 0) >= end
                                                     for p, end in catalog_end.items() if end),
                             180, "every catalog record reflected in the index")
        print(f"\nkill -9 of the worker: catalog records not yet in the index at each kill: {waiting_at_kill}")
        assert sum(1 for n in waiting_at_kill if n > 0) >= 2, f"kills did not land mid-ingestion: {waiting_at_kill}"
        assert status.items == len(latest) and status.items_digest == digest(set(latest))

        replayed, ends, repeats = fresh_replay(pipeline, status.model_version)
        recovered = snapshot_at(pipeline, snapshot_store(pipeline, cluster.redis_url), ends, 120)
        assert_same_items(recovered, replayed)
        seeds = {i: recovered.metadata(i).get("seed") for i in recovered.item_ids() if i != "warm-up"}
        assert seeds == {i: seed for i, seed in latest.items() if i != "warm-up"}, "an item holds an older image"
        print(f"{len(latest)} items, each with its latest image, equal to a fresh replay of {sum(ends.values())} "
              f"vector records ({repeats} repeated upserts from re-embedded batches)")
    finally:
        stop_pipeline(pipeline)


def test_two_replicas_one_snapshot_writer(snapshotting: Pipeline, cluster: Cluster) -> None:
    """Two indexers of one group hold the same index: one holds the writer lease and writes,
    the other never rewrites (it used to take the other's snapshot for lost, every interval,
    forever); killed, the writer is replaced by the other once its lease lapses."""
    pipeline = snapshotting
    pipeline.start("indexer-2")
    feed = pipeline.feed()
    for i in range(30):
        feed.publish(f"w{i}", small_image(40_000 + i), {})
    feed.flush()
    for name in ("indexer", "indexer-2"):
        wait_status(pipeline, lambda s: s.caught_up and s.items == 31, 90, f"{name} holding every item", name=name)
    store = snapshot_store(pipeline, cluster.redis_url)
    host = socket.gethostname()
    owners = {f"{host}-{pipeline.procs[name].pid}": name for name in ("indexer", "indexer-2")}

    def writer() -> str | None:
        holder = store.client.get(f"{store.ns}:writer")
        return owners.get(holder.decode().split("/")[0]) if holder else None

    first = wait_for(writer, 30, "a snapshot writer")
    other = "indexer-2" if first == "indexer" else "indexer"
    wait_status(pipeline, lambda s: s.snapshot_items == 31, 60, "a snapshot of every item", name=first)
    current, history = store.current(), store.history()
    time.sleep(6 * float(SNAPSHOT_ENV["LOOKALIKE_SNAPSHOT_INTERVAL_S"]))  # no change: nothing to write
    assert store.current() == current and store.history() == history, "snapshots rewritten with nothing changed"
    assert writer() == first
    assert "snapshot writer of" not in pipeline.log_text(other)
    assert not re.search(r"snapshot \S+ of \S+: \d+ items,", pipeline.log_text(other)), "the other replica wrote"

    pipeline.kill(first)
    del pipeline.procs[first]  # dead on purpose: the waits below check the others are alive
    feed.publish("w-after", small_image(40_100), {})
    feed.flush()
    wait_status(pipeline, lambda s: s.items == 32 and s.snapshot_items == 32, 60,
                "the other replica taking over the snapshots", name=other)
    assert writer() == other and "snapshot writer of" in pipeline.log_text(other)


def test_a_snapshot_older_than_the_tombstone_retention_is_not_used(snapshotting: Pipeline, cluster: Cluster) -> None:
    """The vector topic keeps tombstones for delete.retention.ms (set explicitly); a snapshot
    older than that less the margin is refused and the topic replayed from the start. Here
    the margin leaves a snapshot one second of life (24 h retention, margin 24 h - 1 s)."""
    pipeline = snapshotting
    feed = pipeline.feed()
    for i in range(20):
        feed.publish(f"t{i}", small_image(60_000 + i), {})
    feed.remove("t3")
    feed.flush()
    status = wait_status(pipeline, lambda s: s.snapshot_items == 20 and s.items == 20, 60, "a snapshot of 20 items")
    settings = indexer_settings(pipeline)
    vectors = f"{settings.catalog_vectors_topic}.{status.model_version}"
    assert topic_delete_retention_ms(settings, vectors) == settings.delete_retention_ms == 24 * 3600 * 1000
    assert topic_delete_retention_ms(settings, settings.catalog_topic) == settings.delete_retention_ms

    pipeline.kill("indexer")
    store = snapshot_store(pipeline, cluster.redis_url, status.model_version)
    current = store.current()
    pipeline.service_env["indexer"] = {"LOOKALIKE_SNAPSHOT_RETENTION_MARGIN_S": str(24 * 3600 - 1)}
    wait_for(lambda: time.time() - store.read_manifest(current).created_at > 1.5, 10, "the snapshot older than 1 s")
    pipeline.start("indexer")
    wait_status(pipeline, lambda s: s.caught_up and s.items == 20 and s.items_digest ==
                digest({"warm-up", *(f"t{i}" for i in range(20) if i != 3)}), 60, "recovery by a full replay")
    log = pipeline.log_text("indexer")
    assert f"snapshot {current} refused: " in log and "tombstones compacted since may be missing" in log
    assert "full replay" in log
    assert log.count("restored snapshot") == 0
