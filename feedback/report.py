"""``lookalike metrics``: the aggregator's windows read back from Redis, per model version.

Every figure is per model version, drift included: during a rollout the old and the new
model embed queries into different spaces, so their query samples are compared each with
its own version's catalog sample, never pooled (:func:`version_drift`).
"""

from __future__ import annotations

import time
from typing import Any

import redis

from feedback import windows as w
from feedback.policy import mean_cosine_drift
from feedback.store import FeedbackStore
from lookalike.settings import FeedbackSettings
from lookalike.status import indexer_status


def indexed_catalogs(settings: FeedbackSettings) -> dict[str, int]:
    """Per model version ("" for an indexer that names none), the largest item count a live
    indexer reports for it ({} when Redis is away)."""
    try:
        statuses = indexer_status(settings, settings.indexer_group)
    except redis.RedisError:
        return {}
    sizes: dict[str, int] = {}
    for status in statuses:
        sizes[status.model_version] = max(sizes.get(status.model_version, 0), status.items)
    return sizes


def catalog_items(settings: FeedbackSettings) -> int | None:
    """The catalog's size as the aggregator counts it: the largest item count a live indexer reports."""
    sizes = indexed_catalogs(settings)
    return max(sizes.values()) if sizes else None


def metrics_report(settings: FeedbackSettings, *, model_version: str | None = None, minutes: float | None = None,
                   store: FeedbackStore | None = None, now_ms: int | None = None) -> dict[str, Any]:
    """Per model version, the metrics over the last ``minutes`` (None: every bucket kept), plus the totals."""
    store = store or FeedbackStore.connect(settings)
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    catalog = catalog_items(settings)
    models = [model_version] if model_version else store.models()
    out: dict[str, Any] = {"window_minutes": minutes, "bucket_s": settings.bucket_s, "catalog_items": catalog,
                           "models": {}}
    for model in models:
        buckets = list(w.window(now_ms, minutes, settings.bucket_s)) if minutes else store.buckets(model)
        drift, drift_queries = version_drift(store, model, buckets)
        out["models"][model] = {"buckets": len(buckets), **store.window_metrics(model, buckets, catalog),
                                "drift": drift, "drift_queries": drift_queries}
    out["totals"] = store.totals()
    out["last_training"] = store.last_training()
    out["trigger_pending"] = store.trigger_pending()
    out["trainer_lease"] = store.lease_holder()
    return out


def version_drift(store: FeedbackStore, model: str, buckets: list[int]) -> tuple[float | None, int]:
    """``1 - cos(mean query vector, mean catalog vector)`` of one model version over ``buckets``:
    its own queries against its own catalog sample; and how many query vectors were sampled."""
    queries = store.query_samples(model, buckets)
    if not len(queries):
        return None, 0
    return mean_cosine_drift(queries, store.catalog_sample(model)), len(queries)


def metrics_series(settings: FeedbackSettings, *, model_version: str | None = None, minutes: float | None = None,
                   store: FeedbackStore | None = None, now_ms: int | None = None) -> dict[str, list[dict[str, Any]]]:
    """Per model version, one row per bucket it has (oldest first): ``t`` (the bucket's start,
    seconds since the epoch), the bucket's metrics and its drift. For ``--plot`` and the loop's timeline."""
    store = store or FeedbackStore.connect(settings)
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    first = w.window(now_ms, minutes, settings.bucket_s).start if minutes else None
    catalog = catalog_items(settings)
    catalog_vectors: dict[str, Any] = {}
    out: dict[str, list[dict[str, Any]]] = {}
    for model in [model_version] if model_version else store.models():
        rows = []
        for bucket in store.buckets(model):
            if first is not None and bucket < first:
                continue
            if model not in catalog_vectors:
                catalog_vectors[model] = store.catalog_sample(model)
            queries = store.query_samples(model, [bucket])
            drift = mean_cosine_drift(queries, catalog_vectors[model]) if len(queries) else None
            rows.append({"t": bucket * settings.bucket_s, **store.window_metrics(model, [bucket], catalog),
                         "drift": drift, "drift_queries": len(queries)})
        out[model] = rows
    return out


COLUMNS = [("replies", "replies", "{}"), ("events", "events", "{}"), ("impressions", "impr", "{}"),
           ("clicks", "clicks", "{}"), ("ctr_at_5", "CTR@5", "{:.3f}"), ("add_to_cart_rate", "cart", "{:.3f}"),
           ("purchase_rate", "purchase", "{:.3f}"), ("dismiss_rate", "dismiss", "{:.3f}"),
           ("mean_click_rank", "click rank", "{:.2f}"), ("coverage", "coverage", "{:.3f}"), ("drift", "drift", "{:.4f}")]


def render_table(report: dict[str, Any]) -> str:
    """A fixed-width table for people, one row per model version."""
    width = max([len("model version"), *(len(m) for m in report["models"])])
    lines = [f"{'model version':{width}}  " + "  ".join(f"{title:>10}" for _, title, _ in COLUMNS)]
    for model, m in report["models"].items():
        cells = ["-" if m.get(name) is None else fmt.format(m[name]) for name, _, fmt in COLUMNS]
        lines.append(f"{model:{width}}  " + "  ".join(f"{cell:>10}" for cell in cells))
    if not report["models"]:
        lines.append("(no replies seen yet)")
    span = f"last {report['window_minutes']:g} min" if report["window_minutes"] else "everything kept"
    lines.append(f"window: {span}, buckets of {report['bucket_s']} s; catalog: {report['catalog_items']} items")
    lines.append(f"totals: {report['totals']}")
    lines.append(f"last training: {report['last_training']}; trigger pending: {report['trigger_pending']}; "
                 f"trainer lease: {report['trainer_lease']}")
    return "\n".join(lines)


def trigger_records(limit: int, settings: FeedbackSettings | None = None) -> list[dict[str, Any]]:
    """The newest trigger records (lookalike/ledger.py): what became of each retraining
    trigger; [] when Redis is not reachable."""
    try:
        return FeedbackStore.connect(settings or FeedbackSettings()).triggers(limit)
    except redis.RedisError:
        return []


def trigger_line(record: dict[str, Any]) -> str:
    """One trigger record as a line of `lookalike models list` and `lookalike status`."""
    raised = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(int(record.get("raised_ms") or 0) / 1000))
    detail = record.get("outcome") or record.get("why") or record.get("holder") or ""
    what = record["state"] + (f" ({detail})" if detail else "")
    if record.get("challenger"):
        what += f" -> {record['challenger']}"
    return f"{record['trigger_id'][:12]}  raised {raised}Z  {','.join(record.get('reasons', []))}: {what}"
