"""The topics Lookalike uses, their configuration, and an idempotent "create if missing"."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import OFFSET_END, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from lookalike.clients import confluent_config, max_message_bytes
from lookalike.errors import ConfigError
from lookalike.settings import CommonSettings

log = logging.getLogger(__name__)

HOUR_MS = 3600 * 1000


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)


def compacted_config(settings: CommonSettings) -> dict[str, str]:
    """The compacted topics' policy. ``delete.retention.ms`` is set explicitly: how long a
    tombstone outlives compaction, so how old a snapshot's position may be before a restore
    from it could miss a delete (the indexer refuses older snapshots, docs/durability.md)."""
    return {"cleanup.policy": "compact", "min.compaction.lag.ms": "60000",
            "delete.retention.ms": str(settings.delete_retention_ms)}


def topic_specs(settings: CommonSettings) -> list[TopicSpec]:
    """The topics of a deployment that do not depend on a model version. Catalog topics are
    compacted: the latest image per item is the catalog, and a tombstone deletes it. Each
    model version's catalog-vector topic is made by :func:`ensure_vectors_topic`."""
    big = str(max_message_bytes(settings))
    p = settings.partitions
    compacted = {**compacted_config(settings), "max.message.bytes": big}
    transient = {"cleanup.policy": "delete", "retention.ms": str(24 * HOUR_MS), "max.message.bytes": big}
    return [
        TopicSpec(settings.catalog_topic, p, compacted),
        TopicSpec(settings.queries_topic, p, transient),
        TopicSpec(settings.query_vectors_topic, p, {**transient, "max.message.bytes": str(1024 * 1024)}),
        TopicSpec(settings.partials_topic, p, {**transient, "retention.ms": str(HOUR_MS),
                                               "max.message.bytes": str(4 * 1024 * 1024)}),
        TopicSpec(settings.replies_topic, p, {**transient, "max.message.bytes": str(4 * 1024 * 1024)}),
        TopicSpec(settings.deadletter_topic, 1, {**transient, "retention.ms": str(7 * 24 * HOUR_MS)}),
        # Feedback is an event log, not state: deleted after a week, never compacted.
        TopicSpec(settings.feedback_topic, p, {"cleanup.policy": "delete", "retention.ms": str(7 * 24 * HOUR_MS)}),
        TopicSpec(settings.triggers_topic, 1, {"cleanup.policy": "delete", "retention.ms": str(7 * 24 * HOUR_MS)}),
        TopicSpec(settings.models_topic, 1, {"cleanup.policy": "delete", "retention.ms": str(30 * 24 * HOUR_MS)}),
    ]


def ensure_topics_if_allowed(settings: CommonSettings) -> list[str]:
    """What services call at start: create missing topics where this principal may; where the
    ACLs leave topic creation to an admin (``lookalike topics create``), say so and go on."""
    try:
        return ensure_topics(settings)
    except KafkaException as exc:
        if exc.args[0].code() not in (KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.CLUSTER_AUTHORIZATION_FAILED):
            raise
        log.warning("not allowed to create topics (%s): they must be made by `lookalike topics create`", exc.args[0].str())
        return []


def ensure_topics(settings: CommonSettings, specs: list[TopicSpec] | None = None, timeout_s: float = 30.0) -> list[str]:
    """Create the topics that do not exist yet; return the names created."""
    admin = AdminClient(confluent_config(settings))
    specs = specs if specs is not None else topic_specs(settings)
    existing = set(admin.list_topics(timeout=timeout_s).topics)
    wanted = [
        NewTopic(s.name, num_partitions=s.partitions, replication_factor=settings.replication_factor, config=s.config)
        for s in specs
        if s.name not in existing
    ]
    if not wanted:
        return []
    created = []
    for name, future in admin.create_topics(wanted, request_timeout=timeout_s).items():
        try:
            future.result(timeout=timeout_s)
            created.append(name)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
    log.info("created topics %s", created)
    return created


def vectors_topic(settings: CommonSettings, version: str) -> str:
    """The catalog-vector topic of one model version: ``{catalog_vectors_topic}.{version}``."""
    return f"{settings.catalog_vectors_topic}.{version}"


def vectors_topic_spec(settings: CommonSettings, version: str, partitions: int) -> TopicSpec:
    """A model version's catalog-vector topic: compacted like the catalog (the latest vector
    per item is the index), and with the catalog's partitions (catalog partition p's vectors
    go to partition p)."""
    config = {**compacted_config(settings), "max.message.bytes": str(1024 * 1024)}
    return TopicSpec(vectors_topic(settings, version), partitions, config)


def topic_delete_retention_ms(settings: CommonSettings, topic: str, timeout_s: float = 10.0) -> int | None:
    """The ``delete.retention.ms`` the broker applies to ``topic`` (a topic made before it was
    set explicitly has the broker's default), or None when it cannot be read (no
    DescribeConfigs grant, broker away)."""
    from confluent_kafka.admin import ConfigResource, ResourceType

    admin = AdminClient(confluent_config(settings))
    resource = ConfigResource(ResourceType.TOPIC, topic)
    try:
        configs = admin.describe_configs([resource], request_timeout=timeout_s)[resource].result(timeout=timeout_s)
        return int(configs["delete.retention.ms"].value)
    except (KafkaException, KeyError, ValueError, TypeError, TimeoutError) as exc:
        log.warning("cannot read delete.retention.ms of %s: %s", topic, exc)
        return None


def ensure_vectors_topic(settings: CommonSettings, version: str, timeout_s: float = 30.0) -> str:
    """Create the catalog-vector topic of ``version`` if missing (idempotent; any worker or
    indexer may be first), and check it has at least the catalog's partitions."""
    admin = AdminClient(confluent_config(settings))
    deadline = time.monotonic() + min(timeout_s, 10.0)
    while True:
        meta = admin.list_topics(timeout=timeout_s)
        catalog = meta.topics.get(settings.catalog_topic)
        if catalog is not None and catalog.error is None:
            break
        # A catalog topic created a moment ago may not be in a fresh broker's metadata yet
        # (seen in tests on a just-started broker): look again for a few seconds.
        if time.monotonic() > deadline:
            raise ConfigError(f"topic {settings.catalog_topic} does not exist: `lookalike topics create`")
        time.sleep(0.2)
    spec = vectors_topic_spec(settings, version, len(catalog.partitions))
    existing = meta.topics.get(spec.name)
    if existing is None or existing.error is not None:
        ensure_topics(settings, [spec], timeout_s)
        return spec.name
    if len(existing.partitions) < len(catalog.partitions):
        raise ConfigError(
            f"{spec.name} has {len(existing.partitions)} partitions, fewer than {settings.catalog_topic}'s "
            f"{len(catalog.partitions)}: add partitions to it"
        )
    return spec.name


def end_assignment(consumer: Any, topic: str, wait_s: float = 30.0) -> list[TopicPartition]:
    """``topic``'s partitions at their end offsets, for a consumer that reads only what comes
    next (a reply topic). A topic created a moment ago may have no leaders yet (its metadata
    says unknown, its watermarks fail): it is looked up again for ``wait_s``. Then raises
    LookupError (no such topic, or no partitions) or the KafkaException."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
            if meta is None or meta.error is not None or not meta.partitions:
                raise LookupError(f"topic {topic!r} is not readable: {meta.error if meta else 'no such topic'}")
            out = []
            for partition in sorted(meta.partitions):
                _low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
                out.append(TopicPartition(topic, partition, high if high >= 0 else OFFSET_END))
            return out
        except (KafkaException, LookupError):
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.5)


def naming_env(prefix: str) -> dict[str, str]:
    """Every topic, reply prefix and consumer-group name any service reads, as
    ``LOOKALIKE_*`` variables under ``prefix``: a test (or a second pipeline on one cluster)
    gets a set of its own. The list is the settings classes' own fields, so a topic added
    to the settings is covered without anyone remembering it here."""
    from lookalike import settings as s

    fields: dict[str, object] = {}
    for cls in (s.CommonSettings, s.WorkerSettings, s.IndexerSettings, s.ClientSettings, s.FeedbackSettings,
                s.TrainerSettings):
        fields.update({name: f.default for name, f in cls.model_fields.items()})
    env = {}
    for name, default in sorted(fields.items()):
        if name.endswith("_topic"):
            env[name] = f"{prefix}.{str(default).removeprefix('lookalike.')}"
        elif name.endswith("_group"):
            env[name] = f"{prefix}-{str(default).removeprefix('lookalike-')}"
    env["reply_topic_prefix"] = f"{prefix}."
    return {f"LOOKALIKE_{name.upper()}": value for name, value in env.items()}
