"""The feedback loop's state in Redis: the reply join, the metric windows, samples, pairs, the trainer lease.

Keys (``{ns}`` is ``LOOKALIKE_FEEDBACK_GROUP``; every key but the totals expires)::

    lookalike:feedback:{ns}:req:{request_id}        hash: model_version, items (JSON, rank order), query_item
    lookalike:feedback:{ns}:pending:{request_id}    list: feedback that arrived before its reply
    lookalike:feedback:{ns}:seen:{sha1}             one (request, item, event) counted
    lookalike:feedback:{ns}:w:{model}:{bucket}      hash: the counters of windows.COUNTERS
    lookalike:feedback:{ns}:wi:{model}:{bucket}     set: items impressed (coverage)
    lookalike:feedback:{ns}:wq:{model}:{bucket}     list: sampled query vectors (drift)
    lookalike:feedback:{ns}:buckets:{model}         sorted set: the buckets a model has
    lookalike:feedback:{ns}:models                  sorted set: model versions by last reply
    lookalike:feedback:{ns}:catalog:{model}         hash: item id -> vector, a hash-chosen sample of the catalog
    lookalike:feedback:{ns}:pairs                   list: JSON training pairs, newest first, capped
    lookalike:feedback:{ns}:totals                  hash: labelled, events, invalid, pending, late, duplicates, ...
    lookalike:feedback:{ns}:last-training           hash: generation, labelled, catalog_items, at, outcome
    lookalike:feedback:{ns}:trigger-pending         a trigger id, while a trigger is out and not yet taken
    lookalike:feedback:{ns}:trainer-lease           the training trainer's id, with a TTL it renews

The join is safe in any order: a reply first stores its lookup and then takes the
pending list; a feedback event first joins the pending list and then, if the lookup
holds the reply's model version, takes it (a "more like this" query's vector record may
have created the lookup earlier with only its query item). Taking is atomic (LRANGE + DEL
in one transaction), so every event is applied once whichever side gets there first. An event is applied in one
transaction with its ``seen`` mark, so a replay after a crash counts nothing twice.
"""

from __future__ import annotations

import hashlib
import json
import time
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import numpy as np

from feedback import windows as w
from lookalike import contracts as c
from lookalike.events import FeedbackEvent, parse_feedback
from lookalike.ledger import FeedbackLedger

Outcome = Literal["applied", "pending", "duplicate", "late"]


class FeedbackStore(FeedbackLedger):
    """The aggregator's reads and writes over the shared ledger; every method is a few Redis round trips."""

    # -- replies and queries ---------------------------------------------------------
    def record_reply(self, facts: w.ReplyFacts, timestamp_ms: int) -> list[tuple[FeedbackEvent, Outcome]]:
        """Store the join lookup, count the reply once, then apply feedback that waited for it."""
        return self.record_replies([(facts, timestamp_ms)])

    def record_replies(self, replies: Sequence[tuple[w.ReplyFacts, int]]) -> list[tuple[FeedbackEvent, Outcome]]:
        """A batch of replies in two round trips: the join lookups, the count of each reply
        seen for the first time, and which have feedback waiting; then the counts. The
        waiting feedback (rare: it came before its reply) is applied after, reply by reply.
        Feedback that arrives meanwhile finds the lookup and applies itself
        (:meth:`record_feedback`), so none is left waiting."""
        if not replies:
            return []
        pipe = self.r.pipeline(transaction=True)
        for facts, timestamp_ms in replies:
            req = self.key("req", facts.request_id)
            known = {"model_version": facts.model_version, "items": json.dumps(facts.items)}
            if facts.query_item is not None:  # the join has the pair's query at once, whenever the query vector is read
                known["query_item"] = facts.query_item
            pipe.hset(req, mapping=known)
            pipe.hsetnx(req, "counted", "1")
            pipe.expire(req, self.s.reply_ttl_s)
            pipe.zadd(self.key("models"), {facts.model_version: timestamp_ms})
            pipe.exists(self.key("pending", facts.request_id))
        results = pipe.execute()
        counts: dict[tuple[str, int], int] = {}
        waiting: list[str] = []
        for n, (facts, timestamp_ms) in enumerate(replies):
            first_time, pending = results[5 * n + 1], results[5 * n + 4]
            if first_time:
                where = (facts.model_version, w.bucket_of(timestamp_ms, self.s.bucket_s))
                counts[where] = counts.get(where, 0) + 1
            if pending:
                waiting.append(facts.request_id)
        if counts:
            pipe = self.r.pipeline(transaction=True)
            for (model, bucket), n in counts.items():
                self._bump(model, bucket, {"replies": n}, pipe)
            pipe.hincrby(self.key("totals"), "replies", sum(counts.values()))
            pipe.execute()
        return [outcome for request_id in waiting for outcome in self._drain(request_id)]

    def record_query(self, request_id: str, model_version: str | None, query_item: str | None,
                     vector: np.ndarray | None, timestamp_ms: int) -> None:
        """What a query vector record tells: its "more like this" item (pairs) and its vector (drift)."""
        pipe = self.r.pipeline(transaction=False)
        if query_item is not None:
            req = self.key("req", request_id)
            pipe.hset(req, "query_item", query_item)
            pipe.expire(req, self.s.reply_ttl_s)
        if vector is not None and model_version:
            samples = self.key("wq", model_version, w.bucket_of(timestamp_ms, self.s.bucket_s))
            pipe.lpush(samples, c.encode_vector(vector))
            pipe.ltrim(samples, 0, self.s.query_samples_per_bucket - 1)
            pipe.expire(samples, self.keep_s)
        pipe.execute()
        if query_item is not None:
            self._pair_waiting(request_id, query_item)

    def record_catalog_vector(self, item_id: str, model_version: str, vector: np.ndarray | None) -> bool:
        """Keep the vector if the item id hashes into the sample (tombstone: forget it). Returns: kept."""
        if zlib.crc32(item_id.encode()) % 10_000 >= self.s.catalog_sample_rate * 10_000:
            return False
        sample = self.key("catalog", model_version)
        if vector is None:
            self.r.hdel(sample, item_id)
            return False
        if self.r.hlen(sample) >= self.s.catalog_sample_max and not self.r.hexists(sample, item_id):
            return False
        self.r.hset(sample, item_id, c.encode_vector(vector))
        return True

    # -- feedback --------------------------------------------------------------------
    def record_feedback(self, event: FeedbackEvent, now_ms: int | None = None) -> Outcome:
        """Apply an event now if its reply is known, else leave it waiting for the reply."""
        if self.r.exists(self._seen_key(event)):
            self.r.hincrby(self.key("totals"), "duplicates", 1)
            return "duplicate"
        pending = self.key("pending", event.request_id)
        pipe = self.r.pipeline(transaction=True)
        pipe.rpush(pending, json.dumps({"user": event.user_id, **event.to_json()}))
        pipe.expire(pending, self.s.pending_ttl_s)
        # The reply is known when its model version is: the lookup hash may exist before, holding
        # only the query item that the query-vector record brought (record_query).
        pipe.hexists(self.key("req", event.request_id), "model_version")
        joined = pipe.execute()[2]
        if not joined:
            self.r.hincrby(self.key("totals"), "pending", 1)
            return "pending"
        outcomes = self._drain(event.request_id, now_ms)
        mine = [o for e, o in outcomes if e == event]
        return mine[0] if mine else "applied"  # a concurrent reply took it: applied there

    @staticmethod
    def _pending_event(item: bytes) -> FeedbackEvent:
        doc = json.loads(item)
        user = doc.pop("user")
        return parse_feedback(user.encode(), json.dumps(doc).encode())

    def _drain(self, request_id: str, now_ms: int | None = None) -> list[tuple[FeedbackEvent, Outcome]]:
        """Apply the feedback waiting for ``request_id``'s reply; only called once the reply is recorded.

        The waiting events leave their list only after each one's effect and its seen mark are in
        Redis: when Redis goes away in between, the caller's retry (the batch, by ``until_done``)
        finds them still waiting and applies them, each at most once (the seen mark). Taken off
        first, the events of a query whose feedback was already committed were lost (7 of 2,705
        in a soak's Redis restart)."""
        pending = self.key("pending", request_id)
        raw = self.r.lrange(pending, 0, -1)
        if not raw:
            return []
        lookup = self.r.hgetall(self.key("req", request_id))
        model = lookup[b"model_version"].decode()
        items = json.loads(lookup[b"items"])
        query_item = lookup[b"query_item"].decode() if b"query_item" in lookup else None
        outcomes = []
        for item in raw:
            event = self._pending_event(item)
            outcomes.append((event, self._apply(event, model, items, query_item, now_ms)))
        pipe = self.r.pipeline(transaction=True)
        for item in raw:  # exactly these: one pushed meanwhile (another instance) stays for its own drain
            pipe.lrem(pending, 1, item)
        pipe.execute()
        return outcomes

    def _seen_key(self, event: FeedbackEvent) -> str:
        return self.key("seen", hashlib.sha1(event.dedup_key.encode()).hexdigest())

    def _apply(self, event: FeedbackEvent, model: str, items: list[str], query_item: str | None,
               now_ms: int | None) -> Outcome:
        seen = self._seen_key(event)
        if self.r.exists(seen):
            self.r.hincrby(self.key("totals"), "duplicates", 1)
            return "duplicate"
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        bucket = w.bucket_of(event.timestamp_ms, self.s.bucket_s)
        pipe = self.r.pipeline(transaction=True)
        pipe.set(seen, "1", ex=self.s.dedup_ttl_s)
        if now_ms - event.timestamp_ms > self.keep_s * 1000:
            pipe.hincrby(self.key("totals"), "late", 1)
            pipe.execute()
            return "late"
        rank = w.rank_of(event.item_id, items)
        self._bump(model, bucket, w.increments(event, rank), pipe)
        if event.event == "impression":
            shown = self.key("wi", model, bucket)
            pipe.sadd(shown, event.item_id)
            pipe.expire(shown, self.keep_s)
        totals = self.key("totals")
        pipe.hincrby(totals, "events", 1)
        label = w.pair_label(event)
        unpaired = self.key("unpaired", event.request_id)
        if label is not None:
            pipe.hincrby(totals, "labelled", 1)
            pair = {"query_item": query_item, "item_id": event.item_id, "label": label, "event": event.event,
                    "model_version": model, "timestamp": event.timestamp_ms}
            if query_item is None:  # its query-vector record may not be read yet: keep the label until it is
                pipe.rpush(unpaired, json.dumps(pair))
                pipe.expire(unpaired, self.s.reply_ttl_s)
            elif query_item != event.item_id:
                pipe.lpush(self.key("pairs"), json.dumps(pair))
                pipe.ltrim(self.key("pairs"), 0, self.s.max_pairs - 1)
        pipe.execute()
        if label is not None and query_item is None:  # the query item may have come meanwhile
            late = self.r.hget(self.key("req", event.request_id), "query_item")
            if late is not None:
                self._pair_waiting(event.request_id, late.decode())
        return "applied"

    def _pair_waiting(self, request_id: str, query_item: str) -> int:
        """Labels that came before their query's item was known become pairs now (for image
        queries there is no query item; their labels expire with the request)."""
        unpaired = self.key("unpaired", request_id)
        raw = self.r.lrange(unpaired, 0, -1)
        if not raw:
            return 0
        pairs = [{**json.loads(r), "query_item": query_item} for r in raw]
        pairs = [p for p in pairs if p["item_id"] != query_item]
        pipe = self.r.pipeline(transaction=True)  # the pairs made and the labels taken, together
        if pairs:
            pipe.lpush(self.key("pairs"), *[json.dumps(p) for p in pairs])
            pipe.ltrim(self.key("pairs"), 0, self.s.max_pairs - 1)
        for item in raw:
            pipe.lrem(unpaired, 1, item)
        pipe.execute()
        return len(pairs)

    def _bump(self, model: str, bucket: int, counts: dict[str, int], pipe: Any = None) -> None:
        own = pipe is None
        pipe = self.r.pipeline(transaction=True) if own else pipe
        counters = self.key("w", model, bucket)
        for name, n in counts.items():
            pipe.hincrby(counters, name, n)
        pipe.expire(counters, self.keep_s)
        index = self.key("buckets", model)
        pipe.zadd(index, {str(bucket): bucket})
        pipe.expire(index, self.keep_s)
        if own:
            pipe.execute()

    def count_invalid(self, code: str) -> None:
        self.r.hincrby(self.key("totals"), "invalid", 1)
        self.r.hincrby(self.key("totals"), f"invalid:{code}", 1)

    # -- reading ---------------------------------------------------------------------
    def models(self) -> list[str]:
        """Model versions seen in replies, the latest to answer last."""
        return [m.decode() for m in self.r.zrange(self.key("models"), 0, -1)]

    def serving_model(self) -> str | None:
        latest = self.r.zrange(self.key("models"), -1, -1)
        return latest[0].decode() if latest else None

    def buckets(self, model: str) -> list[int]:
        return sorted(int(b) for b in self.r.zrange(self.key("buckets", model), 0, -1))

    def window_metrics(self, model: str, buckets: Iterable[int], catalog_items: int | None) -> dict[str, Any]:
        """The metrics of ``model`` over ``buckets`` (counters summed, impressed items united)."""
        buckets = list(buckets)
        pipe = self.r.pipeline(transaction=False)
        for b in buckets:
            pipe.hgetall(self.key("w", model, b))
        total: dict[str, int] = {}
        for raw in pipe.execute():
            w.add_counts(total, {k.decode(): int(v) for k, v in raw.items()})
        shown = self.r.sunion([self.key("wi", model, b) for b in buckets]) if buckets else set()
        return w.metrics(total, len(shown), catalog_items)

    def query_samples(self, model: str, buckets: Iterable[int]) -> np.ndarray:
        pipe = self.r.pipeline(transaction=False)
        for b in buckets:
            pipe.lrange(self.key("wq", model, b), 0, -1)
        return sample_matrix([v for rows in pipe.execute() for v in rows])

    def catalog_sample(self, model: str) -> np.ndarray:
        return sample_matrix(self.r.hvals(self.key("catalog", model)))


def sample_matrix(raw: list[bytes]) -> np.ndarray:
    """Stored vectors -> an (N, D) matrix of the finite ones of the commonest size: a record
    of another size or with NaNs (anyone who can write a vector topic can send one) must not
    stop the drift measure for good."""
    vectors = [v for v in (np.frombuffer(r, "<f4") for r in raw if len(r) % 4 == 0) if len(v) and np.isfinite(v).all()]
    if not vectors:
        return np.empty((0, 0), np.float32)
    dim = Counter(len(v) for v in vectors).most_common(1)[0][0]
    return np.stack([v for v in vectors if len(v) == dim])
