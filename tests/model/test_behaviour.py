"""Behaviour of a trained embedder: what it must keep, whatever the architecture."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lookalike.artifacts import ModelCard
from lookalike.embedder import Embedder
from lookalike.imaging import decode_image

pytestmark = pytest.mark.model
LIMITS = {"max_bytes": 8 << 20, "max_pixels": 40_000_000}


def reencoded(img: Image.Image, size: tuple[int, int], fmt: str) -> Image.Image:
    """The same picture as another user would send it: another size and encoding."""
    out = io.BytesIO()
    img.resize(size, Image.Resampling.BICUBIC).save(out, fmt, **({"quality": 75} if fmt == "JPEG" else {}))
    return decode_image(out.getvalue(), **LIMITS)


def test_vectors_are_unit_length_and_deterministic(tiny_model: tuple[Path, ModelCard]) -> None:
    root, card = tiny_model
    embedder = Embedder.from_store(root, card.version, "cpu")
    images = [Image.open(p).convert("RGB") for p in sorted((root.parent / "data" / "images").glob("*.jpg"))[:8]]
    first, again = embedder.embed_images(images), embedder.embed_images(images)
    assert first.shape == (8, card.embedding_dim) and first.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(first, again, atol=1e-6)


def test_reencoded_and_resized_image_finds_its_original(tiny_model: tuple[Path, ModelCard]) -> None:
    """Invariance: a catalog image re-encoded at another size and aspect ratio is nearest to itself."""
    root, card = tiny_model
    embedder = Embedder.from_store(root, card.version, "cpu")
    paths = sorted((root.parent / "data" / "images").glob("*.jpg"))
    originals = [decode_image(p.read_bytes(), **LIMITS) for p in paths]
    catalog = embedder.embed_images(originals)
    variants = [reencoded(img, (90, 120) if i % 2 else (48, 64), "PNG" if i % 3 == 0 else "JPEG")
                for i, img in enumerate(originals)]
    queries = embedder.embed_images(variants)
    nearest = np.argmax(queries @ catalog.T, axis=1)
    found_self = float(np.mean(nearest == np.arange(len(paths))))
    assert found_self >= 0.9, f"only {found_self:.0%} of re-encoded images found their original first"
