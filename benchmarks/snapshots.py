"""Snapshot and restore of a large index in Redis, and what queries feel meanwhile.

    python -m benchmarks.snapshots --items 1000000          # against the local stack's Redis

Prints (and writes to out/bench-snapshots.json): build time, snapshot time split into the
writer pause (export under the read lock) and the Redis write, restore time split into
the Redis read with checksums and the hnswlib load, peak memory of this process and of
Redis, and query latencies before and during the snapshot from searching threads.
"""

from __future__ import annotations

import argparse
import json
import resource
import secrets
import threading
import time
from pathlib import Path

import numpy as np
import redis

from indexer.index import VectorIndex
from indexer.snapshot import SnapshotStore
from lookalike.cleanup import matching_keys, unlink
from lookalike.settings import IndexerSettings


def unit_vectors(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    vecs = rng.standard_normal((n, dim), dtype=np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    return vecs


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    arr = np.asarray(values)
    return {"n": len(values), "p50_ms": float(np.percentile(arr, 50)), "p99_ms": float(np.percentile(arr, 99)),
            "max_ms": float(arr.max())}


class QueryLoad:
    """Threads searching as fast as they can, recording (start time, latency)."""

    def __init__(self, index: VectorIndex, queries: np.ndarray, threads: int = 2) -> None:
        self.index, self.queries = index, queries
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(i,)) for i in range(threads)]

    def run(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not self.stop.is_set():
            q = self.queries[rng.integers(len(self.queries))]
            started = time.perf_counter()
            self.index.search(q, 5)
            self.samples.append((started, (time.perf_counter() - started) * 1000))
            time.sleep(0.002)  # a steady stream, not a saturating one

    def between(self, start: float, end: float) -> list[float]:
        return [ms for t, ms in self.samples if start <= t <= end]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--redis-url", default=IndexerSettings().redis_url.get_secret_value())
    parser.add_argument("--out", type=Path, default=Path("out/bench-snapshots.json"))
    args = parser.parse_args(argv)
    settings = IndexerSettings()
    rng = np.random.default_rng(0)

    index = VectorIndex(args.dim, m=settings.hnsw_m, ef_construction=settings.hnsw_ef_construction,
                        ef_search=settings.hnsw_ef_search, capacity=args.items)
    started = time.perf_counter()
    for start in range(0, args.items, 100_000):
        n = min(100_000, args.items - start)
        index.bulk_add([f"item-{i}" for i in range(start, start + n)], unit_vectors(rng, n, args.dim))
        print(f"  built {start + n:,} / {args.items:,} ({time.perf_counter() - started:.0f} s)", flush=True)
    build_s = time.perf_counter() - started

    client = redis.Redis.from_url(args.redis_url, socket_timeout=120)
    owner = f"bench-snapshots-{int(time.time())}"  # a throwaway name (lookalike.cleanup)
    store = SnapshotStore(client, f"lookalike:snapshots:{owner}:bench", key=secrets.token_bytes(32),
                          chunk_bytes=settings.snapshot_chunk_bytes, keep=1)
    lease = store.lease("bench", ttl_s=600)
    try:
        assert lease.acquire(), "a fresh namespace has no writer"
        load = QueryLoad(index, unit_vectors(rng, 1000, args.dim))
        for thread in load.threads:
            thread.start()
        time.sleep(5)  # baseline
        baseline_end = time.perf_counter()

        snap_start = time.perf_counter()
        index_bytes, items_bytes, facts = index.export()
        exported = time.perf_counter()
        manifest = store.write(index_bytes, items_bytes, facts, lease=lease, model_version="bench")
        snap_end = time.perf_counter()
        time.sleep(1)
        load.stop.set()
        for thread in load.threads:
            thread.join()
        del index_bytes, items_bytes

        read_start = time.perf_counter()
        snap = store.read(manifest.id)
        read_end = time.perf_counter()
        restored = VectorIndex.restore(snap.index_bytes, snap.items_bytes, snap.manifest.facts())
        restore_end = time.perf_counter()
        probes = unit_vectors(rng, 50, args.dim)
        same = np.mean([[h.item_id for h in restored.search(q, 5)] == [h.item_id for h in index.search(q, 5)]
                        for q in probes])
        redis_peak = client.info("memory").get("used_memory_peak", 0)
    finally:  # the run's keys, whatever happened (`lookalike stack gc` finds them if it was killed)
        lease.release()
        unlink(client, matching_keys(client, [owner]))

    size_mb = (manifest.index.bytes + manifest.items.bytes) / 1e6
    result = {
        "items": args.items, "dim": args.dim, "build_s": round(build_s, 1), "snapshot_mb": round(size_mb, 1),
        "chunks": len(manifest.index.chunks) + len(manifest.items.chunks),
        "snapshot_writer_pause_s": round(exported - snap_start, 2),
        "snapshot_redis_write_s": round(snap_end - exported, 2),
        "snapshot_total_s": round(snap_end - snap_start, 2),
        "restore_read_verify_s": round(read_end - read_start, 2),
        "restore_load_s": round(restore_end - read_end, 2),
        "restore_total_s": round(restore_end - read_start, 2),
        "restored_results_identical": float(same),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
        "redis_used_memory_peak_gb": round(redis_peak / 1e9, 2),
        "queries_before_snapshot": percentiles(load.between(0, baseline_end)),
        "queries_during_snapshot": percentiles(load.between(snap_start, snap_end)),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
