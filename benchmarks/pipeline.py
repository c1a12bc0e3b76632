"""The live stack under load: query latency at a fixed rate, ingestion throughput, freshness.

Everything goes through Kafka as a client would: the topics, groups and servers are the
``LOOKALIKE_*`` settings of the stack under test. Items the benchmark adds are keyed
``bench-{run}-...`` and removed again (tombstones) at the end.

* Query latency is measured open loop: a sender publishes at fixed times whatever the
  replies do, a separate consumer timestamps each reply; latency is publish → reply read.
* Ingestion: catalog images published as fast as the producer goes, until a read-your-writes
  query (``min-position`` = the last offsets) is answered: images per second from the first
  publish to all searchable.
* Freshness: images published at a steady rate, each followed at once by a "more like this
  item" query for it that waits (``min-position``) until the index holds it: publish → the
  reply of the first query that finds it.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from confluent_kafka import Consumer, KafkaException, Producer

from lookalike import contracts as c
from lookalike.catalog import CatalogItem
from lookalike.cleanup import unlink_matching
from lookalike.clients import confluent_config, producer_config, redis_client
from lookalike.settings import ClientSettings
from lookalike.topics import end_assignment


def percentiles(values: Sequence[float]) -> dict[str, float]:
    if not len(values):
        return {"n": 0}
    arr = np.asarray(values, dtype=np.float64)
    return {"n": len(arr), "p50": round(float(np.percentile(arr, 50)), 2), "p95": round(float(np.percentile(arr, 95)), 2),
            "p99": round(float(np.percentile(arr, 99)), 2), "max": round(float(arr.max()), 2),
            "mean": round(float(arr.mean()), 2)}


class Replies:
    """A consumer on the reply topic, assigned at its end before anything is sent, and a thread
    that timestamps the replies this benchmark waits for (others share the topic)."""

    def __init__(self, settings: ClientSettings) -> None:
        self.topic = settings.replies_topic
        self.consumer = Consumer(confluent_config(settings, **{
            "group.id": f"bench-{uuid.uuid4().hex}", "enable.auto.commit": False, "fetch.wait.max.ms": 5}))
        self.consumer.assign(end_assignment(self.consumer, self.topic, wait_s=30))  # a new topic: its leader may lag
        self.expected: set[bytes] = set()
        self.arrived: dict[bytes, tuple[float, dict[str, Any]]] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, name="bench-replies", daemon=True)
        self.thread.start()

    def expect(self, key: bytes) -> None:
        with self.lock:
            self.expected.add(key)

    def run(self) -> None:
        while not self.stop.is_set():
            msg = self.consumer.poll(0.05)
            if msg is None or msg.error() is not None:
                continue
            now = time.monotonic()
            key = msg.key()
            with self.lock:
                if key not in self.expected or key in self.arrived:
                    continue
            try:
                reply = json.loads(msg.value())
            except (TypeError, ValueError):
                reply = {"status": "error", "error": {"code": "unparseable"}}
            with self.lock:
                self.arrived[key] = (now, reply)

    def wait(self, keys: Sequence[bytes], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                if all(k in self.arrived for k in keys):
                    return
            time.sleep(0.02)

    def get(self, key: bytes) -> tuple[float, dict[str, Any]] | None:
        with self.lock:
            return self.arrived.get(key)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.consumer.close()


def query_headers(settings: ClientSettings, *, item_id: str | None = None, k: int = 5,
                  min_position: Mapping[int, int] | None = None, deadline_ms: int | None = None,
                  ) -> list[tuple[str, bytes]]:
    headers = [(c.H_REPLY_TO, settings.replies_topic.encode()), (c.H_K, str(k).encode())]
    if deadline_ms is not None:
        headers.append((c.H_DEADLINE, str(deadline_ms).encode()))
    if item_id is not None:
        headers.append((c.H_ITEM_ID, item_id.encode()))
    if min_position:
        headers.append((c.H_MIN_POSITION, c.format_position(min_position)))
    return headers


def sleep_until(target: float) -> None:
    delay = target - time.monotonic()
    if delay > 0:
        time.sleep(delay)


@dataclass
class Bench:
    """The stack under test, as its settings name it, and this run's id."""

    settings: ClientSettings
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    added: list[str] = field(default_factory=list)  # bench item ids to remove at the end
    rounds: int = 0  # query_latency calls so far

    def __post_init__(self) -> None:
        self.replies = Replies(self.settings)
        self.producer = Producer(producer_config(self.settings, **{"linger.ms": 0}))

    # -- queries ------------------------------------------------------------------
    def query_latency(self, queries: Sequence[tuple[str, bytes]], rate: float, duration_s: float,
                      warmup_s: float = 3.0, timeout_s: float = 15.0) -> dict[str, Any]:
        """Open loop at ``rate`` per second for ``warmup_s + duration_s``; the warm-up is not counted.
        A benchmark's main freezes its heap before it measures (:func:`lookalike.runtime.freeze_heap`):
        a full collection of what the client imported, torch included, stalled its sender and
        its reply reader for ~300 ms once a run, and that was the run's p99."""
        total = int(rate * (warmup_s + duration_s))
        skip = int(rate * warmup_s)
        sent: list[tuple[bytes, str, float, float]] = []  # key, item id, scheduled, sent
        start = time.monotonic() + 0.2
        self.rounds += 1  # keys unique across rounds: a reply of the last round is not one of this one's
        for i in range(total):
            item_id, image = queries[i % len(queries)]
            key = f"bench-{self.run_id}-r{self.rounds}q{i}".encode()
            scheduled = start + i / rate
            sleep_until(scheduled)
            self.replies.expect(key)
            sent.append((key, item_id, scheduled, time.monotonic()))
            self.producer.produce(self.settings.queries_topic, key=key, value=image, headers=query_headers(self.settings))
            self.producer.poll(0)
        self.producer.flush(10)
        self.replies.wait([s[0] for s in sent], timeout_s)

        latencies, rows, errors, stages = [], [], {}, {}
        self_first = 0
        timeouts = 0
        for i, (key, item_id, scheduled, at) in enumerate(sent):
            got = self.replies.get(key)
            if i < skip:
                continue
            if got is None:
                timeouts += 1
                continue
            arrived, reply = got
            ms = (arrived - at) * 1000
            rows.append({"t": round(at - start, 4), "ms": round(ms, 3), "late_ms": round((at - scheduled) * 1000, 3)})
            if reply.get("status") != "ok":
                code = (reply.get("error") or {}).get("code", "unknown")
                errors[code] = errors.get(code, 0) + 1
                continue
            latencies.append(ms)
            timings = dict(reply.get("timings_ms") or {})
            if "total" in timings:
                timings["reply_transport"] = max(0.0, ms - timings["total"])
            for stage, value in timings.items():
                stages.setdefault(stage, []).append(value)
            results = reply.get("results") or []
            self_first += bool(results) and (results[0]["item_id"] == item_id or results[0]["score"] >= 0.9999)
        return {
            "rate_per_s": rate, "duration_s": duration_s, "sent": total - skip, "answered_ok": len(latencies),
            "errors": errors, "timeouts": timeouts,
            "latency_ms": percentiles(latencies),
            "sender_late_ms": percentiles([r["late_ms"] for r in rows]),
            "stages_ms": {stage: percentiles(values) for stage, values in sorted(stages.items())},
            "top1_is_query_item": round(self_first / max(1, len(latencies)), 4),
            "samples": rows,
        }

    def burst(self, queries: Sequence[tuple[str, bytes]], *, normal_rate: float, burst_rate: float, burst_s: float,
              deadline_ms: float, before_s: float = 5.0, after_s: float = 20.0, window_s: float = 1.0,
              drain_s: float = 30.0, steady_windows: int = 5) -> dict[str, Any]:
        """Load shedding, open loop: ``normal_rate`` for ``before_s``, ``burst_rate`` for
        ``burst_s``, ``normal_rate`` again for ``after_s``; every query carries ``deadline-ms``
        = its send time + ``deadline_ms``. Counts each query's one reply by code (none: lost),
        the answered queries' latencies against the deadline, and how soon after the burst the
        latency is back to normal: the start of the first of ``steady_windows`` windows in a row
        (``window_s`` each) that have all their queries answered ok with a p99 within 2x the p99
        before the burst (at least ``deadline_ms`` / 20, so a quiet box's 10 ms is not the bar);
        every window's p99 is kept beside it, later blips included."""
        phases = [("before", normal_rate, before_s), ("burst", burst_rate, burst_s), ("after", normal_rate, after_s)]
        sent: list[tuple[bytes, str, float]] = []  # key, phase, sent (monotonic)
        late: list[float] = []
        self.rounds += 1
        start = time.monotonic() + 0.2
        t0 = start
        for phase, rate, seconds in phases:
            for i in range(int(rate * seconds)):
                scheduled = t0 + i / rate
                sleep_until(scheduled)
                key = f"bench-{self.run_id}-r{self.rounds}{phase}{i}".encode()
                self.replies.expect(key)
                now = time.monotonic()
                late.append((now - scheduled) * 1000)
                sent.append((key, phase, now))
                headers = query_headers(self.settings, deadline_ms=int(time.time() * 1000 + deadline_ms))
                while True:
                    try:
                        self.producer.produce(self.settings.queries_topic, key=key,
                                              value=queries[i % len(queries)][1], headers=headers)
                        break
                    except BufferError:  # the producer's queue is full: let it send, then go on
                        self.producer.poll(0.01)
                self.producer.poll(0)
            t0 += seconds
        burst_end = start + before_s + burst_s
        self.producer.flush(30)
        self.replies.wait([k for k, _, _ in sent], drain_s)

        by_phase: dict[str, dict[str, Any]] = {}
        windows: dict[int, list[float | None]] = {}  # after the burst: window -> latencies (None: not ok)
        for key, phase, at in sent:
            got = self.replies.get(key)
            counts = by_phase.setdefault(phase, {"sent": 0, "codes": {}, "latency_ms": []})
            counts["sent"] += 1
            code = "no_reply" if got is None else ("ok" if got[1].get("status") == "ok"
                                                   else str((got[1].get("error") or {}).get("code", "unknown")))
            counts["codes"][code] = counts["codes"].get(code, 0) + 1
            ms = None if got is None else (got[0] - at) * 1000
            if code == "ok":
                counts["latency_ms"].append(ms)
            if phase == "after":
                windows.setdefault(int((at - burst_end) // window_s), []).append(ms if code == "ok" else None)
        summary = {phase: {"sent": v["sent"], "codes": dict(sorted(v["codes"].items())),
                           "latency_ms": percentiles(v["latency_ms"])} for phase, v in by_phase.items()}
        normal_p99 = summary.get("before", {}).get("latency_ms", {}).get("p99")
        bar = max(2 * normal_p99, deadline_ms / 20) if normal_p99 else None
        window_p99 = {w: (None if not v or any(ms is None for ms in v) else float(np.percentile(v, 99)))
                      for w, v in sorted(windows.items())}
        recovered_s = None
        if bar is not None:
            normal = [w for w, p99 in window_p99.items() if p99 is not None and p99 <= bar]
            for w in normal:
                if all(v in normal for v in range(w, w + steady_windows)):
                    recovered_s = round(w * window_s, 1)
                    break
        burst = summary.get("burst", {})
        answered = burst.get("latency_ms", {})
        return {"normal_rate_per_s": normal_rate, "burst_rate_per_s": burst_rate, "burst_s": burst_s,
                "deadline_ms": deadline_ms, "phases": summary,
                "burst_answered_p99_over_deadline": (round(answered["p99"] / deadline_ms, 3) if answered.get("n") else None),
                "normal_p99_ms": normal_p99, "recovery_bar_ms": bar, "recovered_after_s": recovered_s,
                "recovery_windows_p99_ms": {round(w * window_s, 1): None if p99 is None else round(p99, 1)
                                            for w, p99 in window_p99.items()},
                "sender_late_ms": percentiles(late)}

    # -- catalog ------------------------------------------------------------------
    def _catalog_producer(self, positions: dict[str, tuple[int, int]]) -> Producer:
        def delivered(err: Any, msg: Any) -> None:
            if err is None:
                positions[msg.key().decode()] = (msg.partition(), msg.offset())

        return Producer(producer_config(self.settings, **{"linger.ms": 20, "on_delivery": delivered}))

    def _publish(self, producer: Producer, key: str, item: CatalogItem, image: bytes) -> None:
        meta = json.dumps({**item.metadata, "bench": self.run_id}).encode()
        while True:
            try:
                producer.produce(self.settings.catalog_topic, key=key.encode(), value=image,
                                 headers=[(c.H_METADATA, meta)])
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
        self.added.append(key)

    def _ask_until_ok(self, item_id: str, position: Mapping[int, int], timeout_s: float) -> tuple[float, dict] | None:
        """Read your writes: a "more like this" query for ``item_id`` that waits for ``position``,
        repeated while the index is not there yet. Returns (reply time, reply)."""
        deadline = time.monotonic() + timeout_s
        n = 0
        while time.monotonic() < deadline:
            key = f"bench-{self.run_id}-w{item_id}-{n}".encode()
            n += 1
            self.replies.expect(key)
            self.producer.produce(self.settings.queries_topic, key=key, value=None,
                                  headers=query_headers(self.settings, item_id=item_id, k=1, min_position=position))
            self.producer.flush(10)
            self.replies.wait([key], min(30.0, max(0.1, deadline - time.monotonic())))
            got = self.replies.get(key)
            if got is not None and got[1].get("status") == "ok":
                return got
        return None

    def ingestion(self, items: Sequence[CatalogItem], images: Sequence[bytes],
                  searchable: Callable[[], Mapping[int, int]] | None = None,
                  timeout_s: float = 1800.0) -> dict[str, Any]:
        """Publish every item under a new id as fast as possible; until all are searchable."""
        positions: dict[str, tuple[int, int]] = {}
        producer = self._catalog_producer(positions)
        progress: list[tuple[float, int]] = []
        stop = threading.Event()

        def sample() -> None:  # how many of ours the indexer's published position covers
            while not stop.wait(0.5):
                try:
                    reached = searchable() if searchable else {}
                    done = sum(1 for p, o in list(positions.values()) if reached.get(p, 0) > o)
                except Exception:  # the status is a picture for the plot, not the measurement
                    continue
                progress.append((time.monotonic() - started, done))

        sampler = threading.Thread(target=sample, daemon=True)
        started = time.monotonic()
        sampler.start()
        for item, image in zip(items, images, strict=True):
            self._publish(producer, f"bench-{self.run_id}-{item.item_id}", item, image)
        producer.flush(120)
        published = time.monotonic()
        final: dict[int, int] = {}
        for p, o in positions.values():
            final[p] = max(o, final.get(p, -1))
        last_key = max(positions, key=lambda k: positions[k][1])
        got = self._ask_until_ok(last_key, final, timeout_s)
        stop.set()
        sampler.join(timeout=5)
        if got is None:
            return {"items": len(items), "error": f"not all searchable within {timeout_s}s"}
        done_at = got[0]
        seconds = done_at - started
        progress.append((seconds, len(positions)))
        return {"items": len(items), "delivered": len(positions), "publish_s": round(published - started, 2),
                "searchable_s": round(seconds, 2), "images_per_s": round(len(positions) / seconds, 1),
                "progress": [(round(t, 2), n) for t, n in progress]}

    def freshness(self, items: Sequence[CatalogItem], images: Sequence[bytes], rate: float,
                  timeout_s: float = 30.0) -> dict[str, Any]:
        """Publish at ``rate`` per second; each publish is followed by a query that waits for it."""
        positions: dict[str, tuple[int, int]] = {}
        producer = self._catalog_producer(positions)
        asked: list[tuple[bytes, float]] = []
        start = time.monotonic() + 0.2
        for i, (item, image) in enumerate(zip(items, images, strict=True)):
            sleep_until(start + i / rate)
            item_key = f"bench-{self.run_id}-f{i}-{item.item_id}"
            published = time.monotonic()
            self._publish(producer, item_key, item, image)
            producer.flush(10)  # the offset, to wait for exactly this record
            if item_key not in positions:
                continue
            partition, offset = positions[item_key]
            key = f"bench-{self.run_id}-fq{i}".encode()
            self.replies.expect(key)
            self.producer.produce(self.settings.queries_topic, key=key, value=None,
                                  headers=query_headers(self.settings, item_id=item_key, k=1,
                                                        min_position={partition: offset}))
            self.producer.poll(0)
            asked.append((key, published))
        self.producer.flush(10)
        self.replies.wait([k for k, _ in asked], timeout_s)
        fresh, errors, timeouts = [], {}, 0
        for key, published in asked:
            got = self.replies.get(key)
            if got is None:
                timeouts += 1
            elif got[1].get("status") != "ok":
                code = (got[1].get("error") or {}).get("code", "unknown")
                errors[code] = errors.get(code, 0) + 1
            else:
                fresh.append((got[0] - published) * 1000)
        return {"rate_per_s": rate, "items": len(items), "found": len(fresh), "errors": errors, "timeouts": timeouts,
                "freshness_ms": percentiles(fresh), "samples_ms": [round(v, 2) for v in fresh]}

    def cleanup(self) -> int:
        """Tombstones for every item this run added."""
        producer = Producer(producer_config(self.settings, **{"linger.ms": 20}))
        for key in self.added:
            while True:
                try:
                    producer.produce(self.settings.catalog_topic, key=key.encode(), value=None)
                    break
                except BufferError:
                    producer.poll(0.1)
        producer.flush(60)
        removed, self.added = len(self.added), []
        return removed

    def forget_requests(self, wait_s: float = 60.0) -> int:
        """Remove the feedback aggregator's join records of this run's queries (``…:req:bench-{run}-…``,
        kept a day otherwise): the requests were the benchmark's, so are their records. The
        aggregator's windows of the serving model are the stack's own figures and stay.

        First waits (``wait_s`` at most) for the aggregator to have read the replies and query
        vectors this run caused: it commits only once a record's effect is in Redis, and a join
        record it wrote after the removal stayed behind (9 of one run's, seen in a key listing)."""
        self._wait_for_the_aggregator(wait_s)
        return unlink_matching(redis_client(self.settings), f"lookalike:feedback:*:req:bench-{self.run_id}-*")

    def _wait_for_the_aggregator(self, wait_s: float) -> bool:
        from lookalike.metrics import LagProbe
        from lookalike.settings import FeedbackSettings

        group = FeedbackSettings().feedback_group  # the services' group, from the same environment
        probe = LagProbe(self.settings, "bench", group, [self.settings.replies_topic, self.settings.query_vectors_topic])
        try:
            ends = {topic: probe.ends(topic) for topic in probe.topics}  # what this run's traffic reached
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                if all(done >= ends[topic][p] for topic in probe.topics
                       for p, done in probe.committed(topic, ends[topic]).items()):
                    return True
                time.sleep(0.5)
            return False
        except KafkaException:  # no aggregator's group here: nothing to wait for
            return False
        finally:
            probe.close()

    def close(self) -> None:
        self.producer.flush(10)
        self.replies.close()
