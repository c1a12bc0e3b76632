"""The promotion gate: worse challengers are refused, better ones promoted, rollback restores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lookalike.artifacts import CHAMPION, ModelStore
from lookalike.errors import ModelArtifactError
from lookalike.imaging import PreprocessSpec
from lookalike.model import EmbeddingNet, ModelSpec
from lookalike.registry import CHALLENGER, Registry

SPEC = ModelSpec(input_size=16, channels=(4, 8), embedding_dim=8, num_classes=3)


def stored(store: ModelStore, seed: int, p_at_5: float, split: str = "s" * 64) -> str:
    torch.manual_seed(seed)
    card = store.save(EmbeddingNet(SPEC), preprocess=PreprocessSpec(size=16), classes=["a", "b", "c"],
                      metrics={"precision_at_5": p_at_5}, data_split_sha256=split)
    return card.version


def test_gate_refuses_worse_promotes_better_and_records(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    registry = Registry(store, margin=0.01)
    first = stored(store, 1, 0.80)
    assert registry.propose(first).accepted  # no champion yet
    worse = stored(store, 2, 0.805)  # better, but not by the margin
    decision = registry.propose(worse)
    assert not decision.accepted and "does not beat" in decision.reason
    assert store.aliases()[CHAMPION] == first and store.aliases()[CHALLENGER] == worse
    better = stored(store, 3, 0.82)
    assert registry.propose(better).accepted
    assert store.aliases()[CHAMPION] == better
    other_split = stored(store, 4, 0.99, split="t" * 64)
    refused = registry.propose(other_split)
    assert not refused.accepted and "not comparable" in refused.reason
    recorded = registry.decisions()
    assert [d["accepted"] for d in recorded] == [True, False, True, False]
    assert recorded[1]["challenger_value"] == 0.805 and recorded[1]["champion_value"] == 0.80


def test_rollback_returns_to_the_previous_champion(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    registry = Registry(store)
    with pytest.raises(ModelArtifactError):
        registry.rollback()
    first, second = stored(store, 1, 0.80), stored(store, 2, 0.90)
    registry.propose(first)
    registry.propose(second)
    decision = registry.rollback()
    assert decision.champion_after == first and store.aliases()[CHAMPION] == first
    assert registry.decisions()[-1]["action"] == "rollback"
    with pytest.raises(ModelArtifactError):
        registry.rollback()
