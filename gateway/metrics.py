"""The gateway's Prometheus metrics (``/metrics`` on the gateway's own port)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from lookalike.metrics import LATENCY_BUCKETS

REQUESTS = Counter("lookalike_gateway_requests", "HTTP requests answered, by route and status", ["route", "status"])
REQUEST_SECONDS = Histogram("lookalike_gateway_request_seconds", "HTTP request handling time, by route", ["route"],
                            buckets=LATENCY_BUCKETS)
KAFKA_ROUND_TRIP = Histogram("lookalike_gateway_kafka_round_trip_seconds",
                             "Query produced -> its reply read back, as the gateway sees it", buckets=LATENCY_BUCKETS)
REPLY_CODES = Counter("lookalike_gateway_replies", "Replies returned, by status and error code", ["code"])
FEEDBACK_EVENTS = Counter("lookalike_gateway_feedback_events", "Feedback events published, by event", ["event"])
WAITING = Gauge("lookalike_gateway_waiting_queries", "Queries published and waiting for their reply")
PICTURES = Gauge("lookalike_gateway_picture_cache_items", "Item pictures held in memory")
PICTURE_BYTES = Gauge("lookalike_gateway_picture_cache_bytes", "Bytes of item pictures held in memory")
