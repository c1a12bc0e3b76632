"""The metrics endpoint, the reply hook and the JSON log format, without Kafka."""

from __future__ import annotations

import json
import logging
import socket
import urllib.error
import urllib.request

import pytest
from prometheus_client import REGISTRY

from lookalike import contracts as c
from lookalike import logs, metrics


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_endpoint_serves_metrics_and_health() -> None:
    healthy = {"ok": True}
    port = free_port()
    server = metrics.serve(port, lambda: (healthy["ok"], {"items": 3}))
    assert server is not None
    try:
        metrics.observe_stages("indexer", {"search": 2.0})
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert 'lookalike_stage_seconds_bucket{le="0.0025",service="indexer",stage="search"}' in body
        assert "process_resident_memory_bytes" in body  # CPU and memory of the process, for free
        reply = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).read())
        assert reply == {"status": "ok", "items": 3}
        healthy["ok"] = False
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
        assert err.value.code == 503
        # A second service on the same port keeps running without an endpoint.
        assert metrics.serve(port, lambda: (True, {})) is None
    finally:
        server.shutdown()
        server.server_close()
    assert metrics.serve(0, lambda: (True, {})) is None


def test_reply_hook_counts_stages_and_error_codes() -> None:
    before_total = sample("lookalike_stage_seconds_count", service="indexer", stage="total")
    before_errors = sample("lookalike_errors_total", service="indexer", code="model_mismatch")
    ok = c.ok_reply("r1", [], model_version="m", index_version="i", index_position={0: 1},
                    timings_ms={"decode": 1.0, "embed": 4.0, "search": 0.5, "total": 9.0})
    metrics.observe_reply(ok)
    metrics.observe_reply(c.error_reply("r2", "model_mismatch", "no"))
    assert sample("lookalike_stage_seconds_count", service="indexer", stage="total") == before_total + 1
    assert sample("lookalike_errors_total", service="indexer", code="model_mismatch") == before_errors + 1


def test_declared_metric_names_are_registered() -> None:
    names = {s.name for m in REGISTRY.collect() for s in m.samples}
    families = {m.name for m in REGISTRY.collect()}
    for name in metrics.METRIC_NAMES:
        assert name in names or name in families or name.removesuffix("_total") in families, name


def test_json_log_lines_carry_request_ids() -> None:
    formatter = logs.JsonFormatter("worker")
    record = logging.LogRecord("workers.app", logging.INFO, __file__, 1, "query %s refused", ("abc",), None)
    record.request_id = "abc"
    record.code = "bad_image"
    doc = json.loads(formatter.format(record))
    assert doc["message"] == "query abc refused"
    assert (doc["service"], doc["request_id"], doc["code"], doc["level"]) == ("worker", "abc", "bad_image", "INFO")
