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


def stored(store: ModelStore, seed: int, p_at_5: float, split: str = "s" * 64, random_p_at_5: float = 0.5) -> str:
    """A model whose out-of-period P@5 (the gate's figure) is ``p_at_5``."""
    torch.manual_seed(seed)
    card = store.save(EmbeddingNet(SPEC), preprocess=PreprocessSpec(size=16), classes=["a", "b", "c"],
                      metrics={"period_precision_at_5": p_at_5, "precision_at_5": random_p_at_5},
                      data_split_sha256=split)
    return card.version


def legacy(store: ModelStore, seed: int, p_at_5: float) -> str:
    """A model from before the split by period: a random split's P@5 only."""
    torch.manual_seed(seed)
    return store.save(EmbeddingNet(SPEC), preprocess=PreprocessSpec(size=16), classes=["a", "b", "c"],
                      metrics={"precision_at_5": p_at_5}, data_split_sha256="r" * 64).version


def test_the_gate_decides_on_out_of_period_precision_not_the_random_split(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    registry = Registry(store)
    champion = stored(store, 1, 0.70, random_p_at_5=0.85)
    registry.propose(champion)
    # better on the random split (siblings in the catalog), worse on next season's products: refused
    sibling_recaller = stored(store, 2, 0.69, random_p_at_5=0.95)
    decision = registry.propose(sibling_recaller)
    assert not decision.accepted and decision.metric == "period_precision_at_5"
    # worse on the random split, better out of period: promoted
    generaliser = stored(store, 3, 0.75, random_p_at_5=0.80)
    assert registry.propose(generaliser).accepted
    assert store.aliases()[CHAMPION] == generaliser


def test_legacy_cards_on_one_random_split_are_still_compared_on_it(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    registry = Registry(store)
    first = legacy(store, 1, 0.80)
    registry.propose(first)
    decision = registry.propose(legacy(store, 2, 0.83))
    assert decision.accepted and decision.metric == "precision_at_5"
    new = stored(store, 3, 0.9)  # on the split by period: not comparable with a random split's champion
    refused = registry.propose(new)
    assert not refused.accepted and "not comparable" in refused.reason and refused.metric == "period_precision_at_5"


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
