"""Item pictures for the shopper's page, from the catalog topic, in bounded memory.

The catalog topic is compacted and keyed by item id: it already *is* the set of product
images, so the gateway reads it (every partition assigned from the beginning, no group, no
commits) and keeps each item's latest image in memory; a tombstone removes it. The gateway
never reads the dataset folder and needs no image store of its own.

Memory is bounded by ``gateway_image_cache_bytes``: least recently used images go first
(a catalog larger than the bound serves the pictures shoppers look at; the others get
404 and the page shows a placeholder). Images up to ``gateway_image_max_item_bytes`` are
kept as they came (the sample catalog's are ~7 KB); larger ones become a JPEG thumbnail.
Only JPEG, PNG and WebP are served, recognised by content, so nothing else can reach a
browser as an image.
"""

from __future__ import annotations

import io
import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition
from PIL import Image

from lookalike.clients import confluent_config
from lookalike.imaging import decode_image
from lookalike.settings import CommonSettings

log = logging.getLogger(__name__)


def image_type(data: bytes) -> str | None:
    """The MIME type of JPEG, PNG or WebP bytes, by their magic numbers; None for anything else."""
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def thumbnail(data: bytes, max_px: int, *, max_bytes: int, max_pixels: int) -> bytes:
    """A JPEG no larger than ``max_px`` on its long side (raises BadImage/MessageTooLarge)."""
    img = decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels, min_size=max_px)  # a JPEG at its scale
    img.thumbnail((max_px, max_px), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=85)
    return out.getvalue()


@dataclass(frozen=True)
class Picture:
    data: bytes
    content_type: str


class PictureCache:
    """item id -> picture, at most ``max_bytes`` of image data, least recently used evicted."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.items: OrderedDict[str, Picture] = OrderedDict()
        self.bytes = 0
        self.evicted = 0
        self.lock = threading.Lock()

    def put(self, item_id: str, picture: Picture) -> None:
        with self.lock:
            self._drop(item_id)
            if len(picture.data) > self.max_bytes:
                return
            self.items[item_id] = picture
            self.bytes += len(picture.data)
            while self.bytes > self.max_bytes:
                _old_id, old = self.items.popitem(last=False)
                self.bytes -= len(old.data)
                self.evicted += 1

    def remove(self, item_id: str) -> None:
        with self.lock:
            self._drop(item_id)

    def _drop(self, item_id: str) -> None:
        old = self.items.pop(item_id, None)
        if old is not None:
            self.bytes -= len(old.data)

    def get(self, item_id: str) -> Picture | None:
        with self.lock:
            picture = self.items.get(item_id)
            if picture is not None:
                self.items.move_to_end(item_id)
            return picture

    def __len__(self) -> int:
        return len(self.items)


def picture_of(value: bytes, settings: CommonSettings, *, max_item_bytes: int, thumbnail_px: int) -> Picture | None:
    """What the cache keeps for one catalog value: the bytes as they are, a thumbnail, or nothing."""
    content_type = image_type(value)
    if content_type is None:
        return None
    if len(value) <= max_item_bytes:
        return Picture(value, content_type)
    try:
        return Picture(thumbnail(value, thumbnail_px, max_bytes=settings.max_image_bytes,
                                 max_pixels=settings.max_image_pixels), "image/jpeg")
    except Exception as exc:  # any decoder failure: this item just has no picture
        log.info("no thumbnail for a catalog image of %d bytes: %s", len(value), exc)
        return None


class CatalogPictures:
    """A thread that follows the catalog topic into a :class:`PictureCache`."""

    def __init__(self, settings: CommonSettings, cache: PictureCache, *, max_item_bytes: int, thumbnail_px: int) -> None:
        self.settings = settings
        self.cache = cache
        self.max_item_bytes = max_item_bytes
        self.thumbnail_px = thumbnail_px
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.records = 0
        self.caught_up = False
        self.ends: dict[int, int] = {}

    def start(self) -> CatalogPictures:
        self.thread = threading.Thread(target=self._run, name="gateway-catalog-pictures", daemon=True)
        self.thread.start()
        return self

    def close(self) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout=5)

    def _run(self) -> None:
        topic = self.settings.catalog_topic
        consumer = Consumer(confluent_config(self.settings, **{
            "group.id": f"lookalike-gateway-pictures-{uuid.uuid4().hex}", "enable.auto.commit": False}))
        try:
            while not self.stopping.is_set():  # the catalog topic may not exist yet
                meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
                if meta is not None and meta.error is None and meta.partitions:
                    break
                self.stopping.wait(2)
            else:
                return
            for p in meta.partitions:
                self.ends[p] = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
            positions: dict[int, int] = {}
            started = time.monotonic()
            while not self.stopping.is_set():
                for msg in consumer.consume(500, 0.5):
                    if msg.error() is not None:
                        continue
                    self.apply(msg.key(), msg.value())
                    positions[msg.partition()] = msg.offset() + 1
                if not self.caught_up and all(positions.get(p, 0) >= end for p, end in self.ends.items()):
                    self.caught_up = True
                    log.info("catalog pictures: %d items, %.1f MB, read in %.1fs", len(self.cache),
                             self.cache.bytes / 1e6, time.monotonic() - started)
        except KafkaException as exc:
            log.error("catalog pictures stopped: %s", exc)
        finally:
            consumer.close()

    def apply(self, key: bytes | None, value: bytes | None) -> None:
        """One catalog record: an image replaces the item's picture, a tombstone removes it."""
        if not key:
            return
        item_id = key.decode("utf-8", "replace")
        self.records += 1
        if value is None:
            self.cache.remove(item_id)
            return
        picture = picture_of(value, self.settings, max_item_bytes=self.max_item_bytes, thumbnail_px=self.thumbnail_px)
        if picture is None:
            self.cache.remove(item_id)
        else:
            self.cache.put(item_id, picture)

    def health(self) -> dict[str, object]:
        return {"enabled": True, "items": len(self.cache), "bytes": self.cache.bytes, "evicted": self.cache.evicted,
                "records_read": self.records, "caught_up": self.caught_up,
                "running": bool(self.thread and self.thread.is_alive())}
