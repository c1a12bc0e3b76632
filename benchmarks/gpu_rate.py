"""Embedding throughput on a GPU: the prepared short script for issue 7's CUDA figure.

    python -m benchmarks.gpu_rate --models ~/.lookalike/models --images DIR --out gpu.json

It needs torch with CUDA, torchvision, numpy, pillow and safetensors (not the services' other
dependencies), so it runs on a bare GPU machine with the repository on PYTHONPATH. In a
few minutes it measures, for the model store's champion (or ``--version``):

* ``forward``: the model alone on input already on the GPU, images/s, for float32, bf16
  and fp16 autocast at batch sizes 256 to 4096 (channels_last, inference mode);
* ``host_to_host``: what the worker's ``Embedder.embed_pixels`` does per batch: uint8
  pixels from host memory to the GPU, normalised there, forward, vectors back to the host;
* ``decode``: JPEG bytes → the model's uint8 input on one CPU core (Pillow, draft mode: the
  CPU worker's path), so it is plain how many decoding cores one GPU would need without
  device decoding;
* ``device_decode``: the GPU worker's path (lookalike/device_decode.py): a batch of JPEG
  bytes decoded by nvJPEG and resized on the GPU, alone and on to vectors on the host, and
  the agreement of its vectors with the CPU path's (``device_decode_agreement``);
* ``agreement``: fp16 and bf16 vectors against float32 ones on real images (cosine, and
  the overlap of each image's 5 nearest neighbours).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.model_rate import forward_rate
from lookalike.artifacts import ModelStore
from lookalike.device_decode import decode_batch
from lookalike.embedder import Embedder
from lookalike.imaging import decode_pixels

BATCHES = (256, 1024, 4096)
PRECISIONS = ("fp32", "bf16", "fp16")


def load(models: Path, version: str | None, precision: str, device: str) -> Embedder:
    model, card = ModelStore(models).load(version)
    return Embedder(model, card, torch.device(device), precision)  # type: ignore[arg-type]


def host_to_host_rate(embedder: Embedder, batch: int, budget_s: float) -> float:
    size = embedder.card.preprocess.size
    pixels = np.random.default_rng(1).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    for _ in range(3):
        embedder.embed_pixels(pixels)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < budget_s:
        embedder.embed_pixels(pixels)  # returns numpy: synchronised
        done += batch
    return done / (time.perf_counter() - started)


def host_decode(embedder: Embedder, images: list[bytes]) -> tuple[np.ndarray, float]:
    """The CPU path (Pillow, draft mode) on one core: pixels, images/s."""
    started = time.perf_counter()
    pixels = np.stack([decode_pixels(b, embedder.card.preprocess, max_bytes=1 << 26, max_pixels=1 << 28)
                       for b in images])
    return pixels, len(images) / (time.perf_counter() - started)


def device_decode_rate(embedder: Embedder, images: list[bytes], batch: int, budget_s: float,
                       embed: bool) -> float:
    """JPEG bytes -> the model's input on the device (nvJPEG, lookalike.device_decode), and with
    ``embed`` on to vectors on the host: images/s at ``batch`` images a call."""
    chunk = [images[i % len(images)] for i in range(batch)]
    limits = {"max_bytes": 1 << 26, "max_pixels": 1 << 28}

    def step() -> None:
        decoded = decode_batch(chunk, embedder.card.preprocess, embedder.device, **limits)
        if embed:
            embedder.embed_pixels(decoded.pixels)  # vectors back on the host: synchronised
        elif embedder.device.type == "cuda":
            torch.cuda.synchronize()

    step()
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < budget_s:
        step()
        done += batch
    return done / (time.perf_counter() - started)


def agreement(reference: np.ndarray, other: np.ndarray, k: int = 5) -> dict[str, float]:
    cos = np.sum(reference * other, axis=1)

    def neighbours(v: np.ndarray) -> np.ndarray:
        sims = v @ v.T
        np.fill_diagonal(sims, -np.inf)
        return np.argsort(-sims, axis=1)[:, :k]

    a, b = neighbours(reference), neighbours(other)
    overlap = np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b, strict=True)])
    return {"cosine_min": round(float(cos.min()), 6), "cosine_mean": round(float(cos.mean()), 6),
            "top5_overlap": round(float(overlap), 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, required=True, help="a model store (its champion is used)")
    parser.add_argument("--version", help="a model version instead of the champion")
    parser.add_argument("--images", type=Path, help="a folder of catalog JPEGs (decode rate, agreement)")
    parser.add_argument("--budget", type=float, default=2.0, help="seconds per measured configuration")
    parser.add_argument("--out", type=Path, help="write the JSON here too")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the script (every precision is fp32)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this script measures the GPU path")

    result: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cpu_cores": torch.get_num_threads(), "python": platform.python_version(),
    }
    embedders = {p: load(args.models, args.version, p, args.device) for p in PRECISIONS}
    result["model_version"] = embedders["fp32"].version
    result["input_size"] = embedders["fp32"].card.preprocess.size
    torch.backends.cudnn.benchmark = True

    forward: list[dict[str, Any]] = []
    for precision, embedder in embedders.items():
        for batch in BATCHES:
            rates = forward_rate(embedder, batch, budget_s=args.budget, rounds=3)
            forward.append({"precision": precision, "batch": batch, "images_per_s": round(float(np.median(rates)))})
            print(json.dumps(forward[-1]), flush=True)
    result["forward"] = forward
    best = max(forward, key=lambda r: r["images_per_s"])
    result["forward_best"] = best

    fast = embedders[best["precision"]]
    result["host_to_host"] = [
        {"precision": best["precision"], "batch": b, "images_per_s": round(host_to_host_rate(fast, b, args.budget))}
        for b in (1024, 4096)
    ]
    print(json.dumps(result["host_to_host"]), flush=True)

    if args.images:
        files = sorted(args.images.glob("*.jpg"))[:512]
        images = [p.read_bytes() for p in files]
        pixels, rate = host_decode(fast, images)
        result["decode"] = {"images": len(images), "images_per_s_one_core": round(rate)}
        result["device_decode"] = [
            {"batch": b, "embed": embed, "precision": best["precision"],
             "images_per_s": round(device_decode_rate(fast, images, b, args.budget, embed))}
            for b in (256, 1024) for embed in (False, True)
        ]
        print(json.dumps(result["device_decode"]), flush=True)
        device_pixels = decode_batch(images, fast.card.preprocess, fast.device, max_bytes=1 << 26,
                                     max_pixels=1 << 28).pixels
        result["device_decode_agreement"] = agreement(embedders["fp32"].embed_pixels(pixels),
                                                      embedders["fp32"].embed_pixels(device_pixels))
        reference = embedders["fp32"].embed_pixels(pixels)
        result["agreement"] = {p: agreement(reference, embedders[p].embed_pixels(pixels)) for p in ("bf16", "fp16")}
        print(json.dumps({k: result[k] for k in ("decode", "agreement", "device_decode_agreement")}), flush=True)

    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
