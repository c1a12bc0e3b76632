"""Batched inference: images in, unit-length 256-d vectors out.

The model runs in inference mode in the channels_last layout (on this 2-core CPU, res-cnn
at 64x64: 1.4-1.8x the images/s of the default layout; docs/benchmarks.md). On CUDA it runs
under autocast (float16 by default), and the uint8 pixels travel to the GPU as they are (a
quarter of float32's bytes) and are normalised there. On CPU it runs in float32, or under
bfloat16 autocast (``bf16``), which the workers choose where the CPU multiplies bfloat16
matrices in hardware (Intel AMX: :func:`serving_precision`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from lookalike.artifacts import ModelCard, ModelStore
from lookalike.imaging import to_uint8
from lookalike.model import EmbeddingNet, fold_batchnorm

log = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "fp16", "bf16"]
_AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def pick_device(wanted: str) -> torch.device:
    """``auto`` is CUDA when a GPU is visible, else CPU."""
    if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def cpu_has_bf16_matmul() -> bool:
    """Does this CPU multiply bfloat16 matrices in hardware (AMX tiles)? There oneDNN's
    bfloat16 convolutions are 2-3x float32's (res-cnn, batches of 4-64, docs/benchmarks.md);
    without, bfloat16 is emulated and no faster."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # torch 2.x; absent: assume not
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def serving_precision(wanted: Precision, device: torch.device) -> Precision:
    """What a worker embeds in: ``auto`` is float16 on CUDA, bfloat16 on a CPU with AMX,
    float32 elsewhere; anything else as asked."""
    if wanted != "auto":
        return wanted
    if device.type == "cuda":
        return "fp16"
    return "bf16" if cpu_has_bf16_matmul() else "fp32"


class Embedder:
    """A loaded model in inference mode, with the preprocessing its card names.

    ``precision``: ``auto`` is float16 autocast on CUDA and float32 on CPU (what training
    and evaluation use; the workers pass :func:`serving_precision`); ``fp32``, ``bf16`` and,
    on CUDA, ``fp16`` force one (a CPU has no float16 autocast: it stays float32). Under
    bfloat16 the vectors differ from float32's by a cosine of 1 - 3e-5 at most (the
    champion, docs/benchmarks.md), and are still normalised in float32."""

    def __init__(self, model: EmbeddingNet, card: ModelCard, device: torch.device,
                 precision: Precision = "auto") -> None:
        self.card = card
        self.device = device
        cuda = device.type == "cuda"
        if precision == "auto":
            precision = "fp16" if cuda else "fp32"
        self.amp_dtype = _AMP_DTYPES.get(precision) if cuda or precision == "bf16" else None
        self.precision = precision if self.amp_dtype is not None else "fp32"
        # A copy with its batch norms folded into the layers before them: the same vectors to
        # float rounding, 15-30 % less time per batch on this CPU (docs/benchmarks.md).
        self.model = fold_batchnorm(copy.deepcopy(model).to(device).eval()).to(memory_format=torch.channels_last)
        self.channels_last = True  # the input's layout follows the model's (workers.inference.use_layout)
        spec = card.preprocess
        if cuda:
            self._mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1) * 255.0
            self._std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1) * 255.0
        else:  # imaging.normalise's own float32 steps, in place and in the input's layout
            self._mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
            self._std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1)

    @classmethod
    def from_store(cls, root: Path, version: str | None = None, device: str = "auto", threads: int = 0,
                   precision: Precision = "auto") -> Embedder:
        if threads:
            torch.set_num_threads(threads)
        model, card = ModelStore(root).load(version)
        dev = pick_device(device)
        embedder = cls(model, card, dev, precision)
        log.info("loaded model %s (dim %d, input %s) on %s, %s", card.version, card.embedding_dim, card.preprocess,
                 dev, embedder.precision)
        return embedder

    @property
    def version(self) -> str:
        return self.card.version

    @property
    def dim(self) -> int:
        return self.card.embedding_dim

    def pixels(self, images: Sequence[Image.Image]) -> np.ndarray:
        """RGB images -> uint8 (B, S, S, 3) as the card's preprocessing says."""
        return np.stack([to_uint8(img, self.card.preprocess) for img in images])

    def to_input(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (B, S, S, 3) -> the model's normalised float input on the model's device.

        ``pixels`` may be a tensor already on the device (decoded there,
        :mod:`lookalike.device_decode`): it is normalised where it is."""
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        if self.device.type != "cuda":
            # (B, S, S, 3) is the channels-last layout already: a permuted view, made float32
            # in that layout, then imaging.normalise's steps in place (the same float32
            # values, to the bit). 4.6 -> 1.0 ms for a batch of 64 against normalise's numpy
            # passes and its two layout copies (docs/benchmarks.md).
            if isinstance(pixels, torch.Tensor):
                raw = pixels.cpu()
            else:  # torch shares the array's memory (and reads it only): a read-only one is copied
                raw = torch.from_numpy(pixels if pixels.flags.writeable else pixels.copy())
            x = raw.permute(0, 3, 1, 2).float().div_(255.0).sub_(self._mean).div_(self._std)
            return x.contiguous(memory_format=layout)
        if isinstance(pixels, torch.Tensor):
            raw = pixels.to(self.device, non_blocking=True)
        else:
            raw = torch.from_numpy(pixels).pin_memory().to(self.device, non_blocking=True)
        x = raw.permute(0, 3, 1, 2).float()  # a channels_last view of (B, 3, S, S): no copy
        return ((x - self._mean) / self._std).contiguous(memory_format=layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised input on the device -> float32 (B, D) unit vectors on the device."""
        with torch.inference_mode():
            if self.amp_dtype is None:
                return self.model.embed(x)
            with torch.autocast(self.device.type, dtype=self.amp_dtype):
                views = torch.cat([x, x.flip(3)]) if self.model.spec.flip_average else x
                out = self.model.penultimate(views).float()  # normalised in float32: fp16 sums of squares overflow
            unit = torch.nn.functional.normalize(out, dim=1)
            if self.model.spec.flip_average:  # the mean of the image's and its mirror image's directions
                unit = torch.nn.functional.normalize(unit[: len(x)] + unit[len(x) :], dim=1)
            return unit

    def embed_pixels(self, pixels: np.ndarray | torch.Tensor) -> np.ndarray:
        """uint8 (B, S, S, 3), on the host or the device -> float32 (B, D), unit length."""
        return self.forward(self.to_input(pixels)).cpu().numpy()

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.dim), np.float32)
        return self.embed_pixels(self.pixels(images))
