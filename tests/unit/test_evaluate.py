"""The evaluation report: metrics on hand-made vectors, and a whole report on generated data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lookalike.artifacts import ModelStore
from training import evaluate as evaluation
from training.synthetic import make_synthetic_catalog
from training.train import TrainConfig, train


def test_exact_neighbours_are_nearest_first_and_ignore_length() -> None:
    catalog = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
    queries = np.array([[2.0, 0.2], [0.0, -3.0]])
    assert evaluation.exact_neighbours(catalog, queries, 3).tolist() == [[0, 1, 2], [0, 3, 1]]
    with pytest.raises(ValueError):
        evaluation.exact_neighbours(catalog, queries, 5)


def test_map_at_5_on_hand_made_rankings() -> None:
    same = np.array(
        [
            [1, 1, 1, 1, 1],  # all right: 1
            [0, 1, 0, 1, 0],  # (1/2 + 2/4) / 5 = 0.2
            [1, 0, 0, 0, 0],  # 1/5, but only 2 relevant items exist: 1/2
            [0, 0, 0, 0, 0],  # 0
        ],
        bool,
    )
    ap = evaluation.average_precision_at_k(same, np.array([10, 10, 2, 10]))
    assert ap == pytest.approx([1.0, 0.2, 0.5, 0.0])


def test_query_scores_and_summary_per_class() -> None:
    catalog = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.0]])
    catalog_labels = np.array(["a", "a", "b", "b", "c"])
    queries = np.array([[1.0, 0.05], [0.05, 1.0], [0.8, 0.2]])
    query_labels = np.array(["a", "b", "b"])
    neighbours = evaluation.exact_neighbours(catalog, queries, 2)
    scores = evaluation.query_scores(neighbours, catalog_labels, query_labels)
    assert scores["top1"].tolist() == [1.0, 1.0, 0.0]
    assert scores["precision_at_2"].tolist() == [1.0, 1.0, 0.0]
    assert scores["map_at_2"].tolist() == [1.0, 1.0, 0.0]
    summary = evaluation.summarise(scores, query_labels, ["b", "a"])
    assert summary["overall"]["top1"] == pytest.approx(2 / 3, abs=1e-4)
    assert summary["per_class"]["b"] == {"queries": 2, "top1": 0.5, "precision_at_2": 0.5, "map_at_2": 0.5}


def test_hnsw_recall_against_exact_search() -> None:
    rng = np.random.default_rng(0)
    catalog = rng.normal(size=(300, 16)).astype(np.float32)
    queries = rng.normal(size=(40, 16)).astype(np.float32)
    exact = evaluation.exact_neighbours(catalog, queries, 5)
    assert evaluation.recall_at_k(exact, exact) == 1.0
    assert evaluation.recall_at_k(evaluation.hnsw_neighbours(catalog, queries, 5), exact) > 0.9
    assert evaluation.recall_at_k(np.roll(exact, 1, axis=0), exact) < 0.2


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelStore, str, Path, Path]:
    root = tmp_path_factory.mktemp("evaluate")
    data = make_synthetic_catalog(root / "data", classes=4, per_class=15, size=32, seed=5)
    config = TrainConfig(
        data=data, min_count=2, size=32, channels=(8, 16), embedding_dim=16, epochs=2, batch_size=16,
        patience=None, cache_dir=root / "cache", threads=2, device="cpu", shoot_augment=False,
    )  # fmt: skip
    store = ModelStore(root / "models")
    card = train(config, store, progress=False)
    return store, card.version, data, root / "cache"


def test_evaluate_reports_both_query_sets_and_hnsw(stored: tuple[ModelStore, str, Path, Path]) -> None:
    store, version, data, cache = stored
    report = evaluation.evaluate(store, version, data, cache_dir=cache)
    json.dumps(report)  # plain JSON
    assert report["model_version"] == version
    # split by period: the newest 12 of 60 ids held out; of the older 48, 10% per class (1 each) the random view
    assert (report["catalog_size"], report["query_size"]) == (44, 4)
    assert report["split_scheme"] == "period" and report["first_period_id"] == "10048"
    assert report["largest_classes"] == ["Circles", "Crosses", "Squares", "Triangles"]  # ties: by name
    assert set(report["views"]) == {"random", "period"}  # every title's brand is "Synthetic": no unseen brand
    for view, queries in (("random", 4), ("period", 12)):
        for name in ("catalog", "invariance"):
            overall = report["views"][view][name]["overall"]
            assert overall["queries"] == queries
            assert 0.0 <= overall["map_at_5"] <= 1.0 and 0.0 <= overall["precision_at_5"] <= 1.0
            assert sum(row["queries"] for row in report["views"][view][name]["per_class"].values()) == queries
            assert report["views"][view]["hnsw"][f"recall_at_5_{name}"] == 1.0  # 44 vectors: HNSW finds them all
    assert report["catalog"] == report["views"]["random"]["catalog"]  # the old top-level keys: the random view
    gate = report["gate_metric"]
    assert gate["name"] == "period_precision_at_5"
    assert gate["value"] == report["views"]["period"]["invariance"]["overall"]["precision_at_5"]
    # generated classes differ by colour and shape: two epochs suffice
    assert report["views"]["period"]["catalog"]["overall"]["precision_at_5"] > 0.6
    markdown = evaluation.render_markdown(report)
    assert version in markdown and "| Circles | 3 |" in markdown
    padded = evaluation.evaluate(store, version, data, resize="pad", cache_dir=cache)
    assert padded["preprocess"]["resize"] == "pad" and padded["card_preprocess_resize"] == "stretch"
    mirrored = evaluation.evaluate(store, version, data, flip_average=True, cache_dir=cache)
    assert mirrored["flip_average"] and not report["flip_average"]


def test_evaluate_cli_writes_json_and_markdown(
    stored: tuple[ModelStore, str, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store, version, data, cache = stored
    args = ["--data", str(data), "--model-dir", str(store.root), "--cache-dir", str(cache), "--quiet"]
    assert evaluation.main([*args, "--out", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "report.json").read_text("utf-8"))["model_version"] == version
    assert (tmp_path / "out" / "report.md").read_text("utf-8") in capsys.readouterr().out
    assert evaluation.main([*args, "--model", "no-such-version"]) == 1
    assert "no model" in capsys.readouterr().err


def test_every_class_with_queries_is_reported_largest_first() -> None:
    # 20 classes: more than the 15 largest the report once stopped at
    catalog = np.array([f"c{i:02d}" for i in range(20) for _ in range(20 - i)])
    queries = np.array([f"c{i:02d}" for i in range(20) if i != 3])  # c03 has no query
    classes = evaluation.query_classes(catalog, queries)
    assert classes == [f"c{i:02d}" for i in range(20) if i != 3]
    assert evaluation.largest_classes(catalog, queries) == [f"c{i:02d}" for i in range(15)]
    scores = evaluation.query_scores(np.zeros((len(queries), 5), np.int64), catalog, queries)
    summary = evaluation.summarise(scores, queries, classes)
    assert len(summary["per_class"]) == 19 and summary["per_class"]["c19"]["queries"] == 1
