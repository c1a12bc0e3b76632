"""`lookalike stack gc` on the real broker and Redis: a dry run lists a run's leftovers and
removes nothing, --apply removes them, and names in production's namespaces stay."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from lookalike.cleanup import counts, find, list_groups
from lookalike.clients import confluent_config, redis_client
from lookalike.settings import CommonSettings
from lookalike.topics import TopicSpec, ensure_topics
from tests.conftest import Cluster

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def commit_group(settings: CommonSettings, group: str, topic: str) -> None:
    """A consumer group with a committed offset and no members (what a stopped service leaves)."""
    consumer = Consumer(confluent_config(settings, **{"group.id": group, "enable.auto.commit": False}))
    try:
        consumer.commit(offsets=[TopicPartition(topic, 0, 0)], asynchronous=False)
    finally:
        consumer.close()


def gc(settings: CommonSettings, *args: str) -> str:
    env = {**os.environ, "LOOKALIKE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
           "LOOKALIKE_REDIS_URL": settings.redis_url.get_secret_value()}
    done = subprocess.run([sys.executable, "-m", "control.cli", "stack", "gc", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture
def names(cluster: Cluster) -> Iterator[tuple[CommonSettings, str, dict[str, list[str]], dict[str, list[str]]]]:
    """A run's topics, groups and keys under a test prefix, and production-like ones beside them
    (in ``lookalike.``/``lookalike-``/``lookalike:`` namespaces, some with the prefix deeper in the
    name); the production-like ones are removed by this fixture, never by gc."""
    settings = CommonSettings(kafka_bootstrap=cluster.kafka_bootstrap, redis_url=cluster.redis_url)
    run, prefix = uuid.uuid4().hex[:8], f"test-{uuid.uuid4().hex[:10]}"
    throwaway = {"topics": [f"{prefix}.catalog", f"{prefix}.catalog.vectors.v1"], "groups": [f"{prefix}-worker"],
                 "keys": [f"lookalike:rollout:{prefix}.catalog", f"lookalike:indexers:{prefix}-indexer",
                          f"lookalike:feedback:{prefix}-feedback:req:r1"]}
    kept = {"topics": [f"lookalike.gc-{run}", f"lookalike.replies.{prefix}"], "groups": [f"lookalike-gc-{run}"],
            "keys": [f"lookalike:rollout:lookalike.gc-{run}", f"lookalike:indexer:lookalike-gc-{run}:{prefix}-host",
                     f"lookalike:feedback:lookalike-gc-{run}:req:{prefix}"]}
    client = redis_client(settings)
    try:
        ensure_topics(settings, [TopicSpec(t, 1) for t in throwaway["topics"] + kept["topics"]])
        commit_group(settings, throwaway["groups"][0], throwaway["topics"][0])
        commit_group(settings, kept["groups"][0], kept["topics"][0])
        for key in throwaway["keys"] + kept["keys"]:
            client.set(key, "1", ex=600)
        yield settings, prefix, throwaway, kept
    finally:
        admin = AdminClient(confluent_config(settings))
        for future in admin.delete_topics(kept["topics"] + throwaway["topics"], operation_timeout=30).values():
            future.exception()  # gone already (gc did it) is fine
        for future in admin.delete_consumer_groups(kept["groups"] + throwaway["groups"], request_timeout=30).values():
            future.exception()
        client.unlink(*kept["keys"], *throwaway["keys"])


def test_gc_lists_in_a_dry_run_removes_with_apply_and_leaves_production_names(names) -> None:  # type: ignore[no-untyped-def]
    settings, prefix, throwaway, kept = names
    before = counts(settings)

    # The default prefixes: a dry run, so safe beside other tests' runs; -v lists every name, as a
    # broker holding other runs' leftovers lists more than the first 20 of each kind.
    listed = gc(settings, "-v")
    for name in throwaway["topics"] + throwaway["groups"] + throwaway["keys"]:
        assert f" {name}\n" in listed, listed
    for name in kept["topics"] + kept["groups"] + kept["keys"]:
        assert f" {name}\n" not in listed, listed
    assert counts(settings) == before  # nothing removed
    assert find(settings, [prefix]).summary() == "2 topics, 1 consumer groups, 3 Redis keys"

    applied = gc(settings, "--apply", "--prefix", prefix)  # only this test's own prefix
    assert "removed: 2 topics, 1 consumer groups, 3 Redis keys" in applied, applied
    assert not find(settings, [prefix])
    after = counts(settings)
    assert (after.topics, after.groups, after.keys) == (before.topics - 2, before.groups - 1, before.keys - 3)

    admin = AdminClient(confluent_config(settings))
    assert set(kept["topics"]) <= set(admin.list_topics(timeout=10).topics)
    groups = set(list_groups(admin))
    assert set(kept["groups"]) <= groups and not set(throwaway["groups"]) & groups
    assert redis_client(settings).exists(*kept["keys"]) == len(kept["keys"])
