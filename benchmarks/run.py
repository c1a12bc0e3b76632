"""`lookalike bench`: the whole benchmark against the running stack, one table at the end.

    lookalike stack up && lookalike services up      # or `make demo`, which leaves both running
    lookalike bench                                  # ≈ 20 min on 2 cores, 1M-vector HNSW included
    lookalike bench --ann-items 0 --query-seconds 10 # a quick look (≈ 3 min)

Phases, in order: the bare model's batched rate (services idle), query latency at a fixed
rate, the capacity curve, a burst of 10x capacity for 30 s (queries with a deadline: how many
are shed, the answered ones' p99 against the deadline, how soon latency is normal again),
the HTTP gateway (overhead over Kafka, requests/s; benchmarks/gateway.py), ingestion
throughput, freshness, HNSW vs exact on the live catalog's vectors, HNSW vs exact on
synthetic vectors; CPU and memory of every local process throughout. Writes
``out/bench/bench.json`` and PNG plots beside it, and prints the figures against the
targets of issue 7. Settings (servers, topics, model store) are the ``LOOKALIKE_*`` ones.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from benchmarks import ann, model_rate, plots
from benchmarks.pipeline import Bench
from benchmarks.resources import ResourceMonitor, local_pids
from lookalike.catalog import CatalogItem, iter_catalog
from lookalike.cleanup import counts
from lookalike.runtime import freeze_heap
from lookalike.settings import ClientSettings, IndexerSettings, WorkerSettings, default_data

TARGETS = {  # issue 15's (latency at 50/s, capacity) and issue 7's (the rest)
    "query_p50_ms": 8.0, "query_p99_ms": 25.0, "capacity_per_s": 300.0, "capacity_p99_ms": 100.0,
    "ingest_ratio": 0.8, "freshness_p99_ms": 1000.0, "recall_at_5": 0.99, "speedup_vs_exact": 10.0,
}


def capacity(curve: list[dict[str, Any]], p99_ms: float = TARGETS["capacity_p99_ms"]) -> float | None:
    """The highest rate of the curve that was sustained: every query answered ok, the sender
    on time, and a p99 within ``p99_ms``; None when no rate was."""
    held = [point["rate_per_s"] for point in curve
            if point["timeouts"] == 0 and not point["errors"] and point["answered_ok"] == point["sent"]
            and point["latency_ms"].get("p99", float("inf")) <= p99_ms
            and point["sender_late_ms"].get("p99", float("inf")) <= p99_ms]
    return max(held) if held else None


def saturated(point: dict[str, Any]) -> bool:
    """A rate of the curve the stack did not keep up with (a query timed out, or a p99 over
    1 s): higher rates are not worth measuring."""
    return bool(point["timeouts"]) or point["latency_ms"].get("p99", float("inf")) > 1000


def catalog_vectors(settings: ClientSettings, timeout_s: float = 120) -> tuple[list[str], np.ndarray, str | None]:
    """The live catalog's vectors, read from the serving model version's compacted vector
    topic like an indexer does: the last record per item, tombstones removed, the benchmark's
    own items left out."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    from lookalike import contracts as c
    from lookalike import rollout
    from lookalike.clients import confluent_config
    from lookalike.topics import vectors_topic

    state = rollout.read_state(rollout.redis_client(settings), settings)
    serving = state.serving if state else rollout.desired_version(settings)
    if not serving:
        return [], np.zeros((0, 0), np.float32), None
    topic = vectors_topic(settings, serving)
    consumer = Consumer(confluent_config(settings, **{"group.id": "bench-vectors", "enable.auto.commit": False}))
    parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts}
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    latest: dict[str, tuple[str | None, bytes | None, int]] = {}
    done = {p for p, end in ends.items() if end <= 0}
    deadline = time.monotonic() + timeout_s
    while len(done) < len(parts) and time.monotonic() < deadline:
        for msg in consumer.consume(2000, 1.0):
            if msg.error() is not None:
                continue
            headers = c.headers_to_dict(msg.headers())
            dim = int(headers.get(c.H_VECTOR_DIM, b"0") or 0)
            latest[msg.key().decode("utf-8", "replace")] = (
                headers.get(c.H_MODEL_VERSION, b"").decode() or None, msg.value(), dim)
            if msg.offset() + 1 >= ends[msg.partition()]:
                done.add(msg.partition())
    consumer.close()
    live = {k: v for k, v in latest.items() if v[1] is not None and not k.startswith("bench-")}
    if not live:
        return [], np.zeros((0, 0), np.float32), None
    version = Counter(v[0] for v in live.values()).most_common(1)[0][0]
    ids = [k for k, v in live.items() if v[0] == version]
    vectors = np.stack([c.decode_vector(live[k][1], live[k][2]) for k in ids])  # type: ignore[arg-type]
    return ids, vectors, version


def indexer_reach(settings: ClientSettings, group: str) -> dict[int, int]:
    """The highest catalog position any live indexer of the group reports (Redis status)."""
    from lookalike.status import indexer_status

    reach: dict[int, int] = {}
    for status in indexer_status(settings, group):
        for p, o in status.catalog_position.items():
            reach[p] = max(o, reach.get(p, 0))
    return reach


def verdict(measured: float | None, target: float, higher_is_better: bool) -> str:
    if measured is None:
        return "not measured"
    return "met" if (measured >= target if higher_is_better else measured <= target) else "MISSED"


def table(result: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    rows: list[tuple[str, str, str, str]] = []

    def row(name: str, value: float | None, unit: str, target: float | None = None, higher: bool = False,
            target_text: str | None = None) -> None:
        digits = 4 if unit == "" and value is not None and value <= 1 else 2  # recall: 0.998 is not 1.00
        shown = "—" if value is None else f"{value:,.{digits}f} {unit}".strip()
        if target is None:
            rows.append((name, shown, target_text or "", ""))
        else:
            rows.append((name, shown, target_text or f"{'≥' if higher else '≤'} {target:g} {unit}".strip(),
                         verdict(value, target, higher)))

    q = result.get("queries")
    if q:
        lat = q["latency_ms"]
        row(f"query p50 at {q['rate_per_s']:g}/s (publish → reply)", lat.get("p50"), "ms", TARGETS["query_p50_ms"])
        row("query p95", lat.get("p95"), "ms")
        row("query p99", lat.get("p99"), "ms", TARGETS["query_p99_ms"])
        row("query max", lat.get("max"), "ms")
        row("queries answered ok / sent", q["answered_ok"], f"/ {q['sent']}")
        for stage, p in q["stages_ms"].items():
            row(f"  stage {stage} p50 / p99", p.get("p50"), f"/ {p.get('p99')} ms")
    curve = result.get("curve")
    if curve:
        for point in curve["points"]:
            lat = point["latency_ms"]
            lost = point["sent"] - point["answered_ok"]
            row(f"curve: {point['rate_per_s']:g}/s, p50 / p99{f' ({lost} not answered ok)' if lost else ''}",
                lat.get("p50"), f"/ {lat.get('p99')} ms")
        row(f"capacity: highest rate with every query answered and p99 ≤ {TARGETS['capacity_p99_ms']:g} ms",
            curve["capacity_per_s"], "queries/s", TARGETS["capacity_per_s"], higher=True)
    b = result.get("burst")
    if b:
        d = b["deadline_ms"]
        for phase in ("before", "burst", "after"):
            p = b["phases"].get(phase)
            if p:
                codes = ", ".join(f"{code} {n}" for code, n in p["codes"].items())
                row(f"burst: {phase}, {p['sent']} sent: {codes}", p["latency_ms"].get("p99"), "ms p99 of the ok")
        lost = sum(p["codes"].get("no_reply", 0) for p in b["phases"].values())
        row(f"burst: {b['burst_rate_per_s']:g}/s for {b['burst_s']:g}s, queries without any reply", lost, "queries",
            0, target_text="0")
        row(f"burst: answered p99 / deadline ({d:g} ms)", b["burst_answered_p99_over_deadline"], "×", 2.0)
        row(f"burst: back to normal (5 windows of 1 s in a row all ok, p99 ≤ {b['recovery_bar_ms'] or 0:.0f} ms) after",
            b["recovered_after_s"], "s", 10.0)
    so = result.get("scale_out")
    if so:
        for layout in so["layouts"]:
            ing = layout["ingestion"]
            row(f"scale-out: {layout['layout']}, ingestion of {ing.get('delivered')} items", ing.get("images_per_s"),
                "images/s")
            row(f"scale-out: {layout['layout']}, capacity (p99 ≤ {TARGETS['capacity_p99_ms']:g} ms, all answered)",
                layout["capacity_per_s"], "queries/s")
        row("scale-out: ingestion, 2 workers + 2 shards / 1 + 1", so["ingestion_ratio"], "×")
        row("scale-out: capacity, 2 workers + 2 shards / 1 + 1", so["capacity_ratio"], "×")
    g = result.get("gateway")
    if g:
        o = g["overhead"]
        row("gateway: Kafka round trip p50 / p99 (one at a time)", o["kafka_ms"].get("p50"), f"/ {o['kafka_ms'].get('p99')} ms")
        row("gateway: HTTP round trip p50 / p99 (one at a time)", o["http_ms"].get("p50"), f"/ {o['http_ms'].get('p99')} ms")
        row("gateway: overhead p50 / p99 (HTTP − Kafka)", o["overhead_p50_ms"], f"/ {o['overhead_p99_ms']} ms")
        if o.get("paired_difference_ms", {}).get("n"):
            pd, inside = o["paired_difference_ms"], o["http_minus_server_kafka_ms"]
            row("gateway: paired HTTP − Kafka p50 / p99", pd["p50"], f"/ {pd['p99']} ms")
            row("gateway: its own share (HTTP − its Kafka wait) p50 / p99", inside.get("p50"), f"/ {inside.get('p99')} ms")
        for t in g["throughput"]:
            lat = t["latency_ms"]
            kind = "more-like-item" if t.get("kind") == "item" else "image"
            row(f"gateway: {t['concurrency']} clients, {kind} requests/s (p50 / p99 {lat.get('p50')} / {lat.get('p99')} ms)",
                t["requests_per_s"], "req/s")
    m = result.get("model")
    if m:
        layout = (", channels-last" if m.get("channels_last") else "") + (f", {m['precision']}" if m.get("precision") else "")
        row(f"bare model, batch {m['batch']} ({m['device']}, {m['threads']} threads{layout})", m["forward_images_per_s"],
            "images/s")
        if "with_decode_images_per_s" in m:
            row("bare model + JPEG decode + preprocess", m["with_decode_images_per_s"], "images/s")
    ing = result.get("ingestion")
    if ing and "images_per_s" in ing:
        row(f"ingestion, {ing['delivered']} images (publish → searchable)", ing["images_per_s"], "images/s")
        if m:
            row("ingestion / bare model", result["ingest_ratio"], "", TARGETS["ingest_ratio"], higher=True)
    fr = result.get("freshness")
    if fr:
        f = fr["freshness_ms"]
        row(f"freshness p50 at {fr['rate_per_s']:g} items/s", f.get("p50"), "ms")
        row("freshness p99", f.get("p99"), "ms", TARGETS["freshness_p99_ms"])
    for key in ("ann_catalog", "ann_synthetic"):
        a = result.get(key)
        if not a:
            continue
        label = f"{a['name']} {a['items']:,}×{a['dim']}, ef {a['ef_search_served']}"
        row(f"recall@5 {label}", a["recall_at_5"], "", TARGETS["recall_at_5"] if key == "ann_synthetic" else None,
            higher=True, target_text=None if key == "ann_synthetic" else "(info)")
        row(f"HNSW QPS / exact QPS (one at a time) {a['name']}", a["speedup_vs_exact_one_at_a_time"], "×",
            TARGETS["speedup_vs_exact"] if key == "ann_synthetic" else None, higher=True,
            target_text=None if key == "ann_synthetic" else "(info)")
        row(f"HNSW QPS / exact QPS (batches of 64) {a['name']}", a["speedup_vs_exact_batch64"], "×")
        row(f"  HNSW {a['hnsw_qps']:,.0f} QPS, exact {a['exact_qps_one_at_a_time']:,.1f} / "
            f"{a['exact_qps_batch64']:,.1f} QPS; HNSW index size", a["index_bytes"] / 1e6, "MB")
    return rows


def print_table(rows: list[tuple[str, str, str, str]], resources: dict[str, Any]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(4)] if rows else [0] * 4
    print()
    for r in [("figure", "measured", "target", ""), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    if resources:
        print("\nCPU (cores busy) and peak RSS per process and phase:")
        for phase, procs in resources.items():
            cells = ", ".join(f"{n} {v['cpu_cores']:.2f} cores {v['rss_peak_mb']:.0f} MB" for n, v in procs.items())
            print(f"  {phase:12} {cells}")


def parse_pids(values: list[str]) -> dict[str, int]:
    out = {}
    for value in values:
        name, _, pid = value.partition("=")
        out[name] = int(pid)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lookalike bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=default_data(), help="catalog folder for query and ingest images")
    parser.add_argument("--out", type=Path, default=Path("out/bench"))
    parser.add_argument("--query-rate", type=float, default=50.0)
    parser.add_argument("--query-seconds", type=float, default=30.0)
    parser.add_argument("--curve-rates", type=float, nargs="*", default=[100, 200, 300, 400, 500, 600],
                        help="the capacity curve's rates (queries/s), in order; it stops after the first saturated one")
    parser.add_argument("--curve-seconds", type=float, default=15.0, help="per rate of the curve")
    parser.add_argument("--burst-rate", type=float, default=None,
                        help="the burst's queries/s; default 10x the curve's capacity (or 10x --burst-capacity)")
    parser.add_argument("--burst-capacity", type=float, default=300.0,
                        help="the capacity the burst is 10x of when the curve did not measure one")
    parser.add_argument("--burst-seconds", type=float, default=30.0)
    parser.add_argument("--burst-deadline-ms", type=float, default=1000.0, help="each burst query's deadline-ms")
    parser.add_argument("--ingest-items", type=int, default=0, help="0: the whole catalog folder")
    parser.add_argument("--fresh-rate", type=float, default=20.0)
    parser.add_argument("--fresh-items", type=int, default=200)
    parser.add_argument("--scale-items", type=int, default=3000, help="items each scale-out layout ingests")
    parser.add_argument("--scale-rates", type=float, nargs="*", default=[200, 400, 600],
                        help="query rates each scale-out layout is measured at")
    parser.add_argument("--ann-items", type=int, default=1_000_000, help="synthetic vectors; 0 skips")
    parser.add_argument("--ann-kind", choices=["clustered", "uniform"], default="clustered")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["model", "queries", "curve", "burst", "gateway", "ingestion", "freshness", "scale-out",
                                 "ann-catalog", "ann-synthetic"])
    parser.add_argument("--gateway-url", default="http://127.0.0.1:8480", help="the HTTP gateway (skipped when down)")
    parser.add_argument("--gateway-seconds", type=float, default=15.0, help="per concurrency level (1, 4, 16)")
    parser.add_argument("--pid", nargs="*", default=[], metavar="NAME=PID", help="more processes to watch")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    settings, wsettings, isettings = ClientSettings(), WorkerSettings(), IndexerSettings()
    started = time.monotonic()

    items: list[CatalogItem] = list(iter_catalog(args.data))
    random.Random(0).shuffle(items)
    images = {item.item_id: Path(item.image_path).read_bytes() for item in items}
    result: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"), "host": platform.node(),
        "cpus": psutil.cpu_count(), "load_average_at_start": list(psutil.getloadavg()),
        "memory_gb": round(psutil.virtual_memory().total / 1e9, 1), "catalog_folder": str(args.data),
        "kafka": settings.kafka_bootstrap, "catalog_topic": settings.catalog_topic, "targets": TARGETS,
    }
    # the client too: publishing and reading the replies is part of what the box carries
    monitor = ResourceMonitor({**local_pids(parse_pids(args.pid)), "bench client": os.getpid()}).start()
    result["watched_processes"] = sorted(monitor.procs)
    paths: list[Path] = []
    before = counts(settings)  # what the stack holds: the run must leave it so (its own names removed)
    print(f"== stack: {before}", flush=True)
    freeze_heap()  # the client's own full collections stalled it ~300 ms (Bench.query_latency)
    bench = Bench(settings)
    try:
        if "model" not in args.skip:
            print("== bare model: batched inference, services idle", flush=True)
            monitor.begin("model")
            result["model"] = model_rate.measure(wsettings, [images[i.item_id] for i in items[:512]])
        if "queries" not in args.skip:
            print(f"== queries: {args.query_rate:g}/s for {args.query_seconds:g}s, open loop", flush=True)
            monitor.begin("queries")
            queries = [(i.item_id, images[i.item_id]) for i in items[:1000]]
            result["queries"] = bench.query_latency(queries, args.query_rate, args.query_seconds)
            paths += [plots.latency(result["queries"], args.out / "latency.png", TARGETS),
                      plots.stages(result["queries"], args.out / "stages.png")]
        if "curve" not in args.skip and args.curve_rates:
            queries = [(i.item_id, images[i.item_id]) for i in items[:1000]]
            points = []
            for rate in args.curve_rates:
                print(f"== curve: {rate:g}/s for {args.curve_seconds:g}s, open loop", flush=True)
                monitor.begin(f"curve-{rate:g}")
                point = bench.query_latency(queries, rate, args.curve_seconds, warmup_s=2.0)
                point.pop("samples")
                points.append(point)
                if saturated(point):
                    print(f"   saturated at {rate:g}/s; higher rates skipped", flush=True)
                    break
            result["curve"] = {"points": points, "capacity_per_s": capacity(points)}
            paths.append(plots.curve(result["curve"], args.out / "curve.png", TARGETS))
        if "burst" not in args.skip:
            measured = (result.get("curve") or {}).get("capacity_per_s")
            rate = args.burst_rate or 10 * (measured or args.burst_capacity)
            print(f"== burst: {rate:g}/s for {args.burst_seconds:g}s (10x {'the curve' if measured else 'the given'} "
                  f"capacity), deadline {args.burst_deadline_ms:g} ms, between {args.query_rate:g}/s", flush=True)
            monitor.begin("burst")
            result["burst"] = bench.burst([(i.item_id, images[i.item_id]) for i in items[:1000]],
                                          normal_rate=args.query_rate, burst_rate=rate, burst_s=args.burst_seconds,
                                          deadline_ms=args.burst_deadline_ms)
            result["burst"]["capacity_per_s"] = measured or args.burst_capacity
        if "gateway" not in args.skip:
            from benchmarks import gateway

            if gateway.reachable(args.gateway_url):
                print(f"== gateway: HTTP vs Kafka round trip, then requests/s at {args.gateway_url}", flush=True)
                monitor.begin("gateway")
                result["gateway"] = gateway.measure(args.gateway_url, settings, [images[i.item_id] for i in items[:200]],
                                                    seconds=args.gateway_seconds)
            else:
                print(f"== gateway: none answers at {args.gateway_url}/healthz, skipped", flush=True)
        group = isettings.indexer_group
        if "ingestion" not in args.skip:
            chosen = items[: args.ingest_items or len(items)]
            print(f"== ingestion: {len(chosen)} images as new items, as fast as they go", flush=True)
            monitor.begin("ingestion")
            result["ingestion"] = bench.ingestion(chosen, [images[i.item_id] for i in chosen],
                                                  searchable=lambda: indexer_reach(settings, group))
            if "images_per_s" in result["ingestion"]:
                paths.append(plots.ingestion(result["ingestion"], args.out / "ingestion.png"))
                if "model" in result:
                    result["ingest_ratio"] = round(
                        result["ingestion"]["images_per_s"] / result["model"]["forward_images_per_s"], 3)
        if "freshness" not in args.skip:
            chosen = items[: args.fresh_items]
            print(f"== freshness: {len(chosen)} images at {args.fresh_rate:g}/s, each followed by a query", flush=True)
            monitor.begin("freshness")
            result["freshness"] = bench.freshness(chosen, [images[i.item_id] for i in chosen], args.fresh_rate)
            paths.append(plots.freshness(result["freshness"], args.out / "freshness.png"))
        if "scale-out" not in args.skip:
            from benchmarks import scale_out

            print("== scale-out: 1 worker + 1 index, then 2 workers + a 2-shard index, each a pipeline of its own",
                  flush=True)
            monitor.begin("scale-out")
            chosen = items[: args.scale_items]
            result["scale_out"] = scale_out.measure(settings, chosen, {i.item_id: images[i.item_id] for i in chosen},
                                                    rates=args.scale_rates, seconds=args.curve_seconds)
        monitor.begin("cleanup")
        print(f"== cleanup: {bench.cleanup()} tombstones for the benchmark's items", flush=True)
        monitor.end()
        ann_results = []
        if "ann-catalog" not in args.skip:
            ids, vectors, version = catalog_vectors(settings)
            if len(ids) > 10:
                print(f"== ann: the live catalog's {len(ids)} vectors (model {version})", flush=True)
                monitor.begin("ann-catalog")
                rng = np.random.default_rng(0)
                picks = rng.choice(len(ids), size=min(1000, len(ids)), replace=False)
                result["ann_catalog"] = ann.compare(vectors, vectors[picks], name="catalog", settings=isettings,
                                                    exclude_self=True)
                result["ann_catalog"]["model_version"] = version
                ann_results.append(result["ann_catalog"])
        if "ann-synthetic" not in args.skip and args.ann_items:
            monitor.begin("ann-synthetic")
            result["ann_synthetic"] = ann.run_synthetic(args.ann_items, 256, args.ann_kind, settings=isettings)
            ann_results.append(result["ann_synthetic"])
        if ann_results:
            paths.append(plots.ann(ann_results, args.out / "ann.png"))
    finally:
        if bench.added:
            bench.cleanup()
        forgotten = bench.forget_requests()
        bench.close()
        monitor.close()
    after = counts(settings)
    result["stack_counts"] = {"before": str(before), "after": str(after), "request_records_removed": forgotten}
    print(f"== stack: {after} after the run ({'as before' if after == before else f'before: {before}'}); "
          f"{forgotten} join records of the run's queries removed", flush=True)
    result["resources"] = monitor.summary()
    if result["resources"]:
        paths.append(plots.resources(result["resources"], args.out / "resources.png"))
    result["duration_s"] = round(time.monotonic() - started, 1)
    rows = table(result)
    result["table"] = [dict(zip(("figure", "measured", "target", "verdict"), r, strict=True)) for r in rows]
    (args.out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    print_table(rows, result["resources"])
    print(f"\nwritten: {args.out / 'bench.json'}, " + ", ".join(str(p) for p in paths))
    print(f"took {result['duration_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
