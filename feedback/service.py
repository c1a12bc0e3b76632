"""The feedback aggregator: joins feedback to replies and raises retraining triggers.

Loops on the consumer runtime (:mod:`lookalike.runtime`); one consumer of the group
``LOOKALIKE_FEEDBACK_GROUP`` reads these three topics:

* ``replies``: every ok reply -> the join lookup (model version, items in rank order);
* ``query-vectors``: the "more like this" item of a query (training pairs) and a
  sample of query vectors (drift);
* ``feedback``: validate, join, count; a record the contract refuses is counted, logged
  and dead-lettered like the worker's, and the loop goes on;

and one in ``{group}.catalog-vectors`` reads every model version's catalog-vector topic
(by pattern, including ones created later) for a hash-chosen sample of catalog vectors (drift).

A timer evaluates :mod:`feedback.policy` every ``LOOKALIKE_POLICY_INTERVAL_S`` and
produces at most one trigger per training. Redis work runs in one thread; when Redis is
away the loops wait and retry (nothing is committed before its effect is in Redis).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import redis

from feedback import windows as w
from feedback.policy import (
    PolicyInputs,
    TriggerPolicy,
    drift_null,
    due_reasons,
    emit_decision,
    mean_cosine_drift,
)
from feedback.report import indexed_catalogs
from feedback.store import FeedbackStore
from lookalike import contracts as c
from lookalike.clients import LONG_POLL_MS
from lookalike.errors import InvalidMessage
from lookalike.events import Trigger, make_trigger, parse_feedback
from lookalike.health import HEARTBEAT_EVERY_S, beat, heartbeat_path
from lookalike.runtime import Loop, Output, Record, Sender, Source, dead_letter, run_forever
from lookalike.settings import FeedbackSettings

log = logging.getLogger(__name__)
T = TypeVar("T")

# The aggregator is not on anyone's critical path: its consumers let the broker gather up to
# 1 MiB or 500 ms per fetch. At 50 queries/s it otherwise woke per reply and per query
# vector, ~100 fetches a second, each a round of work for the broker and for this process.
BATCHED_FETCH = {"fetch.min.bytes": 1 << 20, "fetch.wait.max.ms": LONG_POLL_MS}


class Aggregator:
    """The store, the policy, and what the loops call (in the Redis thread)."""

    def __init__(self, settings: FeedbackSettings, store: FeedbackStore | None = None) -> None:
        self.settings = settings
        self.store = store or FeedbackStore.connect(settings)
        self.policy = TriggerPolicy.from_settings(settings)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="redis")
        self.last_emit: str = "nothing_due"

    def feedback_batch(self, records: Sequence[Record]) -> list[Output]:
        """Validate and apply a batch; returns the dead letters."""
        dead: list[Output] = []
        for record in records:
            try:
                event = parse_feedback(record.key, record.value)
            except InvalidMessage as exc:
                log.warning("feedback %s refused: %s", record.where(), exc)
                self.store.count_invalid(exc.code)
                dead.append(dead_letter(self.settings.deadletter_topic, record, exc))
                continue
            self.store.record_feedback(event)
        return dead

    def reply_batch(self, events: Sequence[tuple[bytes | None, int]]) -> None:
        replies = [(facts, timestamp_ms) for value, timestamp_ms in events
                   if (facts := w.reply_facts(value)) is not None]
        self.store.record_replies(replies)

    def query_batch(self, events: Sequence[tuple[bytes | None, bytes | None, dict[str, bytes], int]]) -> None:
        for key, value, headers, timestamp_ms in events:
            try:
                request_id = c.decode_key(key)
                item = headers.get(c.H_ITEM_ID)
                model = headers.get(c.H_MODEL_VERSION, b"").decode() or None
                dim = c.parse_int(headers.get(c.H_VECTOR_DIM, str(len(value or b"") // 4).encode()),
                                  what="vector-dim", lo=1, hi=c.MAX_VECTOR_DIM) if value else 0
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
                dim = c.parse_int(headers.get(c.H_VECTOR_DIM, b""), what="vector-dim", lo=1,
                                  hi=c.MAX_VECTOR_DIM) if value else 0
                vector = c.decode_vector(value, dim) if value else None
                self.store.record_catalog_vector(item_id, model, vector)
            except (InvalidMessage, UnicodeDecodeError, ValueError) as exc:
                log.debug("catalog vector skipped: %s", exc)

    # -- the policy ------------------------------------------------------------------
    def policy_inputs(self, now_ms: int) -> PolicyInputs:
        s, store = self.settings, self.store
        model = store.serving_model()
        indexed = indexed_catalogs(self.settings)
        for version, items in indexed.items():
            if version:
                store.note_catalog(version, items, now_ms / 1000)
        catalog = max(indexed.values()) if indexed else None
        # Growth is measured for the model that answers (before any reply: the largest index's).
        grown_from = model or max(indexed, key=lambda v: indexed[v], default=None)
        last = store.last_training()
        labelled = store.totals().get("labelled", 0)
        baseline = recent = None
        drift, drift_queries, null = None, 0, None
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
                catalog_vectors = store.catalog_sample(model)
                drift = mean_cosine_drift(queries, catalog_vectors)
                if drift is not None and drift >= self.policy.drift:  # the null only matters past the threshold
                    null = drift_null(catalog_vectors, drift_queries)
        return PolicyInputs(
            model_version=model,
            new_feedback=labelled - int(last.get("labelled", 0)),
            baseline=baseline,
            recent=recent,
            catalog_items=catalog,
            catalog_baseline=store.catalog_baseline(grown_from),
            drift=drift,
            drift_queries=drift_queries,
            drift_null=null,
            seconds_since_training=(time.time() - last["at"]) if "at" in last else None,
        )

    def maybe_trigger(self, now_ms: int | None = None) -> Trigger | None:
        """A trigger to produce now, claimed in Redis; None when nothing is due or one is absorbed."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        inputs = self.policy_inputs(now_ms)
        self.store.count("policy_evaluations")
        reasons = due_reasons(inputs, self.policy)
        store = self.store
        decision = emit_decision(reasons, lease_held=store.lease_holder() is not None,
                                 trigger_pending=store.trigger_pending() is not None)
        if decision == "emit":
            trigger = make_trigger(inputs.model_version, int(store.last_training()["generation"]), reasons)
            if store.claim_trigger(trigger.trigger_id, self.settings.trigger_pending_ttl_s):
                store.note_trigger(trigger)  # its record: the trainer says what became of it
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


def ms_of(record: Record) -> int:
    return record.timestamp_ms or int(time.time() * 1000)


class FeedbackService:
    """The aggregator's loops on the consumer runtime: feedback, replies and query vectors in
    the group ``LOOKALIKE_FEEDBACK_GROUP``; every version's catalog vectors, found by
    pattern, in ``{group}.catalog-vectors``; the policy timer; the heartbeat."""

    def __init__(self, settings: FeedbackSettings, aggregator: Aggregator | None = None) -> None:
        self.settings = settings
        self.agg = aggregator or Aggregator(settings)

    async def handle(self, records: list[Record]) -> list[Output]:
        """One batch of the three joined topics; Redis work in the Redis thread, retried while it is away."""
        s, agg = self.settings, self.agg
        feedback = [r for r in records if r.topic == s.feedback_topic]
        replies = [(r.value, ms_of(r)) for r in records if r.topic == s.replies_topic]
        queries = [(r.key, r.value, r.headers, ms_of(r)) for r in records if r.topic == s.query_vectors_topic]
        dead = await until_done(agg, agg.feedback_batch, feedback) if feedback else []
        if replies:
            await until_done(agg, agg.reply_batch, replies)
        if queries:
            await until_done(agg, agg.query_batch, queries)
        return dead

    def failed(self, record: Record, exc: Exception) -> list[Output]:
        """A feedback record the stage failed on is dead-lettered; replies and query vectors
        are others' records and are only counted (the runtime logs them)."""
        return [dead_letter(self.settings.deadletter_topic, record, exc)] if record.topic == self.settings.feedback_topic else []

    async def handle_catalog(self, records: list[Record]) -> list[Output]:
        await until_done(self.agg, self.agg.catalog_batch, [(r.key, r.value, r.headers) for r in records])
        return []

    async def policy(self, sender: Sender) -> None:
        """Evaluate the trigger policy every ``policy_interval_s``; produce at most one trigger."""
        s, agg = self.settings, self.agg
        while True:
            await asyncio.sleep(s.policy_interval_s)
            try:
                trigger = await until_done(agg, agg.maybe_trigger)
            except Exception:  # a bug in one evaluation must not stop the next ones
                log.exception("trigger policy evaluation failed")
                continue
            if trigger is None:
                continue
            key, value = trigger.encode()
            if await sender.send_all([Output(s.triggers_topic, key, value)]):
                log.warning("trigger %s could not be sent; released for the next evaluation", trigger.trigger_id)
                await until_done(agg, agg.store.unclaim_trigger, trigger.trigger_id)
                continue
            log.info("trigger %s: %s", trigger.trigger_id, "; ".join(r.message for r in trigger.reasons))

    async def heartbeat(self) -> None:
        while True:
            beat(heartbeat_path(self.settings, "feedback"))
            await asyncio.sleep(HEARTBEAT_EVERY_S)

    async def run(self) -> None:
        s = self.settings
        sender = Sender(s)
        joined = Loop(name="feedback", service="feedback", sender=sender, handle=self.handle, on_error=self.failed,
                      source=Source(s, group=s.feedback_group, name="feedback", **BATCHED_FETCH),
                      topics=[s.feedback_topic, s.replies_topic, s.query_vectors_topic],
                      batch_max=256, batch_wait_s=0.05)
        catalog = Loop(name="catalog-vectors", service="feedback", sender=sender, handle=self.handle_catalog,
                       source=Source(s, group=f"{s.feedback_group}.catalog-vectors", name="catalog-vectors",
                                     **BATCHED_FETCH),
                       topics=[f"^{re.escape(s.catalog_vectors_topic)}\\..+$"], batch_max=256)
        try:
            await run_forever(joined.run(), catalog.run(), self.policy(sender), self.heartbeat(),
                              names=("feedback", "catalog-vectors", "policy", "heartbeat"))
        finally:
            sender.close()
