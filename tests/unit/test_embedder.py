"""The embedder's layout and precision choices change speed, not what it computes."""

from __future__ import annotations

import numpy as np
import torch

from lookalike.artifacts import ModelCard
from lookalike.embedder import Embedder
from lookalike.imaging import PreprocessSpec, normalise
from lookalike.model import EmbeddingNet, ModelSpec


def make(arch: str, precision: str = "auto") -> Embedder:
    torch.manual_seed(0)
    spec = ModelSpec(arch=arch, input_size=32, channels=(8, 16, 32, 32), num_classes=3)
    card = ModelCard("test-v1", "2026-01-01T00:00:00+00:00", spec, PreprocessSpec(size=32), ["a", "b", "c"], "0" * 64)
    return Embedder(EmbeddingNet(spec), card, torch.device("cpu"), precision)  # type: ignore[arg-type]


def test_channels_last_gives_the_vectors_of_the_plain_layout() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    for arch in ("seed-cnn", "res-cnn"):
        embedder = make(arch)
        assert embedder.to_input(pixels).is_contiguous(memory_format=torch.channels_last)
        vectors = embedder.embed_pixels(pixels)
        plain = embedder.model.to(memory_format=torch.contiguous_format)
        with torch.inference_mode():
            reference = plain.embed(torch.from_numpy(normalise(pixels, embedder.card.preprocess))).numpy()
        assert vectors.shape == (6, 256) and vectors.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(vectors, reference, atol=1e-5)


def test_cpu_stays_float32_whatever_precision_is_asked() -> None:
    for asked in ("auto", "fp16", "bf16", "fp32"):
        embedder = make("res-cnn", asked)
        assert embedder.precision == "fp32" and embedder.amp_dtype is None
