"""Prometheus metrics for the worker and the indexer, and the HTTP endpoint that serves them.

One port per service (``LOOKALIKE_WORKER_METRICS_PORT``, ``LOOKALIKE_INDEXER_METRICS_PORT``;
0 turns it off) answers ``/metrics`` (Prometheus text format) and ``/healthz`` (JSON, 200
when the service's event loop is beating, 503 otherwise; the indexer adds whether it has
caught up with the catalog). The services call the small ``observe_*`` hooks below from
their loops; gauges that describe state (index size and position, snapshot age, consumer
lag) are refreshed by a background thread every few seconds, so the hot paths pay for
counters and histograms only.

Names and labels (docs/scaling.md and deploy/ use them):

* ``lookalike_stage_seconds{service,stage}`` — per-stage latency: worker ``decode``,
  ``embed`` (per batch), ``catalog_batch``; indexer ``queue``, ``search``, ``total``
  (query published → reply produced), all from the timings the replies carry;
* ``lookalike_records_total{service,kind}`` — throughput: catalog images embedded,
  removals, queries embedded, vectors applied, replies sent;
* ``lookalike_batch_size{service,kind}``;
* ``lookalike_errors_total{service,code}`` — dead letters and error replies by code;
* ``lookalike_consumer_lag{service,group,topic,partition}`` — records behind the end of
  the partition (group: committed offsets; the indexer's catalog feed: applied offsets);
* ``lookalike_index_items``, ``lookalike_index_position{partition}``,
  ``lookalike_index_caught_up``, ``lookalike_snapshot_age_seconds``;
* ``lookalike_model_info{service,version}`` (1) and
  ``lookalike_model_created_timestamp_seconds{service}``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, disable_created_metrics, make_wsgi_app

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)

STAGE_SECONDS = Histogram("lookalike_stage_seconds", "Latency of one pipeline stage", ["service", "stage"],
                          buckets=LATENCY_BUCKETS)
RECORDS = Counter("lookalike_records", "Records processed", ["service", "kind"])
BATCH_SIZE = Histogram("lookalike_batch_size", "Records per micro-batch", ["service", "kind"], buckets=BATCH_BUCKETS)
ERRORS = Counter("lookalike_errors", "Refused messages and error replies, by error code", ["service", "code"])
CONSUMER_LAG = Gauge("lookalike_consumer_lag", "Records between the consumed position and the partition's end",
                     ["service", "group", "topic", "partition"])
PARTIAL_REPLIES = Counter("lookalike_partial_replies", "Replies merged without every index shard (one was late)")
INDEX_ITEMS = Gauge("lookalike_index_items", "Items in the HNSW index")
INDEX_POSITION = Gauge("lookalike_index_position", "Next catalog offset the index reflects", ["partition"])
INDEX_CAUGHT_UP = Gauge("lookalike_index_caught_up", "1 once the catalog feed has caught up since start-up")
SNAPSHOT_AGE = Gauge("lookalike_snapshot_age_seconds", "Seconds since the index's last snapshot (or start-up)")
MODEL_INFO = Gauge("lookalike_model_info", "The model version served (value 1)", ["service", "version"])
MODEL_CREATED = Gauge("lookalike_model_created_timestamp_seconds", "When the served model was trained", ["service"])

METRIC_NAMES = frozenset({
    "lookalike_stage_seconds", "lookalike_records_total", "lookalike_batch_size", "lookalike_errors_total",
    "lookalike_consumer_lag", "lookalike_index_items", "lookalike_index_position", "lookalike_index_caught_up",
    "lookalike_snapshot_age_seconds", "lookalike_model_info", "lookalike_model_created_timestamp_seconds",
    "lookalike_partial_replies_total",
})

_STARTED = time.time()


# -- hooks the services call -------------------------------------------------------
def observe_stages(service: str, timings_ms: Mapping[str, float]) -> None:
    """Per-stage latencies from a reply's (or a batch's) timings, in milliseconds."""
    for stage, ms in timings_ms.items():
        if isinstance(ms, int | float) and ms >= 0:
            STAGE_SECONDS.labels(service, stage).observe(ms / 1000)


def observe_batch(service: str, kind: str, size: int, seconds: float | None = None) -> None:
    BATCH_SIZE.labels(service, kind).observe(size)
    RECORDS.labels(service, kind).inc(size)
    if seconds is not None:
        STAGE_SECONDS.labels(service, f"{kind}_batch").observe(seconds)


def observe_error(service: str, code: str) -> None:
    ERRORS.labels(service, code).inc()


def observe_reply(reply: Mapping[str, Any]) -> None:
    """The indexer's hook: one reply document, ok or error."""
    RECORDS.labels("indexer", "reply").inc()
    if reply.get("status") == "ok":
        observe_stages("indexer", reply.get("timings_ms") or {})
    else:
        observe_error("indexer", (reply.get("error") or {}).get("code", "unknown"))


def set_model(service: str, version: str, created_at: str | None) -> None:
    MODEL_INFO.labels(service, version).set(1)
    if created_at:
        try:
            MODEL_CREATED.labels(service).set(datetime.fromisoformat(created_at).timestamp())
        except ValueError:
            log.warning("model created_at %r is not ISO 8601", created_at)


# -- consumer lag -------------------------------------------------------------------
class LagProbe:
    """Lag of a consumer group from its committed offsets and the partitions' ends.

    A plain confluent Consumer with the group's id that never subscribes does not join the
    group; it only reads the group's committed offsets, as lag exporters (and KEDA) do.
    """

    def __init__(self, settings: Any, service: str, group: str, topics: Iterable[str]) -> None:
        from confluent_kafka import Consumer

        from lookalike.clients import confluent_config

        self.service, self.group, self.topics = service, group, list(topics)
        self.consumer = Consumer(confluent_config(settings, **{"group.id": group, "enable.auto.commit": False}))

    def ends(self, topic: str) -> dict[int, int]:
        from confluent_kafka import TopicPartition

        meta = self.consumer.list_topics(topic, timeout=5).topics.get(topic)
        if meta is None or meta.error is not None:
            return {}
        return {p: self.consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=5, cached=False)[1]
                for p in meta.partitions}

    def committed(self, topic: str, partitions: Iterable[int]) -> dict[int, int]:
        """The group's committed offset of each of ``topic``'s ``partitions`` (0 where it has none)."""
        from confluent_kafka import TopicPartition

        committed = self.consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=5)
        return {tp.partition: tp.offset if tp.offset >= 0 else 0 for tp in committed}

    def __call__(self) -> None:
        for topic in self.topics:
            ends = self.ends(topic)
            for partition, done in self.committed(topic, ends).items():
                CONSUMER_LAG.labels(self.service, self.group, topic, str(partition)).set(max(0, ends[partition] - done))

    def close(self) -> None:
        self.consumer.close()


def feed_lag(probe: LagProbe, topic: str, applied: Callable[[], Mapping[int, int]]) -> Callable[[], None]:
    """Lag of the indexer's catalog feed (no group: its applied offsets are its position)."""

    def update() -> None:
        position = applied()
        for partition, end in probe.ends(topic).items():
            CONSUMER_LAG.labels("indexer", "feed", topic, str(partition)).set(max(0, end - position.get(partition, 0)))

    return update


def indexer_gauges(indexer: Any) -> Callable[[], None]:
    """Size, position, readiness and snapshot age of the serving index of an
    ``indexer.service.Indexer`` (one index per live model version; the serving one counts)."""

    def update() -> None:
        vi = indexer.serving
        INDEX_ITEMS.set(len(vi) if vi is not None else 0)
        for partition, offset in (vi.catalog_position if vi is not None else {}).items():
            INDEX_POSITION.labels(str(partition)).set(offset)
        INDEX_CAUGHT_UP.set(1 if vi is not None and vi.caught_up.is_set() else 0)
        SNAPSHOT_AGE.set(time.time() - ((vi.last_snapshot_at if vi is not None else None) or _STARTED))
        served_model("indexer", indexer.state.serving if indexer.state else None)

    return update


def served_model(service: str, version: str | None) -> None:
    """Keep exactly one ``lookalike_model_info`` series per service: the serving version."""
    if not version:
        return
    for old in list(_served.get(service, set()) - {version}):
        MODEL_INFO.remove(service, old)
    _served[service] = {version}
    MODEL_INFO.labels(service, version).set(1)


_served: dict[str, set[str]] = {}


class Refresher:
    """A daemon thread calling each probe every ``interval_s``; a failing probe is logged, not fatal."""

    def __init__(self, probes: Iterable[Callable[[], None]], interval_s: float = 5.0) -> None:
        self.probes = list(probes)
        self.interval_s = interval_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, name="metrics-refresh", daemon=True)

    def start(self) -> Refresher:
        self.thread.start()
        return self

    def run(self) -> None:
        while not self.stop.is_set():
            for probe in self.probes:
                try:
                    probe()
                except Exception as exc:  # metrics must never take a service down
                    log.debug("metrics probe %s failed: %s", probe, exc)
            self.stop.wait(self.interval_s)


# -- HTTP endpoint --------------------------------------------------------------------
class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes every few seconds: not worth a log line
        pass


def wsgi_app(health: Callable[[], tuple[bool, dict[str, Any]]]) -> Callable:
    """``/healthz`` from ``health()``, everything else from prometheus-client's exposition."""
    metrics_app = make_wsgi_app(REGISTRY)

    def app(environ: dict[str, Any], start_response: Callable) -> list[bytes]:
        if environ.get("PATH_INFO") == "/healthz":
            try:
                healthy, facts = health()
            except Exception as exc:
                healthy, facts = False, {"error": f"{type(exc).__name__}: {exc}"}
            body = json.dumps({"status": "ok" if healthy else "unhealthy", **facts}).encode()
            start_response("200 OK" if healthy else "503 Service Unavailable",
                           [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        return metrics_app(environ, start_response)

    return app


def serve(port: int, health: Callable[[], tuple[bool, dict[str, Any]]], host: str = "127.0.0.1") -> _Server | None:
    """Serve /metrics and /healthz on ``host:port`` from a daemon thread; None when off (port 0)
    or when the port is taken (logged: a second replica on one host keeps working without)."""
    if not port:
        return None
    disable_created_metrics()  # the *_created series only double what a scrape says
    try:
        server = make_server(host, port, wsgi_app(health), server_class=_Server, handler_class=_QuietHandler)
    except OSError as exc:
        log.warning("metrics endpoint %s:%d not started: %s", host, port, exc)
        return None
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    log.info("metrics on http://%s:%d/metrics, health on /healthz", host, port)
    return server


def heartbeat_health(path: Any, extra: Callable[[], dict[str, Any]] | None = None) -> Callable[[], tuple[bool, dict]]:
    """Healthy while the service's heartbeat file is fresh (its event loop runs)."""
    from lookalike.health import check

    def health() -> tuple[bool, dict[str, Any]]:
        healthy, reason = check(path)
        return healthy, {"reason": reason, **(extra() if extra else {})}

    return health


# -- wiring (called by ``python -m workers`` / ``python -m indexer``) ------------------------
def instrument_worker(settings: Any, models: Any) -> _Server | None:
    """Model gauges, the groups' lag and the endpoint for a worker process (``models``: its
    ``workers.app.ModelSet``; the catalog group is the serving version's)."""
    from lookalike.health import heartbeat_path

    served_model("worker", models.serving)
    if not settings.worker_metrics_port:
        return None
    probes: dict[str, LagProbe] = {}

    def lag() -> None:
        served_model("worker", models.serving)
        embedder = models.loaded(models.serving)
        if embedder is not None:
            set_model("worker", embedder.version, getattr(embedder.card, "created_at", None))
        groups = {settings.worker_group: [settings.queries_topic]}
        if models.serving:
            groups[f"{settings.worker_group}.catalog.{models.serving}"] = [settings.catalog_topic]
        for group, topics in groups.items():
            if group not in probes:
                probes[group] = LagProbe(settings, "worker", group, topics)
            probes[group]()

    Refresher([lag]).start()
    return serve(settings.worker_metrics_port, heartbeat_health(heartbeat_path(settings, "worker")),
                 settings.metrics_host)


def instrument_indexer(settings: Any, indexer: Any) -> _Server | None:
    """Index gauges, the feed's and the group's lag and the endpoint for an indexer process."""
    from lookalike.health import heartbeat_path
    from lookalike.topics import vectors_topic

    if not settings.indexer_metrics_port:
        return None
    probe = LagProbe(settings, "indexer", settings.query_group, [settings.query_vectors_topic])

    def feed() -> None:
        vi = indexer.serving
        if vi is not None:
            feed_lag(probe, vectors_topic(settings, vi.version), lambda: vi.position)()

    Refresher([indexer_gauges(indexer), probe, feed]).start()

    def ready() -> dict[str, Any]:
        vi = indexer.serving
        return {"caught_up": vi is not None and vi.caught_up.is_set(), "items": len(vi) if vi is not None else 0,
                "model_version": indexer.state.serving if indexer.state else None}

    return serve(settings.indexer_metrics_port, heartbeat_health(heartbeat_path(settings, "indexer"), ready),
                 settings.metrics_host)
