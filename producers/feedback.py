"""The feedback producer: what shoppers did with the items a reply showed them.

Key: the user or session id. Value: JSON (``lookalike/schemas/feedback.schema.json``).
Events are checked against the contract before they are sent, so a bad one fails here,
in the caller's hands, rather than in the aggregator's dead letters.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from confluent_kafka import KafkaException, Producer

from lookalike.clients import producer_config
from lookalike.events import FeedbackEvent, make_feedback
from lookalike.settings import CommonSettings

log = logging.getLogger(__name__)


class FeedbackProducer:
    """An idempotent confluent-kafka producer (acks=all) for the feedback topic."""

    def __init__(self, settings: CommonSettings, producer: Producer | None = None) -> None:
        self.settings = settings
        self.topic = settings.feedback_topic
        self.producer = producer or Producer(producer_config(settings, **{"linger.ms": 5}))
        self.sent = 0
        self.failed = 0

    def _delivered(self, err: Any, msg: Any) -> None:
        if err is not None:
            self.failed += 1
            log.error("feedback for %r was not delivered: %s", msg.key(), err)

    def send(self, event: FeedbackEvent) -> None:
        key, value = event.encode()
        while True:
            try:
                self.producer.produce(self.topic, key=key, value=value, on_delivery=self._delivered)
                break
            except BufferError:  # local queue full: let deliveries drain
                self.producer.poll(0.5)
        self.producer.poll(0)
        self.sent += 1

    def emit(self, event: str, *, request_id: str, item_id: str, user_id: str,
             timestamp_ms: int | None = None) -> FeedbackEvent:
        """Validate and send one event; raises InvalidMessage for one the contract refuses."""
        made = make_feedback(event, request_id=request_id, item_id=item_id, user_id=user_id, timestamp_ms=timestamp_ms)
        self.send(made)
        return made

    def impressions(self, reply: Mapping[str, Any], user_id: str, timestamp_ms: int | None = None) -> list[FeedbackEvent]:
        """An ``impression`` for each result of an ok reply (what the user was shown)."""
        if reply.get("status") != "ok":
            return []
        return [self.emit("impression", request_id=reply["request_id"], item_id=hit["item_id"], user_id=user_id,
                          timestamp_ms=timestamp_ms)
                for hit in reply.get("results", [])]

    def send_all(self, events: Iterable[FeedbackEvent]) -> None:
        for event in events:
            self.send(event)

    def flush(self, timeout_s: float = 30.0) -> int:
        """Wait for every delivery; raises if some are still undelivered. Returns the failures so far."""
        left = self.producer.flush(timeout_s)
        if left:
            raise KafkaException(f"{left} feedback events still undelivered after {timeout_s}s")
        return self.failed
