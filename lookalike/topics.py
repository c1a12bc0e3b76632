"""The topics Lookalike uses, their configuration, and an idempotent "create if missing"."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from confluent_kafka import KafkaError, KafkaException
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


def topic_specs(settings: CommonSettings) -> list[TopicSpec]:
    """Every topic of a deployment. Catalog topics are compacted: the latest image per item
    is the catalog, and a tombstone deletes it."""
    big = str(max_message_bytes(settings))
    p = settings.partitions
    compacted = {"cleanup.policy": "compact", "max.message.bytes": big, "min.compaction.lag.ms": "60000"}
    transient = {"cleanup.policy": "delete", "retention.ms": str(24 * HOUR_MS), "max.message.bytes": big}
    return [
        TopicSpec(settings.catalog_topic, p, compacted),
        TopicSpec(settings.catalog_vectors_topic, p, {**compacted, "max.message.bytes": str(1024 * 1024)}),
        TopicSpec(settings.queries_topic, p, transient),
        TopicSpec(settings.query_vectors_topic, p, {**transient, "max.message.bytes": str(1024 * 1024)}),
        TopicSpec(settings.replies_topic, p, {**transient, "max.message.bytes": str(4 * 1024 * 1024)}),
        TopicSpec(settings.deadletter_topic, 1, {**transient, "retention.ms": str(7 * 24 * HOUR_MS)}),
        # Feedback is an event log, not state: deleted after a week, never compacted.
        TopicSpec(settings.feedback_topic, p, {"cleanup.policy": "delete", "retention.ms": str(7 * 24 * HOUR_MS)}),
        TopicSpec(settings.triggers_topic, 1, {"cleanup.policy": "delete", "retention.ms": str(7 * 24 * HOUR_MS)}),
        TopicSpec(settings.models_topic, 1, {"cleanup.policy": "delete", "retention.ms": str(30 * 24 * HOUR_MS)}),
    ]


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


def check_copartitioned(settings: CommonSettings, timeout_s: float = 30.0) -> None:
    """The vector topic needs at least the catalog's partitions: catalog partition p's vectors go to p."""
    meta = AdminClient(confluent_config(settings)).list_topics(timeout=timeout_s)
    counts = {}
    for name in (settings.catalog_topic, settings.catalog_vectors_topic):
        topic = meta.topics.get(name)
        if topic is None or topic.error is not None:
            raise ConfigError(f"topic {name} does not exist: `lookalike topics create`")
        counts[name] = len(topic.partitions)
    if counts[settings.catalog_vectors_topic] < counts[settings.catalog_topic]:
        raise ConfigError(
            f"{settings.catalog_vectors_topic} has {counts[settings.catalog_vectors_topic]} partitions, fewer than "
            f"{settings.catalog_topic}'s {counts[settings.catalog_topic]}: add partitions to it"
        )
