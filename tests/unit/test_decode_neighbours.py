"""Embedding the same image through the new decode paths gives the same neighbours as before.

Before: Pillow decoded every JPEG whole, then resized to the model's input. Now the CPU path
decodes a JPEG at the smallest DCT scale that still covers the input (draft mode), and a GPU
worker decodes whole on the device and resizes there. Over 400 real catalog photos (fashion-9k,
224 x 224: drafted to 112 x 112 for a 64 px input) and an untrained res-cnn of the default
shape (fixed seed), each path's vectors must keep what the old ones found.

Calibration on these photos (this model): the draft path keeps 0.918 of the top-5 catalog
neighbours and a cosine >= 0.99986 to the old vector; decoding at one scale further (1/4,
then enlarging: what a wrong ``min_size`` would do) keeps 0.834 and 0.99952, and nearest-
neighbour resizing 0.568; so the bounds below tell the right path from a wrong one. The
trained champion keeps 0.958 on the draft path (docs/benchmarks.md).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lookalike.artifacts import ModelCard
from lookalike.device_decode import decode_batch
from lookalike.embedder import Embedder
from lookalike.imaging import PreprocessSpec, decode_image, decode_pixels, to_uint8
from lookalike.model import EmbeddingNet, ModelSpec
from lookalike.settings import default_data

IMAGES = default_data() / "images"
LIMITS = {"max_bytes": 8 * 1024 * 1024, "max_pixels": 40_000_000}
pytestmark = [
    pytest.mark.skipif(not IMAGES.is_dir(), reason=f"no fashion-9k images at {IMAGES} (set LOOKALIKE_DATA)"),
    pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning"),
]


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    return [p.read_bytes() for p in sorted(IMAGES.glob("*.jpg"))[::20][:400]]


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    torch.manual_seed(0)
    spec = ModelSpec(arch="res-cnn", input_size=64, channels=(32, 64, 128, 256), num_classes=3)
    card = ModelCard("test-v1", "2026-01-01T00:00:00+00:00", spec, PreprocessSpec(size=64), ["a", "b", "c"], "0" * 64)
    return Embedder(EmbeddingNet(spec), card, torch.device("cpu"))


@pytest.fixture(scope="module")
def before(photos: list[bytes], embedder: Embedder) -> np.ndarray:
    spec = embedder.card.preprocess
    return embedder.embed_pixels(np.stack([to_uint8(decode_image(data, **LIMITS), spec) for data in photos]))


def neighbours(catalog: np.ndarray, queries: np.ndarray, k: int = 5) -> np.ndarray:
    return np.argsort(-(queries @ catalog.T), axis=1)[:, :k]


def kept_neighbours(before: np.ndarray, after: np.ndarray) -> float:
    """Share of each query's top 5 among 300 catalog photos kept, the other 100 as queries."""
    old, new = neighbours(before[:300], before[300:]), neighbours(after[:300], after[300:])
    return float(np.mean([len(set(a) & set(b)) / 5 for a, b in zip(old, new, strict=True)]))


def check_same_neighbours(before: np.ndarray, after: np.ndarray, min_kept: float, min_cosine: float) -> None:
    assert np.array_equal(np.argmax(after @ before.T, axis=1), np.arange(len(after))), \
        "a photo's new vector is nearest to another photo's old one"
    assert np.sum(after * before, axis=1).min() >= min_cosine
    assert kept_neighbours(before, after) >= min_kept


def test_the_draft_decode_path_keeps_the_neighbours(photos: list[bytes], embedder: Embedder,
                                                    before: np.ndarray) -> None:
    spec = embedder.card.preprocess
    assert decode_image(photos[0], **LIMITS, min_size=spec.size).size == (112, 112)  # drafted for real
    after = embedder.embed_pixels(np.stack([decode_pixels(data, spec, **LIMITS) for data in photos]))
    check_same_neighbours(before, after, min_kept=0.88, min_cosine=0.9997)


def test_the_device_decode_path_keeps_the_neighbours(photos: list[bytes], embedder: Embedder,
                                                     before: np.ndarray) -> None:
    batch = decode_batch(photos, embedder.card.preprocess, "cpu", **LIMITS)
    assert batch.ok == list(range(len(photos)))
    after = embedder.embed_pixels(batch.pixels)
    check_same_neighbours(before, after, min_kept=0.95, min_cosine=0.99999)
