"""The one consumer runtime every Lookalike service runs its Kafka loops on.

A loop reads records, hands batches to a stage, produces what the stage returns, waits
for the broker's acknowledgement of all of it, and only then commits the records'
offsets. The shape is the same in every service, so "effects before commits" and "a bad
record never stops the loop" are proven once, here:

* **Isolation.** A stage that raises for a batch is called again one record at a time;
  a record that still raises is handed to the loop's ``on_error``, which turns it into a
  dead letter or an error reply (or nothing). It is counted, logged with its origin, and
  the loop goes on.
* **Effects before commits.** Offsets are committed per partition up to the first record
  whose effects are not yet acknowledged (several batches may be in flight; a stage may
  also hold records open, as the shard gatherer does until a request is complete). A
  crash replays the unacknowledged rest: at-least-once, and every effect in Lookalike is
  an upsert or a keyed reply, so replays are harmless (docs/delivery.md).
* **Failed sends.** A record the broker refuses for good (too large, no such topic, not
  authorised) becomes the ``on_error`` answer of the record it came from; a send that
  times out is retried with back-off, and nothing after it is committed meanwhile.
* **Bounded waits.** Fetches, commits and sends have timeouts; the consumer runs in its
  own thread (librdkafka heartbeats in its own), so a busy stage never costs a group
  membership.

It is built on confluent-kafka (librdkafka), the client the producers, the query client and
the admin calls already use: one client, one configuration (:mod:`lookalike.clients`),
one security setup. Stages are plain functions of records, tested without Kafka.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from lookalike import contracts as c
from lookalike import metrics
from lookalike.batching import MicroBatches
from lookalike.clients import LONG_POLL_MS, confluent_config, max_message_bytes, producer_config
from lookalike.errors import ErrorCode, code_of
from lookalike.settings import CommonSettings

log = logging.getLogger(__name__)

# librdkafka errors after which sending the same record again cannot succeed.
PERMANENT_SEND_ERRORS = frozenset({
    KafkaError.MSG_SIZE_TOO_LARGE,
    KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC, KafkaError._UNKNOWN_PARTITION,
    KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.INVALID_RECORD, KafkaError.RECORD_LIST_TOO_LARGE,
    KafkaError.INVALID_MSG, KafkaError._INVALID_ARG, KafkaError.TOPIC_EXCEPTION,
})


@dataclass(frozen=True)
class Record:
    """A consumed record, decoupled from the client: what stages receive."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes] = field(default_factory=dict)
    timestamp_ms: int | None = None

    @classmethod
    def of(cls, msg: Message) -> Record:
        kind, ts = msg.timestamp()
        headers: dict[str, bytes] = {}
        for name, raw in msg.headers() or []:
            headers[name] = raw if raw is not None else b""  # the last of a repeated header wins
        return cls(msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value(), headers,
                   ts if kind != 0 and ts >= 0 else None)

    def where(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"


Headers = Sequence[tuple[str, bytes]] | Mapping[str, bytes] | None


@dataclass(frozen=True)
class Output:
    """A record to produce. ``answers``: the consumed record it is the effect of (its
    ``on_error`` answer replaces it if the broker refuses it for good)."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: Headers = None
    partition: int | None = None
    answers: Record | None = None


class SendFailed(Exception):
    """The broker refused a record (permanently, or it timed out)."""

    def __init__(self, output: Output, error: KafkaError | str, permanent: bool) -> None:
        super().__init__(f"send to {output.topic} failed: {error}")
        self.output = output
        self.error = error
        self.permanent = permanent
        too_large = isinstance(error, KafkaError) and error.code() == KafkaError.MSG_SIZE_TOO_LARGE
        self.code = ErrorCode.TOO_LARGE if too_large else ErrorCode.INTERNAL


# ---------------------------------------------------------------------------------------
class Sender:
    """An idempotent confluent-kafka producer with awaitable sends: ``send_all`` returns
    once the broker has acknowledged every record. One per service; a thread serves the
    delivery reports."""

    def __init__(self, settings: CommonSettings, **extra: Any) -> None:
        config = producer_config(settings, **{"message.max.bytes": max_message_bytes(settings),
                                              "message.timeout.ms": 30_000, **extra})
        self._producer = Producer(config)
        self._closed = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="delivery-reports", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        while not self._closed.is_set():
            self._producer.poll(0.05)

    async def send_all(self, outputs: Sequence[Output]) -> list[SendFailed]:
        """Produce ``outputs`` and wait for every acknowledgement; returns the failures (a
        record refused at once, e.g. too large, fails here too, without waiting)."""
        if not outputs:
            return []
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[SendFailed | None]] = []
        for output in outputs:
            future: asyncio.Future[SendFailed | None] = loop.create_future()
            futures.append(future)

            def delivered(err: KafkaError | None, _msg: Message, future=future, output=output) -> None:
                result = None if err is None else SendFailed(output, err, permanent(err))
                loop.call_soon_threadsafe(_settle, future, result)

            kwargs: dict[str, Any] = {"key": output.key, "value": output.value, "on_delivery": delivered}
            if output.headers:
                kwargs["headers"] = list(output.headers.items()) if isinstance(output.headers, Mapping) \
                    else list(output.headers)
            if output.partition is not None:
                kwargs["partition"] = output.partition
            while True:
                try:
                    self._producer.produce(output.topic, **kwargs)
                    break
                except BufferError:  # the local queue is full: let deliveries drain it
                    await asyncio.sleep(0.01)
                except KafkaException as exc:  # refused before it left (size, unknown topic, bad header)
                    future.set_result(SendFailed(output, exc.args[0], permanent(exc.args[0])))
                    break
                except (TypeError, ValueError) as exc:
                    future.set_result(SendFailed(output, str(exc), True))
                    break
        return [f for f in await asyncio.gather(*futures) if f is not None]

    def close(self, timeout_s: float = 10) -> None:
        with contextlib.suppress(Exception):
            self._producer.flush(timeout_s)
        self._closed.set()


def _settle(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def permanent(err: KafkaError | Any) -> bool:
    if not isinstance(err, KafkaError):
        return True
    return err.code() in PERMANENT_SEND_ERRORS or err.fatal()


# ---------------------------------------------------------------------------------------
class Source:
    """A confluent-kafka consumer used from one thread of its own: subscribed in a group, or
    assigned to partitions (no group, no commits) as the indexer's feeds are."""

    def __init__(self, settings: CommonSettings, *, group: str, name: str, **extra: Any) -> None:
        config = confluent_config(settings, **{
            "group.id": group,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": int(settings.session_timeout_s * 1000),
            "heartbeat.interval.ms": max(int(settings.session_timeout_s * 250), 100),
            "fetch.max.bytes": max(max_message_bytes(settings), 50 * 1024 * 1024),
            "max.partition.fetch.bytes": max_message_bytes(settings),
            "fetch.wait.max.ms": LONG_POLL_MS,
            "topic.metadata.refresh.interval.ms": 5000,
            **extra,
        })
        self.group = group
        self.name = name
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"consumer-{name}")
        self._consumer = Consumer(config)
        self._on_revoke: Callable[[list[TopicPartition]], None] | None = None

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def subscribe(self, topics: Sequence[str], on_revoke: Callable[[list[TopicPartition]], None]) -> None:
        """Join the group; ``on_revoke`` runs (in the consumer's thread) before partitions move."""
        self._on_revoke = on_revoke

        def revoked(_consumer: Consumer, partitions: list[TopicPartition]) -> None:
            on_revoke(partitions)

        def assigned(_consumer: Consumer, partitions: list[TopicPartition]) -> None:
            log.info("%s: assigned in group %s: %s", self.name, self.group,
                     " ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions) or "(nothing)")

        await self._call(lambda: self._consumer.subscribe(list(topics), on_assign=assigned, on_revoke=revoked,
                                                          on_lost=revoked))

    async def assign(self, topic: str, start: Mapping[int, int | None]) -> None:
        """Read ``topic``'s partitions from the given offsets (None: from the beginning)."""
        tps = [TopicPartition(topic, p, OFFSET_BEGINNING if o is None else o) for p, o in sorted(start.items())]
        await self._call(self._consumer.assign, tps)

    def _take(self, max_records: int, timeout_s: float) -> list[Message]:
        """Wait up to ``timeout_s`` for the first record, then take what else is fetched
        already, without waiting (``consume(n, t)`` alone would wait for n records or the
        whole timeout: a lone query would sit out the timeout)."""
        first = self._consumer.poll(timeout_s)
        if first is None:
            return []
        return [first, *self._consumer.consume(max_records - 1, 0)] if max_records > 1 else [first]

    async def fetch(self, max_records: int, timeout_s: float) -> list[Record]:
        messages = await self._call(self._take, max_records, timeout_s)
        records = []
        for msg in messages:
            err = msg.error()
            if err is None:
                records.append(Record.of(msg))
            elif err.code() == KafkaError._PARTITION_EOF:
                continue
            elif err.fatal():
                raise KafkaException(err)
            else:  # transient (broker down, rebalance in progress): librdkafka goes on by itself
                log.warning("%s: %s", self.name, err)
        return records

    async def commit(self, offsets: Mapping[tuple[str, int], int]) -> bool:
        if not offsets:
            return True
        tps = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        try:
            await self._call(lambda: self._consumer.commit(offsets=tps, asynchronous=False))
            return True
        except KafkaException as exc:  # partitions moved (the new owner redoes them) or the broker is away
            log.warning("%s: commit failed (%s); the uncommitted records are read again", self.name, exc)
            return False

    def commit_now(self, offsets: Mapping[tuple[str, int], int]) -> None:
        """A commit from the consumer's own thread (inside a rebalance callback)."""
        if offsets:
            with contextlib.suppress(KafkaException):
                self._consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                                      asynchronous=False)

    async def ends(self, topic: str, partitions: Iterable[int]) -> dict[int, int]:
        """The partitions' end offsets now."""
        def read() -> dict[int, int]:
            return {p: self._consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False)[1]
                    for p in partitions}
        return await self._call(read)

    async def positions(self, topic: str, partitions: Iterable[int]) -> dict[int, int]:
        """Where the consumer reads next (-1001 before its first fetch of a partition)."""
        return {tp.partition: tp.offset for tp in await self._call(
            self._consumer.position, [TopicPartition(topic, p) for p in partitions])}

    async def partitions(self, topic: str, wait_s: float = 15.0) -> list[int]:
        """The topic's partition ids; [] if it does not exist. A topic created a moment ago may
        not be in every broker's metadata yet: it is looked up again for ``wait_s``."""
        deadline = time.monotonic() + wait_s
        while True:
            meta = await self._call(lambda: self._consumer.list_topics(topic, timeout=10))
            found = meta.topics.get(topic)
            if found is not None and found.error is None and found.partitions:
                return sorted(found.partitions)
            if time.monotonic() >= deadline:
                return []
            await asyncio.sleep(0.5)

    async def seek(self, offsets: Mapping[tuple[str, int], int]) -> None:
        def go() -> None:
            for (t, p), o in offsets.items():
                with contextlib.suppress(KafkaException):  # not assigned any more: its new owner reads it
                    self._consumer.seek(TopicPartition(t, p, o))
        await self._call(go)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._call(self._consumer.close)  # leaves the group: others take over at once
        self._thread.shutdown(wait=False)


# ---------------------------------------------------------------------------------------
class Offsets:
    """Which consumed records have had their effects, per partition: the commit point is the
    first one that has not (thread-safe: rebalance callbacks run in the consumer's thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[tuple[str, int], set[int]] = {}
        self._next: dict[tuple[str, int], int] = {}
        self._committed: dict[tuple[str, int], int] = {}

    def read(self, records: Iterable[Record]) -> None:
        with self._lock:
            for r in records:
                tp = (r.topic, r.partition)
                self._open.setdefault(tp, set()).add(r.offset)
                self._next[tp] = max(self._next.get(tp, 0), r.offset + 1)

    def done(self, records: Iterable[Record]) -> None:
        with self._lock:
            for r in records:
                self._open.get((r.topic, r.partition), set()).discard(r.offset)

    def due(self, held: Mapping[tuple[str, int], int] | None = None) -> dict[tuple[str, int], int]:
        """Offsets to commit now: per partition the first open record (or one held by the
        stage), else the next after the last read; only where it moved."""
        with self._lock:
            out = {}
            for tp, nxt in self._next.items():
                point = min(self._open[tp]) if self._open.get(tp) else nxt
                if held and tp in held:
                    point = min(point, held[tp])
                if self._committed.get(tp) != point:
                    out[tp] = point
            return out

    def committed(self, offsets: Mapping[tuple[str, int], int]) -> None:
        with self._lock:
            self._committed.update(offsets)

    def forget(self, partitions: Iterable[tuple[str, int]]) -> None:
        with self._lock:
            for tp in partitions:
                self._open.pop(tp, None)
                self._next.pop(tp, None)
                self._committed.pop(tp, None)

    def pending(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._open.values())


# ---------------------------------------------------------------------------------------
Handle = Callable[[list[Record]], Awaitable[list[Output]]]
OnError = Callable[[Record, Exception], list[Output]]
Triage = Callable[[Record], list[Output] | None]  # a record answered as it is read (None: to the stage)
TRIAGE_SENDS = 64  # triaged answers awaiting their acks at once; then the reading waits


class Stage(Protocol):
    """What a stateful stage may add to a plain ``handle`` (the shard gatherer does)."""

    async def tick(self) -> list[Output]: ...

    def held(self) -> dict[tuple[str, int], int]: ...

    def revoke(self, partitions: Iterable[tuple[str, int]]) -> None: ...


def nothing_on_error(record: Record, exc: Exception) -> list[Output]:
    return []


def dead_letter(topic: str, record: Record, exc: Exception) -> Output:
    """``record`` as it came, with why it was refused and where it came from (the dead-letter
    contract of docs/contracts.md). A ``too_large`` one keeps neither value nor headers."""
    code = code_of(exc)
    if code == ErrorCode.TOO_LARGE:
        headers = [(c.H_ORIGINAL_VALUE_BYTES, str(len(record.value or b"")).encode())]
        value = None
    else:
        headers = [(n, v) for n, v in record.headers.items() if not n.startswith(("error-", "source-"))]
        value = record.value
    headers += [
        (c.H_ERROR_CODE, code.encode()),
        (c.H_ERROR_MESSAGE, str(exc)[:1000].encode("utf-8", "backslashreplace")),
        (c.H_SOURCE_TOPIC, record.topic.encode()),
        (c.H_SOURCE_PARTITION, str(record.partition).encode()),
        (c.H_SOURCE_OFFSET, str(record.offset).encode()),
    ]
    return Output(topic, record.key, value, headers)


class Loop:
    """consume → stage → send, acknowledged → commit, with per-record isolation.

    ``batch_max``/``batch_wait_s``: records are handed to the stage in micro-batches
    (:class:`lookalike.batching.MicroBatches`: a batch leaves as soon as a handler is free);
    ``in_flight``: how many batches are handled at once (1 keeps the partition's order of
    effects; queries that may wait use more, so one waits alone). With ``commit`` false
    (assigned feeds whose position lives in a snapshot) nothing is committed.

    ``triage`` (load shedding): called on each record as it is read; a record it answers
    (queries past their deadlines) skips the stage, and its answers are sent beside the
    batches, their acks awaited apart (at most ``TRIAGE_SENDS`` sends at once), so a backlog
    of such records drains at the rate the broker takes answers, not one batch's ack at a time.
    ``fetch_max``: records read per fetch (default ``batch_max``).
    """

    def __init__(self, *, name: str, service: str, source: Source, sender: Sender, handle: Handle,
                 topics: Sequence[str] | None = None, on_error: OnError = nothing_on_error,
                 batch_max: int = 256, batch_wait_s: float = 0.0,
                 in_flight: int = 1, commit: bool = True, fetch_wait_s: float = 0.1, stage: Stage | None = None,
                 tick_s: float = 0.1, after_fetch: Callable[[list[Record]], Awaitable[None]] | None = None,
                 triage: Triage | None = None, fetch_max: int | None = None) -> None:
        self.name, self.service = name, service
        self.source, self.sender, self.topics = source, sender, topics
        self.handle, self.on_error = handle, on_error
        self.batch_max, self.in_flight, self.commit = batch_max, in_flight, commit
        self.fetch_wait_s = fetch_wait_s
        self.stage, self.tick_s = stage, tick_s
        self.after_fetch = after_fetch
        self.triage, self.fetch_max = triage, fetch_max or batch_max
        self.triaged = 0  # records answered by triage
        self._triage_sends = asyncio.Semaphore(TRIAGE_SENDS)
        self._triage_tasks: set[asyncio.Task[None]] = set()
        self.batches: MicroBatches[Record] = MicroBatches(batch_max, batch_wait_s, max_pending=max(4 * batch_max, 256))
        self.offsets = Offsets()
        self.isolated = 0  # records answered by on_error
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- rebalance ------------------------------------------------------------------
    def revoked(self, partitions: list[TopicPartition]) -> None:
        """Before partitions move: commit what is done there, forget the rest (its new owner
        reads it again)."""
        tps = [(tp.topic, tp.partition) for tp in partitions]
        if self.commit:
            try:  # runs in the consumer's thread, beside the stage: a stage's state may be mid-change
                held = self.stage.held() if self.stage else None
            except RuntimeError:
                held = None
                log.warning("%s: partitions revoked while the stage changed; their new owner redoes more", self.name)
            else:
                self.source.commit_now({tp: o for tp, o in self.offsets.due(held).items() if tp in tps})
        self.offsets.forget(tps)
        if self.stage is not None and self._loop is not None:  # the stage lives in the event loop's thread
            self._loop.call_soon_threadsafe(self.stage.revoke, tps)

    # -- the loop -------------------------------------------------------------------
    async def run(self) -> None:
        """Subscribe (when ``topics`` were given; an assigned source is ready already) and run
        until cancelled or until the loop itself fails."""
        self._loop = asyncio.get_running_loop()
        if self.topics is not None:
            await self.source.subscribe(self.topics, on_revoke=self.revoked)
        tasks = [asyncio.create_task(self._read(), name=f"{self.name}-read")]
        tasks += [asyncio.create_task(self._work(), name=f"{self.name}-work-{i}") for i in range(self.in_flight)]
        if self.commit:
            tasks.append(asyncio.create_task(self._commits(), name=f"{self.name}-commit"))
        if self.stage is not None:
            tasks.append(asyncio.create_task(self._ticks(), name=f"{self.name}-tick"))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # a failure of the loop itself (not of a record): raise it
        finally:
            tasks += self._triage_tasks  # their records stay open: read again after a restart
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.commit:
                await self._commit_due()
            await self.source.close()

    async def _read(self) -> None:
        while True:
            records = await self.source.fetch(self.fetch_max, self.fetch_wait_s)
            if records:
                self.offsets.read(records)
                metrics.RECORDS.labels(self.service, self.name).inc(len(records))
                for record in await self._triaged(records) if self.triage else records:
                    await self.batches.put(record)  # waits while the handlers are behind
            if self.after_fetch is not None:
                await self.after_fetch(records)

    async def _triaged(self, records: list[Record]) -> list[Record]:
        """The records triage does not answer; the answers of the others are on their way."""
        assert self.triage is not None
        rest: list[Record] = []
        answered: list[Record] = []
        outputs: list[Output] = []
        for record in records:
            try:
                out = self.triage(record)
            except Exception:  # a bug in triage: the stage (and its error path) handles the record
                log.exception("%s: triage failed on %s", self.name, record.where())
                out = None
            if out is None:
                rest.append(record)
            else:
                answered.append(record)
                outputs.extend(out)
        if answered:
            self.triaged += len(answered)
            await self._triage_sends.acquire()  # waits while TRIAGE_SENDS are unacknowledged
            task = asyncio.create_task(self._send_triaged(answered, outputs), name=f"{self.name}-triaged")
            self._triage_tasks.add(task)
            task.add_done_callback(self._triage_tasks.discard)
        return rest

    async def _send_triaged(self, records: list[Record], outputs: list[Output]) -> None:
        try:
            await self._send(outputs)
            self.offsets.done(records)
        finally:
            self._triage_sends.release()

    async def _work(self) -> None:
        while True:
            batch = await self.batches.get()
            outputs = await self._guarded(batch)
            await self._send(outputs)
            self.offsets.done(batch)

    async def _guarded(self, batch: list[Record]) -> list[Output]:
        """The stage's outputs for ``batch``; a record it fails on gets its on_error answer."""
        try:
            return await self.handle(batch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if len(batch) == 1:
                return self._isolate(batch[0], exc)
            log.warning("%s: a batch of %d failed (%r); handling its records one by one", self.name, len(batch), exc)
        outputs: list[Output] = []
        for record in batch:
            try:
                outputs.extend(await self.handle([record]))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                outputs.extend(self._isolate(record, exc))
        return outputs

    def _isolate(self, record: Record, exc: Exception) -> list[Output]:
        self.isolated += 1
        code = code_of(exc)
        metrics.observe_error(self.service, code)
        log.error("%s: record %s failed (%s: %s); answered and skipped", self.name, record.where(),
                  type(exc).__name__, exc, exc_info=not hasattr(exc, "code"),
                  extra={"topic": record.topic, "partition": record.partition, "offset": record.offset, "code": code})
        try:
            return self.on_error(record, exc)
        except Exception:  # the answer itself failed: the record is skipped, still counted
            log.exception("%s: no error answer for %s", self.name, record.where())
            return []

    async def _send(self, outputs: list[Output]) -> None:
        """Send and wait; a record refused for good is replaced by its source's error
        answer (sent once); a send that timed out is retried until it goes through."""
        delay = 0.5
        while outputs:
            failures = await self.sender.send_all(outputs)
            retry: list[Output] = []
            for failure in failures:
                if not failure.permanent:
                    retry.append(failure.output)
                    continue
                log.warning("%s: %s", self.name, failure)
                source = failure.output.answers
                if source is not None:
                    answer = [o for o in self._isolate(source, failure) if o != failure.output]
                    for late in await self.sender.send_all(answer):
                        log.error("%s: the error answer for %s failed too: %s", self.name, source.where(), late)
            outputs = retry
            if outputs:
                log.warning("%s: %d records not acknowledged; retrying in %.1fs", self.name, len(outputs), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _commit_due(self) -> None:
        due = self.offsets.due(self.stage.held() if self.stage else None)
        if due and await self.source.commit(due):
            self.offsets.committed(due)

    async def _commits(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            await self._commit_due()

    async def _ticks(self) -> None:
        assert self.stage is not None
        while True:
            await asyncio.sleep(self.tick_s)
            await self._send(await self.stage.tick())


async def run_forever(*coroutines: Awaitable[None], names: Sequence[str] = ()) -> None:
    """Run a service's loops and tasks together until the first of them ends: one that fails
    stops them all (the process then exits non-zero and its supervisor restarts it), and
    one that returns (a stop signal's watcher) ends them cleanly."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    for task, name in zip(tasks, names, strict=False):
        task.set_name(name)
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def freeze_heap() -> None:
    """Collect once, then take every object alive now out of the garbage collector's sight
    (``gc.freeze``): a service calls it when it is set up, before its loops run.

    A process that imported torch holds about 400,000 objects, and a full collection walks
    them all: 240-445 ms in the worker, the indexer and the aggregator at start-up, and
    381 ms in the benchmark's client, which stalled its sender and its reply reader for
    ~300 ms once a run and made that run's p99 (docs/benchmarks.md). Frozen, they are
    never walked again; what the service makes later is collected as usual. The price: an
    object alive now that later becomes cyclic garbage is never freed."""
    gc.collect()
    gc.freeze()


def serve(main: Callable[[], Awaitable[None]]) -> None:
    """``asyncio.run(main())`` until SIGTERM or SIGINT, which end it cleanly (loops commit
    what is done and leave their groups). The heap as set up so far is frozen first
    (:func:`freeze_heap`)."""
    import signal

    async def runner() -> None:
        task = asyncio.ensure_future(main())
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    freeze_heap()
    asyncio.run(runner())
