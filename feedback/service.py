"""The feedback aggregator: a faust app that joins feedback to replies and raises retraining triggers.

Agents (each its own consumer of the group ``LOOKALIKE_FEEDBACK_GROUP``):

* ``replies``: every ok reply -> the join lookup (model version, items in rank order);
* ``query-vectors``: the "more like this" item of a query (training pairs) and a
  sample of query vectors (drift);
* ``catalog-vectors``: a hash-chosen sample of catalog vectors (drift);
* ``feedback``: validate, join, count; a record the contract refuses is counted, logged
  and dead-lettered like the worker's, and the loop goes on.

A timer evaluates :mod:`feedback.policy` every ``LOOKALIKE_POLICY_INTERVAL_S`` and
produces at most one trigger per training. Redis work runs in one thread so the event
loop keeps heartbeating; when Redis is away the agents wait and retry (nothing is
committed before its effect is in Redis).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import faust
import redis
from aiokafka import AIOKafkaConsumer

from feedback import windows as w
from feedback.policy import PolicyInputs, TriggerPolicy, due_reasons, emit_decision, mean_cosine_drift
from feedback.store import FeedbackStore
from lookalike import contracts as c
from lookalike.clients import aiokafka_config, faust_app
from lookalike.errors import InvalidMessage
from lookalike.events import Trigger, make_trigger, parse_feedback
from lookalike.health import HEARTBEAT_EVERY_S, beat, heartbeat_path
from lookalike.settings import FeedbackSettings
from lookalike.status import indexer_status

log = logging.getLogger(__name__)
T = TypeVar("T")
Record = tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]


def deadletter_record(key: bytes | None, value: bytes | None, headers: dict[str, bytes], error: InvalidMessage,
                      topic: str, partition: int, offset: int) -> Record:
    """The refused record as it came, with the reason and its origin (the worker's dead-letter headers)."""
    kept = [(n, v) for n, v in headers.items() if not n.startswith(("error-", "source-"))]
    return (key, value, [*kept,
                         (c.H_ERROR_CODE, error.code.encode()),
                         (c.H_ERROR_MESSAGE, str(error)[:1000].encode()),
                         (c.H_SOURCE_TOPIC, topic.encode()),
                         (c.H_SOURCE_PARTITION, str(partition).encode()),
                         (c.H_SOURCE_OFFSET, str(offset).encode())])


class Aggregator:
    """The store, the policy, and what the agents call (in the Redis thread)."""

    def __init__(self, settings: FeedbackSettings, store: FeedbackStore | None = None) -> None:
        self.settings = settings
        self.store = store or FeedbackStore.connect(settings)
        self.policy = TriggerPolicy.from_settings(settings)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="redis")
        self.last_emit: str = "nothing_due"

    def catalog_items(self) -> int | None:
        """The catalog's size: the largest item count a live indexer reports."""
        try:
            counts = [s["items"] for s in indexer_status(self.settings, self.settings.indexer_group)]
        except redis.RedisError:
            return None
        return max(counts) if counts else None

    def feedback_batch(self, events: Sequence[tuple[bytes | None, bytes | None, dict[str, bytes], str, int, int]]
                       ) -> list[Record]:
        """Validate and apply a batch; returns the dead letters."""
        dead: list[Record] = []
        for key, value, headers, topic, partition, offset in events:
            try:
                event = parse_feedback(key, value)
            except InvalidMessage as exc:
                log.warning("feedback %s:%d@%d refused: %s", topic, partition, offset, exc)
                self.store.count_invalid(exc.code)
                dead.append(deadletter_record(key, value, headers, exc, topic, partition, offset))
                continue
            self.store.record_feedback(event)
        return dead

    def reply_batch(self, events: Sequence[tuple[bytes | None, int]]) -> None:
        for value, timestamp_ms in events:
            facts = w.reply_facts(value)
            if facts is not None:
                self.store.record_reply(facts, timestamp_ms)

    def query_batch(self, events: Sequence[tuple[bytes | None, bytes | None, dict[str, bytes], int]]) -> None:
        for key, value, headers, timestamp_ms in events:
            try:
                request_id = c.decode_key(key)
                item = headers.get(c.H_ITEM_ID)
                model = headers.get(c.H_MODEL_VERSION, b"").decode() or None
                dim = int(headers.get(c.H_VECTOR_DIM, b"0") or 0) or (len(value) // 4 if value else 0)
                vector = c.decode_vector(value, dim) if value else None
                self.store.record_query(request_id, model, item.decode() if item else None, vector, timestamp_ms)
            except (InvalidMessage, UnicodeDecodeError, ValueError) as exc:
                log.debug("query vector skipped: %s", exc)

    def catalog_batch(self, events: Sequence[tuple[bytes | None, bytes | None, dict[str, bytes]]]) -> None:
        for key, value, headers in events:
            try:
                item_id = c.decode_key(key)
                model = headers.get(c.H_MODEL_VERSION, b"").decode()
                if not model:
                    continue
                vector = c.decode_vector(value, len(value) // 4) if value else None
                self.store.record_catalog_vector(item_id, model, vector)
            except (InvalidMessage, UnicodeDecodeError, ValueError) as exc:
                log.debug("catalog vector skipped: %s", exc)

    # -- the policy ------------------------------------------------------------------
    def policy_inputs(self, now_ms: int) -> PolicyInputs:
        s, store = self.settings, self.store
        model = store.serving_model()
        catalog = self.catalog_items()
        if catalog is not None:
            store.note_catalog_baseline(catalog)
        last = store.last_training()
        labelled = store.totals().get("labelled", 0)
        baseline = recent = None
        drift, drift_queries = None, 0
        if model is not None:
            buckets = store.buckets(model)
            if buckets:
                base_window = w.leading_window(buckets[0], s.trigger_baseline_minutes, s.bucket_s)
                recent_window = w.window(now_ms, s.trigger_recent_minutes, s.bucket_s)
                if recent_window.start >= base_window.stop:  # the two windows must not overlap
                    baseline = store.window_metrics(model, base_window, catalog)
                    recent = store.window_metrics(model, recent_window, catalog)
            queries = store.query_samples(model, w.window(now_ms, s.trigger_drift_minutes, s.bucket_s))
            drift_queries = len(queries)
            if drift_queries:
                drift = mean_cosine_drift(queries, store.catalog_sample(model))
        return PolicyInputs(
            model_version=model,
            new_feedback=labelled - int(last.get("labelled", 0)),
            baseline=baseline,
            recent=recent,
            catalog_items=catalog,
            catalog_items_at_training=last.get("catalog_items"),
            drift=drift,
            drift_queries=drift_queries,
            seconds_since_training=(time.time() - last["at"]) if "at" in last else None,
        )

    def maybe_trigger(self, now_ms: int | None = None) -> Trigger | None:
        """A trigger to produce now, claimed in Redis; None when nothing is due or one is absorbed."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        inputs = self.policy_inputs(now_ms)
        reasons = due_reasons(inputs, self.policy)
        store = self.store
        decision = emit_decision(reasons, lease_held=store.lease_holder() is not None,
                                 trigger_pending=store.trigger_pending() is not None)
        if decision == "emit":
            trigger = make_trigger(inputs.model_version, int(store.last_training()["generation"]), reasons)
            if store.claim_trigger(trigger.trigger_id, self.settings.trigger_pending_ttl_s):
                self.last_emit = decision
                return trigger
            decision = "trigger_pending"  # another aggregator instance got there first
        if decision != "nothing_due":
            if decision != self.last_emit:
                log.info("retraining is due (%s) but absorbed: %s", ", ".join(r.reason for r in reasons), decision)
            store.count(f"absorbed:{decision}")
        self.last_emit = decision
        return None


async def until_done(aggregator: Aggregator, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn`` in the Redis thread; while Redis is away, wait and try again (nothing is committed meanwhile)."""
    loop = asyncio.get_running_loop()
    delay = 0.5
    while True:
        try:
            return await loop.run_in_executor(aggregator.executor, fn, *args)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.warning("Redis is unavailable (%s); retrying in %.1fs", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)


def ms_of(event: Any) -> int:
    ts = event.message.timestamp
    return int(ts * 1000) if ts else int(time.time() * 1000)


def create_app(settings: FeedbackSettings, aggregator: Aggregator | None = None) -> faust.App:
    """The faust app with the four agents and the policy timer."""
    agg = aggregator or Aggregator(settings)
    app = faust_app(settings, settings.feedback_group)

    def topic(name: str) -> faust.TopicT:
        return app.topic(name, key_type=bytes, value_type=bytes, allow_empty=True)

    async def produce(topic_name: str, records: Sequence[Record]) -> None:
        pending = [await app.producer.send(topic_name, k, v, None, None, h) for k, v, h in records]
        if pending:
            await asyncio.gather(*pending)

    @app.agent(topic(settings.feedback_topic), name="feedback")
    async def feedback(stream: faust.Stream) -> None:
        async for events in stream.take_events(256, within=0.05):
            batch = [(e.key, e.value, c.headers_to_dict(e.headers), e.message.topic, e.message.partition,
                      e.message.offset) for e in events]
            dead = await until_done(agg, agg.feedback_batch, batch)
            await produce(settings.deadletter_topic, dead)

    @app.agent(topic(settings.replies_topic), name="replies")
    async def replies(stream: faust.Stream) -> None:
        async for events in stream.take_events(256, within=0.05):
            await until_done(agg, agg.reply_batch, [(e.value, ms_of(e)) for e in events])

    @app.agent(topic(settings.query_vectors_topic), name="query-vectors")
    async def query_vectors(stream: faust.Stream) -> None:
        async for events in stream.take_events(256, within=0.05):
            batch = [(e.key, e.value, c.headers_to_dict(e.headers), ms_of(e)) for e in events]
            await until_done(agg, agg.query_batch, batch)

    @app.task
    async def catalog_vectors() -> None:
        """Every model version's catalog-vector topic ({catalog_vectors_topic}.{version}, see
        lookalike/rollout.py), found by pattern, including ones created later (aiokafka
        re-checks the pattern on each metadata refresh). Offsets are committed after Redis has
        the batch."""
        consumer = AIOKafkaConsumer(
            **aiokafka_config(settings), group_id=f"{settings.feedback_group}.catalog-vectors",
            enable_auto_commit=False, auto_offset_reset="earliest", metadata_max_age_ms=5000,
        )
        await consumer.start()
        try:
            consumer.subscribe(pattern=f"^{re.escape(settings.catalog_vectors_topic)}\\..+$")
            while True:
                batch = await consumer.getmany(timeout_ms=200, max_records=256)
                records = [r for rs in batch.values() for r in rs]
                if not records:
                    continue
                await until_done(agg, agg.catalog_batch, [(r.key, r.value, c.headers_to_dict(r.headers)) for r in records])
                await consumer.commit({tp: rs[-1].offset + 1 for tp, rs in batch.items()})
        finally:
            await consumer.stop()

    @app.timer(interval=settings.policy_interval_s)
    async def policy() -> None:
        try:
            trigger = await until_done(agg, agg.maybe_trigger)
        except Exception:  # a bug in one evaluation must not stop the next ones
            log.exception("trigger policy evaluation failed")
            return
        if trigger is None:
            return
        key, value = trigger.encode()
        try:
            await produce(settings.triggers_topic, [(key, value, [])])
        except Exception:
            await until_done(agg, agg.store.unclaim_trigger, trigger.trigger_id)
            raise
        log.info("trigger %s: %s", trigger.trigger_id, "; ".join(r.message for r in trigger.reasons))

    @app.task
    async def heartbeat() -> None:
        while True:
            beat(heartbeat_path(settings, "feedback"))
            await asyncio.sleep(HEARTBEAT_EVERY_S)

    app.lookalike_aggregator = agg  # type: ignore[attr-defined]
    return app
