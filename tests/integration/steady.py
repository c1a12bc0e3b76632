"""A steady stream of queries with known answers, sent while a test breaks something.

The stream runs in a thread: it publishes one query every ``1 / rate`` seconds (each with
a fresh request id) and reads the reply topic at the same time, keeping the first reply
per request id (later copies are counted as duplicates, as the query client does). After
the sending stops it keeps reading until every query is answered or ``drain_s`` passes.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from confluent_kafka import OFFSET_END, Consumer, Producer, TopicPartition

from lookalike.clients import confluent_config, producer_config
from lookalike.settings import ClientSettings


@dataclass
class Sent:
    expected_item: str
    sent_at: float
    answered_at: float | None = None
    reply: dict | None = None
    partition: int | None = None  # of the queries topic, once the broker acknowledged it
    offset: int | None = None


@dataclass
class StreamReport:
    sent: int
    answered: int
    ok_and_right: int  # status ok and the expected item first
    errors: dict[str, int]
    duplicates: int
    max_latency_s: float
    unanswered: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"{self.answered}/{self.sent} answered, {self.ok_and_right} ok with the right item first, "
                f"errors {self.errors or 0}, {self.duplicates} duplicate replies dropped, "
                f"slowest {self.max_latency_s:.1f}s")


class SteadyStream:
    """Queries at a fixed rate from a thread; ``report()`` once it is done."""

    def __init__(self, settings: ClientSettings, queries: Sequence[tuple[bytes, str]], *, rate: float,
                 duration_s: float, drain_s: float = 45.0) -> None:
        self.settings = settings
        self.queries = list(queries)  # (image bytes, item id it must find first), cycled
        self.rate, self.duration_s, self.drain_s = rate, duration_s, drain_s
        self.requests: dict[bytes, Sent] = {}
        self.duplicates = 0
        self.started_at = 0.0
        self.stopped_sending_at: float | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="steady-stream", daemon=True)
        self._consumer = Consumer(confluent_config(settings, **{
            "group.id": f"steady-{uuid.uuid4().hex}", "enable.auto.commit": False, "fetch.wait.max.ms": 10}))
        self._producer = Producer(producer_config(settings, **{"linger.ms": 0}))
        meta = self._consumer.list_topics(settings.replies_topic, timeout=30).topics[settings.replies_topic]
        tps = []
        for p in meta.partitions:
            _low, high = self._consumer.get_watermark_offsets(TopicPartition(settings.replies_topic, p), timeout=30)
            tps.append(TopicPartition(settings.replies_topic, p, high if high >= 0 else OFFSET_END))
        self._consumer.assign(tps)

    def start(self) -> SteadyStream:
        self.started_at = time.monotonic()
        self._thread.start()
        return self

    def join(self) -> StreamReport:
        self._thread.join()
        self._consumer.close()
        return self.report()

    def _read(self, timeout_s: float) -> None:
        msg = self._consumer.poll(timeout_s)
        if msg is None or msg.error() is not None or msg.key() not in self.requests:
            return
        sent = self.requests[msg.key()]
        if sent.reply is not None:
            self.duplicates += 1
            return
        sent.reply, sent.answered_at = json.loads(msg.value()), time.monotonic()

    def _delivered(self, err: object, msg: object) -> None:
        if err is None:
            with self._lock:
                sent = self.requests[msg.key()]
                sent.partition, sent.offset = msg.partition(), msg.offset()  # type: ignore[attr-defined]

    def held_in(self, partitions: set[int], older_than_s: float) -> int:
        """Queries on these partitions of the queries topic that were sent more than
        ``older_than_s`` ago and are not answered yet: a consumer of those partitions holds them."""
        now = time.monotonic()
        with self._lock:
            return sum(1 for s in self.requests.values() if s.partition in partitions and s.reply is None
                       and now - s.sent_at > older_than_s)

    def _run(self) -> None:
        interval = 1.0 / self.rate
        n = 0
        while time.monotonic() - self.started_at < self.duration_s:
            image, item_id = self.queries[n % len(self.queries)]
            key = f"steady-{n}-{uuid.uuid4().hex[:8]}".encode()
            with self._lock:
                self.requests[key] = Sent(item_id, time.monotonic())
            self._producer.produce(self.settings.queries_topic, key=key, value=image, on_delivery=self._delivered)
            self._producer.poll(0)
            n += 1
            next_at = self.started_at + n * interval
            while (left := next_at - time.monotonic()) > 0:
                self._read(min(left, 0.05))
        undelivered = self._producer.flush(60)
        assert undelivered == 0, f"{undelivered} queries not delivered"
        self.stopped_sending_at = time.monotonic()
        deadline = time.monotonic() + self.drain_s
        while time.monotonic() < deadline and any(s.reply is None for s in self.requests.values()):
            self._read(0.1)
        self._read(0.5)  # a late duplicate shows up now

    def at_or_after(self, positions: dict[int, int], sent_before: float) -> int:
        """Queries sent before ``sent_before`` (monotonic) and stored at or after ``positions``
        (partition -> offset, a group's committed positions): a consumer of the group that
        starts there reads them again."""
        with self._lock:
            return sum(1 for s in self.requests.values()
                       if s.sent_at < sent_before and s.partition in positions and s.offset is not None
                       and s.offset >= positions[s.partition])

    def answered_between(self, start: float, end: float) -> int:
        """Queries sent before ``start`` and answered after ``end`` (monotonic times)."""
        with self._lock:
            return sum(1 for s in self.requests.values()
                       if s.sent_at < start and s.answered_at is not None and s.answered_at > end)

    def report(self) -> StreamReport:
        with self._lock:
            requests = list(self.requests.items())
        answered = [(k, s) for k, s in requests if s.reply is not None]
        errors: dict[str, int] = {}
        right = 0
        for _key, s in answered:
            reply = s.reply or {}
            if reply.get("status") == "ok":
                right += bool(reply["results"]) and reply["results"][0]["item_id"] == s.expected_item
            else:
                code = (reply.get("error") or {}).get("code", "?")
                errors[code] = errors.get(code, 0) + 1
        latency = max(((s.answered_at or 0) - s.sent_at for _k, s in answered), default=0.0)
        unanswered = [k.decode() for k, s in requests if s.reply is None]
        return StreamReport(len(requests), len(answered), right, errors, self.duplicates, latency, unanswered[:10])
