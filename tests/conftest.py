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

import pytest


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
    from lookalike.stack import LocalStack

    stack = LocalStack()
    was_running = stack.kafka.running() and stack.redis.answers()
    stack.up()
    yield Cluster(stack.kafka.bootstrap, stack.redis.url, "local stack")
    if not was_running and os.environ.get("LOOKALIKE_TESTS_KEEP_STACK") != "1":
        stack.down()
