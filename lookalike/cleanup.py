"""Throwaway names: the topics, consumer groups and Redis keys that tests, benchmarks and
loop runs make under a prefix of their own, how to find what they left, and how to remove it.

A run's names all carry its prefix (``lookalike.topics.naming_env``): topics
``{prefix}.catalog``, groups ``{prefix}-worker``, and Redis keys whose owner (the group or
topic a ``lookalike:{kind}:{owner}:...`` key belongs to) is one of those names. Production
names (the settings' defaults, ``lookalike.*`` and ``lookalike-*``) never carry one of these
prefixes, and :func:`check_prefix` refuses a prefix that could reach them.

The services that use a prefix must be stopped before it is removed: a running worker
would make its topics again, and a group with members cannot be deleted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from lookalike.clients import confluent_config, redis_client
from lookalike.errors import ConfigError
from lookalike.settings import CommonSettings

log = logging.getLogger(__name__)

# What tests (test-, and sec-/acl-/compose- on their private brokers), benchmarks (bench-) and
# `lookalike demo --loop` (lookalike-loop-) put in front of every name they make.
THROWAWAY_PREFIXES: tuple[str, ...] = ("test-", "bench-", "sec-", "acl-", "compose-", "lookalike-loop-")
UNLINK_BATCH = 500


@dataclass(frozen=True)
class Leftovers:
    """Names found under some prefixes (or, after :func:`remove`, the ones that stayed)."""

    topics: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.topics or self.groups or self.keys)

    def under(self, prefix: str) -> Leftovers:
        """The part of these names that carries ``prefix``."""
        return Leftovers([t for t in self.topics if carries(t, [prefix])], [g for g in self.groups if carries(g, [prefix])],
                         [k for k in self.keys if key_carries(k, [prefix])])

    def summary(self) -> str:
        return f"{len(self.topics)} topics, {len(self.groups)} consumer groups, {len(self.keys)} Redis keys"


@dataclass(frozen=True)
class Counts:
    """What a broker and a Redis database hold: the figures a run must leave as it found them."""

    topics: int  # without Kafka's internal ones (__consumer_offsets appears with the first group)
    groups: int
    keys: int  # DBSIZE

    def __str__(self) -> str:
        return f"topics {self.topics} groups {self.groups} redis-keys {self.keys}"


def production_names() -> set[str]:
    """Every topic, group, reply prefix and client id a deployment has by default: the names
    (and, by extension, e.g. ``lookalike.catalog.vectors.{version}``, ``lookalike-indexer.shard-0``)
    that cleaning must never reach."""
    from lookalike import settings as s

    names = set()
    for cls in (s.CommonSettings, s.WorkerSettings, s.IndexerSettings, s.ClientSettings, s.FeedbackSettings,
                s.TrainerSettings):
        for name, f in cls.model_fields.items():
            if name.endswith(("_topic", "_group", "_topic_prefix")) or name == "client_id":
                names.add(str(f.default))
    return names


def check_prefix(prefix: str) -> str:
    """``prefix``, or ConfigError when it could match a production name: one that is the start
    of such a name (``lookalike``, ``lookalike.``) or lies inside one's namespace
    (``lookalike-indexer.``), Kafka's internal topics, or nothing at all."""
    if not prefix or prefix.startswith("_"):
        raise ConfigError(f"prefix {prefix!r} would match Kafka's internal topics or everything")
    for name in production_names():
        if name.startswith(prefix) or prefix.startswith(name):
            raise ConfigError(f"prefix {prefix!r} could match the production name {name!r}")
    return prefix


def carries(name: str, prefixes: Iterable[str]) -> bool:
    """Does a topic or group name start with one of ``prefixes``?"""
    return name.startswith(tuple(prefixes))


def key_owner(key: str) -> str:
    """The name a Redis key belongs to: the group or topic of ``lookalike:{kind}:{owner}:...``
    (rollout state, indexer status, snapshots, feedback, rate limits), else its first part
    (``test-ratelimit:...``). Deeper parts are ids (instances, requests) that may look like
    anything, so only the owner decides."""
    parts = key.split(":")
    return parts[2] if parts[0] == "lookalike" and len(parts) > 2 else parts[0]


def key_carries(key: str, prefixes: Iterable[str]) -> bool:
    return key_owner(key).startswith(tuple(prefixes))


def _glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis MATCH pattern."""
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


def matching_keys(client: Any, prefixes: Sequence[str]) -> list[str]:
    """The Redis keys whose owner carries one of ``prefixes``, by SCAN (never KEYS: a big
    keyspace would block the server). MATCH narrows what comes back; :func:`key_carries` decides."""
    found: set[str] = set()
    for prefix in prefixes:
        literal = _glob_escape(prefix)
        for pattern in (f"{literal}*", f"lookalike:*:{literal}*"):
            for raw in client.scan_iter(match=pattern, count=1000):
                key = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
                if key_carries(key, prefixes):
                    found.add(key)
    return sorted(found)


def unlink(client: Any, keys: Sequence[str]) -> int:
    """UNLINK ``keys`` in batches (the memory is freed off the main thread); the number removed."""
    removed = 0
    for i in range(0, len(keys), UNLINK_BATCH):
        removed += int(client.unlink(*keys[i:i + UNLINK_BATCH]))
    return removed


def unlink_matching(client: Any, pattern: str) -> int:
    """UNLINK the keys of a SCAN MATCH ``pattern`` (a caller's own, e.g. its request ids)."""
    return unlink(client, [k.decode() if isinstance(k, bytes) else k for k in client.scan_iter(match=pattern, count=1000)])


def find(settings: CommonSettings, prefixes: Sequence[str], timeout_s: float = 30.0) -> Leftovers:
    """What the broker and Redis of ``settings`` hold under ``prefixes`` (each checked first)."""
    prefixes = [check_prefix(p) for p in prefixes]
    admin = _admin(settings)
    topics = sorted(t for t in admin.list_topics(timeout=timeout_s).topics if carries(t, prefixes))
    groups = sorted(g for g in list_groups(admin, timeout_s) if carries(g, prefixes))
    keys = matching_keys(redis_client(settings), prefixes)
    return Leftovers(topics, groups, keys)


def remove(settings: CommonSettings, leftovers: Leftovers, wait_s: float = 30.0) -> Leftovers:
    """Delete what ``leftovers`` names; returns what stayed (a group whose members did not
    leave within ``wait_s``: a killed consumer stays a member until its session times out)."""
    admin = _admin(settings)
    deadline = time.monotonic() + wait_s
    _delete_topics(admin, leftovers.topics, deadline)
    groups_left = _delete_groups(admin, leftovers.groups, deadline)
    unlink(redis_client(settings), leftovers.keys)
    topics_left = sorted(set(leftovers.topics) & set(admin.list_topics(timeout=10).topics))
    return Leftovers(topics_left, groups_left, [])


def _delete_topics(admin: AdminClient, topics: Sequence[str], deadline: float) -> None:
    """Delete ``topics`` and wait until the broker no longer lists them (a count right after
    must not see them)."""
    if not topics:
        return
    for topic, future in admin.delete_topics(list(topics), operation_timeout=30).items():
        try:
            future.result(timeout=max(1.0, deadline - time.monotonic()))
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise KafkaException(KafkaError(exc.args[0].code(), f"deleting topic {topic}: {exc.args[0].str()}")) from exc
    while time.monotonic() < deadline and set(topics) & set(admin.list_topics(timeout=10).topics):
        time.sleep(0.2)


def _delete_groups(admin: AdminClient, groups: Sequence[str], deadline: float) -> list[str]:
    """Delete ``groups``, trying again while one still has members; returns those that kept them."""
    left = list(groups)
    while left:
        still = []
        for group, future in admin.delete_consumer_groups(left, request_timeout=10).items():
            try:
                future.result(timeout=15)
            except KafkaException as exc:
                code = exc.args[0].code()
                if code == KafkaError.NON_EMPTY_GROUP:
                    still.append(group)
                elif code != KafkaError.GROUP_ID_NOT_FOUND:
                    raise
        left = still
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(1.0)
    if left:
        log.warning("consumer groups still have members, not deleted: %s", left)
    return sorted(left)


def list_groups(admin: AdminClient, timeout_s: float = 30.0) -> list[str]:
    """Every consumer group the broker knows. A broker just started answers ListGroups with
    COORDINATOR_LOAD_IN_PROGRESS while it reads ``__consumer_offsets`` back, and the groups
    listed then are none of the stored ones: asked again until no error comes with the list,
    and an error still there at ``timeout_s`` is raised, never counted as zero groups."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = max(1.0, deadline - time.monotonic())
        listed = admin.list_consumer_groups(request_timeout=left).result(timeout=left)
        if not listed.errors:
            return [g.group_id for g in listed.valid]
        if time.monotonic() >= deadline:
            error = listed.errors[0]
            error = error.args[0] if isinstance(error, KafkaException) else error
            raise KafkaException(KafkaError(error.code(), f"listing consumer groups: {error.str()}"))
        time.sleep(0.5)


def _admin(settings: CommonSettings) -> AdminClient:
    # librdkafka logs each failed connect attempt (20 a second while the broker is away); the
    # calls here fail with one exception instead, which the CLI turns into one line.
    return AdminClient(confluent_config(settings) | {"log_level": 2})


def remove_prefix(settings: CommonSettings, prefix: str, wait_s: float = 30.0) -> Leftovers:
    """Remove everything under one run's ``prefix`` (its services stopped); returns what stayed.
    What tests and benchmarks call when they are done, passed or failed."""
    return remove(settings, find(settings, [prefix]), wait_s)


def counts(settings: CommonSettings, timeout_s: float = 30.0) -> Counts:
    """The broker's topic and consumer-group counts and the Redis database's key count."""
    admin = _admin(settings)
    topics = [t for t in admin.list_topics(timeout=timeout_s).topics if not t.startswith("__")]
    groups = list_groups(admin, timeout_s)
    return Counts(len(topics), len(groups), int(redis_client(settings).dbsize()))
