"""The embedding worker: a faust app with an agent for queries and one catalog consumer
per live model version.

* Queries (faust agent, consumer group ``worker_group``) are embedded by the *serving*
  model of the rollout state (:mod:`lookalike.rollout`); the query-vector record names
  that version, and the indexer answers it from that version's index.
* The catalog is read once per live model version (serving, and the target while a
  rollout builds it), each by its own consumer group ``{worker_group}.catalog.{version}``
  from the beginning of the compacted topic, and embedded into that version's vector
  topic. Several workers share each group's partitions.

Both paths micro-batch (catalog: large batches after a wait to fill them; queries: whatever
arrived while the previous batch was embedded, :mod:`lookalike.batching`), run the pure
stages of :mod:`workers.stages` in their own inference thread (:mod:`workers.inference`:
a query never waits behind a catalog batch, and each path has its torch thread count) so
the event loop keeps heartbeating, produce the results and wait for the broker's
acknowledgement before the batch's offsets are committed.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence

import faust
import redis
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from faust.types import EventT

from lookalike import contracts as c
from lookalike import metrics, rollout
from lookalike.batching import MicroBatches, consume_in_batches
from lookalike.clients import aiokafka_config, confluent_config, faust_app, max_message_bytes
from lookalike.embedder import Embedder
from lookalike.errors import BadHeader, InvalidMessage, ModelArtifactError
from lookalike.health import HEARTBEAT_EVERY_S, beat, heartbeat_path
from lookalike.rollout import RolloutState
from lookalike.settings import WorkerSettings
from lookalike.topics import ensure_vectors_topic
from workers import stages
from workers.guard import QueryGuard
from workers.inference import InferenceThread, use_layout
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


class ModelSet:
    """The models this worker has loaded, by version, and which one embeds queries.

    The serving version comes from the rollout state in Redis; before there is one, or
    while Redis is away at start-up, it is the pinned version or the store's champion."""

    def __init__(self, settings: WorkerSettings, serving: Embedder | None = None) -> None:
        """``serving``: a model already loaded, to serve from the start (embedding without a store)."""
        self.settings = settings
        self._loaded: dict[str, Embedder] = (
            {serving.version: use_layout(serving, settings.channels_last)} if serving else {})
        self.state = RolloutState(serving=serving.version if serving else rollout.desired_version(settings))
        self._loading = threading.Lock()  # both inference threads may ask for a version first

    def get(self, version: str) -> Embedder:
        """The embedder of ``version``, loaded on first use (blocking)."""
        with self._loading:
            if version not in self._loaded:
                s = self.settings  # threads 0: each inference thread sets its own count
                embedder = Embedder.from_store(s.models_path, version, s.device, 0)
                self._loaded[version] = use_layout(embedder, s.channels_last)
            return self._loaded[version]

    @property
    def serving(self) -> str | None:
        return self.state.serving

    def loaded(self, version: str | None) -> Embedder | None:
        """The embedder of ``version`` if it is loaded already (never loads)."""
        return self._loaded.get(version) if version else None

    def forget(self, keep: Sequence[str]) -> None:
        for version in [v for v in self._loaded if v not in keep]:
            del self._loaded[version]
            log.info("model %s unloaded", version)


class EmbeddingWorker:
    """The models and the threads they run in; what the agents call for each batch."""

    def __init__(self, settings: WorkerSettings, models: ModelSet) -> None:
        self.settings = settings
        self.models = models
        self.catalog_thread = InferenceThread("embed-catalog", settings.torch_threads, settings.catalog_nice)
        self.query_thread = InferenceThread("embed-queries", settings.query_torch_threads or settings.torch_threads)
        self.reply_topics = ReplyTopics(settings)
        self.guard = QueryGuard(settings)

    def catalog_batch(self, events: Sequence[tuple[bytes | None, bytes | None, dict[str, bytes], Source]],
                      version: str, dead_letters: bool = True):
        """-> ([(partition, vector record)], dead-letter records). Runs in the inference thread.

        A vector goes to the partition of the catalog record it comes from: partition p of
        the vector topic is then partition p of the catalog, in the same order, which is
        what lets the indexer report (and wait for) positions in catalog offsets. Only the
        serving version's consumer writes dead letters (``dead_letters``), so a rollout's
        re-read of the catalog does not repeat them.
        """
        embedder = self.models.get(version)
        images: list[CatalogImage] = []
        out: list[tuple[int, Record]] = []
        dead: list[Record] = []
        for key, value, headers, source in events:
            try:
                parsed = stages.parse_catalog(key, value, headers, source, self.settings)
            except InvalidMessage as exc:
                if dead_letters:
                    log.warning("catalog %s:%d@%d refused: %s", source.topic, source.partition, source.offset, exc,
                                extra={"item_id": stages.request_id_of(key), "code": exc.code})
                    metrics.observe_error("worker", exc.code)
                    dead.append(stages.deadletter_record(Rejected(key, value, headers, exc, source)))
                continue
            if isinstance(parsed, CatalogRemoval):
                out.append((source.partition, stages.removal_record(parsed, embedder.version)))
            else:
                images.append(parsed)
        if images:
            records = stages.embed_catalog(embedder, images)
            out.extend((img.source.partition, record) for img, record in zip(images, records, strict=True))
        return out, dead

    def query_batch(self, events: Sequence[tuple[bytes | None, bytes | None, dict[str, bytes], Source]]):
        """-> (query-vector records, [(reply topic, error reply record)]). Runs in the inference thread."""
        version = self.models.serving
        try:
            embedder = self.models.get(version) if version else None
        except (ModelArtifactError, OSError) as exc:
            log.error("model %s cannot be loaded: %s", version, exc)
            embedder = None
        queries: list[Query] = []
        errors: list[tuple[str, Record]] = []
        for key, value, headers, source in events:
            try:
                self.guard.admit(key, value, headers)  # signature and rate limit, before decoding anything
                query = stages.parse_query(key, value, headers, source, self.settings)
                if not self.reply_topics.exists(query.options.reply_to):
                    raise BadHeader(f"reply-to topic {query.options.reply_to!r} does not exist")
                queries.append(query)
            except InvalidMessage as exc:
                log.info("query %r refused: %s", stages.request_id_of(key), exc,  # %r: a key may hold a newline
                         extra={"request_id": stages.request_id_of(key), "code": exc.code})
                metrics.observe_error("worker", exc.code)
                rejected = Rejected(key, value, headers, exc, source)
                reply_to = stages.reply_destination(headers, self.settings)
                if not self.reply_topics.exists(reply_to):
                    reply_to = self.settings.replies_topic
                errors.append((reply_to, stages.error_reply_record(rejected, version)))
        if queries and embedder is None:
            for query in queries:
                exc = InvalidMessage(f"no model to embed with (serving: {version}): train or fetch one", code="not_ready")
                rejected = Rejected(query.request_key, None, {}, exc, query.source)
                errors.append((query.options.reply_to, stages.error_reply_record(rejected, None)))
            return [], errors
        return (stages.embed_queries(embedder, queries) if queries else []), errors


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


def records_to_events(batch: dict) -> list[tuple[bytes | None, bytes | None, dict[str, bytes], Source]]:
    """aiokafka's fetched records (by partition) -> the stages' input, in partition order."""
    out = []
    for tp, records in sorted(batch.items(), key=lambda kv: kv[0].partition):
        for r in records:
            out.append((r.key, r.value, c.headers_to_dict(r.headers), Source(tp.topic, tp.partition, r.offset, r.timestamp)))
    return out


class CatalogConsumers:
    """One catalog consumer group per live model version, started and stopped to match the
    rollout state; effects (vectors, dead letters acknowledged by the broker) before commits."""

    def __init__(self, app: faust.App, worker: EmbeddingWorker) -> None:
        self.app = app
        self.worker = worker
        self.settings = worker.settings
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def group(self, version: str) -> str:
        return f"{self.settings.worker_group}.catalog.{version}"

    def reconcile(self, versions: Sequence[str]) -> None:
        for version in versions:
            task = self.tasks.get(version)
            if task is None or task.done():
                self.tasks[version] = asyncio.create_task(self.run(version), name=f"catalog-{version}")
                self.tasks[version].add_done_callback(self._done)
                log.info("catalog consumer for model %s: started (group %s)", version, self.group(version))
        for version in [v for v in self.tasks if v not in versions]:
            self.tasks.pop(version).cancel()
            log.info("catalog consumer for model %s: stopped", version)

    async def stop(self) -> None:
        tasks = list(self.tasks.values())
        self.tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @staticmethod
    def _done(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("%s stopped: %r; restarted on the next rollout tick", task.get_name(), task.exception())

    async def run(self, version: str) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        try:
            await self.worker.catalog_thread.run(self.worker.models.get, version)
            topic = await loop.run_in_executor(None, ensure_vectors_topic, s, version)
        except (ModelArtifactError, OSError, KafkaException) as exc:
            log.error("catalog consumer for model %s cannot start: %s (retried on the next state change)", version, exc)
            await asyncio.sleep(5)
            return
        consumer = AIOKafkaConsumer(
            s.catalog_topic, **aiokafka_config(s), group_id=self.group(version), enable_auto_commit=False,
            auto_offset_reset="earliest", max_partition_fetch_bytes=max_message_bytes(s),
            fetch_max_bytes=max(max_message_bytes(s), 50 * 1024 * 1024),
            session_timeout_ms=int(s.session_timeout_s * 1000), heartbeat_interval_ms=int(s.session_timeout_s * 250),
        )
        await consumer.start()
        try:
            wait_ms = max(s.catalog_batch_wait_ms, 1)
            while True:
                batch = await consumer.getmany(timeout_ms=wait_ms, max_records=s.catalog_batch_max)
                if not batch:
                    continue
                events = records_to_events(batch)
                dead_letters = self.worker.models.serving == version
                started = time.perf_counter()
                vectors, dead = await self.worker.catalog_thread.run(
                    self.worker.catalog_batch, events, version, dead_letters)
                metrics.observe_batch("worker", "catalog", len(events), time.perf_counter() - started)
                await produce_all(self.app, topic, [r for _, r in vectors], [p for p, _ in vectors])
                await produce_all(self.app, s.deadletter_topic, dead)
                try:
                    await consumer.commit({tp: records[-1].offset + 1 for tp, records in batch.items()})
                except KafkaError as exc:  # partitions moved to another worker: it redoes the batch
                    log.warning("commit for model %s failed (%s); the batch will be redone", version, exc)
                log.debug("catalog batch for %s: %d events, %d vectors, %d dead letters", version, len(events),
                          len(vectors), len(dead))
        finally:
            await consumer.stop()


def create_app(settings: WorkerSettings, models: ModelSet) -> faust.App:
    """The faust app: the query agent, the catalog consumers and the rollout-state poller."""
    worker = EmbeddingWorker(settings, models)
    app = faust_app(
        settings,
        settings.worker_group,
        producer_max_request_size=max_message_bytes(settings),
        consumer_max_fetch_size=max_message_bytes(settings),
    )
    queries_topic = app.topic(settings.queries_topic, key_type=bytes, value_type=bytes, allow_empty=True)
    catalog = CatalogConsumers(app, worker)

    @app.task
    async def follow_rollout() -> None:
        """Read the rollout state; embed queries with the serving model and the catalog with
        every live one. When Redis is away, the last state known stays."""
        loop = asyncio.get_running_loop()
        client = rollout.redis_client(settings)
        try:
            while True:
                try:
                    state = await loop.run_in_executor(None, rollout.read_state, client, settings)
                except (redis.RedisError, OSError) as exc:
                    log.debug("rollout state unavailable: %s", exc)
                    state = None
                if state is not None and state != models.state:
                    log.info("rollout state: serving %s, building %s", state.serving, state.target)
                    models.state = state
                elif state is None and models.state.serving is None:  # no state and no champion at start: look again
                    models.state = RolloutState(serving=rollout.desired_version(settings))
                catalog.reconcile(models.state.embedding())
                models.forget([*models.state.embedding()])
                await asyncio.sleep(settings.rollout_poll_s)
        finally:  # the worker stops: its catalog consumers leave their groups, so others take over at once
            await catalog.stop()

    @app.agent(queries_topic, name="embed-queries")
    async def embed_queries(stream: faust.Stream) -> None:
        """Queries are read into micro-batches while the previous batch is embedded; a batch's
        events are acked (so committed) only once the broker has its vectors and error replies."""
        async def embed(events: list[EventT]) -> None:
            started = time.perf_counter()
            records, errors = await worker.query_thread.run(worker.query_batch, unpack(events))
            metrics.observe_batch("worker", "query", len(events), time.perf_counter() - started)
            await produce_all(app, settings.query_vectors_topic, records)
            for reply_to, record in errors:
                await produce_all(app, reply_to, [record])

        await consume_in_batches(
            stream, MicroBatches(settings.query_batch_max, settings.query_batch_wait_ms / 1000), embed)

    @app.task
    async def heartbeat() -> None:
        while True:
            beat(heartbeat_path(settings, "worker"), model_version=models.serving,
                 catalog_models=sorted(catalog.tasks))
            await asyncio.sleep(HEARTBEAT_EVERY_S)

    app.lookalike_worker = worker  # type: ignore[attr-defined]
    return app
