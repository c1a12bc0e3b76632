"""Losses for the embedding: a cosine classifier with an additive margin (CosFace).

The ``res-cnn`` network's logits are cosines between the unit embedding and one unit
proxy per class. Cross-entropy over ``scale * cos`` alone already pulls each image
towards its class's proxy; subtracting a ``margin`` from the true class's cosine
before the softmax demands that an image be closer to its own proxy than to any
other by that margin, which tightens classes and widens the gaps between them in
exactly the cosine geometry the HNSW index searches (Wang et al., "CosFace", 2018).
Every proxy has unit length, so a frequent class cannot win by a larger weight norm
or bias, one of the ways a plain classifier leans towards the head of a long tail.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class CosFaceLoss(nn.Module):
    """Cross-entropy over ``scale * (cos - margin * onehot(target))``.

    Input: cosines (B, C) in [-1, 1] and class indices (B,); output: the mean loss.
    """

    def __init__(self, scale: float = 16.0, margin: float = 0.2) -> None:
        super().__init__()
        if scale <= 0 or margin < 0:
            raise ValueError(f"need scale > 0 and margin >= 0, got scale={scale}, margin={margin}")
        self.scale = scale
        self.margin = margin

    def forward(self, cosines: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        margins = F.one_hot(targets, cosines.shape[1]).to(cosines.dtype) * self.margin  # (B, C)
        return F.cross_entropy(self.scale * (cosines - margins), targets)

