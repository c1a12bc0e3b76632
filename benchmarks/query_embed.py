"""One query image's embedding time on one CPU core, per stored model, float32 and bfloat16.

    python -m benchmarks.query_embed --model champion --model challenger [--model-dir DIR]

Each model is served as the workers serve it (:class:`lookalike.embedder.Embedder`: batch
norms folded, channels-last) in one torch thread: preprocessed uint8 pixels in, a unit
vector out (``embed_pixels``: normalisation + forward). The figure is the median of
``--calls`` calls after 10 warm-up calls, at batch 1 (a lone query) and per image at batch
16 (queries under load). The models are measured in turns within one run, so their ratio
holds on a noisy box even when the absolute figures drift. bfloat16 is autocast, which pays
only on CPUs that multiply bfloat16 in hardware (AMX; :func:`lookalike.embedder.cpu_has_bf16_matmul`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from lookalike.artifacts import ModelStore
from lookalike.embedder import Embedder, cpu_has_bf16_matmul
from lookalike.settings import CommonSettings


def median_ms(embedder: Embedder, batch: int, calls: int) -> float:
    """Median milliseconds per image of ``embedder.embed_pixels`` on a random batch."""
    size = embedder.card.preprocess.size
    pixels = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    for _ in range(10):
        embedder.embed_pixels(pixels)
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        embedder.embed_pixels(pixels)
        times.append(time.perf_counter() - started)
    return float(np.median(times)) * 1000 / batch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, help="a stored version or alias (repeatable)")
    parser.add_argument("--model-dir", type=Path, default=None, help="model store (default: LOOKALIKE_MODEL_DIR)")
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--batches", default="1,16")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    store = ModelStore(args.model_dir or CommonSettings().models_path)
    loaded = [store.load(name) for name in args.model]
    rows = []
    for model, card in loaded:
        for precision in ("fp32", "bf16"):
            embedder = Embedder(model, card, torch.device("cpu"), precision)  # type: ignore[arg-type]
            for batch in (int(b) for b in args.batches.split(",")):
                rows.append({"model": card.version, "arch": card.spec.arch, "input": card.preprocess.size,
                             "precision": precision, "batch": batch,
                             "ms_per_image": round(median_ms(embedder, batch, args.calls), 2)})
    print(f"one torch thread; bfloat16 in hardware (AMX): {cpu_has_bf16_matmul()}")
    print("| model | arch | input | precision | batch | ms per image |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['arch']} | {r['input']} px | {r['precision']} | {r['batch']} | {r['ms_per_image']} |")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
