"""Training data: labelled catalog items, a reproducible split, and cached pixels.

Pixels are made by :func:`lookalike.imaging.decode_pixels`, the function the workers
call on catalog images (and its parts on query images), so the model learns on exactly
what it will be served. Decoded pixels
are cached as ``.npz`` (no pickle) under a key that changes with the item set, the
files' sizes and mtimes, and the preprocessing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from lookalike.catalog import CatalogItem, iter_catalog
from lookalike.errors import BadImage, InvalidMessage
from lookalike.imaging import PreprocessSpec, decode_pixels
from lookalike.settings import default_home
from training import cancel

log = logging.getLogger(__name__)

SPLIT_FORMAT = 1  # a random split (``scheme`` "random"): train and test ids
PERIOD_SPLIT_FORMAT = 2  # a split by product id: also the newest ids and the unseen brands among them
CACHE_FORMAT = 2  # 2: JPEGs decoded at the scale the input needs (draft mode)
# Catalog files are ours, not untrusted queries: generous limits, still bounded.
# Pillow itself refuses images over 2 x Image.MAX_IMAGE_PIXELS (~179M) as bombs.
MAX_FILE_BYTES = 256 * 1024 * 1024
MAX_FILE_PIXELS = 80_000_000
# Below this many images a process pool costs more than it saves.
POOL_MIN_ITEMS = 256


def load_labelled(folder: Path, min_count: int = 10, label: str = "articleType") -> list[CatalogItem]:
    """Catalog items that carry ``label``, keeping only classes with at least ``min_count`` items.

    Order is the catalog's file order.
    """
    items = [item for item in iter_catalog(Path(folder)) if item.metadata.get(label)]
    counts = Counter(item.metadata[label] for item in items)
    kept = {name for name, n in counts.items() if n >= min_count}
    log.info(
        "%s: %d labelled items in %d classes; %d classes have >= %d items (%d items)",
        folder,
        len(items),
        len(counts),
        len(kept),
        min_count,
        sum(counts[name] for name in kept),
    )
    return [item for item in items if item.metadata[label] in kept]


def keep_largest_classes(items: Sequence[CatalogItem], n: int, label: str = "articleType") -> list[CatalogItem]:
    """Only the items of the ``n`` most frequent classes (ties broken by class name)."""
    counts = Counter(item.metadata[label] for item in items)
    largest = {name for name, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]}
    return [item for item in items if item.metadata[label] in largest]


@dataclass(frozen=True)
class Split:
    """Which items train and which are held out. Ids are sorted, so equal splits are equal JSON.

    ``scheme`` "random" (format 1, the original golden split): ``test_ids`` are a
    stratified random share of all items. ``scheme`` "period" (format 2): the newest
    ``period_fraction`` of the product ids are held out as ``period_ids`` (next season's
    products); ``unseen_brand_ids`` are those of them whose brand has no training item;
    ``test_ids`` are a stratified random share of the *older* ids (the old random view,
    kept to show the difference); ``train_ids`` are the rest of the older ids.
    """

    train_ids: tuple[str, ...]
    test_ids: tuple[str, ...]
    classes: tuple[str, ...]  # sorted; a class's index is its classifier output
    label: str = "articleType"
    seed: int = 1234
    test_fraction: float = 0.2
    scheme: Literal["random", "period"] = "random"
    period_ids: tuple[str, ...] = ()
    unseen_brand_ids: tuple[str, ...] = ()
    period_fraction: float = 0.0
    first_period_id: str | None = None  # the oldest held-out id

    def to_dict(self) -> dict[str, Any]:
        raw: dict[str, Any] = {
            "format": SPLIT_FORMAT,
            "label": self.label,
            "seed": self.seed,
            "test_fraction": self.test_fraction,
            "classes": list(self.classes),
            "train_ids": list(self.train_ids),
            "test_ids": list(self.test_ids),
        }
        if self.scheme == "random":  # exactly the format-1 JSON: stored splits keep their checksums
            return raw
        return raw | {
            "format": PERIOD_SPLIT_FORMAT,
            "scheme": self.scheme,
            "period_fraction": self.period_fraction,
            "first_period_id": self.first_period_id,
            "period_ids": list(self.period_ids),
            "unseen_brand_ids": list(self.unseen_brand_ids),
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Split:
        fmt = raw.get("format")
        if fmt not in (SPLIT_FORMAT, PERIOD_SPLIT_FORMAT):
            raise ValueError(f"split format {fmt!r} is not {SPLIT_FORMAT} or {PERIOD_SPLIT_FORMAT}")
        period = fmt == PERIOD_SPLIT_FORMAT
        return cls(
            train_ids=tuple(str(i) for i in raw["train_ids"]),
            test_ids=tuple(str(i) for i in raw["test_ids"]),
            classes=tuple(str(c) for c in raw["classes"]),
            label=str(raw["label"]),
            seed=int(raw["seed"]),
            test_fraction=float(raw["test_fraction"]),
            scheme="period" if period else "random",
            period_ids=tuple(str(i) for i in raw.get("period_ids", ())),
            unseen_brand_ids=tuple(str(i) for i in raw.get("unseen_brand_ids", ())),
            period_fraction=float(raw.get("period_fraction", 0.0)),
            first_period_id=raw.get("first_period_id"),
        )

    def canonical_json(self) -> str:
        """The JSON the checksum is taken over: sorted keys, no whitespace."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.canonical_json().encode("ascii")).hexdigest()

    def save(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n", "utf-8")

    @classmethod
    def load(cls, path: Path) -> Split:
        return cls.from_dict(json.loads(Path(path).read_text("utf-8")))


def brand(item: CatalogItem) -> str:
    """The brand of a product: the first word of its display name ("" when it has none)."""
    words = str(item.metadata.get("title") or item.metadata.get("productDisplayName") or "").split()
    return words[0] if words else ""


def id_order(item_id: str) -> tuple[int, int | str]:
    """Sort key for product ids: numeric ids by value (the store numbers them in time), others after, by text."""
    return (0, int(item_id)) if item_id.isdigit() else (1, item_id)


def period_split(
    items: Sequence[CatalogItem],
    period_fraction: float = 0.2,
    test_fraction: float = 0.1,
    seed: int = 1234,
    label: str = "articleType",
    min_count: int = 10,
) -> Split:
    """Hold out the newest ``period_fraction`` of the ids; train on the older ones.

    ``items``: every labelled item, whatever its class's size. Classes are those with at
    least ``min_count`` items among the older ids (a type the catalog has no examples of
    cannot be retrieved by type, so held-out items of other types are left out). Of the
    older items of those classes a stratified random ``test_fraction`` is the random
    view's queries (:func:`stratified_split`), the rest trains. ``unseen_brand_ids``: the
    held-out items whose brand (:func:`brand`) no training item has.
    """
    if not 0.0 < period_fraction < 1.0:
        raise ValueError(f"period_fraction must be in (0, 1), got {period_fraction}")
    by_id = {item.item_id: item for item in items}
    ordered = sorted(by_id, key=id_order)
    n_period = round(len(ordered) * period_fraction)
    if not 0 < n_period < len(ordered):
        raise ValueError(f"{len(ordered)} items cannot be split with period_fraction {period_fraction}")
    older, newest = ordered[: len(ordered) - n_period], ordered[len(ordered) - n_period :]
    counts = Counter(by_id[i].metadata[label] for i in older)
    classes = {name for name, n in counts.items() if n >= min_count}
    if not classes:
        raise ValueError(f"no class has {min_count} or more items among the {len(older)} older ids")
    random_view = stratified_split([by_id[i] for i in older if by_id[i].metadata[label] in classes],
                                   test_fraction, seed, label)
    period_ids = [i for i in newest if by_id[i].metadata[label] in classes]
    train_brands = {brand(by_id[i]) for i in random_view.train_ids}
    unseen = [i for i in period_ids if brand(by_id[i]) and brand(by_id[i]) not in train_brands]
    return replace(
        random_view,
        scheme="period",
        period_ids=tuple(sorted(period_ids)),
        unseen_brand_ids=tuple(sorted(unseen)),
        period_fraction=period_fraction,
        first_period_id=newest[0],
    )


def stratified_split(
    items: Sequence[CatalogItem],
    test_fraction: float = 0.2,
    seed: int = 1234,
    label: str = "articleType",
) -> Split:
    """Per class, a seeded shuffle of its sorted ids; the first ``round(n * test_fraction)`` test.

    Every class keeps at least one training item, and one test item when it has two
    or more. The result depends only on the ids, labels, fraction and seed, not on
    the order of ``items``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    by_class: dict[str, list[str]] = {}
    for item in items:
        by_class.setdefault(item.metadata[label], []).append(item.item_id)
    rng = np.random.default_rng(seed)
    train_ids: list[str] = []
    test_ids: list[str] = []
    for name in sorted(by_class):
        ids = sorted(set(by_class[name]))
        order = rng.permutation(len(ids))
        n_test = min(max(round(len(ids) * test_fraction), 1), len(ids) - 1)
        test_ids += [ids[i] for i in order[:n_test]]
        train_ids += [ids[i] for i in order[n_test:]]
    return Split(
        train_ids=tuple(sorted(train_ids)),
        test_ids=tuple(sorted(test_ids)),
        classes=tuple(sorted(by_class)),
        label=label,
        seed=seed,
        test_fraction=test_fraction,
    )


def select(items: Sequence[CatalogItem], ids: Sequence[str]) -> list[CatalogItem]:
    """The items with these ids, in the order of ``ids``."""
    by_id = {item.item_id: item for item in items}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise KeyError(f"{len(missing)} split ids are not in the catalog, e.g. {missing[:3]}")
    return [by_id[i] for i in ids]


def pixels_cache_key(items: Sequence[CatalogItem], spec: PreprocessSpec) -> str:
    """A hash of what the pixels depend on: ids, files (size, mtime) and preprocessing."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"format": CACHE_FORMAT, "spec": spec.to_dict()}, sort_keys=True).encode())
    for item in items:
        stat = item.image_path.stat()
        digest.update(f"\n{item.item_id}\t{item.image_path}\t{stat.st_size}\t{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def decode_file(path: Path, spec: PreprocessSpec) -> np.ndarray:
    """One image file -> uint8 (S, S, 3), as serving would preprocess it."""
    return decode_pixels(Path(path).read_bytes(), spec, max_bytes=MAX_FILE_BYTES, max_pixels=MAX_FILE_PIXELS)


def _decode_job(job: tuple[str, Path, PreprocessSpec]) -> np.ndarray:
    item_id, path, spec = job
    try:
        return decode_file(path, spec)
    except InvalidMessage as exc:
        raise BadImage(f"item {item_id} ({path}): {exc}") from exc


def decode_all(items: Sequence[CatalogItem], spec: PreprocessSpec, workers: int, progress: bool) -> np.ndarray:
    """Decode every item's image -> uint8 (N, S, S, 3); raises BadImage naming the item."""
    jobs = [(item.item_id, item.image_path, spec) for item in items]
    out = np.empty((len(jobs), spec.size, spec.size, 3), np.uint8)
    bar = tqdm(total=len(jobs), desc="decoding images", unit="img", disable=not progress, leave=False)
    with bar:
        if workers <= 1 or len(jobs) < POOL_MIN_ITEMS:
            for i, job in enumerate(jobs):
                cancel.check()  # the trainer service's stop request (training/cancel.py)
                out[i] = _decode_job(job)
                bar.update()
        else:
            # Decoding is pure CPU in Pillow; separate processes use every core.
            with get_context("spawn").Pool(workers) as pool:
                for i, pixels in enumerate(pool.imap(_decode_job, jobs, chunksize=64)):
                    cancel.check()  # leaving the block terminates the pool
                    out[i] = pixels
                    bar.update()
    return out


def load_pixels(
    items: Sequence[CatalogItem],
    spec: PreprocessSpec,
    cache_dir: Path | None = None,
    *,
    workers: int | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Pixels of ``items`` in order -> uint8 (N, S, S, 3), from the cache when it is current.

    ``cache_dir`` defaults to ``default_home() / "cache"``; ``workers`` defaults to the
    number of CPUs.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_home() / "cache"
    ids = np.array([item.item_id for item in items], dtype=np.str_)
    path = cache_dir / f"pixels-{pixels_cache_key(items, spec)[:24]}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as cached:
                pixels, cached_ids = cached["pixels"], cached["ids"]
            if pixels.shape == (len(items), spec.size, spec.size, 3) and np.array_equal(cached_ids, ids):
                log.info("pixels of %d items from cache %s", len(items), path)
                return pixels
            log.warning("cache %s does not match its items; decoding again", path)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("cache %s is unreadable (%s); decoding again", path, exc)
    pixels = decode_all(items, spec, workers or os.cpu_count() or 1, progress)
    save_npz_atomic(path, pixels=pixels, ids=ids)
    log.info("decoded %d images; cached in %s", len(items), path)
    return pixels


def save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    """``np.savez`` to a temporary file, then rename: readers never see half a cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache is not a secret
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def class_balanced_batches(
    labels: np.ndarray, classes_per_batch: int, per_class: int, n_batches: int, rng: np.random.Generator
) -> Iterator[np.ndarray]:
    """``n_batches`` P x K batches: P classes drawn uniformly, K items of each.

    Every class is equally likely whatever its size, so the tail of a long-tailed
    catalog is seen as often as its head. Within a class, items come from a shuffled
    cycle (every item once before any twice); a class with fewer than K items repeats
    some. Yields index arrays into ``labels`` of length P * K (P capped at the number
    of classes), grouped by class.
    """
    if classes_per_batch < 1 or per_class < 1:
        raise ValueError(f"need P >= 1 and K >= 1, got P={classes_per_batch}, K={per_class}")
    labels = np.asarray(labels)
    classes = np.unique(labels)
    members = {c: np.flatnonzero(labels == c) for c in classes}
    queues: dict[Any, list[int]] = {c: [] for c in classes}
    p = min(classes_per_batch, len(classes))
    for _ in range(n_batches):
        batch: list[int] = []
        for c in rng.choice(classes, size=p, replace=False):
            while len(queues[c]) < per_class:
                # a new cycle, its items not already waiting first: no repeats within a batch for classes of K or more
                waiting = set(queues[c])
                cycle = rng.permutation(members[c]).tolist()
                queues[c] += [i for i in cycle if i not in waiting] + [i for i in cycle if i in waiting]
            batch += queues[c][:per_class]
            del queues[c][:per_class]
        yield np.array(batch, np.int64)
