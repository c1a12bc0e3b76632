"""HNSW against exact search: recall@5 and queries per second, on real and synthetic vectors.

    python -m benchmarks.ann --items 1000000              # synthetic, 256-d (about 12 min on 2 cores)
    python -m benchmarks.ann --items 20000 --kind uniform

The HNSW index is the indexer's (hnswlib, cosine, M / ef_construction / ef_search from
``LOOKALIKE_HNSW_*``), queried one vector at a time on one thread as the indexer's search
pool does. Exact search is a float32 matrix product over all vectors (BLAS, every core),
measured one query at a time (how a service answers) and in batches of 64 (its best case).
Recall@5: the share of the exact top 5 that HNSW returns, over held-out queries.

Synthetic ``clustered`` vectors (the default) are a Gaussian mixture on the unit sphere —
like product embeddings, which gather by category; ``uniform`` ones (no structure at all)
are the worst case for any graph index and are offered for comparison.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import hnswlib
import numpy as np
import psutil

from lookalike.settings import IndexerSettings

K = 5


def unit(vectors: np.ndarray) -> np.ndarray:
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def synthetic(n: int, dim: int, kind: str, seed: int = 0, clusters: int = 1000, spread: float = 0.06) -> np.ndarray:
    """``n`` unit vectors. clustered: centre + N(0, spread²) per coordinate, so a member's cosine
    to its centre is about 1/sqrt(1 + dim·spread²) (0.72 at 256-d, 0.06), like one category."""
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        return unit(rng.standard_normal((n, dim), dtype=np.float32))
    centres = unit(rng.standard_normal((clusters, dim), dtype=np.float32))
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        out[start:start + m] = centres[rng.integers(0, clusters, m)] + spread * rng.standard_normal((m, dim), np.float32)
    return unit(out)


def exact_top(data: np.ndarray, queries: np.ndarray, k: int, batch: int = 256) -> np.ndarray:
    """Indices of the k largest inner products (cosine on unit vectors), exactly."""
    out = np.empty((len(queries), k), np.int64)
    for start in range(0, len(queries), batch):
        scores = queries[start:start + batch] @ data.T
        top = np.argpartition(-scores, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        out[start:start + batch] = np.take_along_axis(top, order, axis=1)
    return out


def exact_qps(data: np.ndarray, queries: np.ndarray, batch: int, budget_s: float = 10.0) -> float:
    done, started = 0, time.perf_counter()
    while done < len(queries) and time.perf_counter() - started < budget_s:
        exact_top(data, queries[done:done + batch], K, batch=batch)
        done += len(queries[done:done + batch])
    return done / (time.perf_counter() - started)


def rss_gb() -> float:
    return psutil.Process().memory_info().rss / 1e9


def compare(data: np.ndarray, queries: np.ndarray, *, name: str, settings: IndexerSettings,
            ef_values: tuple[int, ...] = (32, 64, 128, 256), threads: int = -1,
            exclude_self: bool = False) -> dict[str, Any]:
    """Build HNSW over ``data`` and measure it and exact search on ``queries``.

    ``exclude_self``: the queries are rows of ``data`` (the real catalog): both searches
    ask for k+1 and drop the query's own row, so the neighbours are other items.
    """
    n, dim = data.shape
    rss_before = rss_gb()
    started = time.perf_counter()
    index = hnswlib.Index(space="cosine", dim=dim)
    index.init_index(max_elements=n, M=settings.hnsw_m, ef_construction=settings.hnsw_ef_construction)
    for start in range(0, n, 100_000):
        index.add_items(data[start:start + 100_000], np.arange(start, min(n, start + 100_000)), num_threads=threads)
    build_s = time.perf_counter() - started
    index_gb = rss_gb() - rss_before

    want = K + 1 if exclude_self else K
    truth = exact_top(data, queries, want)
    result: dict[str, Any] = {
        "name": name, "items": n, "dim": dim, "queries": len(queries), "m": settings.hnsw_m,
        "ef_construction": settings.hnsw_ef_construction, "ef_search_served": settings.hnsw_ef_search,
        "build_s": round(build_s, 1), "index_bytes": index.index_file_size(),
        "rss_growth_gb": round(index_gb, 3),
        "vectors_memory_gb": round(data.nbytes / 1e9, 3),
        "exact_qps_one_at_a_time": round(exact_qps(data, queries, 1), 1),
        "exact_qps_batch64": round(exact_qps(data, queries, 64), 1),
        "hnsw": [],
    }
    for ef in sorted(set(ef_values) | {settings.hnsw_ef_search}):
        index.set_ef(max(ef, want))
        index.set_num_threads(1)
        hits = np.empty((len(queries), want), np.int64)
        started = time.perf_counter()
        for i, q in enumerate(queries):
            labels, _ = index.knn_query(q, k=want)
            hits[i] = labels[0]
        seconds = time.perf_counter() - started
        recalls = []
        for i in range(len(queries)):
            got, exact = list(hits[i]), list(truth[i])
            if exclude_self:
                got, exact = [h for h in got if h != i][:K], [h for h in exact if h != i][:K]
            recalls.append(len(set(got) & set(exact)) / K)
        result["hnsw"].append({"ef": ef, "recall_at_5": round(float(np.mean(recalls)), 4),
                               "qps": round(len(queries) / seconds, 1)})
    served = next(h for h in result["hnsw"] if h["ef"] == settings.hnsw_ef_search)
    result["recall_at_5"] = served["recall_at_5"]
    result["hnsw_qps"] = served["qps"]
    result["speedup_vs_exact_one_at_a_time"] = round(served["qps"] / result["exact_qps_one_at_a_time"], 1)
    result["speedup_vs_exact_batch64"] = round(served["qps"] / result["exact_qps_batch64"], 1)
    result["peak_rss_gb"] = round(psutil.Process().memory_info().rss / 1e9, 2)
    return result


def run_synthetic(items: int, dim: int = 256, kind: str = "clustered", queries: int = 1000,
                  settings: IndexerSettings | None = None, progress: bool = True) -> dict[str, Any]:
    settings = settings or IndexerSettings()
    if progress:
        print(f"   ann: {items:,} synthetic {kind} {dim}-d vectors (build takes a while)", flush=True)
    data = synthetic(items + queries, dim, kind)
    result = compare(data[:items], data[items:], name=f"synthetic-{kind}", settings=settings)
    result["kind"] = kind
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--kind", choices=["clustered", "uniform"], default="clustered")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("out/bench-ann.json"))
    args = parser.parse_args(argv)
    result = run_synthetic(args.items, args.dim, args.kind, args.queries)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
