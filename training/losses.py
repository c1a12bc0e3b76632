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



def multi_similarity_loss(
    unit: torch.Tensor, labels: torch.Tensor, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5,
    epsilon: float = 0.1,
) -> torch.Tensor:
    """Multi-similarity loss over a batch's pairs (Wang et al., "Multi-Similarity Loss", 2019).

    ``unit``: (B, D) unit embeddings; ``labels``: (B,). Each anchor keeps the negatives more
    similar than its least similar positive less ``epsilon`` and the positives less similar
    than its most similar negative plus ``epsilon``, then pays
    ``log(1 + sum exp(-alpha (s - base))) / alpha`` over those positives and
    ``log(1 + sum exp(beta (s - base))) / beta`` over those negatives. Anchors without a
    positive or a negative in the batch add nothing; the mean is over the anchors that
    have both (0 when none has).
    """
    sims = unit @ unit.T  # (B, B) cosines
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=unit.device)
    pos, neg = same & ~eye, ~same
    has_both = pos.any(dim=1) & neg.any(dim=1)
    if not has_both.any():
        return unit.sum() * 0.0  # keeps the graph, adds nothing
    inf = torch.finfo(sims.dtype).max
    hardest_pos = torch.where(pos, sims, torch.full_like(sims, inf)).min(dim=1, keepdim=True).values  # (B, 1)
    hardest_neg = torch.where(neg, sims, torch.full_like(sims, -inf)).max(dim=1, keepdim=True).values
    keep_neg = neg & (sims + epsilon > hardest_pos)
    keep_pos = pos & (sims - epsilon < hardest_neg)
    zero = torch.zeros_like(sims)
    pos_term = torch.log1p(torch.where(keep_pos, torch.exp(-alpha * (sims - base)), zero).sum(dim=1)) / alpha
    neg_term = torch.log1p(torch.where(keep_neg, torch.exp(beta * (sims - base)), zero).sum(dim=1)) / beta
    return (pos_term + neg_term)[has_both].mean()


def supervised_contrastive_loss(unit: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss over a batch (Khosla et al., "Supervised Contrastive Learning", 2020).

    ``unit``: (B, D) unit embeddings; ``labels``: (B,). For each anchor, the mean over its
    positives of ``-log softmax`` of the positive among every other item of the batch, at
    ``temperature``; the mean over anchors that have a positive (0 when none has).
    """
    eye = torch.eye(len(labels), dtype=torch.bool, device=unit.device)
    pos = (labels[:, None] == labels[None, :]) & ~eye
    has_pos = pos.any(dim=1)
    if not has_pos.any():
        return unit.sum() * 0.0
    logits = (unit @ unit.T / temperature).masked_fill(eye, float("-inf"))  # (B, B), self left out
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    per_anchor = -(log_prob.masked_fill(~pos, 0.0).sum(dim=1)) / pos.sum(dim=1).clamp(min=1)
    return per_anchor[has_pos].mean()


BATCH_LOSSES = {"multi-similarity": multi_similarity_loss, "supcon": supervised_contrastive_loss}
