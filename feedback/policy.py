"""The retraining policy, pure: from the aggregator's numbers to the reasons a training is due.

Four reasons, each with its knob in :class:`lookalike.settings.FeedbackSettings` (0 turns it off):

* ``feedback_volume``: at least ``trigger_min_feedback`` new labelled events (click,
  add-to-cart, purchase, dismiss) since the last training;
* ``metric_drop``: the serving model's recent window is worse than its own baseline window
  (its first minutes in service) by ``trigger_drop_fraction``, with enough impressions in both;
* ``catalog_growth``: the catalog grew by ``trigger_catalog_growth`` since the serving model
  was indexed (its catalog once settled, :meth:`lookalike.ledger.FeedbackLedger.catalog_baseline`)
  or since the last training, whichever was larger;
* ``query_drift``: ``1 - cos(mean query vector, mean catalog vector)`` over samples kept
  in Redis is above ``trigger_drift``, with enough queries, *and* above what ``n`` catalog
  vectors give against the rest of the sample 99 times in 100 (:func:`drift_null`): the catalog's
  vectors spread over the sphere (the demo's mean vector has a norm of 0.09), so the mean
  of a few hundred queries that look exactly like the catalog is far from its mean by
  chance alone (167 random catalog items: 0.145 median, 0.39 at the 99th percentile).

All due reasons go into one trigger. :func:`emit_decision` here and
:func:`lookalike.ledger.trainer_decision` are the de-duplication rules on each side of the
triggers topic.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from lookalike.events import Reason
from lookalike.settings import FeedbackSettings


@dataclass(frozen=True)
class TriggerPolicy:
    min_feedback: int = 1000
    drop_metric: str = "ctr_at_5"
    drop_fraction: float = 0.2
    min_impressions: int = 200
    catalog_growth: float = 0.2
    drift: float = 0.1
    drift_min_queries: int = 100
    cooldown_s: float = 3600.0

    @classmethod
    def from_settings(cls, s: FeedbackSettings) -> TriggerPolicy:
        return cls(s.trigger_min_feedback, s.trigger_drop_metric, s.trigger_drop_fraction, s.trigger_min_impressions,
                   s.trigger_catalog_growth, s.trigger_drift, s.trigger_drift_min_queries, s.trigger_cooldown_s)


@dataclass(frozen=True)
class PolicyInputs:
    """What the aggregator measured, for the serving model version."""

    model_version: str | None
    new_feedback: int = 0
    baseline: Mapping[str, Any] | None = None  # metrics of the model's first window; None: not enough history yet
    recent: Mapping[str, Any] | None = None  # metrics of the latest window
    catalog_items: int | None = None
    catalog_baseline: int | None = None  # items of the catalog growth is measured from (FeedbackLedger.catalog_baseline)
    drift: float | None = None
    drift_queries: int = 0
    drift_null: float | None = None  # the drift of as many random catalog vectors, 99th percentile
    seconds_since_training: float | None = None  # None: no training recorded


def mean_cosine_drift(queries: np.ndarray, catalog: np.ndarray) -> float | None:
    """``1 - cos(mean(queries), mean(catalog))`` of two (N, D) samples; None if either is empty or averages to 0.

    0 when queries look, on average, like the catalog; it grows as they move away
    (up to 2). Coarse by design: it sees a shift of the whole query population, not of a niche.
    """
    if len(queries) == 0 or len(catalog) == 0 or queries.shape[1] != catalog.shape[1]:
        return None  # nothing to compare, or samples of two sizes (a hostile record's): no figure
    q = np.asarray(queries, np.float64).mean(axis=0)
    c = np.asarray(catalog, np.float64).mean(axis=0)
    nq, nc = np.linalg.norm(q), np.linalg.norm(c)
    if nq == 0 or nc == 0:
        return None
    return float(1.0 - q @ c / (nq * nc))


def drift_null(catalog: np.ndarray, n: int, *, draws: int = 200, quantile: float = 0.99,
               seed: int = 0) -> float | None:
    """What :func:`mean_cosine_drift` gives when ``n`` queries look exactly like the catalog:
    its ``quantile`` over ``draws`` random splits of the catalog sample. A query drift below
    it is sampling noise, not a change of the queries.

    Each split draws ``m = min(n, len(catalog) // 2)`` rows as the queries and compares them
    with the mean of the *other* rows. Real queries are not rows of the sample, so the rows
    drawn must not be part of the mean they are compared with: drawn from the sample and
    compared with its whole mean, 206 rows of a 479-row sample sat much closer to it than
    206 independent catalog items do, the null came out at 0.254, and the bench's random
    catalog queries (0.349) retrained the demo's model. With fewer rows than ``2 n`` the
    split's query side is smaller than ``n``: the null is then wider, never narrower."""
    if n <= 0 or len(catalog) < 2:
        return None
    rng = np.random.default_rng(seed)
    vectors = np.asarray(catalog, np.float64)
    rows = len(vectors)
    m = min(n, rows // 2)
    # Each split as a row of 0/1 weights (the m rows with the smallest random keys), so that
    # all the splits' sums are one matrix product: this runs at policy evaluations.
    keys = rng.random((draws, rows))
    drawn = (keys <= np.partition(keys, m - 1, axis=1)[:, m - 1:m]).astype(np.float64)
    sums = drawn @ vectors  # (draws, D)
    queries = sums / m
    rest = (vectors.sum(axis=0) - sums) / (rows - m)
    norms = np.linalg.norm(queries, axis=1) * np.linalg.norm(rest, axis=1)
    kept = norms > 0
    if not kept.any():
        return None
    return float(np.quantile(1.0 - np.einsum("ij,ij->i", queries[kept], rest[kept]) / norms[kept], quantile))


def due_reasons(inputs: PolicyInputs, policy: TriggerPolicy) -> list[Reason]:
    """Every reason to retrain that is due now (empty: none, or still in the cool-down)."""
    if inputs.seconds_since_training is not None and inputs.seconds_since_training < policy.cooldown_s:
        return []
    reasons: list[Reason] = []
    if policy.min_feedback and inputs.new_feedback >= policy.min_feedback:
        reasons.append(Reason("feedback_volume",
                              f"{inputs.new_feedback} new feedback events since the last training "
                              f"(threshold {policy.min_feedback})",
                              {"new_feedback": inputs.new_feedback, "threshold": policy.min_feedback}))
    drop = metric_drop(inputs, policy)
    if drop is not None:
        reasons.append(drop)
    if policy.catalog_growth and inputs.catalog_items is not None and inputs.catalog_baseline:
        growth = (inputs.catalog_items - inputs.catalog_baseline) / inputs.catalog_baseline
        if growth >= policy.catalog_growth:
            reasons.append(Reason("catalog_growth",
                                  f"the catalog grew by {growth:.1%} since the serving model was indexed or "
                                  f"last retrained ({inputs.catalog_baseline} -> {inputs.catalog_items} items)",
                                  {"catalog_items": inputs.catalog_items,
                                   "catalog_baseline": inputs.catalog_baseline,
                                   "growth": round(growth, 6), "threshold": policy.catalog_growth}))
    if (policy.drift and inputs.drift is not None and inputs.drift_queries >= policy.drift_min_queries
            and inputs.drift >= policy.drift and (inputs.drift_null is None or inputs.drift > inputs.drift_null)):
        null = "" if inputs.drift_null is None else f"; random catalog samples: {inputs.drift_null:.4f}"
        reasons.append(Reason("query_drift",
                              f"queries drifted from the catalog: 1 - cos of the mean vectors is {inputs.drift:.4f} "
                              f"(threshold {policy.drift}, {inputs.drift_queries} queries{null})",
                              {"drift": round(inputs.drift, 6), "queries": inputs.drift_queries,
                               "threshold": policy.drift,
                               "null_99": None if inputs.drift_null is None else round(inputs.drift_null, 6)}))
    return reasons


def metric_drop(inputs: PolicyInputs, policy: TriggerPolicy) -> Reason | None:
    """The ``metric_drop`` reason, when the recent window is worse than the baseline by the fraction."""
    if not policy.drop_fraction or inputs.baseline is None or inputs.recent is None:
        return None
    name = policy.drop_metric
    base, recent = inputs.baseline.get(name), inputs.recent.get(name)
    enough = (inputs.baseline.get("impressions", 0) >= policy.min_impressions
              and inputs.recent.get("impressions", 0) >= policy.min_impressions)
    if base is None or recent is None or not enough or base <= 0:
        return None
    if recent > base * (1 - policy.drop_fraction):
        return None
    return Reason("metric_drop",
                  f"{name} fell from {base:.4f} (baseline) to {recent:.4f} (recent), "
                  f"more than {policy.drop_fraction:.0%}",
                  {"metric": name, "baseline": round(base, 6), "recent": round(recent, 6),
                   "baseline_impressions": inputs.baseline.get("impressions"),
                   "recent_impressions": inputs.recent.get("impressions"), "threshold": policy.drop_fraction})


Emit = Literal["emit", "nothing_due", "training_running", "trigger_pending"]


def emit_decision(reasons: list[Reason], *, lease_held: bool, trigger_pending: bool) -> Emit:
    """Whether the aggregator may emit a trigger now. While a trainer holds its lease, or a
    trigger is already out and not yet taken, a due trigger is absorbed: one trigger per training."""
    if not reasons:
        return "nothing_due"
    if lease_held:
        return "training_running"
    if trigger_pending:
        return "trigger_pending"
    return "emit"
