"""``lookalike evaluate``: a stored model's retrieval report on its frozen golden split.

Up to three views, each a set of held-out queries searched exactly (cosine) among the
training split (the catalog) and judged by ``articleType``:

* ``random``: a stratified random share of the ids (the only view of splits made before
  the split by period). Neighbouring ids are one brand's shoot, so a near-twin of most of
  these queries is in the catalog: it measures recall of siblings;
* ``period``: the newest ids, held out from training (next season's products; their
  siblings are held out with them). The promotion gate's figure is this view's P@5 on
  shopper photos (``period_precision_at_5``);
* ``unseen_brand``: those of the newest ids whose brand (first word of the display name)
  has no training item.

Each view's queries are sent twice: as the catalog stores them (``catalog``), and as a
shopper would send them (``invariance``): stretched back to a 3:4 portrait at another
size (120x160) and re-encoded as JPEG (quality 80). ``hnsw``: recall@5 of the index the
indexer builds (hnswlib, cosine, M=16, ef_construction=200, ef=64) against exact search.

For each: top-1 (the nearest item has the query's type), precision@5 and mAP@5,
overall and for every class the view has queries of (``classes``, largest first; the
report's ``largest_classes`` are the first 15 of them). ``AP@k`` is the sum of precision@i over
the ranks i <= k that hold an item of the query's type, divided by min(k, number of
such items in the catalog), so a query scores 1 only if its first min(k, n) results
are all right. The top-level ``catalog``, ``invariance`` and ``hnsw`` keys are the
random view's, as in reports before the views.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lookalike.artifacts import CHAMPION, ModelStore
from lookalike.catalog import CatalogItem
from lookalike.errors import LookalikeError
from lookalike.imaging import PreprocessSpec, decode_image, decode_pixels
from lookalike.model import EmbeddingNet
from lookalike.registry import GATE_METRIC
from lookalike.settings import CommonSettings, default_data
from training.data import MAX_FILE_BYTES, MAX_FILE_PIXELS, Split, load_labelled, load_pixels, select
from training.train import batches, embed_all, unit_rows

log = logging.getLogger(__name__)

REPORT_FORMAT = 1
K = 5
LARGEST_CLASSES = 15
# A shopper's photo of a catalog item: the natural 3:4 portrait, another size, JPEG.
INVARIANCE_SIZE = (120, 160)  # width, height
INVARIANCE_JPEG_QUALITY = 80
# The indexer's defaults (lookalike.settings / indexer.index).
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH = 64


def exact_neighbours(catalog: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Indices (Q, k) of each query's k nearest catalog rows by cosine, nearest first."""
    if not 1 <= k <= len(catalog):
        raise ValueError(f"need k in [1, {len(catalog)}], got {k}")
    catalog = unit_rows(catalog)
    queries = unit_rows(queries)
    out = np.empty((len(queries), k), np.int64)
    for idx in batches(len(queries), 1024):  # bounds the (Q, N) similarity matrix
        sims = queries[idx] @ catalog.T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1, kind="stable")
        out[idx] = np.take_along_axis(top, order, axis=1)
    return out


def hnsw_neighbours(catalog: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Indices (Q, k) from an hnswlib index built as the indexer builds it."""
    import hnswlib

    index = hnswlib.Index(space="cosine", dim=catalog.shape[1])
    index.init_index(max_elements=len(catalog), M=HNSW_M, ef_construction=HNSW_EF_CONSTRUCTION, random_seed=100)
    index.add_items(np.asarray(catalog, np.float32), np.arange(len(catalog)), num_threads=1)
    index.set_ef(HNSW_EF_SEARCH)
    labels, _ = index.knn_query(np.asarray(queries, np.float32), k=k, num_threads=1)
    return labels.astype(np.int64)


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each row of ``exact`` (Q, k) that ``found`` (Q, k) also holds."""
    return float(np.mean([len(set(f) & set(e)) / exact.shape[1] for f, e in zip(found, exact, strict=True)]))


def average_precision_at_k(same: np.ndarray, n_relevant: np.ndarray) -> np.ndarray:
    """AP@k per query from ``same`` (Q, k) bool (rank i is relevant) and relevant catalog items (Q,)."""
    same = np.asarray(same, bool)
    k = same.shape[1]
    precision_at_i = np.cumsum(same, axis=1) / np.arange(1, k + 1)  # (Q, k)
    denominator = np.minimum(np.asarray(n_relevant), k).clip(min=1)
    return (precision_at_i * same).sum(axis=1) / denominator


def query_scores(
    neighbours: np.ndarray, catalog_labels: np.ndarray, query_labels: np.ndarray
) -> dict[str, np.ndarray]:
    """Per-query ``top1``, ``precision_at_k`` and ``map_at_k`` (arrays of length Q)."""
    catalog_labels = np.asarray(catalog_labels)
    query_labels = np.asarray(query_labels)
    same = catalog_labels[neighbours] == query_labels[:, None]  # (Q, k)
    counts = Counter(catalog_labels.tolist())
    n_relevant = np.array([counts[label] for label in query_labels.tolist()])
    k = neighbours.shape[1]
    return {
        "top1": same[:, 0].astype(np.float64),
        f"precision_at_{k}": same.mean(axis=1),
        f"map_at_{k}": average_precision_at_k(same, n_relevant),
    }


def summarise(scores: dict[str, np.ndarray], query_labels: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Means overall and per class (for ``classes``), rounded for the report."""
    query_labels = np.asarray(query_labels)
    overall = {name: round(float(values.mean()), 4) for name, values in scores.items()}
    per_class = {}
    for name in classes:
        mask = query_labels == name
        per_class[name] = {"queries": int(mask.sum())} | {
            metric: round(float(values[mask].mean()), 4) if mask.any() else None for metric, values in scores.items()
        }
    return {"overall": overall | {"queries": len(query_labels)}, "per_class": per_class}


def shopper_pixels(path: Path, spec: PreprocessSpec) -> np.ndarray:
    """A catalog file as a shopper's photo of it (3:4, another size, JPEG q80), preprocessed by ``spec``."""
    img = decode_image(Path(path).read_bytes(), max_bytes=MAX_FILE_BYTES, max_pixels=MAX_FILE_PIXELS)
    out = io.BytesIO()
    img.resize(INVARIANCE_SIZE, Image.Resampling.BICUBIC).save(out, "JPEG", quality=INVARIANCE_JPEG_QUALITY)
    return decode_pixels(out.getvalue(), spec, max_bytes=MAX_FILE_BYTES, max_pixels=MAX_FILE_PIXELS)  # as served


def load_split(store: ModelStore, card_training: dict[str, Any], split_sha256: str | None) -> Split:
    """The split the model was trained on, checked against the card's checksum."""
    name = card_training.get("split_file") or f"splits/{split_sha256}.json"
    split = Split.load(store.root / name)
    if split_sha256 and split.sha256 != split_sha256:
        raise LookalikeError(f"split {name} has checksum {split.sha256[:12]}, the card names {split_sha256[:12]}")
    return split


def view_ids(split: Split) -> dict[str, tuple[str, ...]]:
    """Each view's query ids: ``random`` (the random held-out share), and for a split by
    period ``period`` (the newest ids) and ``unseen_brand`` (those of brands nothing trained on)."""
    views = {"random": split.test_ids}
    if split.scheme == "period":
        views |= {"period": split.period_ids, "unseen_brand": split.unseen_brand_ids}
    return views


def largest_classes(catalog_labels: np.ndarray, query_labels: np.ndarray, n: int | None = LARGEST_CLASSES) -> list[str]:
    """The ``n`` classes (None: all) with most catalog and query items together (ties by name)."""
    sizes = Counter(np.asarray(catalog_labels).tolist()) + Counter(np.asarray(query_labels).tolist())
    return [name for name, _ in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


def query_classes(catalog_labels: np.ndarray, query_labels: np.ndarray) -> list[str]:
    """Every class with at least one query, largest first (catalog and queries together; ties by name)."""
    asked = set(np.asarray(query_labels).tolist())
    return [name for name in largest_classes(catalog_labels, query_labels, None) if name in asked]


def measure_views(
    model: EmbeddingNet,
    spec: PreprocessSpec,
    split: Split,
    items: Sequence[CatalogItem],
    *,
    cache_dir: Path | None = None,
    hnsw: bool = True,
    progress: bool = False,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Every view of ``split`` (:func:`view_ids`): its queries, as catalog images and as shopper
    photos, searched exactly among the training split; overall and for the view's largest classes.

    The catalog is the training split for every view: next season's products are queried
    against the catalog the model was trained with, and neither a held-out query nor its
    shoot's siblings (neighbouring ids, also held out) are in it.
    """
    catalog_items = select(items, split.train_ids)
    catalog_labels = np.array([item.metadata[split.label] for item in catalog_items])
    catalog_vecs = embed_all(model, load_pixels(catalog_items, spec, cache_dir, progress=progress), spec,
                             precision=precision)
    out: dict[str, Any] = {}
    for view, ids in view_ids(split).items():
        if not ids:
            continue
        query_items = select(items, ids)
        query_labels = np.array([item.metadata[split.label] for item in query_items])
        classes = query_classes(catalog_labels, query_labels)
        shopper = np.stack([shopper_pixels(item.image_path, spec) for item in query_items])
        result: dict[str, Any] = {"queries": len(ids), "classes": classes,
                                  "largest_classes": largest_classes(catalog_labels, query_labels)}
        recalls: dict[str, float] = {}
        for name, pixels in (("catalog", load_pixels(query_items, spec, cache_dir, progress=progress)),
                             ("invariance", shopper)):
            queries = embed_all(model, pixels, spec, precision=precision)
            exact = exact_neighbours(catalog_vecs, queries, K)
            result[name] = summarise(query_scores(exact, catalog_labels, query_labels), query_labels, classes)
            if hnsw:
                recalls[f"recall_at_{K}_{name}"] = round(recall_at_k(hnsw_neighbours(catalog_vecs, queries, K), exact), 4)
        if hnsw:
            result["hnsw"] = recalls
        out[view] = result
    return out


def card_metrics(views: dict[str, Any]) -> dict[str, float]:
    """The figures a model card keeps from :func:`measure_views` (shopper photos unless named
    ``catalog``); ``period_precision_at_5`` is the promotion gate's."""
    metrics: dict[str, float] = {}
    for view, result in views.items():
        shopper, catalog = result["invariance"]["overall"], result["catalog"]["overall"]
        prefix = "" if view == "random" else f"{view}_"
        if view == "random":
            metrics |= {"shopper_precision_at_5": shopper[f"precision_at_{K}"]}
            continue
        metrics |= {
            f"{prefix}precision_at_{K}": shopper[f"precision_at_{K}"],
            f"{prefix}top1": shopper["top1"],
            f"{prefix}map_at_{K}": shopper[f"map_at_{K}"],
            f"{prefix}catalog_precision_at_{K}": catalog[f"precision_at_{K}"],
            f"{prefix}queries": result["queries"],
        }
    return metrics


def evaluate(
    store: ModelStore,
    version: str | None,
    data_folder: Path,
    *,
    resize: str | None = None,
    flip_average: bool | None = None,
    cache_dir: Path | None = None,
    progress: bool = False,
    precision: str = "fp32",
) -> dict[str, Any]:
    """The report (plain JSON) for model ``version`` (or alias; None: champion) on its golden split.

    ``resize`` ("stretch" or "pad") overrides the card's preprocessing for catalog and
    queries alike, to measure what serving with the other one would give; ``flip_average``
    overrides the spec's averaging with the mirror image likewise; ``precision`` "bf16"
    embeds catalog and queries under bfloat16 autocast, as workers on CPUs with AMX serve.
    """
    started = time.perf_counter()
    model, card = store.load(version)
    spec = card.preprocess
    if resize is not None and resize != spec.resize:
        spec = PreprocessSpec(size=spec.size, resize=resize, mean=spec.mean, std=spec.std)  # type: ignore[arg-type]
    if flip_average is not None:
        model.spec = replace(model.spec, flip_average=flip_average)
    split = load_split(store, card.training, card.data_split_sha256)
    if list(split.classes) != list(card.classes):
        raise LookalikeError(f"model {card.version}'s classes differ from its split's")
    items = load_labelled(Path(data_folder), min_count=1, label=split.label)
    views = measure_views(model, spec, split, items, cache_dir=cache_dir, progress=progress, precision=precision)
    random_view = views["random"]
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "model_version": card.version,
        "arch": card.spec.arch,
        "flip_average": model.spec.flip_average,
        "precision": precision,
        "preprocess": spec.to_dict(),
        "card_preprocess_resize": card.preprocess.resize,
        "data": str(data_folder),
        "split_sha256": split.sha256,
        "split_scheme": split.scheme,
        "first_period_id": split.first_period_id,
        "catalog_size": len(split.train_ids),
        "query_size": len(split.test_ids),
        "k": K,
        "invariance_queries": {
            "size": list(INVARIANCE_SIZE),
            "format": "JPEG",
            "quality": INVARIANCE_JPEG_QUALITY,
            "how": "catalog test image stretched to a 3:4 portrait, re-encoded, preprocessed as served",
        },
        # the random view at the top level, as reports before the views had it
        "largest_classes": random_view["largest_classes"],
        "catalog": random_view["catalog"],
        "invariance": random_view["invariance"],
        "hnsw": {"M": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION, "ef": HNSW_EF_SEARCH} | random_view["hnsw"],
        "views": views,
        "gate_metric": {"name": GATE_METRIC, "value": card_metrics(views).get(GATE_METRIC)},
        # a model trained again on every item (training.final_fit "all") has seen the views'
        # queries: its figures here are not held out; its card's are its recipe's
        "trained_on_all": (card.training.get("final_fit") or {}).get("items"),
    }
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


VIEW_TITLES = {
    "random": "random held-out share (siblings in the catalog)",
    "period": "newest ids held out (next season)",
    "unseen_brand": "newest ids, brands never trained on",
}


def render_markdown(report: dict[str, Any]) -> str:
    """A short Markdown summary: one row per view and query set, then each view's largest classes."""
    k = report["k"]
    metrics = ("top1", f"precision_at_{k}", f"map_at_{k}")
    views = report.get("views") or {"random": {"queries": report["query_size"], "catalog": report["catalog"],
                                               "invariance": report["invariance"], "hnsw": report["hnsw"],
                                               "largest_classes": report["largest_classes"]}}
    scheme = report.get("split_scheme", "random")
    lines = [
        f"# Evaluation of model {report['model_version']} ({report['arch']})",
        "",
        f"Golden split {report['split_sha256'][:12]} ({scheme}): {report['catalog_size']} catalog items (the "
        f"training split); preprocessing {report['preprocess']['resize']} to {report['preprocess']['size']} px"
        f"{', mirror-averaged embeddings' if report.get('flip_average') else ''}"
        f"{', embedded under bfloat16 autocast' if report.get('precision') == 'bf16' else ''}; exact cosine search, judged by "
        "articleType; shopper photos: 3:4, 120x160, JPEG q80.",
        "",
        f"| view | queries | photos | top-1 | P@{k} | mAP@{k} | HNSW recall@{k} |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for view, result in views.items():
        for name, title in (("catalog", "catalog"), ("invariance", "shopper")):
            o = result[name]["overall"]
            recall = result["hnsw"].get(f"recall_at_{k}_{name}")
            lines.append(f"| {VIEW_TITLES.get(view, view)} | {result['queries']} | {title} | "
                         + " | ".join(f"{o[m]:.3f}" for m in metrics)
                         + f" | {'-' if recall is None else f'{recall:.3f}'} |")
    if report.get("trained_on_all"):
        lines += ["", f"**Not held out:** this model was trained on all {report['trained_on_all']} labelled items, "
                  "these queries included (`final_fit` all); the figures that judge its recipe are its card's, "
                  "measured on the recipe's run before it was trained again."]
    gate = report.get("gate_metric") or {}
    if gate.get("value") is not None:
        lines += ["", f"The promotion gate decides on {gate['name']}: {gate['value']:.4f}."]
    lines += [
        "",
        f"HNSW: hnswlib cosine, M={report['hnsw']['M']}, ef_construction={report['hnsw']['ef_construction']}, "
        f"ef={report['hnsw']['ef']}, against exact search of the same vectors.",
    ]
    for view, result in views.items():
        classes = result.get("classes", result["largest_classes"])  # reports before every class was kept
        lines += [
            "",
            f"## {VIEW_TITLES.get(view, view)}: per class ({len(classes)} classes with queries, largest first)",
            "",
            f"| class | queries | top-1 | P@{k} | mAP@{k} | shopper P@{k} |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for name in classes:
            row, inv = result["catalog"]["per_class"][name], result["invariance"]["per_class"][name]
            if not row["queries"]:
                continue
            cells = [f"{row[m]:.3f}" for m in metrics] + [f"{inv[f'precision_at_{k}']:.3f}"]
            lines.append(f"| {name} | {row['queries']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lookalike evaluate",
        description="Retrieval report of a stored model on its golden split (JSON + Markdown).",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=default_data(),
        help="catalog folder the model was trained on (env LOOKALIKE_DATA; default %(default)s)",
    )
    parser.add_argument("--model", default=CHAMPION, help="version or alias (default %(default)s)")
    parser.add_argument("--model-dir", type=Path, default=None, help="model store (default: LOOKALIKE_MODEL_DIR)")
    parser.add_argument("--out", type=Path, default=None, help="write report.json and report.md into this folder")
    parser.add_argument(
        "--resize", choices=["stretch", "pad"], default=None, help="override the card's preprocessing (to compare)"
    )
    parser.add_argument(
        "--flip-average", action=argparse.BooleanOptionalAction, default=None,
        help="override the spec's averaging with the mirror image (to compare)",
    )
    parser.add_argument(
        "--precision", choices=["fp32", "bf16"], default="fp32",
        help="embed in float32 (as trained and gated) or under bfloat16 autocast (as a worker on a CPU with AMX)",
    )
    parser.add_argument("--cache-dir", type=Path, default=None, help="decoded-pixel cache ($LOOKALIKE_HOME/cache)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``lookalike evaluate``; prints the Markdown report; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    store = ModelStore(args.model_dir or CommonSettings().models_path)
    if not args.data.is_dir():
        print(f"error: no catalog folder at {args.data} (set --data or LOOKALIKE_DATA)", file=sys.stderr)
        return 2
    try:
        report = evaluate(
            store, args.model, args.data, resize=args.resize, flip_average=args.flip_average,
            cache_dir=args.cache_dir, progress=not args.quiet, precision=args.precision,
        )
    except (LookalikeError, OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    markdown = render_markdown(report)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n", "utf-8")
        (args.out / "report.md").write_text(markdown, "utf-8")
    print(markdown, end="")
    if args.out is not None:
        print(f"written: {args.out / 'report.json'}, {args.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
