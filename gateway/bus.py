"""The gateway's Kafka side: one producer, and one long-lived consumer of its own reply topic.

A query is published to the queries topic with ``reply-to`` set to this replica's reply
topic; the reply consumer (a thread, assigned every partition of that topic at its end
when the gateway starts, no group, no commits) hands each reply to the asyncio future
registered under its request id. The future is registered *before* the query is produced,
so no reply can come too early; a reply nobody waits for any more (its deadline passed, or
a copy after a worker crash: delivery is at least once) is dropped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

from confluent_kafka import Consumer, KafkaException, Producer
from pydantic import SecretStr

from lookalike import auth
from lookalike import contracts as c
from lookalike.clients import LONG_POLL_MS, confluent_config, producer_config
from lookalike.errors import LookalikeError
from lookalike.settings import CommonSettings
from lookalike.topics import HOUR_MS, TopicSpec, end_assignment, ensure_topics

log = logging.getLogger(__name__)


class GatewayError(LookalikeError):
    """A query the gateway could not get answered; ``code`` is a reply error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Query:
    """What one HTTP request asks the pipeline: the headers of docs/contracts.md, as values."""

    image: bytes | None
    k: str | None = None  # passed on as it came: the worker validates it (bad_header)
    item_id: str | None = None
    min_position: str | None = None
    client_id: str = "anonymous"


@dataclass(frozen=True)
class Answer:
    reply: dict[str, Any]
    raw: bytes  # the reply's bytes as the pipeline wrote them
    request_id: str
    seconds: float  # produce -> reply in the gateway's hands


def query_headers(query: Query, reply_to: str) -> dict[str, bytes]:
    """The record headers of ``query`` (unsigned)."""
    headers = {c.H_REPLY_TO: reply_to.encode(), auth.H_CLIENT_ID: query.client_id.encode()}
    if query.k is not None:
        headers[c.H_K] = query.k.encode("utf-8", "surrogateescape")
    if query.item_id is not None:
        headers[c.H_ITEM_ID] = query.item_id.encode("utf-8", "surrogateescape")
    if query.min_position is not None:
        headers[c.H_MIN_POSITION] = query.min_position.encode("utf-8", "surrogateescape")
    return headers


def record_headers(query: Query, reply_to: str, key: bytes, secret: SecretStr | None,
                   deadline_ms: int | None = None) -> dict[str, bytes]:
    """The headers that travel: the gateway's own deadline as the query's (a reply after it
    is dropped here anyway, so the pipeline need not work on it), signed as the query's client
    when the gateway has its key."""
    headers = query_headers(query, reply_to)
    if deadline_ms is not None:
        headers[c.H_DEADLINE] = str(deadline_ms).encode()
    if secret is None:
        return headers
    return auth.sign(query.client_id, secret.get_secret_value(), key, headers, query.image)


class Bus(Protocol):
    """What the HTTP side needs from Kafka (unit tests give the app a fake one)."""

    async def ask(self, query: Query, request_id: str, deadline_s: float) -> Answer: ...

    async def publish_feedback(self, records: list[tuple[bytes, bytes]], timeout_s: float) -> None: ...

    def health(self) -> tuple[bool, dict[str, Any]]: ...


def reply_topic_spec(topic: str) -> TopicSpec:
    """A replica's reply topic: one partition (one reader), replies kept an hour."""
    return TopicSpec(topic, 1, {"cleanup.policy": "delete", "retention.ms": str(HOUR_MS),
                                "max.message.bytes": str(4 * 1024 * 1024)})


class KafkaBus:
    """Producer + reply router. ``start()`` in the event loop that will await the answers."""

    def __init__(self, settings: CommonSettings, reply_topic: str, signing_keys: dict[str, SecretStr]) -> None:
        self.settings = settings
        self.reply_topic = reply_topic
        self.signing_keys = signing_keys  # client id -> HMAC key (docs/security.md#signed-queries)
        self.producer = Producer(producer_config(settings, **{"linger.ms": 0}))
        self.consumer = Consumer(confluent_config(settings, **{
            "group.id": f"lookalike-gateway-{uuid.uuid4().hex}",  # never joins: partitions are assigned
            "enable.auto.commit": False, "fetch.wait.max.ms": LONG_POLL_MS, "fetch.min.bytes": 1,
        }))
        self.pending: dict[bytes, asyncio.Future[tuple[dict[str, Any], bytes, float]]] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.late_replies = 0  # replies that came after their deadline, or copies
        self.last_poll = 0.0

    # -- life cycle ---------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Create the reply topic if missing, read it from its end, start the threads."""
        self.loop = loop
        ensure_topics(self.settings, [reply_topic_spec(self.reply_topic)])
        try:  # just created on a fresh broker: its leader may take a moment
            assignment = end_assignment(self.consumer, self.reply_topic, wait_s=30)
        except (KafkaException, LookupError) as exc:
            raise GatewayError("unavailable", f"reply topic {self.reply_topic} is not readable: {exc}") from exc
        self.consumer.assign(assignment)
        self.last_poll = time.monotonic()
        for target, name in ((self._read_replies, "gateway-replies"), (self._serve_producer, "gateway-producer")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self.threads.append(thread)
        log.info("reading replies from %s", self.reply_topic, extra={"topic": self.reply_topic})

    def close(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=5)
        self.producer.flush(5)
        self.consumer.close()

    # -- threads ------------------------------------------------------------------
    def _read_replies(self) -> None:
        while not self.stopping.is_set():
            try:
                msg = self.consumer.poll(0.1)
            except KafkaException as exc:  # e.g. the broker away: keep trying, say so
                log.warning("reply consumer: %s", exc)
                time.sleep(0.5)
                continue
            self.last_poll = time.monotonic()
            if msg is None:
                continue
            if msg.error() is not None:
                log.warning("reply consumer: %s", msg.error())
                continue
            key, value = msg.key(), msg.value()
            if key is None or value is None:
                continue
            assert self.loop is not None
            self.loop.call_soon_threadsafe(self._resolve, key, value, time.perf_counter())

    def _serve_producer(self) -> None:
        while not self.stopping.is_set():
            self.producer.poll(0.05)  # delivery reports

    # -- event loop side ----------------------------------------------------------
    def _resolve(self, key: bytes, value: bytes, at: float) -> None:
        future = self.pending.get(key)
        if future is None or future.done():
            self.late_replies += 1
            return
        try:
            future.set_result((json.loads(value), value, at))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            future.set_exception(GatewayError("internal", f"the reply for {key!r} is not UTF-8 JSON: {exc}"))

    def _delivered(self, key: bytes, err: Any) -> None:
        future = self.pending.get(key)
        if err is not None and future is not None and not future.done():
            future.set_exception(GatewayError("unavailable", f"the query could not be published to "
                                                             f"{self.settings.queries_topic}: {err}"))

    async def ask(self, query: Query, request_id: str, deadline_s: float) -> Answer:
        """Publish ``query`` and await its reply; raises GatewayError(timeout | unavailable)."""
        assert self.loop is not None, "start() first"
        key = request_id.encode()
        headers = record_headers(query, self.reply_topic, key, self.signing_keys.get(query.client_id),
                                 deadline_ms=int((time.time() + deadline_s) * 1000))
        future: asyncio.Future[tuple[dict[str, Any], bytes, float]] = self.loop.create_future()
        self.pending[key] = future
        loop = self.loop
        started = time.perf_counter()
        try:
            try:
                self.producer.produce(
                    self.settings.queries_topic, key=key, value=query.image, headers=list(headers.items()),
                    on_delivery=lambda err, _msg: loop.call_soon_threadsafe(self._delivered, key, err))
            except BufferError as exc:
                raise GatewayError("unavailable", "the gateway's producer queue is full; try again") from exc
            except KafkaException as exc:
                raise GatewayError("unavailable", f"the query could not be published: {exc}") from exc
            try:
                reply, raw, at = await asyncio.wait_for(future, deadline_s)
            except TimeoutError as exc:
                raise GatewayError("timeout", f"no reply within {deadline_s:g}s (are the worker and the indexer "
                                              "running?); a late reply is dropped") from exc
        finally:
            self.pending.pop(key, None)
        return Answer(reply, raw, request_id, at - started)

    async def publish_feedback(self, records: list[tuple[bytes, bytes]], timeout_s: float) -> None:
        """Publish feedback records (key, value) and wait until the broker has them all."""
        assert self.loop is not None, "start() first"
        loop = self.loop
        futures: list[asyncio.Future[None]] = [loop.create_future() for _ in records]

        def report(future: asyncio.Future[None], err: Any) -> None:
            if future.done():
                return
            if err is None:
                future.set_result(None)
            else:
                future.set_exception(GatewayError("unavailable", f"feedback not delivered: {err}"))

        for (key, value), future in zip(records, futures, strict=True):
            try:
                self.producer.produce(
                    self.settings.feedback_topic, key=key, value=value,
                    on_delivery=lambda err, _msg, f=future: loop.call_soon_threadsafe(report, f, err))
            except BufferError as exc:
                raise GatewayError("unavailable", "the gateway's producer queue is full; try again") from exc
        try:
            await asyncio.wait_for(asyncio.gather(*futures), timeout_s)
        except TimeoutError as exc:
            raise GatewayError("timeout", f"feedback not acknowledged by the broker within {timeout_s:g}s") from exc

    def health(self) -> tuple[bool, dict[str, Any]]:
        alive = bool(self.threads) and all(t.is_alive() for t in self.threads)
        polled_s = time.monotonic() - self.last_poll
        return alive and polled_s < 10, {"reply_topic": self.reply_topic, "waiting": len(self.pending),
                                         "reply_reader_polled_s_ago": round(polled_s, 2),
                                         "late_replies": self.late_replies}
