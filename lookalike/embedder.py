"""Batched inference: images in, unit-length 256-d vectors out."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lookalike.artifacts import ModelCard, ModelStore
from lookalike.imaging import normalise, to_uint8
from lookalike.model import EmbeddingNet

log = logging.getLogger(__name__)


def pick_device(wanted: str) -> torch.device:
    """``auto`` is CUDA when a GPU is visible, else CPU."""
    if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


class Embedder:
    """A loaded model in inference mode, with the preprocessing its card names."""

    def __init__(self, model: EmbeddingNet, card: ModelCard, device: torch.device) -> None:
        self.card = card
        self.device = device
        self.model = model.to(device).eval()

    @classmethod
    def from_store(cls, root: Path, version: str | None = None, device: str = "auto", threads: int = 0) -> Embedder:
        if threads:
            torch.set_num_threads(threads)
        model, card = ModelStore(root).load(version)
        dev = pick_device(device)
        log.info("loaded model %s (dim %d, input %s) on %s", card.version, card.embedding_dim, card.preprocess, dev)
        return cls(model, card, dev)

    @property
    def version(self) -> str:
        return self.card.version

    @property
    def dim(self) -> int:
        return self.card.embedding_dim

    def pixels(self, images: Sequence[Image.Image]) -> np.ndarray:
        """RGB images -> uint8 (B, S, S, 3) as the card's preprocessing says."""
        return np.stack([to_uint8(img, self.card.preprocess) for img in images])

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (B, S, S, 3) -> float32 (B, D), unit length."""
        batch = torch.from_numpy(normalise(pixels, self.card.preprocess)).to(self.device)
        with torch.inference_mode():
            vectors = self.model.embed(batch)
        return vectors.float().cpu().numpy()

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.dim), np.float32)
        return self.embed_pixels(self.pixels(images))
