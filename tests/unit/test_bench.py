"""The benchmark harness's own arithmetic: exact search, recall, the verdicts of the table."""

from __future__ import annotations

import numpy as np

from benchmarks import ann
from benchmarks.pipeline import percentiles
from benchmarks.run import table
from lookalike.settings import IndexerSettings


def test_exact_top_is_the_brute_force_order() -> None:
    data = ann.synthetic(500, 16, "uniform", seed=1)
    queries = ann.synthetic(7, 16, "uniform", seed=2)
    expected = np.argsort(-(queries @ data.T), axis=1)[:, :5]
    assert (ann.exact_top(data, queries, 5, batch=3) == expected).all()


def test_compare_measures_recall_against_exact_search() -> None:
    data = ann.synthetic(2000, 32, "clustered", seed=3, clusters=20)
    result = ann.compare(data[:1900], data[1900:], name="t", settings=IndexerSettings(), ef_values=(8, 64))
    by_ef = {h["ef"]: h for h in result["hnsw"]}
    assert by_ef[64]["recall_at_5"] >= 0.95
    assert 0 <= by_ef[8]["recall_at_5"] <= by_ef[64]["recall_at_5"] + 0.05
    assert result["recall_at_5"] == by_ef[IndexerSettings().hnsw_ef_search]["recall_at_5"]
    # Catalog mode: queries are rows of the data; their own row must not count as a neighbour.
    self_mode = ann.compare(data[:500], data[:20], name="self", settings=IndexerSettings(), ef_values=(64,),
                            exclude_self=True)
    assert self_mode["recall_at_5"] >= 0.95


def test_table_verdicts_follow_the_targets() -> None:
    result = {
        "queries": {"rate_per_s": 50, "latency_ms": {"p50": 8.0, "p95": 20.0, "p99": 31.0, "max": 40.0},
                    "answered_ok": 10, "sent": 10, "stages_ms": {}},
        "model": {"batch": 64, "device": "cpu", "threads": 2, "forward_images_per_s": 100.0},
        "ingestion": {"delivered": 10, "images_per_s": 79.0},
        "ingest_ratio": 0.79,
        "freshness": {"rate_per_s": 20, "freshness_ms": {"p50": 100.0, "p99": 900.0}},
    }
    verdicts = {figure.split(" at ")[0]: verdict for figure, _, _, verdict in table(result) if verdict}
    assert verdicts == {"query p50": "met", "query p99": "MISSED", "ingestion / bare model": "MISSED",
                        "freshness p99": "met"}


def test_percentiles() -> None:
    p = percentiles(list(range(1, 101)))
    assert (p["n"], p["p50"], p["max"]) == (100, 50.5, 100.0)
    assert percentiles([]) == {"n": 0}


def test_query_path_policies_are_presets_or_knobs_over_the_defaults(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from benchmarks.query_path import child_env, parse_policy

    assert parse_policy("after") == ("after", {})
    name, before = parse_policy("before")
    assert name == "before" and before["shared"] == "1" and before["omp"] == "default"
    assert parse_policy("t2:query_torch_threads=0,omp=ACTIVE") == ("t2", {"query_torch_threads": "0", "omp": "ACTIVE"})
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert child_env({})["OMP_WAIT_POLICY"] == "ACTIVE"  # as this process has it
    assert "OMP_WAIT_POLICY" not in child_env({"omp": "default"})
    assert child_env({"omp": "PASSIVE"})["OMP_WAIT_POLICY"] == "PASSIVE"


def test_query_path_ticker_batches_hold_a_lone_item_until_the_tick() -> None:
    import asyncio
    import time

    from benchmarks.query_path import TickerBatches

    async def scenario() -> tuple[list[int], float, bool]:
        batches = TickerBatches(16, within_s=0.1)
        await batches.put(1)
        started = time.monotonic()
        batch = await batches.get()
        waited = time.monotonic() - started
        late = asyncio.ensure_future(batches.put(2))  # arrives while the batch is processed
        await asyncio.sleep(0.02)
        held = not late.done()
        batches.done()
        await late
        return batch, waited, held

    batch, waited, held = asyncio.run(scenario())
    assert batch == [1] and waited >= 0.09 and held


def test_capacity_is_the_highest_rate_answered_in_full_within_the_p99() -> None:
    from benchmarks.run import capacity

    def point(rate: float, p99: float, answered: int = 100, timeouts: int = 0, late_p99: float = 1.0) -> dict:
        return {"rate_per_s": rate, "sent": 100, "answered_ok": answered, "timeouts": timeouts, "errors": {},
                "latency_ms": {"p99": p99}, "sender_late_ms": {"p99": late_p99}}

    assert capacity([point(100, 20), point(200, 60), point(300, 140)]) == 200
    assert capacity([point(100, 20), point(200, 60, answered=99)]) == 100  # one lost: not sustained
    assert capacity([point(100, 20), point(200, 60, timeouts=1)]) == 100
    assert capacity([point(100, 20), point(200, 60, late_p99=500)]) == 100  # the sender fell behind
    assert capacity([point(100, 120)]) is None
