"""Feedback pairs as a training signal: which pairs are used, and the loss they add."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from training.pairs import pair_loss, pair_set


def test_pair_set_keeps_training_items_only() -> None:
    pairs = [
        {"query_item": "a", "item_id": "b", "label": 1},
        {"query_item": "a", "item_id": "b", "label": -1},  # older, same pair: the newest label wins
        {"query_item": "a", "item_id": "t", "label": 1},  # t is in the golden split
        {"query_item": "a", "item_id": "zz", "label": -1},  # not in the training data
        {"query_item": "c", "item_id": "a", "label": -1},
    ]
    ps = pair_set(pairs, train_ids=["a", "b", "c"], test_ids=["t"])
    assert ps.stats == {"given": 5, "used": 2, "in_golden_split": 1, "unknown_item": 1, "repeated": 1,
                        "positive": 1, "negative": 1}
    assert list(ps.query) == [0, 2] and list(ps.item) == [1, 0] and list(ps.label) == [1.0, -1.0]


def test_pair_loss_pulls_positives_and_pushes_negatives() -> None:
    q = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), dim=1)
    near = F.normalize(torch.tensor([[1.0, 0.1], [1.0, 0.1]]), dim=1)
    far = F.normalize(torch.tensor([[0.0, 1.0], [0.0, 1.0]]), dim=1)
    pos, neg = torch.tensor([1.0, 1.0]), torch.tensor([-1.0, -1.0])
    assert pair_loss(q, near, pos, 0.2) < pair_loss(q, far, pos, 0.2)  # positives: closer is better
    assert pair_loss(q, far, neg, 0.2) == pytest.approx(0.0)  # a negative below the margin costs nothing
    cos = float((q[0] * near[0]).sum())
    assert pair_loss(q, near, neg, 0.2) == pytest.approx(cos - 0.2, abs=1e-6)
