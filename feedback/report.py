"""``lookalike metrics``: the aggregator's windows read back from Redis, per model version."""

from __future__ import annotations

import time
from typing import Any

from feedback import windows as w
from feedback.service import Aggregator
from feedback.store import FeedbackStore
from lookalike.settings import FeedbackSettings


def metrics_report(settings: FeedbackSettings, *, model_version: str | None = None, minutes: float | None = None,
                   store: FeedbackStore | None = None, now_ms: int | None = None) -> dict[str, Any]:
    """Per model version, the metrics over the last ``minutes`` (None: every bucket kept), plus the totals."""
    store = store or FeedbackStore.connect(settings)
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    catalog = Aggregator(settings, store).catalog_items()
    models = [model_version] if model_version else store.models()
    out: dict[str, Any] = {"window_minutes": minutes, "bucket_s": settings.bucket_s, "catalog_items": catalog,
                           "models": {}}
    for model in models:
        buckets = list(w.window(now_ms, minutes, settings.bucket_s)) if minutes else store.buckets(model)
        out["models"][model] = {"buckets": len(buckets), **store.window_metrics(model, buckets, catalog)}
    out["totals"] = store.totals()
    out["last_training"] = store.last_training()
    out["trigger_pending"] = store.trigger_pending()
    out["trainer_lease"] = store.lease_holder()
    return out


COLUMNS = [("replies", "replies", "{}"), ("events", "events", "{}"), ("impressions", "impr", "{}"),
           ("clicks", "clicks", "{}"), ("ctr_at_5", "CTR@5", "{:.3f}"), ("add_to_cart_rate", "cart", "{:.3f}"),
           ("purchase_rate", "purchase", "{:.3f}"), ("dismiss_rate", "dismiss", "{:.3f}"),
           ("mean_click_rank", "click rank", "{:.2f}"), ("coverage", "coverage", "{:.3f}")]


def render_table(report: dict[str, Any]) -> str:
    """A fixed-width table for people, one row per model version."""
    width = max([len("model version"), *(len(m) for m in report["models"])])
    lines = [f"{'model version':{width}}  " + "  ".join(f"{title:>10}" for _, title, _ in COLUMNS)]
    for model, m in report["models"].items():
        cells = ["-" if m[name] is None else fmt.format(m[name]) for name, _, fmt in COLUMNS]
        lines.append(f"{model:{width}}  " + "  ".join(f"{cell:>10}" for cell in cells))
    if not report["models"]:
        lines.append("(no replies seen yet)")
    span = f"last {report['window_minutes']:g} min" if report["window_minutes"] else "everything kept"
    lines.append(f"window: {span}, buckets of {report['bucket_s']} s; catalog: {report['catalog_items']} items")
    lines.append(f"totals: {report['totals']}")
    lines.append(f"last training: {report['last_training']}; trigger pending: {report['trigger_pending']}; "
                 f"trainer lease: {report['trainer_lease']}")
    return "\n".join(lines)
