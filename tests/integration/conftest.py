"""The pipeline fixture: a worker and an indexer on random topics, with a tiny trained model.

Every name a test makes carries a prefix of its own (``test-…``), and what it made under it
(topics, consumer groups, Redis keys: lookalike.cleanup) is removed when it is done, passed or
failed: by :func:`stop_pipeline` once the services are stopped, or by the ``throwaway``
fixture for tests without a pipeline."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lookalike.artifacts import ModelCard
from lookalike.cleanup import remove_prefix
from lookalike.errors import ReplyTimeout
from lookalike.settings import ClientSettings, CommonSettings
from lookalike.status import indexer_status, wait_for_index
from lookalike.topics import ensure_topics, naming_env
from producers.catalog_feed import CatalogFeed
from producers.query_client import QueryClient
from tests.conftest import Cluster

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Pipeline:
    """A running worker + indexer pair on this test module's own topics."""

    settings: ClientSettings
    env: dict[str, str]
    prefix: str  # every topic and group name of this pipeline starts with it
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)
    service_env: dict[str, dict[str, str]] = field(default_factory=dict)  # per service, over env (e.g. its own Kafka user)

    def feed(self) -> CatalogFeed:
        return CatalogFeed(self.settings)

    def client(self, **kwargs) -> QueryClient:  # type: ignore[no-untyped-def]
        return QueryClient(self.settings, **kwargs)

    def log_text(self, name: str) -> str:
        return self.logs[name].read_text(errors="replace")

    def logs_tail(self, chars: int = 3000) -> str:
        return "\n".join(f"--- {name}\n{self.log_text(name)[-chars:]}" for name in self.logs)

    def start(self, name: str) -> subprocess.Popen:
        """Start ``worker`` or ``indexer``; ``worker-2`` etc. start another member of the same group,
        ``shard-N`` an indexer (its shard settings in ``service_env``)."""
        from control.services import module_of  # the indexer is onehop with LOOKALIKE_QUERY_EMBEDDING=indexer

        service = {"shard": "indexer"}.get(name.split("-")[0], name.split("-")[0])
        module = module_of(service, self.env)
        self.logs.setdefault(name, Path(self.env["LOOKALIKE_HOME"]) / f"{name}.log")
        with self.logs[name].open("ab") as fh:
            env = {**self.env, **self.service_env.get(name, {})}
            self.procs[name] = subprocess.Popen([sys.executable, "-m", module], env=env, cwd=REPO,
                                                stdout=fh, stderr=subprocess.STDOUT)
        return self.procs[name]

    def kill(self, name: str) -> None:
        """SIGKILL: no shutdown hooks, no flush, like a crash."""
        proc = self.procs[name]
        proc.kill()
        proc.wait(timeout=30)

    def status(self, name: str = "indexer") -> dict | None:
        """What the running indexer process (not an earlier, killed one) last published."""
        pid = self.procs[name].pid
        for status in indexer_status(self.settings, self.env["LOOKALIKE_INDEXER_GROUP"]):
            if status.instance.endswith(f"-{pid}"):
                return status
        return None

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs.values())


def wait_status(pipeline: Pipeline, predicate, timeout_s: float, what: str,  # type: ignore[no-untyped-def]
                name: str = "indexer") -> dict:
    """Poll the running indexer's (or ``name``'s) status until ``predicate(status)``; fail with the logs."""
    deadline = time.monotonic() + timeout_s
    status = None
    while time.monotonic() < deadline:
        assert pipeline.alive(), pipeline.logs_tail()
        status = pipeline.status(name)
        if status and predicate(status):
            return status
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout_s}s; last status {status}\n{pipeline.logs_tail()}")


def topic_env(prefix: str) -> dict[str, str]:
    """This test's own topics and groups (every one the services read: lookalike.topics.naming_env)."""
    return {
        **naming_env(prefix),
        "LOOKALIKE_PARTITIONS": "2",
        # Tests run side by side on one host: no metrics endpoints unless a test asks for one.
        "LOOKALIKE_WORKER_METRICS_PORT": "0",
        "LOOKALIKE_INDEXER_METRICS_PORT": "0",
    }


def start_pipeline(cluster: Cluster, models: Path, workdir: Path, extra_env: dict[str, str] | None = None, *,
                   prefix: str | None = None, service_env: dict[str, dict[str, str]] | None = None,
                   create_topics: bool = True) -> Pipeline:
    """``create_topics=False``: the caller created them (e.g. as an admin on a broker with ACLs)."""
    prefix = prefix or f"test-{uuid.uuid4().hex[:10]}"
    env = {
        **os.environ,
        **topic_env(prefix),
        "LOOKALIKE_KAFKA_BOOTSTRAP": cluster.kafka_bootstrap,
        "LOOKALIKE_REDIS_URL": cluster.redis_url,
        "LOOKALIKE_MODEL_DIR": str(models),
        "LOOKALIKE_HOME": str(workdir),
        "LOOKALIKE_TORCH_THREADS": "1",
        "LOOKALIKE_CATALOG_BATCH_WAIT_MS": "20",
        "LOOKALIKE_MIN_POSITION_WAIT_S": "2",
        "PYTHONUNBUFFERED": "1",
        **(extra_env or {}),
    }
    settings = ClientSettings(**{k[len("LOOKALIKE_"):].lower(): v for k, v in env.items()
                                 if k.startswith("LOOKALIKE_") and k[len("LOOKALIKE_"):].lower() in ClientSettings.model_fields})
    if create_topics:
        ensure_topics(settings)
    pipeline = Pipeline(settings, env, prefix, service_env=service_env or {})
    for name in ("worker", "indexer"):
        pipeline.logs[name] = workdir / f"{name}.log"
        pipeline.start(name)
    return pipeline


def stop_services(pipeline: Pipeline) -> None:
    """SIGTERM the services still running (SIGKILL after 30 s); what they made stays."""
    for proc in pipeline.procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in pipeline.procs.values():
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def stop_pipeline(pipeline: Pipeline, *, clean: bool = True) -> None:
    """Stop the services, then remove the pipeline's topics, groups and Redis keys (``clean``;
    not where its broker and Redis are private ones that go away with it)."""
    stop_services(pipeline)
    if clean:
        left = remove_prefix(pipeline.settings, pipeline.prefix)
        assert not left, f"{pipeline.prefix}: not removed: {left}"


def cluster_settings(cluster: Cluster) -> CommonSettings:
    """Settings that reach the session's broker and Redis."""
    return CommonSettings(kafka_bootstrap=cluster.kafka_bootstrap, redis_url=cluster.redis_url)


@pytest.fixture
def throwaway(cluster: Cluster) -> Iterator[Callable[[], str]]:
    """``throwaway()`` is a new prefix for this test's own names; at teardown, passed or failed,
    whatever the broker and Redis hold under it is removed (a fixture that runs services on it
    depends on this one, so it has stopped them by then)."""
    made: list[str] = []

    def new() -> str:
        made.append(f"test-{uuid.uuid4().hex[:10]}")
        return made[-1]

    yield new
    settings = cluster_settings(cluster)
    left = {prefix: remove_prefix(settings, prefix) for prefix in made}
    assert not any(left.values()), f"not removed: {left}"


def warm_up(pipeline: Pipeline, image: bytes, timeout_s: float = 90) -> None:
    """Publish one item and ask for it until the whole path answers (groups joined, model loaded)."""
    feed = pipeline.feed()
    feed.publish("warm-up", image, {"title": "warm-up"})
    feed.flush()
    wait_for_index(1, timeout_s, settings=pipeline.settings, group=pipeline.env["LOOKALIKE_INDEXER_GROUP"])
    deadline = time.monotonic() + timeout_s
    with pipeline.client() as client:
        while time.monotonic() < deadline:
            assert pipeline.alive(), "a service died:\n" + pipeline.logs_tail()
            try:
                reply = client.ask(image, timeout_s=5)
            except ReplyTimeout:  # not answering yet
                continue
            if reply["status"] == "ok":
                return
    raise AssertionError("the pipeline did not answer:\n" + pipeline.logs_tail())


@pytest.fixture(scope="module")
def pipeline(
    cluster: Cluster, tiny_model: tuple[Path, ModelCard], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pipeline]:
    from tests.images import jpeg_bytes

    models, _card = tiny_model
    running = start_pipeline(cluster, models, tmp_path_factory.mktemp("pipeline"))
    try:
        warm_up(running, jpeg_bytes(seed=999))
        yield running
    finally:
        stop_pipeline(running)
