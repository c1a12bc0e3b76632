"""JPEG bytes -> the model's uint8 input on one thread: the full decode against draft mode.

    python -m benchmarks.decode_rate --images DIR [--size 64] [--rounds 5]

``full``: Pillow decodes the whole picture, then the resize (the path before issue 15);
``draft``: :func:`lookalike.imaging.decode_pixels`, a JPEG decoded at the smallest DCT
scale that still covers the input. The two alternate round by round over the same files,
so a neighbour's load falls on both; the median of the rounds' ratios is the figure.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from lookalike.imaging import PreprocessSpec, decode_image, decode_pixels, to_uint8

LIMITS = {"max_bytes": 1 << 26, "max_pixels": 1 << 28}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=512)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    images = [p.read_bytes() for p in sorted(args.images.glob("*.jpg"))[: args.limit]]
    spec = PreprocessSpec(size=args.size)
    paths = {"full": lambda b: to_uint8(decode_image(b, **LIMITS), spec),
             "draft": lambda b: decode_pixels(b, spec, **LIMITS)}
    rates: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.rounds):
        for name, decode in paths.items():
            started = time.perf_counter()
            for data in images:
                decode(data)
            rates[name].append(len(images) / (time.perf_counter() - started))
    ratios = [d / f for d, f in zip(rates["draft"], rates["full"], strict=True)]
    print(json.dumps({"images": len(images), "size": args.size,
                      **{f"{name}_images_per_s": round(float(np.median(r)), 1) for name, r in rates.items()},
                      "draft_over_full": round(float(np.median(ratios)), 2),
                      "rounds": {name: [round(x) for x in r] for name, r in rates.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
