"""wait_for_index: an index of the catalog's size is not enough when a model is named; it
must be that model's (a stack that served another model switches by a rollout)."""

from __future__ import annotations

import pytest

from lookalike import status as module
from lookalike.errors import StackError
from lookalike.status import IndexerStatus


def test_it_waits_for_the_named_model_not_just_for_the_items(monkeypatch: pytest.MonkeyPatch) -> None:
    reports = iter([
        [IndexerStatus(instance="a", items=100, model_version="old", caught_up=True)],  # the size, another model
        [IndexerStatus(instance="a", items=100, model_version="old", target_version="new", caught_up=True)],
        [IndexerStatus(instance="a", items=100, model_version="new", caught_up=True)],  # switched
    ])
    seen: list[int] = []

    def statuses(settings, group):  # type: ignore[no-untyped-def]
        seen.append(1)
        return next(reports)

    monkeypatch.setattr(module, "indexer_status", statuses)
    monkeypatch.setattr(module.time, "sleep", lambda s: None)
    found = module.wait_for_index(100, timeout_s=30, model_version="new")
    assert found.model_version == "new" and len(seen) == 3


def test_without_a_model_any_caught_up_index_of_the_size_will_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(module, "indexer_status", lambda settings, group: [
        IndexerStatus(instance="a", items=100, model_version="old", caught_up=True)])
    assert module.wait_for_index(100, timeout_s=30).model_version == "old"


def test_the_timeout_names_the_model_it_waited_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(module, "indexer_status", lambda settings, group: [
        IndexerStatus(instance="a", items=100, model_version="old", caught_up=True)])
    with pytest.raises(StackError, match="served by model new"):
        module.wait_for_index(100, timeout_s=0.3, model_version="new")
