"""The embedding worker: a loop for queries and one catalog loop per live model version,
all on the consumer runtime (:mod:`lookalike.runtime`).

* Queries (consumer group ``worker_group``) are embedded by the *serving*
  model of the rollout state (:mod:`lookalike.rollout`); the query-vector record names
  that version, and the indexer answers it from that version's index.
* The catalog is read once per live model version (serving, and the target while a
  rollout builds it), each by its own consumer group ``{worker_group}.catalog.{version}``
  from the beginning of the compacted topic, and embedded into that version's vector
  topic. Several workers share each group's partitions.

Both paths micro-batch (catalog: large batches after a wait to fill them; queries: whatever
arrived while the previous batch was embedded, :mod:`lookalike.batching`), run the pure
stages of :mod:`workers.stages` in their own inference thread (:mod:`workers.inference`:
a query never waits behind a catalog batch, and each path has its torch thread count);
the runtime produces the results and commits a batch's offsets only once the broker has
acknowledged them, and a record the stage fails on becomes an error reply (queries) or
a dead letter (catalog).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import redis
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from lookalike import contracts as c
from lookalike import metrics, rollout
from lookalike.clients import confluent_config
from lookalike.device_decode import decode_batch
from lookalike.embedder import Embedder, pick_device, serving_precision
from lookalike.errors import (
    BadHeader,
    DeadlineExceeded,
    ErrorCode,
    InvalidMessage,
    ModelArtifactError,
    Overloaded,
    code_of,
)
from lookalike.health import HEARTBEAT_EVERY_S, beat, heartbeat_path
from lookalike.imaging import DecodeBudget
from lookalike.rollout import RolloutState
from lookalike.runtime import Loop, Output, Record, Sender, Source, dead_letter, run_forever
from lookalike.settings import WorkerSettings
from lookalike.topics import ensure_vectors_topic
from workers import stages
from workers.guard import QueryGuard
from workers.inference import InferenceThread, nice_thread, use_layout
from workers.stages import CatalogImage, CatalogRemoval, CatalogUpsert, Query, Rejected
from workers.stages import Record as OutRecord
from workers.stages import Source as Origin

log = logging.getLogger(__name__)
SHED_CODES = frozenset({ErrorCode.DEADLINE_EXCEEDED, ErrorCode.OVERLOADED})  # counted, logged at debug: a burst has many
QUERY_FETCH_MAX = 256  # queries read at once: a backlog of late ones is answered 256 at a time
PACE_WEIGHT = 0.3  # of the last batch in the embedding pace (seconds per query image)
Event = tuple[bytes | None, bytes | None, dict[str, bytes], Origin]  # what the stages take


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
                embedder = Embedder.from_store(s.models_path, version, s.device, 0,
                                               serving_precision(s.precision, pick_device(s.device)))
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
        # Catalog images are decoded by a few threads at the catalog's niceness, while the
        # pixels they may hold at once stay within the budget (docs/security.md).
        self.decode_threads = ThreadPoolExecutor(max_workers=settings.catalog_decode_threads,
                                                 thread_name_prefix="decode-catalog",
                                                 initializer=nice_thread, initargs=(settings.catalog_nice,))
        self.decode_budget = DecodeBudget(settings.catalog_decode_budget_pixels)
        self.query_thread = InferenceThread("embed-queries", settings.query_torch_threads or settings.torch_threads)
        self.reply_topics = ReplyTopics(settings)
        self.guard = QueryGuard(settings)
        self.embed_s_per_query = 0.0  # the query path's pace, for shedding (0: not measured yet)
        self.queued: Callable[[], int] = lambda: 0  # queries read and waiting for a batch (the query loop's)

    def catalog_batch(self, events: Sequence[Event],
                      version: str, dead_letters: bool = True):
        """-> ([(partition, vector record)], dead-letter records). Runs in the inference thread.

        A vector goes to the partition of the catalog record it comes from: partition p of
        the vector topic is then partition p of the catalog, in the same order, which is
        what lets the indexer report (and wait for) positions in catalog offsets. Only the
        serving version's consumer writes dead letters (``dead_letters``), so a rollout's
        re-read of the catalog does not repeat them.
        """
        embedder = self.models.get(version)
        spec = embedder.card.preprocess
        dead: list[OutRecord] = []

        def refuse(key: bytes | None, value: bytes | None, headers: dict[str, bytes], source: Origin,
                   exc: InvalidMessage) -> None:
            if dead_letters:
                log.warning("catalog %s:%d@%d refused: %s", source.topic, source.partition, source.offset, exc,
                            extra={"item_id": stages.request_id_of(key), "code": exc.code})
                metrics.observe_error("worker", exc.code)
                dead.append(stages.deadletter_record(Rejected(key, value, headers, exc, source)))

        upserts: list[tuple[Event, CatalogUpsert]] = []
        slots: list[tuple[int, OutRecord] | None] = []  # catalog order: a removal's record, or None for an upsert
        for event in events:
            key, value, headers, source = event
            try:
                parsed = stages.parse_catalog_record(key, value, headers, source)
            except InvalidMessage as exc:
                refuse(*event, exc)
                continue
            if isinstance(parsed, CatalogRemoval):
                slots.append((source.partition, stages.removal_record(parsed, embedder.version)))
            else:
                upserts.append((event, parsed))
                slots.append(None)  # the upsert's vector goes here (nothing, if it is refused)
        vectors: dict[int, tuple[int, OutRecord]] = {}  # index in upserts -> its vector record
        if upserts and (self.settings.catalog_decode == "device" or (self.settings.catalog_decode == "auto"
                                                                     and embedder.device.type == "cuda")):
            decoded = decode_batch([u.image_bytes for _, u in upserts], spec, embedder.device,
                                   max_bytes=self.settings.max_image_bytes, max_pixels=self.settings.max_image_pixels,
                                   budget=self.decode_budget)
            for (event, _), error in zip(upserts, decoded.errors, strict=True):
                if error is not None:
                    refuse(*event, error)
            kept = [upserts[i][1] for i in decoded.ok]
            if kept:
                records = stages.catalog_vector_records(embedder, kept, embedder.embed_pixels(decoded.pixels[decoded.ok]))
                vectors = {int(i): (u.source.partition, record) for i, u, record in zip(decoded.ok, kept, records, strict=True)}
        elif upserts:
            def decode(upsert: CatalogUpsert) -> CatalogImage | InvalidMessage:
                try:
                    return stages.decode_catalog(upsert, self.settings, spec, self.decode_budget)
                except InvalidMessage as exc:
                    return exc

            images: list[tuple[int, CatalogImage]] = []
            for i, ((event, _), result) in enumerate(zip(upserts, self.decode_threads.map(decode, [u for _, u in upserts]),
                                                         strict=True)):
                if isinstance(result, InvalidMessage):
                    refuse(*event, result)
                else:
                    images.append((i, result))
            if images:
                records = stages.embed_catalog(embedder, [img for _, img in images])
                vectors = {i: (img.source.partition, record) for (i, img), record in zip(images, records, strict=True)}
        # In catalog order: a removal keeps its place among the upserts, else an upsert then a
        # delete of one item in one batch would come out as the delete then the upsert, and
        # the deleted item would come back.
        out: list[tuple[int, OutRecord]] = []
        upsert_index = 0
        for slot in slots:
            if slot is None:
                if upsert_index in vectors:
                    out.append(vectors[upsert_index])
                upsert_index += 1
            else:
                out.append(slot)
        return out, dead

    def query_batch(self, events: Sequence[Event]):
        """-> (query-vector records, [(reply topic, error reply record)]). Runs in the inference thread."""
        version = self.models.serving
        try:
            embedder = self.models.get(version) if version else None
        except (ModelArtifactError, OSError) as exc:
            log.error("model %s cannot be loaded: %s", version, exc)
            embedder = None
        queries: list[Query] = []
        errors: list[tuple[str, OutRecord]] = []
        for key, value, headers, source in events:
            authenticated = False
            try:
                client_id = self.guard.authenticate(key, value, headers)  # before decoding anything
                authenticated = True
                # Past its deadline: answered now, without counting against its client's rate or decoding it.
                deadline = c.query_deadline_ms(headers, source.timestamp_ms, self.settings.query_deadline_ms)
                c.check_deadline(deadline, time.time() * 1000, "worker")
                self.guard.limit(client_id)
                query = stages.parse_query(key, value, headers, source, self.settings,
                                           embedder.card.preprocess if embedder else None, deadline_ms=deadline)
                if not self.reply_topics.exists(query.options.reply_to):
                    raise BadHeader(f"reply-to topic {query.options.reply_to!r} does not exist")
                queries.append(query)
            except InvalidMessage as exc:
                log.log(logging.DEBUG if exc.code in SHED_CODES else logging.INFO,
                        "query %r refused: %s", stages.request_id_of(key), exc,  # %r: a key may hold a newline
                        extra={"request_id": stages.request_id_of(key), "code": exc.code})
                metrics.observe_error("worker", exc.code)
                rejected = Rejected(key, value, headers, exc, source)
                # Before authentication no header is the caller's to choose: the default reply topic.
                reply_to = stages.reply_destination(headers, self.settings) if authenticated else self.settings.replies_topic
                if not self.reply_topics.exists(reply_to):
                    reply_to = self.settings.replies_topic
                errors.append((reply_to, stages.error_reply_record(rejected, version)))
        if queries and embedder is None:
            for query in queries:
                exc = InvalidMessage(f"no model to embed with (serving: {version}): train or fetch one", code=ErrorCode.NOT_READY)
                rejected = Rejected(query.request_key, None, {}, exc, query.source)
                errors.append((query.options.reply_to, stages.error_reply_record(rejected, None)))
            return [], errors
        queries = self.shed(queries, errors, version)
        if not queries:
            return [], errors
        started = time.perf_counter()
        vectors = stages.embed_queries(embedder, queries)
        images = sum(q.pixels is not None for q in queries)
        if images:
            pace = (time.perf_counter() - started) / images
            self.embed_s_per_query = pace if not self.embed_s_per_query else (
                PACE_WEIGHT * pace + (1 - PACE_WEIGHT) * self.embed_s_per_query)
        return vectors, errors

    def shed(self, queries: list[Query], errors: list[tuple[str, OutRecord]], version: str | None) -> list[Query]:
        """Load shedding: an image query that would be finished after its deadline at the pace
        measured so far (the images kept before it and itself) gets ``overloaded`` now instead of
        a late answer. One image query is always kept, so the pace is measured again and a pace
        that was too slow (a stall) cannot shed everything for ever. Returns the queries kept."""
        pace_ms = self.embed_s_per_query * 1000
        if not pace_ms:
            return queries
        now_ms = time.time() * 1000
        kept: list[Query] = []
        shed: list[Query] = []
        images = 0
        for query in queries:
            if query.pixels is None or query.deadline_ms is None or query.deadline_ms >= now_ms + pace_ms * (images + 1):
                kept.append(query)
                images += query.pixels is not None
            else:
                shed.append(query)
        if shed and not images:
            latest = max(shed, key=lambda q: q.deadline_ms or 0)
            shed.remove(latest)
            kept.append(latest)
        for query in shed:
            exc = Overloaded(f"the worker would answer after the query's deadline (in "
                             f"{(query.deadline_ms or 0) - now_ms:.0f} ms) at its present pace "
                             f"({pace_ms:.1f} ms per image); not embedded, ask again later")
            metrics.observe_error("worker", exc.code)
            errors.append((query.options.reply_to,
                           stages.error_reply_record(Rejected(query.request_key, None, {}, exc, query.source), version)))
        return kept

    async def embed_query_records(self, records: Sequence[Record], service: str) -> tuple[list[OutRecord], list[Output]]:
        """Consumed queries -> (their query-vector records, error replies to produce), embedded
        in the query thread; ``service`` names who measures the batch (the worker, or an indexer
        that embeds its own queries: :mod:`onehop.app`)."""
        started = time.perf_counter()
        vectors, errors = await self.query_thread.run(self.query_batch, events_of(records))
        metrics.observe_batch(service, "query", len(records), time.perf_counter() - started)
        return vectors, [Output(reply_to, key, value, headers) for reply_to, (key, value, headers) in errors]

    def late(self, record: Record) -> list[Output] | None:
        """Triage of the query loop (:class:`lookalike.runtime.Loop`), as each query is read: one
        already past its deadline is answered ``deadline_exceeded``, and an image query whose
        deadline comes before the queries queued ahead of it (some must be) and its own batch are
        embedded (at the measured pace) is shed as ``overloaded``, both without a turn in the
        inference thread.
        None for the others (a malformed deadline too: the stage says bad_header)."""
        now_ms = time.time() * 1000
        try:
            deadline = c.query_deadline_ms(record.headers, record.timestamp_ms, self.settings.query_deadline_ms)
            c.check_deadline(deadline, now_ms, "worker")
            # Nothing queued: the query is next, and it keeps the pace measured (a stall cannot shed all for ever).
            queued = self.queued()
            if deadline is None or not self.embed_s_per_query or c.H_ITEM_ID in record.headers or not queued:
                return None
            ahead_ms = self.embed_s_per_query * (queued + self.settings.query_batch_max) * 1000
            if deadline - now_ms >= ahead_ms:
                return None
            raise Overloaded(f"the worker is over capacity: the {self.queued()} queries queued ahead and this one's "
                             f"batch take ~{ahead_ms:.0f} ms at {self.embed_s_per_query * 1000:.1f} ms per image, "
                             f"past the query's deadline in {deadline - now_ms:.0f} ms; not embedded, ask again later")
        except (DeadlineExceeded, Overloaded) as exc:
            metrics.observe_error("worker", exc.code)
            return self.query_failed(record, exc)
        except InvalidMessage:
            return None

    def query_failed(self, record: Record, exc: Exception) -> list[Output]:
        """A query the stage failed on (a bug, or its reply refused by the broker) still gets
        an error reply, at its reply-to if that one is valid."""
        error = exc if isinstance(exc, InvalidMessage) else InvalidMessage(f"{type(exc).__name__}: {exc}"[:500],
                                                                           code=code_of(exc))
        rejected = Rejected(record.key, record.value, record.headers, error,
                            Origin(record.topic, record.partition, record.offset, record.timestamp_ms))
        reply_to = self.settings.replies_topic
        if self.guard.authentic(record.key, record.value, record.headers):  # else its reply-to is no one's word
            wanted = stages.reply_destination(record.headers, self.settings)
            reply_to = wanted if self.reply_topics.exists(wanted) else reply_to
        key, value, headers = stages.error_reply_record(rejected, self.models.serving)
        return [Output(reply_to, key, value, headers)]


def events_of(records: Sequence[Record]) -> list[Event]:
    return [(r.key, r.value, r.headers, Origin(r.topic, r.partition, r.offset, r.timestamp_ms)) for r in records]


def outputs(topic: str, records: Sequence[OutRecord], partitions: Sequence[int | None] | None = None) -> list[Output]:
    return [Output(topic, key, value, headers, partition)
            for (key, value, headers), partition in zip(records, partitions or [None] * len(records), strict=True)]


class Worker:
    """The query loop, the catalog loops (one per live model version), the rollout follower
    and the heartbeat."""

    def __init__(self, settings: WorkerSettings, models: ModelSet) -> None:
        self.settings = settings
        self.models = models
        self.embedding = EmbeddingWorker(settings, models)
        self.sender = Sender(settings)  # the catalog's vectors and dead letters: batched (linger.ms 2)
        # Query vectors and error replies leave at once: a lone query would wait out linger.ms
        # (2 ms) in the producer's queue, at each of the two hops (docs/benchmarks.md).
        self.query_sender = Sender(settings, **{"linger.ms": 0})
        self.catalog_tasks: dict[str, asyncio.Task[None]] = {}

    # -- queries --------------------------------------------------------------------
    async def embed_queries(self, records: list[Record]) -> list[Output]:
        vectors, errors = await self.embedding.embed_query_records(records, "worker")
        return outputs(self.settings.query_vectors_topic, vectors) + errors

    def query_loop(self) -> Loop:
        s = self.settings
        loop = Loop(name="embed-queries", service="worker", sender=self.query_sender,
                    source=Source(s, group=s.worker_group, name="queries"), topics=[s.queries_topic],
                    handle=self.embed_queries, on_error=self.embedding.query_failed,
                    batch_max=s.query_batch_max, batch_wait_s=s.query_batch_wait_ms / 1000,
                    triage=self.embedding.late, fetch_max=max(s.query_batch_max, QUERY_FETCH_MAX))
        self.embedding.queued = loop.batches.__len__
        return loop

    # -- catalog --------------------------------------------------------------------
    def group(self, version: str) -> str:
        return f"{self.settings.worker_group}.catalog.{version}"

    async def catalog_loop(self, version: str) -> None:
        """Embed the catalog into ``version``'s vector topic (effects before commits)."""
        s = self.settings
        loop = asyncio.get_running_loop()
        try:
            await self.embedding.catalog_thread.run(self.models.get, version)
            topic = await loop.run_in_executor(None, ensure_vectors_topic, s, version)
        except (ModelArtifactError, OSError, KafkaException) as exc:
            log.error("catalog consumer for model %s cannot start: %s (retried on the next state change)", version, exc)
            await asyncio.sleep(5)
            return

        async def embed(records: list[Record]) -> list[Output]:
            dead_letters = self.models.serving == version
            started = time.perf_counter()
            vectors, dead = await self.embedding.catalog_thread.run(
                self.embedding.catalog_batch, events_of(records), version, dead_letters)
            metrics.observe_batch("worker", "catalog", len(records), time.perf_counter() - started)
            return (outputs(topic, [r for _, r in vectors], [p for p, _ in vectors])
                    + outputs(s.deadletter_topic, dead))

        def failed(record: Record, exc: Exception) -> list[Output]:
            return [dead_letter(s.deadletter_topic, record, exc)] if self.models.serving == version else []

        await Loop(name=f"catalog-{version}", service="worker", sender=self.sender, handle=embed, on_error=failed,
                   source=Source(s, group=self.group(version), name=f"catalog-{version}"), topics=[s.catalog_topic],
                   batch_max=s.catalog_batch_max, batch_wait_s=max(s.catalog_batch_wait_ms, 1) / 1000).run()

    def reconcile(self, versions: Sequence[str]) -> None:
        for version in versions:
            task = self.catalog_tasks.get(version)
            if task is None or task.done():
                task = asyncio.create_task(self.catalog_loop(version), name=f"catalog-{version}")
                task.add_done_callback(self._catalog_done)
                self.catalog_tasks[version] = task
                log.info("catalog consumer for model %s: started (group %s)", version, self.group(version))
        for version in [v for v in self.catalog_tasks if v not in versions]:
            self.catalog_tasks.pop(version).cancel()
            log.info("catalog consumer for model %s: stopped", version)

    @staticmethod
    def _catalog_done(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("%s stopped: %r; restarted on the next rollout tick", task.get_name(), task.exception())

    async def stop_catalog(self) -> None:
        tasks = list(self.catalog_tasks.values())
        self.catalog_tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- rollout and liveness -------------------------------------------------------
    async def follow_rollout(self) -> None:
        """Read the rollout state; embed queries with the serving model and the catalog with
        every live one. When Redis is away, the last state known stays."""
        s, models = self.settings, self.models
        loop = asyncio.get_running_loop()
        client = rollout.redis_client(s)
        try:
            while True:
                try:
                    state = await loop.run_in_executor(None, rollout.read_state, client, s)
                except (redis.RedisError, OSError) as exc:
                    log.debug("rollout state unavailable: %s", exc)
                    state = None
                if state is not None and state != models.state:
                    log.info("rollout state: serving %s, building %s", state.serving, state.target)
                    models.state = state
                elif state is None and models.state.serving is None:  # no state and no champion at start: look again
                    models.state = RolloutState(serving=rollout.desired_version(s))
                self.reconcile(models.state.embedding())
                models.forget([*models.state.embedding()])
                await asyncio.sleep(s.rollout_poll_s)
        finally:  # the worker stops: its catalog consumers leave their groups, so others take over at once
            await self.stop_catalog()

    async def heartbeat(self) -> None:
        while True:
            beat(heartbeat_path(self.settings, "worker"), model_version=self.models.serving,
                 catalog_models=sorted(self.catalog_tasks))
            await asyncio.sleep(HEARTBEAT_EVERY_S)

    async def run(self) -> None:
        jobs = {"rollout": self.follow_rollout(), "heartbeat": self.heartbeat()}
        if self.settings.query_embedding == "worker":
            jobs["queries"] = self.query_loop().run()
        else:  # the indexers embed and answer the queries themselves (onehop/app.py): the catalog only
            log.info("queries are embedded by the indexers (LOOKALIKE_QUERY_EMBEDDING=indexer): catalog only")
        try:
            await run_forever(*jobs.values(), names=list(jobs))
        finally:
            self.query_sender.close()
            self.sender.close()
