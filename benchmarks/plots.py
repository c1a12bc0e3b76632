"""PNG plots of a benchmark run's JSON (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def latency(result: dict[str, Any], path: Path, targets: dict[str, float]) -> Path:
    samples = result["samples"]
    ms = sorted(s["ms"] for s in samples)
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    a.plot(ms, [i / max(1, len(ms)) for i in range(len(ms))])
    a.axvline(targets["query_p50_ms"], color="green", ls="--", label=f"p50 target {targets['query_p50_ms']:g} ms")
    a.axvline(targets["query_p99_ms"], color="red", ls="--", label=f"p99 target {targets['query_p99_ms']:g} ms")
    a.set_xscale("log")
    a.set_xlabel("publish → reply (ms)")
    a.set_ylabel("fraction of queries")
    a.set_title(f"query latency CDF at {result['rate_per_s']:.0f}/s (open loop)")
    a.legend()
    b.scatter([s["t"] for s in samples], [s["ms"] for s in samples], s=3)
    b.set_yscale("log")
    b.set_xlabel("seconds into the run")
    b.set_ylabel("publish → reply (ms)")
    b.set_title("latency over time")
    return _save(fig, path)


def stages(result: dict[str, Any], path: Path) -> Path:
    names = [n for n in result["stages_ms"] if result["stages_ms"][n].get("n")]
    fig, ax = plt.subplots(figsize=(9, 4))
    x = range(len(names))
    for offset, q in ((-0.25, "p50"), (0.0, "p95"), (0.25, "p99")):
        ax.bar([i + offset for i in x], [result["stages_ms"][n][q] for n in names], width=0.25, label=q)
    ax.set_xticks(list(x), names)
    ax.set_ylabel("ms")
    ax.set_title("per-stage breakdown from the replies' timings")
    ax.legend()
    return _save(fig, path)


def ingestion(result: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4))
    points = result.get("progress") or []
    ax.plot([p[0] for p in points], [p[1] for p in points], label="searchable (indexer status)")
    ax.axvline(result["publish_s"], color="grey", ls=":", label="all published")
    ax.set_xlabel("seconds since the first publish")
    ax.set_ylabel("items")
    ax.set_title(f"ingestion: {result['items']} images, {result['images_per_s']:.0f} images/s")
    ax.legend()
    return _save(fig, path)


def curve(result: dict[str, Any], path: Path, targets: dict[str, float]) -> Path:
    points = result["points"]
    fig, ax = plt.subplots(figsize=(8, 4))
    for q in ("p50", "p99"):
        ax.plot([p["rate_per_s"] for p in points], [p["latency_ms"].get(q) for p in points], marker="o", label=q)
    ax.axhline(targets["capacity_p99_ms"], color="red", ls="--",
               label=f"p99 limit for capacity, {targets['capacity_p99_ms']:g} ms")
    ax.axvline(targets["capacity_per_s"], color="grey", ls=":", label=f"capacity target, {targets['capacity_per_s']:g}/s")
    ax.set_yscale("log")
    ax.set_xlabel("queries/s (open loop)")
    ax.set_ylabel("publish → reply (ms)")
    ax.set_title(f"latency against rate; capacity {result['capacity_per_s'] or '—'}/s")
    ax.legend()
    return _save(fig, path)


def freshness(result: dict[str, Any], path: Path) -> Path:
    ms = sorted(result["samples_ms"])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(ms, [i / max(1, len(ms)) for i in range(len(ms))])
    ax.axvline(1000, color="red", ls="--", label="p99 target 1 s")
    ax.set_xlabel("catalog publish → first reply that finds the item (ms)")
    ax.set_ylabel("fraction of items")
    ax.set_title(f"freshness at {result['rate_per_s']:.0f} items/s")
    ax.legend()
    return _save(fig, path)


def ann(results: list[dict[str, Any]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4))
    for r in results:
        line = ax.plot([h["qps"] for h in r["hnsw"]], [h["recall_at_5"] for h in r["hnsw"]], marker="o",
                       label=f"HNSW {r['name']} ({r['items']:,})")
        for h in r["hnsw"]:
            ax.annotate(f"ef {h['ef']}", (h["qps"], h["recall_at_5"]), fontsize=7)
        ax.axvline(r["exact_qps_one_at_a_time"], color=line[0].get_color(), ls=":",
                   label=f"exact, one at a time ({r['name']})")
    ax.axhline(0.99, color="red", ls="--", label="recall@5 target 0.99")
    ax.set_xscale("log")
    ax.set_xlabel("queries per second (one thread)")
    ax.set_ylabel("recall@5 against exact search")
    ax.legend(fontsize=7)
    return _save(fig, path)


def resources(summary: dict[str, dict[str, dict[str, Any]]], path: Path) -> Path:
    phases = list(summary)
    procs = sorted({p for ph in summary.values() for p in ph})
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / max(1, len(procs))
    for j, proc in enumerate(procs):
        xs = [i + j * width for i in range(len(phases))]
        a.bar(xs, [summary[ph].get(proc, {}).get("cpu_cores", 0) for ph in phases], width=width, label=proc)
        b.bar(xs, [summary[ph].get(proc, {}).get("rss_peak_mb", 0) for ph in phases], width=width, label=proc)
    for ax, label in ((a, "CPU (cores)"), (b, "peak RSS (MB)")):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(phases))], phases, fontsize=8)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    a.set_title("CPU per service and phase")
    b.set_title("memory per service and phase")
    return _save(fig, path)
