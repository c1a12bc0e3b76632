"""Feedback pairs as a training signal: a contrastive term added to the classifier's loss.

A pair is (query item, shown item, label) from the feedback aggregator: +1 when a
shopper who asked "more like this query item" clicked (or carted, or bought) the shown
item, -1 when they dismissed it. The term pulls positives together and pushes
negatives below a cosine margin, on the same unit embedding the index serves::

    loss = weight * mean( 1 - cos(q, i)           for positives,
                          relu(cos(q, i) - margin) for negatives )

Only pairs whose two items are in the *training* part of the split are used: an item
of the golden (test) split would leak into the evaluation the promotion gate trusts.
Image queries have no query item (the shopper's photo is not kept), so their feedback
counts in the metrics but makes no pair.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from lookalike.imaging import PreprocessSpec, normalise


@dataclass(frozen=True)
class PairSet:
    """Pairs as indices into the training pixels."""

    query: np.ndarray  # int64 (P,)
    item: np.ndarray  # int64 (P,)
    label: np.ndarray  # float32 (P,): +1 or -1
    stats: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.label)


def pair_set(pairs: Sequence[Mapping[str, object]], train_ids: Sequence[str], test_ids: Sequence[str]) -> PairSet:
    """Map pair item ids to training indices; count what is left out and why.

    The latest label wins when the same (query, item) pair was both clicked and dismissed
    (``pairs`` come newest first, as the aggregator keeps them).
    """
    index = {item_id: i for i, item_id in enumerate(train_ids)}
    golden = set(test_ids)
    chosen: dict[tuple[int, int], float] = {}
    stats = {"given": len(pairs), "used": 0, "in_golden_split": 0, "unknown_item": 0, "repeated": 0}
    for pair in pairs:
        q, i = str(pair["query_item"]), str(pair["item_id"])
        if q in golden or i in golden:
            stats["in_golden_split"] += 1
            continue
        if q not in index or i not in index:
            stats["unknown_item"] += 1
            continue
        key = (index[q], index[i])
        if key in chosen:
            stats["repeated"] += 1
            continue
        chosen[key] = 1.0 if int(pair["label"]) > 0 else -1.0  # type: ignore[call-overload]
    stats["used"] = len(chosen)
    stats["positive"] = sum(1 for v in chosen.values() if v > 0)
    stats["negative"] = stats["used"] - stats["positive"]
    keys = list(chosen)
    return PairSet(np.array([k[0] for k in keys], np.int64), np.array([k[1] for k in keys], np.int64),
                   np.array(list(chosen.values()), np.float32), stats)


def pair_loss(q: torch.Tensor, i: torch.Tensor, label: torch.Tensor, margin: float) -> torch.Tensor:
    """Mean contrastive loss of unit embeddings q, i (P, D) with labels (P,) in {+1, -1}."""
    cos = (q * i).sum(dim=1)  # (P,)
    positive = 1.0 - cos
    negative = torch.relu(cos - margin)
    return torch.where(label > 0, positive, negative).mean()


class PairTerm:
    """The extra loss term for :func:`training.train.train_step`: a random batch of pairs per call."""

    def __init__(self, pairs: PairSet, pixels: np.ndarray, spec: PreprocessSpec, *, weight: float, margin: float,
                 batch: int, seed: int = 0) -> None:
        self.pairs, self.pixels, self.spec = pairs, pixels, spec
        self.weight, self.margin, self.batch = weight, margin, batch
        self.rng = np.random.default_rng(seed)

    def __call__(self, model: nn.Module) -> torch.Tensor:
        device = next(model.parameters()).device
        chosen = self.rng.choice(len(self.pairs), size=min(self.batch, len(self.pairs)), replace=False)
        idx = np.concatenate([self.pairs.query[chosen], self.pairs.item[chosen]])  # (2P,)
        inputs = torch.from_numpy(normalise(self.pixels[idx], self.spec)).to(device)
        vectors = model.embed(inputs)  # (2P, D), unit rows
        q, i = vectors[: len(chosen)], vectors[len(chosen):]
        label = torch.from_numpy(self.pairs.label[chosen]).to(device)
        return self.weight * pair_loss(q, i, label, self.margin)
