"""The embedding worker: a faust app with one agent for the catalog and one for queries.

Both agents micro-batch (catalog: large batches, queries: small batches and a short
wait), run the pure stages of :mod:`workers.stages` in a thread so the event loop
keeps heartbeating, produce the results and wait for the broker's acknowledgement
before faust may commit the batch's offsets.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import faust
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from faust.types import EventT

from lookalike import contracts as c
from lookalike import metrics
from lookalike.clients import confluent_config, faust_app, max_message_bytes
from lookalike.embedder import Embedder
from lookalike.errors import BadHeader, InvalidMessage
from lookalike.health import HEARTBEAT_EVERY_S, beat, heartbeat_path
from lookalike.settings import WorkerSettings
from workers import stages
from workers.stages import CatalogImage, CatalogRemoval, Query, Record, Rejected, Source

log = logging.getLogger(__name__)


def source_of(event: EventT) -> Source:
    msg = event.message
    ts = int(msg.timestamp * 1000) if msg.timestamp else None
    return Source(msg.topic, msg.partition, msg.offset, ts)


class ReplyTopics:
    """Which topics exist, so a query naming a missing reply-to topic gets an error reply
    instead of stalling the producer (topics are not auto-created)."""

    MIN_REFRESH_S = 1.0  # a flood of bad reply-to names costs at most one look-up a second

    def __init__(self, settings: WorkerSettings) -> None:
        self._admin = AdminClient(confluent_config(settings))
        self._known: set[str] = {settings.replies_topic}
        self._refreshed = 0.0

    def exists(self, topic: str) -> bool:
        if topic not in self._known and time.monotonic() - self._refreshed > self.MIN_REFRESH_S:
            self._refreshed = time.monotonic()
            try:
                self._known = set(self._admin.list_topics(timeout=5).topics) | self._known
            except KafkaException as exc:
                log.warning("cannot list topics: %s", exc)
        return topic in self._known


class EmbeddingWorker:
    """The model and the thread it runs in; what the agents call for each batch."""

    def __init__(self, settings: WorkerSettings, embedder: Embedder) -> None:
        self.settings = settings
        self.embedder = embedder
        # One inference thread: torch already uses every core inside one call.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        self.reply_topics = ReplyTopics(settings)

    def catalog_batch(self, events: Sequence[tuple[bytes | None, bytes | None, dict[str, bytes], Source]]):
        """-> ([(partition, vector record)], dead-letter records). Runs in the inference thread.

        A vector goes to the partition of the catalog record it comes from: partition p of
        the vector topic is then partition p of the catalog, in the same order, which is
        what lets the indexer report (and wait for) positions in catalog offsets.
        """
        images: list[CatalogImage] = []
        out: list[tuple[int, Record]] = []
        dead: list[Record] = []
        for key, value, headers, source in events:
            try:
                parsed = stages.parse_catalog(key, value, headers, source, self.settings)
            except InvalidMessage as exc:
                log.warning("catalog %s:%d@%d refused: %s", source.topic, source.partition, source.offset, exc,
                            extra={"item_id": stages.request_id_of(key), "code": exc.code})
                metrics.observe_error("worker", exc.code)
                dead.append(stages.deadletter_record(Rejected(key, value, headers, exc, source)))
                continue
            if isinstance(parsed, CatalogRemoval):
                out.append((source.partition, stages.removal_record(parsed, self.embedder.version)))
            else:
                images.append(parsed)
        if images:
            records = stages.embed_catalog(self.embedder, images)
            out.extend((img.source.partition, record) for img, record in zip(images, records, strict=True))
        return out, dead

    def query_batch(self, events: Sequence[tuple[bytes | None, bytes | None, dict[str, bytes], Source]]):
        """-> (query-vector records, [(reply topic, error reply record)]). Runs in the inference thread."""
        queries: list[Query] = []
        errors: list[tuple[str, Record]] = []
        for key, value, headers, source in events:
            try:
                query = stages.parse_query(key, value, headers, source, self.settings)
                if not self.reply_topics.exists(query.options.reply_to):
                    raise BadHeader(f"reply-to topic {query.options.reply_to!r} does not exist")
                queries.append(query)
            except InvalidMessage as exc:
                log.info("query %s refused: %s", stages.request_id_of(key), exc,
                         extra={"request_id": stages.request_id_of(key), "code": exc.code})
                metrics.observe_error("worker", exc.code)
                rejected = Rejected(key, value, headers, exc, source)
                reply_to = stages.reply_destination(headers, self.settings)
                if not self.reply_topics.exists(reply_to):
                    reply_to = self.settings.replies_topic
                errors.append((reply_to, stages.error_reply_record(rejected, self.embedder.version)))
        return (stages.embed_queries(self.embedder, queries) if queries else []), errors


async def produce_all(app: faust.App, topic: str, records: Sequence[Record],
                      partitions: Sequence[int | None] | None = None) -> None:
    """Send records and wait until the broker has them all (effects before commits)."""
    pending = [
        await app.producer.send(topic, key, value, partition, None, headers)
        for (key, value, headers), partition in zip(records, partitions or [None] * len(records), strict=True)
    ]
    if pending:
        await asyncio.gather(*pending)


def unpack(events: Sequence[EventT]) -> list[tuple[bytes | None, bytes | None, dict[str, bytes], Source]]:
    return [(e.key, e.value, c.headers_to_dict(e.headers), source_of(e)) for e in events]


def create_app(settings: WorkerSettings, embedder: Embedder) -> faust.App:
    """The faust app with both agents wired to ``embedder``."""
    worker = EmbeddingWorker(settings, embedder)
    app = faust_app(
        settings,
        settings.worker_group,
        producer_max_request_size=max_message_bytes(settings),
        consumer_max_fetch_size=max_message_bytes(settings),
    )
    catalog_topic = app.topic(settings.catalog_topic, key_type=bytes, value_type=bytes, allow_empty=True)
    queries_topic = app.topic(settings.queries_topic, key_type=bytes, value_type=bytes, allow_empty=True)
    loop_executor = worker.executor

    @app.agent(catalog_topic, name="embed-catalog")
    async def embed_catalog(stream: faust.Stream) -> None:
        within = max(settings.catalog_batch_wait_ms, 1) / 1000
        async for events in stream.take_events(settings.catalog_batch_max, within=within):
            loop = asyncio.get_running_loop()
            started = time.perf_counter()
            vectors, dead = await loop.run_in_executor(loop_executor, worker.catalog_batch, unpack(events))
            metrics.observe_batch("worker", "catalog", len(events), time.perf_counter() - started)
            await produce_all(app, settings.catalog_vectors_topic, [r for _, r in vectors], [p for p, _ in vectors])
            await produce_all(app, settings.deadletter_topic, dead)
            log.debug("catalog batch: %d events, %d vectors, %d dead letters", len(events), len(vectors), len(dead))

    @app.agent(queries_topic, name="embed-queries")
    async def embed_queries(stream: faust.Stream) -> None:
        within = max(settings.query_batch_wait_ms, 1) / 1000
        async for events in stream.take_events(settings.query_batch_max, within=within):
            loop = asyncio.get_running_loop()
            started = time.perf_counter()
            records, errors = await loop.run_in_executor(loop_executor, worker.query_batch, unpack(events))
            metrics.observe_batch("worker", "query", len(events), time.perf_counter() - started)
            await produce_all(app, settings.query_vectors_topic, records)
            for reply_to, record in errors:
                await produce_all(app, reply_to, [record])

    @app.task
    async def heartbeat() -> None:
        while True:
            beat(heartbeat_path(settings, "worker"), model_version=embedder.version)
            await asyncio.sleep(HEARTBEAT_EVERY_S)

    app.lookalike_worker = worker  # type: ignore[attr-defined]
    return app
