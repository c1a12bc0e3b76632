"""What training on more of the catalog buys, on products no model here has seen.

``python -m training.refit_gain --model VERSION``: the newest 10 % of the ids are the check;
model A is the stored ``VERSION`` (its recipe trained on the older 80 % less its random
view, as the gate measures it); model B is the same recipe and seed trained on every
labelled item of the older 90 % (what ``final_fit`` "all" does with all items, one step
back in time so that something unseen is left). Both are judged on the newest 10 % as
catalog images and as shopper photos (``training.evaluate``'s), searched exactly among
the older 90 % (the same catalog for both; a served model indexes the whole catalog,
trained on or not), by ``articleType``: the classes both models know.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from lookalike.artifacts import ModelStore
from lookalike.catalog import CatalogItem
from lookalike.embedder import pick_device
from lookalike.settings import CommonSettings, default_data
from training.data import Split, load_labelled, period_split, select
from training.evaluate import measure_views
from training.service import config_from_card
from training.train import (
    LabelledPixels,
    TrainConfig,
    aux_targets,
    fit,
    new_model,
    pixels_and_labels,
    seed_everything,
)

log = logging.getLogger(__name__)
CHECK_FRACTION = 0.1


def recipe_of(card_training: dict[str, Any], data: Path, cache_dir: Path | None) -> TrainConfig:
    from lookalike.settings import TrainerSettings

    config = config_from_card(card_training["config"], TrainerSettings())
    return replace(config, data=data, cache_dir=cache_dir, final_fit="split", promote=False)


def check_split(config: TrainConfig) -> tuple[list[CatalogItem], Split]:
    """Every labelled item, and the split with the newest 10 % of the ids held out."""
    items = load_labelled(config.data, min_count=1, label=config.label)
    return items, period_split(items, CHECK_FRACTION, config.test_fraction, config.split_seed,
                               label=config.label, min_count=config.min_count)


def train_on_older(config: TrainConfig, items: list[CatalogItem], split: Split,
                   progress: bool) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Model B: the recipe on every labelled item of the older 90 % of the ids."""
    ids = split.train_ids + split.test_ids
    x, y = pixels_and_labels(config, items, ids, split.classes, progress)
    aux, aux_classes = aux_targets(config, select(items, ids))
    data = LabelledPixels(split, x, y, x[:0], y[:0], list(items), aux, aux_classes)
    seed_everything(config.seed)
    model = new_model(config, config.model_spec(len(split.classes)), pick_device(config.device))
    started = time.perf_counter()
    result = fit(model, data, config, progress)
    model.load_state_dict(result.best_state)
    return model.cpu().eval(), {"train_size": len(y), "classes": len(split.classes),
                                "train_seconds": round(time.perf_counter() - started, 1)}


def judge(models: dict[str, torch.nn.Module], config: TrainConfig, items: list[CatalogItem], split: Split,
          known: set[str], progress: bool) -> dict[str, Any]:
    """Each model's figures (:func:`training.evaluate.measure_views`, exact search) on the newest
    10 % among the older 90 %, both limited to the classes in ``known``."""
    labels = {item.item_id: item.metadata[config.label] for item in items}
    view = replace(split, train_ids=tuple(i for i in split.train_ids + split.test_ids if labels[i] in known),
                   test_ids=(), period_ids=tuple(i for i in split.period_ids if labels[i] in known),
                   unseen_brand_ids=())
    out: dict[str, Any] = {"catalog_size": len(view.train_ids), "queries": len(view.period_ids),
                           "first_check_id": split.first_period_id, "models": {}}
    for name, model in models.items():
        result = measure_views(model, config.preprocess_spec(), view, items, cache_dir=config.cache_dir,
                               hnsw=False, progress=progress)["period"]
        out["models"][name] = {"catalog": result["catalog"]["overall"], "shopper": result["invariance"]["overall"]}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.refit_gain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model A: a stored version (or alias) trained on the split")
    parser.add_argument("--model-dir", type=Path, default=None, help="model store (default: LOOKALIKE_MODEL_DIR)")
    parser.add_argument("--data", type=Path, default=default_data())
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="write the figures here as JSON too")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    store = ModelStore(args.model_dir or CommonSettings().models_path)
    model_a, card = store.load(args.model)
    if card.training.get("final_fit"):
        print(f"error: {card.version} was trained on all items; model A must be a split run", file=sys.stderr)
        return 2
    config = recipe_of(card.training, args.data, args.cache_dir)
    torch.set_num_threads(config.threads or torch.get_num_threads())
    items, split = check_split(config)
    model_b, trained = train_on_older(config, items, split, not args.quiet)
    figures = judge({"A: older 80 % (the split)": model_a.eval(), "B: older 90 %, all of it": model_b}, config,
                    items, split, set(card.classes), not args.quiet)
    report = {"model_a": card.version, "model_a_train_size": card.training["train_size"], "model_b": trained,
              "seed": config.seed} | figures
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n", "utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
