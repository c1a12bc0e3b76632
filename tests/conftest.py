"""Shared fixtures. Servers are found in this order:

1. ``LOOKALIKE_KAFKA_BOOTSTRAP`` (and ``LOOKALIKE_REDIS_URL``): an existing cluster;
2. a reachable Docker engine: testcontainers starts Kafka (KRaft) and Redis;
3. otherwise the project's local stack (Kafka from Maven Central jars, redis-server).

Integration tests use random topic and group names, so they never see each other's
messages and can run against a shared cluster.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lookalike.artifacts import ModelCard, ModelStore


@dataclass(frozen=True)
class Cluster:
    kafka_bootstrap: str
    redis_url: str
    how: str


def docker_available() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """A real Kafka broker and a real Redis server for the whole session."""
    if os.environ.get("LOOKALIKE_KAFKA_BOOTSTRAP"):
        yield Cluster(
            os.environ["LOOKALIKE_KAFKA_BOOTSTRAP"],
            os.environ.get("LOOKALIKE_REDIS_URL", "redis://127.0.0.1:6379/0"),
            "existing cluster from the environment",
        )
        return
    if docker_available() and os.environ.get("LOOKALIKE_TESTS_NO_DOCKER") != "1":
        from testcontainers.kafka import KafkaContainer
        from testcontainers.redis import RedisContainer

        from lookalike.settings import StackSettings

        version = StackSettings().kafka_version
        with KafkaContainer(f"apache/kafka:{version}") as kafka, RedisContainer("redis:7") as redis_:
            host, port = redis_.get_container_host_ip(), redis_.get_exposed_port(6379)
            yield Cluster(kafka.get_bootstrap_server(), f"redis://{host}:{port}/0", "testcontainers")
        return
    from control.stack import LocalStack

    stack = LocalStack()
    was_running = stack.kafka.running() and stack.redis.answers()
    stack.up()
    yield Cluster(stack.kafka.bootstrap, stack.redis.url, "local stack")
    if not was_running and os.environ.get("LOOKALIKE_TESTS_KEEP_STACK") != "1":
        stack.down()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModelCard]:
    """A small embedder trained for a few seconds on generated shapes (the real one is `lookalike train`)."""
    from training.synthetic import make_synthetic_catalog
    from training.train import TrainConfig, train

    root = tmp_path_factory.mktemp("tiny-model")
    data = make_synthetic_catalog(root / "data", classes=4, per_class=16, size=32, seed=3)
    config = TrainConfig(
        data=data, min_count=2, size=32, channels=(8, 16), embedding_dim=256, epochs=3, batch_size=16,
        patience=None, cache_dir=root / "cache", threads=2, shoot_augment=False,  # flips only, as calibrated
        # The random split, as before the split by period (the synthetic shapes have no periods).
        # With the period split's batch of 15, torch 2.14.1 on 2 threads corrupted its heap in
        # these 8-channel channels-last convolutions; such narrow nets now train in the plain
        # layout (training/train.py: MIN_CHANNELS_LAST_WIDTH).
        split="random", test_fraction=0.2,
    )
    store = ModelStore(root / "models")
    card = train(config, store, progress=False)
    return store.root, card
