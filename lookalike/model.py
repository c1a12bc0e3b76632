"""The embedder networks: small CNN classifiers whose 256-d penultimate layer is the embedding.

Two architectures, chosen by ``ModelSpec.arch``:

* ``seed-cnn``: the seed recipe, three conv blocks, a Dense(256) layer over the
  flattened feature map, a linear classifier (stored models use it; unchanged);
* ``res-cnn``: a small ResNet (torchvision's ``BasicBlock``, one per stage, each
  stage halving the side), global average pooling, Dense(256) + batch norm, and a
  cosine classifier: its logits are the cosines between the unit embedding and one
  unit "proxy" per class, so training shapes exactly the directions the index
  compares (the scale and margin live in the loss, ``training.losses``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models.resnet import BasicBlock

ARCHITECTURES = ("seed-cnn", "res-cnn")


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the network before loading its weights."""

    arch: str = "seed-cnn"
    input_size: int = 64
    channels: tuple[int, ...] = (32, 64, 128)
    embedding_dim: int = 256
    num_classes: int = 48
    dropout: float = 0.3
    # embed(): the mean of the image's and its mirror image's unit vectors (twice the work).
    # Cards written before this field load with False, as they were served.
    flip_average: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelSpec:
        fields = dict(raw)
        fields["channels"] = tuple(int(c) for c in fields["channels"])
        return cls(**fields)


class EmbeddingNet(nn.Module):
    """The embedder: ``embed`` returns unit vectors for the index, ``forward`` class logits.

    ``seed-cnn``: conv blocks, a Dense(embedding_dim) layer, a linear classifier; the
    embedding is taken before the ReLU (after it, a vector can be all zeros and has
    no direction). ``res-cnn``: residual stages, global pooling, Dense(embedding_dim)
    with batch norm, and cosines to the class proxies as logits (see the module doc).
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        if spec.arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {spec.arch!r}; known: {', '.join(ARCHITECTURES)}")
        self.spec = spec
        if spec.arch == "res-cnn":
            self._build_res_cnn(spec)
            return
        blocks: list[nn.Module] = []
        in_ch = 3
        for out_ch in spec.channels:
            blocks += [
                nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
                nn.BatchNorm2d(out_ch),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            in_ch = out_ch
        self.features = nn.Sequential(*blocks)
        side = spec.input_size // 2 ** len(spec.channels)
        self.embedding = nn.Linear(in_ch * side * side, spec.embedding_dim)
        self.dropout = nn.Dropout(spec.dropout)
        self.classifier = nn.Linear(spec.embedding_dim, spec.num_classes)

    def _build_res_cnn(self, spec: ModelSpec) -> None:
        # stem: conv 3x3 at full resolution; then one BasicBlock per stage, each stride 2:
        # (B, 3, S, S) -> (B, c0, S, S) -> ... -> (B, c_last, S / 2**stages, ...) -> pooled (B, c_last)
        stem_ch = spec.channels[0]
        layers: list[nn.Module] = [
            nn.Conv2d(3, stem_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(stem_ch),
            nn.ReLU(inplace=True),
        ]
        in_ch = stem_ch
        for out_ch in spec.channels:
            downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=2, bias=False), nn.BatchNorm2d(out_ch))
            layers.append(BasicBlock(in_ch, out_ch, stride=2, downsample=downsample))
            in_ch = out_ch
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(spec.dropout)
        self.embedding = nn.Sequential(
            nn.Linear(in_ch, spec.embedding_dim, bias=False), nn.BatchNorm1d(spec.embedding_dim)
        )
        self.proxies = nn.Parameter(torch.randn(spec.num_classes, spec.embedding_dim) / spec.embedding_dim**0.5)

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        # seed-cnn: x (B, 3, S, S) -> features (B, C, S/8, S/8) -> (B, D)
        # res-cnn:  x (B, 3, S, S) -> pooled features (B, C) -> (B, D)
        if self.spec.arch == "res-cnn":
            return self.embedding(self.dropout(self.features(x)))
        return self.embedding(self.features(x).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.arch == "res-cnn":
            # cosines in [-1, 1] to each class proxy: (B, D) @ (D, num_classes)
            return self.unit_embedding(x) @ F.normalize(self.proxies, dim=1).T
        return self.classifier(self.dropout(F.relu(self.penultimate(x))))  # (B, num_classes)

    def unit_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """One view's unit vector (B, D): what training shapes."""
        return F.normalize(self.penultimate(x), dim=1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The vectors the index stores and searches: (B, 3, S, S) -> (B, D), unit length."""
        if not self.spec.flip_average:
            return self.unit_embedding(x)
        both = self.unit_embedding(torch.cat([x, x.flip(3)]))  # (2B, D): the images, then their mirror images
        return F.normalize(both[: len(x)] + both[len(x) :], dim=1)
