"""Scale-out on the local stack: one worker and one index against two workers and a 2-shard index.

    python -m benchmarks.scale_out --items 3000 --rates 200 400 600
    lookalike bench ...                     # its phase "scale-out" runs this

For each layout, a pipeline of its own starts on the running broker and Redis: its own
topics and consumer groups (``lookalike.topics.naming_env`` under a ``bench-scale-…``
prefix, 4 partitions), the store's champion, snapshots off; workers are ``python -m
workers`` processes in one group, the index is one ``python -m indexer`` or two shards
(``LOOKALIKE_INDEX_SHARDS=2``, each holding half of the catalog's partitions, every shard
answering every query and the gatherer merging). Measured on each, with the same client
code as ``lookalike bench``: ingestion (the items published as fast as the producer goes,
until all are searchable) and queries at each rate (open loop, publish → reply), then the
ratios of the scaled layout to the single one. The pipelines' topics are deleted after.

On one host the processes share its cores: the ratio shows what a second replica buys
*here*, which on a 2-core box is at most what an idle core can give.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from benchmarks.pipeline import Bench
from benchmarks.run import capacity, indexer_reach, saturated
from control.services import module_of
from lookalike.catalog import CatalogItem
from lookalike.cleanup import remove_prefix
from lookalike.runtime import freeze_heap
from lookalike.settings import ClientSettings
from lookalike.status import indexer_status
from lookalike.topics import ensure_topics, naming_env

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Layout:
    name: str
    workers: int
    shards: int
    query_embedding: str = "worker"  # LOOKALIKE_QUERY_EMBEDDING of its workers and indexers


LAYOUTS = (Layout("1 worker, 1 index", 1, 1), Layout("2 workers, 2-shard index", 2, 2))


class Pipeline:
    """Workers and indexers of one layout, on topics and groups of their own."""

    def __init__(self, layout: Layout, base: ClientSettings, workdir: Path) -> None:
        self.layout = layout
        self.prefix = f"bench-scale-{uuid.uuid4().hex[:8]}"
        self.workdir = workdir
        names = naming_env(self.prefix)
        self.env = {
            **os.environ, **names,
            "LOOKALIKE_PARTITIONS": "4",
            "LOOKALIKE_SNAPSHOTS": "false",
            "LOOKALIKE_WORKER_METRICS_PORT": "0", "LOOKALIKE_INDEXER_METRICS_PORT": "0",
            "LOOKALIKE_MODEL_DIR": str(base.models_path),
            "LOOKALIKE_HOME": str(workdir),  # heartbeats and caches of their own, beside the stack's services
            "LOOKALIKE_QUERY_EMBEDDING": layout.query_embedding,
            "PYTHONUNBUFFERED": "1",
        }
        self.settings = ClientSettings(**{k[len("LOOKALIKE_"):].lower(): v for k, v in names.items()
                                          if k[len("LOOKALIKE_"):].lower() in ClientSettings.model_fields})
        self.group = names["LOOKALIKE_INDEXER_GROUP"]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.names: list[str] = []

    def start(self) -> None:
        ensure_topics(self.settings)
        # Replicas on one host share its cores: each worker's catalog batches get its share of
        # them (two workers of two torch threads each would contend for two cores).
        share = {"LOOKALIKE_TORCH_THREADS": str(max(1, (os.cpu_count() or 1) // self.layout.workers))}
        for i in range(self.layout.workers):
            self._spawn(f"worker-{i}", "workers", share if self.layout.workers > 1 else {})
        if self.layout.shards == 1:
            self._spawn("indexer", module_of("indexer", self.env), {})
        for shard in range(self.layout.shards if self.layout.shards > 1 else 0):
            self._spawn(f"shard-{shard}", "indexer", {"LOOKALIKE_INDEX_SHARDS": str(self.layout.shards),
                                                       "LOOKALIKE_INDEX_SHARD": str(shard)})

    def _spawn(self, name: str, module: str, extra: dict[str, str]) -> None:
        with (self.workdir / f"{self.prefix}-{name}.log").open("ab") as log:
            self.names.append(name)
            self.procs.append(subprocess.Popen([sys.executable, "-m", module], env={**self.env, **extra}, cwd=REPO,
                                               stdout=log, stderr=subprocess.STDOUT))

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time each of the layout's processes has used so far."""
        out = {}
        for name, proc in zip(self.names, self.procs, strict=True):
            with contextlib.suppress(psutil.Error):
                times = psutil.Process(proc.pid).cpu_times()
                out[name] = times.user + times.system
        return out

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def ready(self, bench: Bench, probe: tuple[str, bytes], timeout_s: float = 180) -> None:
        """Every indexer (shard) has published a caught-up status and a query comes back answered
        (ok, or ``empty_index``: the layout's catalog is empty until the ingestion)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"a service of {self.layout.name} died: logs in {self.workdir}")
            statuses = indexer_status(self.settings, self.group)
            if len([s for s in statuses if s.caught_up]) >= self.layout.shards:
                answer = bench.query_latency([probe], rate=5, duration_s=0.2, warmup_s=0, timeout_s=5)
                if answer["answered_ok"] == answer["sent"] > 0 or answer["errors"].get("empty_index"):
                    return
            time.sleep(1)
        raise RuntimeError(f"{self.layout.name} was not ready within {timeout_s}s: logs in {self.workdir}")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        left = remove_prefix(self.settings, self.prefix)  # topics, groups, Redis keys (statuses, snapshots)
        if left:
            print(f"   {self.prefix}: not removed: {left.summary()}; `lookalike stack gc --apply` removes them", flush=True)


def busy(before: dict[str, float], after: dict[str, float], wall_s: float) -> dict[str, float]:
    """Cores each process kept busy over ``wall_s``."""
    return {name: round((after[name] - before.get(name, 0.0)) / wall_s, 2) for name in after if wall_s > 0}


def measure_layout(layout: Layout, base: ClientSettings, items: Sequence[CatalogItem], images: dict[str, bytes],
                   rates: Sequence[float], seconds: float, workdir: Path) -> dict[str, Any]:
    pipeline = Pipeline(layout, base, workdir)
    started = time.monotonic()
    try:
        pipeline.start()
        bench = Bench(pipeline.settings)
        try:
            probe = (items[0].item_id, images[items[0].item_id])
            pipeline.ready(bench, probe)
            print(f"   {layout.name}: ready after {time.monotonic() - started:.0f} s; ingesting {len(items)} items",
                  flush=True)
            before, at = pipeline.cpu_seconds(), time.monotonic()
            ingestion = bench.ingestion(items, [images[i.item_id] for i in items],
                                        searchable=lambda: indexer_reach(pipeline.settings, pipeline.group))
            ingestion.pop("progress", None)
            ingestion["cores_busy"] = busy(before, pipeline.cpu_seconds(), time.monotonic() - at)
            queries = [(i.item_id, images[i.item_id]) for i in items[:1000]]
            points = []
            for rate in rates:
                before, at = pipeline.cpu_seconds(), time.monotonic()
                point = bench.query_latency(queries, rate, seconds, warmup_s=2.0)
                point.pop("samples")
                point["cores_busy"] = busy(before, pipeline.cpu_seconds(), time.monotonic() - at)
                points.append(point)
                print(f"   {layout.name}: {rate:g}/s p50 {point['latency_ms'].get('p50')} ms, "
                      f"p99 {point['latency_ms'].get('p99')} ms, {point['answered_ok']}/{point['sent']} ok", flush=True)
                if saturated(point):
                    break
        finally:
            bench.close()
    finally:
        pipeline.stop()
    return {"layout": layout.name, "workers": layout.workers, "shards": layout.shards, "ingestion": ingestion,
            "curve": points, "capacity_per_s": capacity(points)}


def measure(base: ClientSettings, items: Sequence[CatalogItem], images: dict[str, bytes], *,
            rates: Sequence[float] = (200, 400, 600), seconds: float = 10.0) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="lookalike-scale-out-"))
    results = [measure_layout(layout, base, items, images, rates, seconds, workdir) for layout in LAYOUTS]
    one, two = results
    rate_one = one["ingestion"].get("images_per_s")
    rate_two = two["ingestion"].get("images_per_s")
    return {
        "layouts": results,
        "logs": str(workdir),
        "ingestion_ratio": round(rate_two / rate_one, 3) if rate_one and rate_two else None,
        "capacity_ratio": (round(two["capacity_per_s"] / one["capacity_per_s"], 3)
                           if one["capacity_per_s"] and two["capacity_per_s"] else None),
    }


def main(argv: list[str] | None = None) -> int:
    import random

    from lookalike.catalog import iter_catalog
    from lookalike.settings import default_data

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=default_data())
    parser.add_argument("--items", type=int, default=3000)
    parser.add_argument("--rates", type=float, nargs="+", default=[200, 400, 600])
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args(argv)
    items = list(iter_catalog(args.data))
    random.Random(0).shuffle(items)
    items = items[: args.items]
    images = {i.item_id: Path(i.image_path).read_bytes() for i in items}
    freeze_heap()  # the client's own full collections stalled it ~300 ms (Bench.query_latency)
    print(json.dumps(measure(ClientSettings(), items, images, rates=args.rates, seconds=args.seconds), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
