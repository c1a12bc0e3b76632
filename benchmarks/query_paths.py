"""Two hops against one: the same queries, interleaved, through a pipeline whose workers embed
them and one whose indexer does (``LOOKALIKE_QUERY_EMBEDDING``).

    python -m benchmarks.query_paths --items 1000 --rate 50 --rounds 6 --seconds 10

Both pipelines run at once on the running broker and Redis, each with topics and groups of
its own (:class:`benchmarks.scale_out.Pipeline`: one worker, one indexer, the store's
champion, snapshots off), and both ingest the same items. Then the query stream alternates:
round after round, ``--seconds`` at ``--rate`` through one pipeline, then the other, in
alternating order. On a box whose speed drifts (a shared host), each pair of rounds shares
its minute: the ratios of the pairs are the figure, not the milliseconds of one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.pipeline import Bench
from benchmarks.run import indexer_reach
from benchmarks.scale_out import Layout, Pipeline
from lookalike.catalog import CatalogItem
from lookalike.runtime import freeze_heap
from lookalike.settings import ClientSettings

PATHS = (Layout("two hops", 1, 1, "worker"), Layout("one hop", 1, 1, "indexer"))


def measure(base: ClientSettings, items: Sequence[CatalogItem], images: dict[str, bytes], *, rate: float = 50.0,
            rounds: int = 6, seconds: float = 10.0) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="lookalike-query-paths-"))
    pipelines = [Pipeline(layout, base, workdir) for layout in PATHS]
    benches: list[Bench] = []
    try:
        for pipeline in pipelines:
            pipeline.start()
        for pipeline in pipelines:
            bench = Bench(pipeline.settings)
            benches.append(bench)
            pipeline.ready(bench, (items[0].item_id, images[items[0].item_id]))
            bench.ingestion(items, [images[i.item_id] for i in items],
                            searchable=lambda p=pipeline: indexer_reach(p.settings, p.group))
            print(f"   {pipeline.layout.name}: {len(items)} items searchable", flush=True)
        queries = [(i.item_id, images[i.item_id]) for i in items]
        runs: dict[str, list[dict[str, Any]]] = {p.layout.name: [] for p in pipelines}
        for n in range(rounds):
            order = list(zip(pipelines, benches, strict=True))
            for pipeline, bench in order if n % 2 == 0 else order[::-1]:
                point = bench.query_latency(queries, rate, seconds, warmup_s=2.0)
                point.pop("samples")
                runs[pipeline.layout.name].append(point)
                print(f"   round {n + 1}, {pipeline.layout.name}: p50 {point['latency_ms'].get('p50')} ms, "
                      f"p99 {point['latency_ms'].get('p99')} ms, {point['answered_ok']}/{point['sent']} ok", flush=True)
            if not all(p.alive() for p in pipelines):
                raise RuntimeError(f"a service died: logs in {workdir}")
    finally:
        for bench in benches:
            bench.close()
        for pipeline in pipelines:
            pipeline.stop()
    two, one = (runs[layout.name] for layout in PATHS)

    def ratios(stat: str) -> list[float]:
        return [round(b["latency_ms"][stat] / a["latency_ms"][stat], 3) for a, b in zip(two, one, strict=True)
                if a["latency_ms"].get(stat) and b["latency_ms"].get(stat)]

    def median(points: list[dict[str, Any]], stat: str) -> float | None:
        values = [p["latency_ms"][stat] for p in points if p["latency_ms"].get(stat) is not None]
        return round(statistics.median(values), 2) if values else None

    return {
        "rate_per_s": rate, "rounds": rounds, "seconds": seconds, "items": len(items), "logs": str(workdir),
        "runs": runs,
        "p50_ms": {name: median(points, "p50") for name, points in runs.items()},
        "p99_ms": {name: median(points, "p99") for name, points in runs.items()},
        "one_over_two_p50": ratios("p50"), "one_over_two_p99": ratios("p99"),
        "all_answered_ok": all(p["answered_ok"] == p["sent"] for points in runs.values() for p in points),
    }


def main(argv: list[str] | None = None) -> int:
    import random

    from lookalike.catalog import iter_catalog
    from lookalike.settings import default_data

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=default_data())
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--out", type=Path, help="write the JSON here too")
    args = parser.parse_args(argv)
    items = list(iter_catalog(args.data))
    random.Random(0).shuffle(items)
    items = items[: args.items]
    images = {i.item_id: Path(i.image_path).read_bytes() for i in items}
    started = time.monotonic()
    freeze_heap()  # the client's own full collections stalled it ~300 ms (Bench.query_latency)
    result = measure(ClientSettings(), items, images, rate=args.rate, rounds=args.rounds, seconds=args.seconds)
    result["took_s"] = round(time.monotonic() - started, 1)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
