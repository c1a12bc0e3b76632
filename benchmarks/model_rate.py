"""The bare model's batched inference rate: the ceiling for the pipeline's ingestion.

    python -m benchmarks.model_rate                      # the store's champion, the worker's settings

``forward``: preprocessed tensors in, vectors out — the model alone, in inference mode, at
the worker's catalog batch size and torch threads. ``with_decode``: JPEG bytes in (the
real catalog's files), decode + preprocess + forward, which is the worker's work per image
without Kafka. A small sweep over batch sizes and the channels_last layout shows whether
another setting would be faster on this CPU.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lookalike.embedder import Embedder, pick_device, serving_precision
from lookalike.imaging import decode_pixels
from workers.inference import use_layout

if TYPE_CHECKING:
    from lookalike.settings import WorkerSettings


def forward_rate(embedder: Embedder, batch: int, *, channels_last: bool = True, budget_s: float = 3.0,
                 rounds: int = 5) -> list[float]:
    """Images per second through the embedder's forward pass on random preprocessed input
    already on its device, for each of ``rounds`` rounds (a shared box's neighbours come and
    go: report the median, and the best), in the channels-last layout or (False) the default
    one; the embedder's own layout is restored after."""
    size = embedder.card.preprocess.size
    pixels = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    own = embedder.channels_last
    use_layout(embedder, channels_last)
    x = embedder.to_input(pixels)
    cuda = embedder.device.type == "cuda"
    try:
        for _ in range(3):
            embedder.forward(x)
        if cuda:
            torch.cuda.synchronize()
        rates = []
        for _ in range(rounds):
            done, started = 0, time.perf_counter()
            while time.perf_counter() - started < budget_s / rounds:
                embedder.forward(x)
                done += batch
            if cuda:
                torch.cuda.synchronize()
            rates.append(done / (time.perf_counter() - started))
        return rates
    finally:
        use_layout(embedder, own)


def decode_rate(embedder: Embedder, images: Sequence[bytes], batch: int, budget_s: float = 5.0) -> float:
    """Images per second from JPEG bytes to vectors (decode at the input's size, preprocess,
    forward), on one thread: the serving path's work without the worker's decode threads."""
    spec = embedder.card.preprocess
    done, started, i = 0, time.perf_counter(), 0
    while time.perf_counter() - started < budget_s:
        chunk = [images[(i + j) % len(images)] for j in range(batch)]
        embedder.embed_pixels(np.stack([decode_pixels(b, spec, max_bytes=1 << 26, max_pixels=1 << 28) for b in chunk]))
        done += batch
        i += batch
    return done / (time.perf_counter() - started)


def measure(settings: WorkerSettings, images: Sequence[bytes] = (), sweep: bool = True,
            budget_s: float = 3.0) -> dict[str, Any]:
    precision = serving_precision(settings.precision, pick_device(settings.device))  # as the worker embeds
    embedder = use_layout(Embedder.from_store(settings.models_path, settings.model_version, settings.device,
                                              settings.torch_threads, precision), settings.channels_last)
    batch = settings.catalog_batch_max
    result: dict[str, Any] = {
        "model_version": embedder.version, "device": str(embedder.device), "threads": torch.get_num_threads(),
        "input_size": embedder.card.preprocess.size, "batch": batch, "channels_last": settings.channels_last,
        "precision": embedder.precision,
    }
    rates = forward_rate(embedder, batch, channels_last=settings.channels_last, budget_s=budget_s)
    result["forward_images_per_s"] = round(float(np.median(rates)), 1)
    result["forward_images_per_s_best_round"] = round(max(rates), 1)
    if images:
        result["with_decode_images_per_s"] = round(decode_rate(embedder, images, batch, budget_s=budget_s), 1)
    if sweep:
        result["sweep"] = [
            {"batch": b, "channels_last": cl,
             "images_per_s": round(float(np.median(forward_rate(embedder, b, channels_last=cl, budget_s=budget_s / 2,
                                                                  rounds=3))), 1)}
            for b in (16, 64, 256) for cl in (False, True)
        ]
        result["best_forward_images_per_s"] = max(s["images_per_s"] for s in result["sweep"])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, help="a folder of JPEGs for the with-decode rate")
    parser.add_argument("--limit", type=int, default=512)
    args = parser.parse_args(argv)
    images = [p.read_bytes() for p in sorted(args.images.glob("*.jpg"))[: args.limit]] if args.images else []
    from lookalike.settings import WorkerSettings

    print(json.dumps(measure(WorkerSettings(), images), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
