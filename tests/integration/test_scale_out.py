"""Scale-out: a second worker joins the consumer group, the partitions are shared, and every
query is still answered with the right item first; the metrics endpoints show both workers
doing the work. On a real broker, with a tiny model."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from lookalike.artifacts import ModelCard
from lookalike.clients import confluent_config
from tests.conftest import Cluster
from tests.images import jpeg_bytes
from tests.integration.conftest import REPO, Pipeline, start_pipeline, stop_pipeline, warm_up
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

ITEMS = 24


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int, path: str = "/metrics") -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5).read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{") or line.startswith(f"{name} "):
            sample, _, value = line.rpartition(" ")
            got = sample[len(name):].strip("{}")
            if ",".join(sorted(got.split(","))) == want:
                return float(value)
    return 0.0


def assignment(pipeline: Pipeline) -> dict[str, set[tuple[str, int]]]:
    """member -> the (topic, partition)s it holds, over the workers' two groups: queries (the
    runtime's queries group) and the serving model version's catalog group (lookalike/rollout.py).
    Members are told apart by their client host and id prefix, the same in both groups."""
    admin = AdminClient(confluent_config(pipeline.settings))
    queries_group = pipeline.env["LOOKALIKE_WORKER_GROUP"]
    status = pipeline.status()
    if not status or not status.model_version:
        return {}
    catalog_group = f"{queries_group}.catalog.{status.model_version}"
    out: dict[str, set[tuple[str, int]]] = {}
    for group in (queries_group, catalog_group):
        description = admin.describe_consumer_groups([group])[group].result(timeout=10)
        for m in description.members:
            held = {(tp.topic, tp.partition) for tp in (m.assignment.topic_partitions if m.assignment else [])}
            out.setdefault(f"{group}/{m.member_id}", set()).update(held)
    return out


@pytest.fixture(scope="module")
def two_workers(cluster: Cluster, tiny_model: tuple[Path, ModelCard],
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Pipeline, list[int], int]]:
    models, _card = tiny_model
    workdir = tmp_path_factory.mktemp("scale-out")
    ports = [free_port(), free_port()]
    indexer_port = free_port()
    pipeline = start_pipeline(cluster, models, workdir, extra_env={
        "LOOKALIKE_PARTITIONS": "4", "LOOKALIKE_WORKER_METRICS_PORT": str(ports[0]),
        "LOOKALIKE_INDEXER_METRICS_PORT": str(indexer_port), "LOOKALIKE_LOG_FORMAT": "json"})
    try:
        warm_up(pipeline, jpeg_bytes(seed=999))
        pipeline.logs["worker2"] = workdir / "worker2.log"
        with pipeline.logs["worker2"].open("ab") as fh:
            pipeline.procs["worker2"] = subprocess.Popen(
                [sys.executable, "-m", "workers"], env={**pipeline.env, "LOOKALIKE_WORKER_METRICS_PORT": str(ports[1])},
                cwd=REPO, stdout=fh, stderr=subprocess.STDOUT)
        yield pipeline, ports, indexer_port
    finally:
        stop_pipeline(pipeline)


def ask_all(pipeline: Pipeline, images: dict[str, bytes]) -> dict[str, dict]:
    """Send every query first, then collect the replies: the workers see a stream, not one at a time."""
    with pipeline.client() as client:
        sent = {client.send(image, k=3): item_id for item_id, image in images.items()}
        return {item_id: client.wait(request_id, timeout_s=30) for request_id, item_id in sent.items()}


def test_two_workers_share_partitions_and_answer_correctly(two_workers) -> None:  # type: ignore[no-untyped-def]
    pipeline, ports, indexer_port = two_workers
    topics = {pipeline.env["LOOKALIKE_CATALOG_TOPIC"], pipeline.env["LOOKALIKE_QUERIES_TOPIC"]}

    def shared() -> dict | None:
        members = assignment(pipeline)
        for topic in topics:  # in each group, two members split the topic's 4 partitions between them
            held = [{tp for tp in tps if tp[0] == topic} for tps in members.values()]
            held = [h for h in held if h]
            if len(held) != 2 or set().union(*held) != {(topic, p) for p in range(4)} or held[0] & held[1]:
                return None
        return members

    wait_for(shared, 60, "two members sharing every partition of catalog and of queries", pipeline, alive=True)

    feed = pipeline.feed()
    images = {f"scale-{uuid.uuid4().hex[:6]}-{i}": jpeg_bytes(seed=5000 + i) for i in range(ITEMS)}
    for item_id, image in images.items():
        feed.publish(item_id, image, {"title": item_id})
    feed.flush()
    with pipeline.client() as client:  # read your writes: wait until the index holds them all
        client.ask(None, item_id=next(iter(images)), min_position=dict(feed.positions), timeout_s=30)

    replies = ask_all(pipeline, images)
    wrong = {i: r.get("error") or [h["item_id"] for h in r["results"]] for i, r in replies.items()
             if r["status"] != "ok" or r["results"][0]["item_id"] != i}
    assert not wrong

    # Both workers embedded catalog images and queries (keys hash over the 4 partitions).
    for port in ports:
        text = scrape(port)
        assert metric(text, "lookalike_records_total", service="worker", kind="catalog") > 0, port
        assert metric(text, "lookalike_records_total", service="worker", kind="query") > 0, port
        assert json.loads(scrape(port, "/healthz"))["status"] == "ok"
    # The state gauges are refreshed every few seconds.
    indexer = wait_for(lambda: (lambda t: t if metric(t, "lookalike_index_items") >= ITEMS + 1 else None)(
        scrape(indexer_port)), 15, "the index size gauge to show every item", pipeline, alive=True)
    assert metric(indexer, "lookalike_stage_seconds_count", service="indexer", stage="total") >= ITEMS
    assert json.loads(scrape(indexer_port, "/healthz"))["caught_up"] is True
    # JSON logs carry request ids; the worker logs are JSON objects line by line.
    first_json = next(line for line in pipeline.log_text("worker").splitlines() if line.startswith("{"))
    assert json.loads(first_json)["service"] == "worker"


def test_a_worker_leaves_and_the_other_takes_over(two_workers) -> None:  # type: ignore[no-untyped-def]
    pipeline, _ports, _indexer_port = two_workers
    proc = pipeline.procs.pop("worker2")
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    def one_left() -> bool:
        members = [tps for tps in assignment(pipeline).values() if tps]
        return len(members) == 2 and all(len(tps) == 4 for tps in members)  # one member per group, all 4 each

    wait_for(one_left, 60, "the remaining worker holding every partition", pipeline, alive=True)
    feed = pipeline.feed()
    images = {f"after-{uuid.uuid4().hex[:6]}-{i}": jpeg_bytes(seed=7000 + i) for i in range(8)}
    for item_id, image in images.items():
        feed.publish(item_id, image, {"title": item_id})
    feed.flush()
    with pipeline.client() as client:
        client.ask(None, item_id=next(iter(images)), min_position=dict(feed.positions), timeout_s=30)
    replies = ask_all(pipeline, images)
    assert all(r["status"] == "ok" and r["results"][0]["item_id"] == i for i, r in replies.items()), replies
