"""end_assignment: a reply topic's partitions at their ends; a topic created a moment ago
(no leader yet: unknown in the metadata, failing watermarks) is looked up again. A fresh
broker's gateway died on this (`make demo` on a new machine: "reply topic ... is not
readable: Unknown topic or partition")."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from confluent_kafka import KafkaError, KafkaException

from lookalike.topics import end_assignment


class NewTopicConsumer:
    """The broker's view of a topic just created: unknown for ``unknown`` lookups, then its
    watermarks fail ``no_leader`` times, then it is there with 2 partitions."""

    def __init__(self, unknown: int, no_leader: int) -> None:
        self.unknown, self.no_leader = unknown, no_leader

    def list_topics(self, topic: str, timeout: float) -> SimpleNamespace:
        if self.unknown:
            self.unknown -= 1
            return SimpleNamespace(topics={topic: SimpleNamespace(error=KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART),
                                                                 partitions={})})
        return SimpleNamespace(topics={topic: SimpleNamespace(error=None, partitions={0: None, 1: None})})

    def get_watermark_offsets(self, tp, timeout: float) -> tuple[int, int]:  # type: ignore[no-untyped-def]
        if self.no_leader:
            self.no_leader -= 1
            raise KafkaException(KafkaError(KafkaError.NOT_LEADER_FOR_PARTITION))
        return 0, 10 + tp.partition


def test_a_topic_whose_leader_lags_is_read_from_its_end_once_it_has_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lookalike.topics.time.sleep", lambda s: None)
    tps = end_assignment(NewTopicConsumer(unknown=2, no_leader=2), "replies", wait_s=30)
    assert [(tp.topic, tp.partition, tp.offset) for tp in tps] == [("replies", 0, 10), ("replies", 1, 11)]


def test_without_a_wait_a_missing_topic_is_said_at_once() -> None:
    with pytest.raises(LookupError, match="not readable"):
        end_assignment(NewTopicConsumer(unknown=1, no_leader=0), "replies", wait_s=0)
