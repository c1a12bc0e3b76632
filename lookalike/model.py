"""The embedder network: a small CNN classifier whose 256-d penultimate layer is the embedding."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the network before loading its weights."""

    arch: str = "seed-cnn"
    input_size: int = 64
    channels: tuple[int, ...] = (32, 64, 128)
    embedding_dim: int = 256
    num_classes: int = 48
    dropout: float = 0.3

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelSpec:
        fields = dict(raw)
        fields["channels"] = tuple(int(c) for c in fields["channels"])
        return cls(**fields)


class EmbeddingNet(nn.Module):
    """The seed recipe: conv blocks, a Dense(embedding_dim) layer, a linear classifier.

    ``embed`` returns the L2-normalised penultimate layer, the vectors the index
    stores; ``forward`` returns class logits for training. The embedding is taken
    before the ReLU: after it, a vector can be all zeros and has no direction.
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        if spec.arch != "seed-cnn":
            raise ValueError(f"unknown architecture {spec.arch!r}")
        self.spec = spec
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

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, 3, S, S) -> features (B, C, S/8, S/8) -> (B, D)
        return self.embedding(self.features(x).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(F.relu(self.penultimate(x))))  # (B, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.penultimate(x), dim=1)  # (B, D), unit length
