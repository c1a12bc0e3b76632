"""``lookalike train``: train the embedder on a catalog folder and store the model."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from tqdm.contrib.logging import logging_redirect_tqdm

from lookalike.artifacts import CHAMPION, ModelCard, ModelStore
from lookalike.errors import LookalikeError
from lookalike.model import ARCHITECTURES
from lookalike.settings import CommonSettings, default_data
from training.train import TrainConfig, train


def build_parser() -> argparse.ArgumentParser:
    """The ``lookalike train`` arguments; defaults are :class:`TrainConfig`'s."""
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="lookalike train",
        description="Train the embedder on a catalog folder (Kaggle Fashion Product Images layout).",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=default_data(),
        help="catalog folder with styles.csv and images/ (env LOOKALIKE_DATA; default %(default)s)",
    )
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="default %(default)s")
    parser.add_argument("--size", type=int, default=defaults.size, help="input side in pixels (default %(default)s)")
    parser.add_argument("--resize", choices=["stretch", "pad"], default=defaults.resize, help="default %(default)s")
    parser.add_argument(
        "--arch",
        choices=list(ARCHITECTURES),
        default=defaults.arch,
        help="; ".join(f"{a.name}: {a.summary}" for a in ARCHITECTURES.values()) + " (default %(default)s)",
    )
    parser.add_argument(
        "--channels",
        type=lambda text: tuple(int(c) for c in text.split(",")),
        default=None,
        help="conv widths, comma-separated (default: the architecture's: "
        + "; ".join(f"{a.name} {','.join(map(str, a.default_channels))}" for a in ARCHITECTURES.values()) + ")",
    )
    parser.add_argument("--margin", type=float, default=defaults.cosface_margin, help="CosFace margin (%(default)s)")
    parser.add_argument("--scale", type=float, default=defaults.cosface_scale, help="CosFace scale (%(default)s)")
    parser.add_argument(
        "--sampler",
        choices=["shuffle", "balanced"],
        default=defaults.sampler,
        help="balanced: P x K batches with classes drawn uniformly (default %(default)s)",
    )
    parser.add_argument("--patience", type=int, default=defaults.patience, help="early stopping (%(default)s)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="default %(default)s")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="Adam learning rate (default %(default)s)")
    parser.add_argument(
        "--lr-schedule",
        choices=["constant", "cosine"],
        default=defaults.lr_schedule,
        help="cosine: decay to 0 over the run (default %(default)s)",
    )
    parser.add_argument("--min-count", type=int, default=defaults.min_count, help="smallest class kept (%(default)s)")
    parser.add_argument("--limit-classes", type=int, default=None, help="train on the N largest classes only")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="weights and batch order (%(default)s)")
    parser.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=defaults.augment,
        help="random flips, crops and brightness/contrast while training (default %(default)s)",
    )
    parser.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        default=defaults.flip,
        help="random horizontal flips while training (default %(default)s)",
    )
    parser.add_argument(
        "--split",
        choices=["period", "random"],
        default=defaults.split,
        help="period: hold out the newest product ids (and a random share of the older); random: the old "
        "stratified random split (default %(default)s)",
    )
    parser.add_argument("--period-fraction", type=float, default=defaults.period_fraction,
                        help="newest share of the ids held out (%(default)s)")
    parser.add_argument("--test-fraction", type=float, default=defaults.test_fraction,
                        help="random held-out share (of the older ids with --split period; %(default)s)")
    parser.add_argument(
        "--shoot-augment",
        action=argparse.BooleanOptionalAction,
        default=defaults.shoot_augment,
        help="imitate other shoots: framing, zoom, aspect, light, colour, grey, blur, erasing (default %(default)s)",
    )
    parser.add_argument(
        "--aux-labels",
        type=lambda text: tuple(name for name in text.split(",") if name),
        default=defaults.aux_labels,
        help="extra styles.csv labels learnt by training-only heads, comma-separated, e.g. subCategory,baseColour "
        "('' for none; default %(default)s)",
    )
    parser.add_argument("--aux-weight", type=float, default=defaults.aux_weight, help="their loss weight (%(default)s)")
    parser.add_argument("--ema-decay", type=float, default=defaults.ema_decay,
                        help="keep an exponential moving average of the weights (0: off; default %(default)s)")
    parser.add_argument(
        "--flip-average",
        action=argparse.BooleanOptionalAction,
        default=defaults.flip_average,
        help="embed each image and its mirror image and average them, in serving too (default %(default)s)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default=defaults.device, help="auto: CUDA when available"
    )
    parser.add_argument(
        "--promote",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="put the new model through the promotion gate (lookalike models promote): it becomes champion "
        "only if it beats the champion by the margin. Without: it becomes the challenger, or the champion "
        "when there is none yet",
    )
    parser.add_argument("--model-dir", type=Path, default=None, help="model store (default: LOOKALIKE_MODEL_DIR)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="decoded-pixel cache ($LOOKALIKE_HOME/cache)")
    parser.add_argument(
        "--reuse", action="store_true", help="if the store has a champion, show it and exit without training"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        data=args.data,
        epochs=args.epochs,
        size=args.size,
        arch=args.arch,
        channels=args.channels or ARCHITECTURES[args.arch].default_channels,
        cosface_margin=args.margin,
        cosface_scale=args.scale,
        sampler=args.sampler,
        patience=args.patience,
        split=args.split,
        period_fraction=args.period_fraction,
        test_fraction=args.test_fraction,
        shoot_augment=args.shoot_augment,
        aux_labels=args.aux_labels,
        aux_weight=args.aux_weight,
        ema_decay=args.ema_decay,
        flip_average=args.flip_average,
        resize=args.resize,
        batch_size=args.batch_size,
        lr=args.lr,
        lr_schedule=args.lr_schedule,
        min_count=args.min_count,
        limit_classes=args.limit_classes,
        seed=args.seed,
        augment=args.augment,
        flip=args.flip,
        threads=args.threads,
        device=args.device,
        cache_dir=args.cache_dir,
        promote=args.promote,
    )


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
