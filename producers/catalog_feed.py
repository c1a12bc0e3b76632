"""The catalog feed: publishes product images (new, changed, removed) to the catalog topic.

Key: item id. Value: the image file's bytes as they are. Header ``metadata``: JSON.
Removing an item publishes a tombstone (null value) under its key.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaException, Producer

from lookalike import contracts as c
from lookalike.catalog import CatalogItem
from lookalike.clients import producer_config
from lookalike.settings import CommonSettings

log = logging.getLogger(__name__)


@dataclass
class FeedReport:
    published: int = 0
    removed: int = 0
    failed: int = 0


class CatalogFeed:
    """A confluent-kafka producer for the catalog topic."""

    def __init__(self, settings: CommonSettings, producer: Producer | None = None) -> None:
        self.settings = settings
        self.topic = settings.catalog_topic
        self.producer = producer or Producer(producer_config(settings, **{"linger.ms": 20}))
        self.report = FeedReport()
        # Per catalog partition, the highest offset delivered: pass it as a query's
        # min_position to read your own writes.
        self.positions: dict[int, int] = {}

    def _delivered(self, err: Any, msg: Any) -> None:
        if err is not None:
            self.report.failed += 1
            log.error("catalog event for %r was not delivered: %s", msg.key(), err)
            return
        self.positions[msg.partition()] = max(msg.offset(), self.positions.get(msg.partition(), -1))

    def _produce(self, key: bytes, value: bytes | None, headers: list[tuple[str, bytes]]) -> None:
        while True:
            try:
                self.producer.produce(self.topic, key=key, value=value, headers=headers, on_delivery=self._delivered)
                break
            except BufferError:  # local queue full: let deliveries drain
                self.producer.poll(0.5)
        self.producer.poll(0)

    def publish(self, item_id: str, image: bytes, metadata: dict[str, Any] | None = None) -> None:
        """Add or replace one item."""
        meta = json.dumps(metadata or {}, ensure_ascii=False).encode("utf-8")
        self._produce(item_id.encode("utf-8"), image, [(c.H_METADATA, meta)])
        self.report.published += 1

    def remove(self, item_id: str) -> None:
        """Remove one item: a tombstone for its key."""
        self._produce(item_id.encode("utf-8"), None, [])
        self.report.removed += 1

    def publish_items(self, items: Iterable[CatalogItem]) -> None:
        for item in items:
            self.publish(item.item_id, Path(item.image_path).read_bytes(), item.metadata)

    def flush(self, timeout_s: float = 60.0) -> FeedReport:
        """Wait for every delivery; raises if some could not be delivered in time."""
        left = self.producer.flush(timeout_s)
        if left:
            raise KafkaException(f"{left} catalog events still undelivered after {timeout_s}s")
        return self.report
