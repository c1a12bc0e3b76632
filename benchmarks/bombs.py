"""Peak memory of the worker's catalog (or query) batch on decompression bombs (issue 13).

    python -m benchmarks.bombs --count 64 --megapixels 40 --kind jpeg
    python -m benchmarks.bombs --count 64 --megapixels 40 --kind png
    python -m benchmarks.bombs --count 16 --megapixels 40 --kind png --path queries

A bomb is a small file that decodes to many pixels: a white picture of ``--megapixels``
(4:3), JPEG or PNG, 0.1-0.6 MB of bytes and 120 MB of RGB pixels at 40 Mpx. The files
are made here, then a fresh process (so that making them does not count) builds the
worker's :class:`workers.app.EmbeddingWorker` with an untrained model of the default
shape (res-cnn, 64 px; its weights do not change the memory of decoding), warms it up on
two small images, and hands it one catalog batch of the bombs. Reported: the process's
peak RSS (``ru_maxrss``) before and after the batch, and how many vectors and dead
letters the batch gave.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image


def bomb(kind: str, megapixels: float) -> bytes:
    """A white 4:3 picture of ``megapixels``, as a JPEG or a PNG file."""
    width = int(math.sqrt(megapixels * 1e6 * 4 / 3))
    height = int(megapixels * 1e6 / width)
    out = io.BytesIO()
    picture = Image.new("RGB", (width, height), (255, 255, 255))
    if kind == "jpeg":
        picture.save(out, "JPEG", quality=10)
    else:
        picture.save(out, "PNG", optimize=False, compress_level=9)
    return out.getvalue()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(files: list[Path], overrides: dict[str, Any]) -> dict[str, Any]:
    """In this process: the worker's catalog batch over ``files``, and the peak RSS it cost."""
    import torch

    from lookalike.artifacts import ModelCard
    from lookalike.embedder import Embedder
    from lookalike.imaging import PreprocessSpec
    from lookalike.model import EmbeddingNet, ModelSpec
    from lookalike.settings import WorkerSettings
    from workers.app import EmbeddingWorker, ModelSet
    from workers.stages import Source, embed_queries, parse_query

    overrides = dict(overrides)
    path = overrides.get("path", "catalog")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    spec = ModelSpec(arch="res-cnn", input_size=64, num_classes=3)
    card = ModelCard("bombs-v1", "2026-01-01T00:00:00+00:00", spec, PreprocessSpec(size=64), ["a", "b", "c"], "0" * 64)
    settings = WorkerSettings(_env_file=None, kafka_bootstrap="127.0.0.1:9", catalog_nice=0,
                              **{k: v for k, v in overrides.items() if k != "path"})
    worker = EmbeddingWorker(settings, ModelSet(settings, Embedder(EmbeddingNet(spec), card, torch.device("cpu"))))
    small = io.BytesIO()
    Image.new("RGB", (224, 224), (200, 10, 10)).save(small, "JPEG")
    warm = [(b"w%d" % i, small.getvalue(), {}, Source("catalog", 0, i)) for i in range(2)]
    worker.catalog_batch(warm, "bombs-v1")
    before = peak_rss_mb()
    events = [(b"b%d" % i, path.read_bytes(), {}, Source("catalog", 0, i)) for i, path in enumerate(files)]
    before_batch = peak_rss_mb()  # the files' bytes are held from here on, as a fetched batch holds them
    if overrides.pop("path", "catalog") == "queries":  # what the worker's query batch holds: parse each, then embed
        queries = [parse_query(key, value, {}, Source("queries", 0, i), settings, card.preprocess)
                   for i, (key, value, _h, _s) in enumerate(events)]
        vectors, dead = embed_queries(worker.models.get("bombs-v1"), queries), []
    else:
        vectors, dead = worker.catalog_batch(events, "bombs-v1")
    after = peak_rss_mb()
    return {"path": path, "peak_rss_mb_before": round(before, 1), "peak_rss_mb_with_bytes": round(before_batch, 1),
            "peak_rss_mb_after": round(after, 1), "batch_cost_mb": round(after - before_batch, 1),
            "vectors": len(vectors), "dead_letters": len(dead)}


def run(kind: str, count: int, megapixels: float, overrides: dict[str, Any] | None = None,
        timeout_s: float = 900) -> dict[str, Any]:
    """Make the bombs here, measure in a fresh process (this repository's code on its path)."""
    data = bomb(kind, megapixels)
    with tempfile.TemporaryDirectory(prefix="bombs-") as tmp:
        files = []
        for i in range(count):  # distinct files, as a catalog's would be
            path = Path(tmp) / f"{i}.{kind}"
            path.write_bytes(data)
            files.append(str(path))
        script = ("import json, sys; from pathlib import Path; from benchmarks.bombs import measure; "
                  "print(json.dumps(measure([Path(p) for p in sys.argv[2:]], json.loads(sys.argv[1]))))")
        done = subprocess.run([sys.executable, "-c", script, json.dumps(overrides or {}), *files],
                              capture_output=True, text=True, timeout=timeout_s, check=False,
                              cwd=Path(__file__).resolve().parent.parent)
    if done.returncode != 0:
        raise RuntimeError(f"the measuring process failed ({done.returncode}): {done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"kind": kind, "count": count, "megapixels": megapixels, "file_bytes": len(data), **result}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=["jpeg", "png"], default="jpeg")
    parser.add_argument("--count", type=int, default=64, help="bombs in the one catalog batch")
    parser.add_argument("--megapixels", type=float, default=40.0)
    parser.add_argument("--path", choices=["catalog", "queries"], default="catalog",
                        help="a catalog batch, or a query batch (each query parsed, then the batch embedded)")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.kind, args.count, args.megapixels, {"path": args.path}), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
