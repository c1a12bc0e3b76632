"""``lookalike train``: train the embedder on a catalog folder and store the model."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from tqdm.contrib.logging import logging_redirect_tqdm

from lookalike.artifacts import CHAMPION, ModelCard, ModelStore
from lookalike.errors import LookalikeError
from lookalike.model import ARCHITECTURES
from lookalike.settings import CommonSettings, default_data
from training import shipped
from training.train import TrainConfig, train

# What people read in ``lookalike train --help`` for each TrainConfig field (the rest say
# "TrainConfig.<name>"), and the short flags kept from before the parser was generated.
HELP = {
    "data": "catalog folder with styles.csv and images/ (env LOOKALIKE_DATA)",
    "label": "the styles.csv column the classifier learns",
    "min_count": "smallest class kept",
    "limit_classes": "train on the N largest classes only",
    "split": "period: hold out the newest product ids (and a random share of the older); random: the old "
             "stratified random split",
    "period_fraction": "newest share of the ids held out",
    "test_fraction": "random held-out share (of the older ids with --split period)",
    "size": "input side in pixels",
    "arch": "; ".join(f"{a.name}: {a.summary}" for a in ARCHITECTURES.values()),
    "channels": "conv widths, comma-separated (default: the architecture's: "
                + "; ".join(f"{a.name} {','.join(map(str, a.default_channels))}" for a in ARCHITECTURES.values()) + ")",
    "cosface_margin": "CosFace margin",
    "cosface_scale": "CosFace scale",
    "sampler": "balanced: P x K batches with classes drawn uniformly",
    "patience": "early stopping after this many epochs without a better validation accuracy ('none': off)",
    "lr": "Adam learning rate",
    "lr_schedule": "cosine: decay to 0 over the run",
    "seed": "weights and batch order",
    "augment": "random flips, crops and brightness/contrast while training",
    "flip": "random horizontal flips while training",
    "shoot_augment": "imitate other shoots: framing, zoom, aspect, light, colour, grey, blur, erasing",
    "shoot_strength": "--shoot-augment's ranges and chances scaled (1: full, 0.5: half)",
    "aux_labels": "extra styles.csv labels learnt by training-only heads, comma-separated, e.g. "
                  "subCategory,baseColour ('' for none)",
    "aux_weight": "their loss weight",
    "batch_loss": "a retrieval loss on the batch's pairs of embeddings, added to CosFace (res-cnn)",
    "batch_loss_weight": "its weight",
    "ema_decay": "keep an exponential moving average of the weights (0: off)",
    "flip_average": "embed each image and its mirror image and average them, in serving too",
    "threads": "torch threads (0: torch's default)",
    "device": "auto: CUDA when available",
    "cache_dir": "decoded-pixel cache ($LOOKALIKE_HOME/cache)",
    "teacher": "distil this model of the store (a version or alias, trained on the same split, not on all "
               "items): learn to reproduce its embeddings, e.g. effnet-lite0's in the cheaper res-cnn ('none': off)",
    "distill_weight": "weight of the teacher's term (1 - cosine to its embedding)",
    "teacher_views": "augmented: each step the teacher embeds the student's augmented batch (a teacher forward "
                     "pass per batch); catalog: its embeddings of the training images, once",
    "promote": "put the new model through the promotion gate (lookalike models promote): it becomes champion "
               "only if it beats the champion by the margin. Without: it becomes the challenger, or the champion "
               "when there is none yet",
}
SHORT_FLAGS = {"cosface_margin": ["--margin"], "cosface_scale": ["--scale"]}


def _optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    return lambda text: None if text.lower() == "none" else parse(text)


def _argument(name: str, kind: Any, default: Any) -> dict[str, Any]:
    """argparse keywords for a TrainConfig field of type ``kind``."""
    args = typing.get_args(kind)
    optional = type(None) in args
    if optional:
        kind = next(a for a in args if a is not type(None))
        args = typing.get_args(kind)
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction, "default": default}
    if typing.get_origin(kind) is Literal:
        return {"choices": list(args), "default": default}
    if name == "arch":
        return {"choices": list(ARCHITECTURES), "default": default}
    if typing.get_origin(kind) is tuple:
        item = args[0]
        return {"type": lambda text: tuple(item(part) for part in text.split(",") if part),
                "default": None if name == "channels" else default}
    parse = {int: int, float: float, str: str, Path: Path}[kind]
    return {"type": _optional(parse) if optional else parse, "default": default}


def build_parser() -> argparse.ArgumentParser:
    """The ``lookalike train`` arguments: one per :class:`TrainConfig` field, generated, so a
    new training option is on the command line (with its default) as soon as it exists."""
    parser = argparse.ArgumentParser(
        prog="lookalike train",
        description="Train the embedder on a catalog folder (Kaggle Fashion Product Images layout).",
    )
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if f.name == "data":
            default = default_data()
        keywords = _argument(f.name, hints[f.name], default)
        flags = [f"--{f.name.replace('_', '-')}", *SHORT_FLAGS.get(f.name, [])]
        shown = " (default %(default)s)" if f.name != "channels" else ""
        parser.add_argument(*flags, dest=f.name, help=HELP.get(f.name, f"TrainConfig.{f.name}") + shown, **keywords)
    parser.add_argument("--model-dir", type=Path, default=None, help="model store (default: LOOKALIKE_MODEL_DIR)")
    parser.add_argument(
        "--reuse", action="store_true", help="if the store has a champion, show it and exit without training"
    )
    parser.add_argument(
        "--shipped", action="store_true",
        help="instead of training, install the model shipped in training/shipped (its README says how it was "
             "trained) and put it through the gate; with --reuse, only if the store has no champion",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    values["channels"] = values["channels"] or ARCHITECTURES[values["arch"]].default_channels
    return TrainConfig(**values)


def describe(card: ModelCard) -> str:
    """One line for people: version and retrieval figures."""
    m = card.metrics
    line = (
        f"model {card.version}: top-1 {m.get('top1_accuracy', float('nan')):.3f}, "
        f"P@5 {m.get('precision_at_5', float('nan')):.3f}, "
        f"classifier accuracy {m.get('test_accuracy', float('nan')):.3f}"
    )
    if "period_precision_at_5" in m:
        line += (f"; out-of-period P@5 {m['period_precision_at_5']:.3f} (the gate's), "
                 f"unseen brands {m.get('unseen_brand_precision_at_5', float('nan')):.3f}")
    final = card.training.get("final_fit") or {}
    if final.get("trained_on") == "all":
        line += (f"; the recipe's figures (its run on {final['recipe_train_size']} items), "
                 f"this model trained on all {final['items']} items")
    return line


def main(argv: list[str] | None = None) -> int:
    """Run ``lookalike train``; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    store = ModelStore(args.model_dir or CommonSettings().models_path)
    try:
        if args.reuse and CHAMPION in store.aliases():
            card = store.card(CHAMPION)
            print(f"{CHAMPION} exists, not training: {describe(card)}")
            return 0
        if args.shipped:
            card, decision = shipped.install(store)
            print(f"installed the shipped model, not training ({decision.reason}): {describe(card)}")
            print(f"  how it was trained: {shipped.SHIPPED_DIR / 'README.md'}; stored in {store.root / card.version}")
            return 0
        if not args.data.is_dir():
            print(f"error: no catalog folder at {args.data} (set --data or LOOKALIKE_DATA)", file=sys.stderr)
            return 2
        started = time.perf_counter()
        with logging_redirect_tqdm():
            card = train(config_from_args(args), store, progress=not args.quiet)
    except (LookalikeError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - started
    champion = store.aliases().get(CHAMPION)
    print(describe(card))
    print(
        f"  {card.training['train_size']} train / {card.training['test_size']} test images, "
        f"{len(card.classes)} classes, best epoch {card.training['best_epoch']}/{card.training['epochs_run']}"
    )
    print(
        f"  {seconds:.0f} s in all: {card.training['load_seconds']:.0f} s loading, "
        f"{card.training['train_seconds']:.0f} s training"
    )
    print(f"  stored in {store.root / card.version}; champion: {champion}")
    return 0
