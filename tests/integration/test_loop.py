"""The feedback loop in the stack, as a user meets it: `lookalike services up` runs five
services, a query records its impressions by default, and one query plus one click give
a CTR@5 for the serving version in `lookalike metrics` within seconds."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from control.loop import settings_from
from control.services import SERVICES, LocalServices
from feedback.report import metrics_report
from feedback.store import FeedbackStore
from feedback.windows import ReplyFacts
from lookalike.artifacts import ModelCard
from lookalike.errors import ReplyTimeout
from lookalike.events import make_feedback
from lookalike.settings import ClientSettings, FeedbackSettings, StackSettings
from lookalike.status import wait_for_index
from lookalike.topics import ensure_topics
from producers.catalog_feed import CatalogFeed
from producers.query_client import QueryClient
from tests.conftest import Cluster
from tests.images import jpeg_bytes
from tests.integration.conftest import topic_env

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "control.cli", *args], env={**os.environ, **env}, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_the_services_impressions_by_default_and_ctr_after_one_click(
    cluster: Cluster, tiny_model: tuple[Path, ModelCard], tmp_path: Path, throwaway: Callable[[], str]
) -> None:
    models, card = tiny_model
    env = {
        **topic_env(throwaway()),  # removed after services.down()
        "LOOKALIKE_KAFKA_BOOTSTRAP": cluster.kafka_bootstrap,
        "LOOKALIKE_REDIS_URL": cluster.redis_url,
        "LOOKALIKE_MODEL_DIR": str(models),
        "LOOKALIKE_HOME": str(tmp_path),
        "LOOKALIKE_STACK_STATE_DIR": str(tmp_path / "services"),  # where `lookalike services` keeps its pid files
        "LOOKALIKE_GATEWAY_PORT": "0",  # any free port: tests run beside a demo's gateway
        "LOOKALIKE_TORCH_THREADS": "1",
        "LOOKALIKE_CATALOG_BATCH_WAIT_MS": "20",
        "PYTHONUNBUFFERED": "1",
    }
    settings = settings_from(ClientSettings, env)
    ensure_topics(settings)
    services = LocalServices(StackSettings(state_dir=tmp_path / "services"))
    assert list(SERVICES) == ["worker", "indexer", "feedback", "trainer", "gateway"]
    services.up(env=env)
    try:
        lines = cli(env, "services", "status").splitlines()
        assert [line.split()[:2] for line in lines] == [[name, "up"] for name in SERVICES], lines

        images = {f"item-{i:02d}": jpeg_bytes(seed=i, size=(32, 32)) for i in range(12)}
        feed = CatalogFeed(settings)
        for item_id, image in images.items():
            feed.publish(item_id, image, {"title": item_id})
        feed.flush()
        wait_for_index(len(images), 120, settings=settings, group=env["LOOKALIKE_INDEXER_GROUP"])
        with QueryClient(settings, impressions=False) as client:  # warm-up: shows nothing to anyone
            deadline = time.monotonic() + 90
            while True:
                assert time.monotonic() < deadline, {n: services.daemon(n).log_tail() for n in SERVICES}
                try:
                    if client.ask(images["item-00"], timeout_s=5)["status"] == "ok":
                        break
                except ReplyTimeout:
                    pass

        # One CLI query (impressions by default) and one click on its first result.
        photo = tmp_path / "photo.jpg"
        photo.write_bytes(images["item-03"])
        out = cli(env, "query", str(photo))
        first = re.search(r"^1\.\s+(\S+)", out, re.M)
        said = re.search(r"^request (\S+)\s+impressions recorded for user (\S+):", out, re.M)
        assert first and said, out
        request_id, user = said.groups()
        clicked = time.monotonic()
        cli(env, "feedback", "click", "--request-id", request_id, "--item-id", first.group(1), "--user", user)

        feedback = settings_from(FeedbackSettings, env)

        def serving_metrics() -> dict:
            return metrics_report(feedback)["models"].get(card.version) or {}

        deadline = time.monotonic() + 30
        while serving_metrics().get("ctr_at_5") is None or serving_metrics().get("clicks", 0) < 1:
            assert time.monotonic() < deadline, (serving_metrics(), services.daemon("feedback").log_tail())
            time.sleep(0.3)
        took = time.monotonic() - clicked
        m = serving_metrics()
        assert (m["impressions"], m["clicks"]) == (5, 1), m  # the warm-up recorded no impressions
        assert m["replies"] >= 2, m  # its replies count (volume), the CLI's query too
        assert m["ctr_at_5"] == pytest.approx(1 / 5) and m["mean_click_rank"] == 1.0
        row = next(line for line in cli(env, "metrics").splitlines() if line.startswith(card.version))
        assert row.split()[5] == "0.200", row  # the CTR@5 column
        assert took < 30

        # The library's default, the same: a query records one impression per result, keyed by its session.
        with QueryClient(settings) as client:
            reply = client.ask(images["item-07"], timeout_s=10)
            assert reply["status"] == "ok" and len(reply["results"]) == 5
            assert client.impressions_for == client.session_id and client.impressions_failed == 0
        deadline = time.monotonic() + 30
        while serving_metrics().get("impressions") != 10:
            assert time.monotonic() < deadline, serving_metrics()
            time.sleep(0.3)
        assert serving_metrics()["ctr_at_5"] == pytest.approx(1 / 10)

        # `lookalike shoppers` on a plain folder of photos: every query answered, impressions recorded.
        photos = tmp_path / "photos"
        photos.mkdir()
        for item_id, image in list(images.items())[:6]:
            (photos / f"{item_id}.jpg").write_bytes(image)
        out = cli(env, "shoppers", "--data", str(photos), "--queries", "6", "--rate", "4", "--lanes", "2")
        summary = out.strip().splitlines()[-1]
        asked = int(summary.split()[0])
        assert asked >= 6 and summary.endswith(" 0 failed"), out
        deadline = time.monotonic() + 30
        while serving_metrics().get("impressions", 0) < 10 + 5 * asked:
            assert time.monotonic() < deadline, serving_metrics()
            time.sleep(0.3)
    finally:
        services.down()
    assert all(services.daemon(name).pid() is None for name in SERVICES)


def test_feedback_on_a_more_like_this_query_waits_for_its_reply(cluster: Cluster, throwaway: Callable[[], str]) -> None:
    """The query-vector record of a "more like this" query can be read before its reply: the
    lookup then holds only the query item. Feedback arriving in between waits for the reply
    (it used to be drained at once and crash the aggregator's agent on the missing model version)."""
    settings = FeedbackSettings(redis_url=cluster.redis_url, feedback_group=throwaway())
    store = FeedbackStore.connect(settings)
    now = int(time.time() * 1000)
    store.record_query("r1", "m1", "q-item", None, now)
    shown = make_feedback("impression", request_id="r1", item_id="a", user_id="u", timestamp_ms=now)
    click = make_feedback("click", request_id="r1", item_id="a", user_id="u", timestamp_ms=now + 1)
    assert store.record_feedback(shown) == "pending" and store.record_feedback(click) == "pending"
    outcomes = store.record_reply(ReplyFacts("r1", "m1", ("a", "b")), now)
    assert [(e.event, o) for e, o in outcomes] == [("impression", "applied"), ("click", "applied")]
    m = store.window_metrics("m1", store.buckets("m1"), None)
    assert (m["impressions"], m["clicks"], m["ctr_at_5"]) == (1, 1, 1.0)
    assert [(p["query_item"], p["item_id"], p["label"]) for p in store.pairs()] == [("q-item", "a", 1)]
