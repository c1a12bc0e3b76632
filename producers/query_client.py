"""The query client: publish an image, wait for its reply (with a deadline), return it.

Replies arrive on a shared reply topic keyed by request id. The client assigns itself
every partition of the reply topic at its current end *before* sending, so it cannot
miss a fast reply, then reads until its own key shows up or the deadline passes.

Delivery is at least once: a worker or indexer that crashes after producing a reply but
before committing its input answers the query again after the rebalance. The client keeps
the first reply per request id and drops the copies (:class:`ReplyBook`).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import OrderedDict
from typing import Any

from confluent_kafka import Consumer, KafkaException, Producer

from lookalike import auth
from lookalike import contracts as c
from lookalike.clients import LONG_POLL_MS, confluent_config, producer_config
from lookalike.errors import ReplyTimeout
from lookalike.settings import ClientSettings
from lookalike.topics import end_assignment
from producers.feedback import FeedbackProducer

log = logging.getLogger(__name__)


class ReplyBook:
    """Replies by request id. The first reply to a request that is waited for wins; copies
    (the same request answered twice after a crash) and other clients' replies are dropped."""

    REMEMBER = 10_000  # recently returned request ids, to count late copies

    def __init__(self) -> None:
        self.pending: set[bytes] = set()
        self.replies: dict[bytes, tuple[dict[str, Any], bytes]] = {}
        self.returned: OrderedDict[bytes, None] = OrderedDict()
        self.duplicates = 0  # copies of a reply already held or already returned

    def expect(self, key: bytes) -> None:
        self.pending.add(key)

    def offer(self, key: bytes | None, value: bytes | None) -> bool:
        """A record read from the reply topic; True when it is a new reply to a pending request."""
        if key is None or value is None:
            return False
        if key in self.replies or key in self.returned:
            self.duplicates += 1
            return False
        if key not in self.pending:
            return False
        try:
            self.replies[key] = (json.loads(value), value)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False
        return True

    def has(self, key: bytes) -> bool:
        return key in self.replies

    def take(self, key: bytes) -> tuple[dict[str, Any], bytes]:
        """The reply for ``key`` (which must be held); the request is done."""
        self.pending.discard(key)
        self.returned[key] = None
        while len(self.returned) > self.REMEMBER:
            self.returned.popitem(last=False)
        return self.replies.pop(key)

    def forget(self, key: bytes) -> None:
        """A request given up on (its deadline passed): a late reply is dropped."""
        self.pending.discard(key)
        self.replies.pop(key, None)


class QueryClient:
    """Ask Lookalike for the k items most similar to an image (or to a catalog item).

    Every ok reply returned is also recorded as what its user was shown: one ``impression``
    per result on the feedback topic, keyed by the user or session id, so CTR@5 and the
    other rates are defined from the first query (docs/feedback.md). A client that shows
    nothing to anyone (a benchmark, a health probe) passes ``impressions=False``.
    """

    def __init__(self, settings: ClientSettings | None = None, reply_to: str | None = None,
                 impressions_for: str | None = None, *, impressions: bool = True) -> None:
        """``impressions_for``: the user or session id impressions are keyed by (default: a
        session id made for this client, :attr:`session_id`); ``impressions``: record them."""
        self.settings = settings or ClientSettings()
        self.reply_to = reply_to or self.settings.replies_topic
        self.session_id = impressions_for or f"{self.settings.client_id}-{uuid.uuid4().hex[:12]}"
        self.impressions_for = self.session_id if impressions else None
        self._feedback: FeedbackProducer | None = None
        self.producer = Producer(producer_config(self.settings, **{"linger.ms": 0}))
        self.consumer = Consumer(
            confluent_config(
                self.settings,
                **{
                    "group.id": f"{self.settings.client_id}-{uuid.uuid4().hex}",
                    "enable.auto.commit": False,
                    "auto.offset.reset": "latest",
                    "fetch.wait.max.ms": LONG_POLL_MS,
                },
            )
        )
        self._assigned = False
        self.book = ReplyBook()
        self.last_reply_bytes: bytes | None = None  # the value of the last reply returned, as it came
        self.impressions_failed = 0  # replies whose impressions could not be recorded (the reply was still returned)

    def _assign(self) -> None:
        if self._assigned:
            return
        try:
            tps = end_assignment(self.consumer, self.reply_to, wait_s=0)
        except LookupError as exc:
            raise ReplyTimeout(f"reply topic {self.reply_to!r} does not exist") from exc
        self.consumer.assign(tps)
        self._assigned = True

    def send(self, image: bytes | None, *, k: int | None = None, item_id: str | None = None,
             request_id: str | None = None, headers: dict[str, bytes] | None = None,
             min_position: dict[int, int] | None = None) -> str:
        """Publish a query; returns its request id. ``item_id``: "more like this item";
        ``min_position``: catalog partition -> offset the answering index must include (read
        your writes, e.g. ``CatalogFeed.positions``); ``headers`` are added to (and override)
        the standard ones. With ``client_key`` set the query is signed (after ``headers`` are merged)."""
        self._assign()
        request_id = request_id or uuid.uuid4().hex
        standard = {c.H_REPLY_TO: self.reply_to.encode(), c.H_K: str(k or self.settings.default_k).encode()}
        if item_id is not None:
            standard[c.H_ITEM_ID] = item_id.encode()
        if min_position:
            standard[c.H_MIN_POSITION] = c.format_position(min_position)
        merged = {**standard, **(headers or {})}
        if self.settings.client_key is not None:  # signed as client_id (docs/security.md)
            merged = auth.sign(self.settings.client_id, self.settings.client_key.get_secret_value(),
                               request_id.encode(), merged, image)
        self.producer.produce(self.settings.queries_topic, key=request_id.encode(), value=image,
                              headers=list(merged.items()))
        self.book.expect(request_id.encode())
        left = self.producer.flush(10)
        if left:
            self.book.forget(request_id.encode())
            raise ReplyTimeout(f"query {request_id} was not delivered to {self.settings.queries_topic} within 10s "
                               f"(is the broker at {self.settings.kafka_bootstrap} reachable?)")
        return request_id

    def wait(self, request_id: str, timeout_s: float | None = None) -> dict[str, Any]:
        """The reply for ``request_id``; raises ReplyTimeout after the deadline."""
        key = request_id.encode()
        timeout_s = timeout_s or self.settings.reply_timeout_s
        deadline = time.monotonic() + timeout_s
        while not self.book.has(key):
            left = deadline - time.monotonic()
            if left <= 0:
                self.book.forget(key)
                raise ReplyTimeout(
                    f"no reply for request {request_id} on {self.reply_to} within {timeout_s:g}s (the query went to "
                    f"{self.settings.queries_topic}; are the worker and the indexer running?); a late reply is ignored")
            msg = self.consumer.poll(min(left, 0.2))
            if msg is not None and msg.error() is None:
                self.book.offer(msg.key(), msg.value())  # other clients' replies share the topic
        reply, raw = self.book.take(key)
        self.last_reply_bytes = raw
        if self.impressions_for is not None:
            try:
                self.emit_impressions(reply, self.impressions_for)
            except KafkaException as exc:  # the answer matters more than its bookkeeping
                self.impressions_failed += 1
                log.warning("impressions of request %s were not recorded: %s", request_id, exc)
        return reply

    def emit_impressions(self, reply: dict[str, Any], user_id: str) -> int:
        """Publish an ``impression`` for each result of an ok reply; returns how many (waits for the broker;
        raises KafkaException when they are not delivered within 10 s)."""
        if self._feedback is None:
            self._feedback = FeedbackProducer(self.settings, self.producer)
        sent = self._feedback.impressions(reply, user_id)
        if sent:
            self._feedback.flush(10)
        return len(sent)

    def ask(self, image: bytes | None, *, k: int | None = None, item_id: str | None = None,
            timeout_s: float | None = None, min_position: dict[int, int] | None = None) -> dict[str, Any]:
        """Send a query and wait for its reply."""
        return self.wait(self.send(image, k=k, item_id=item_id, min_position=min_position), timeout_s)

    def close(self) -> None:
        self.consumer.close()
        self.producer.flush(5)

    def __enter__(self) -> QueryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
