"""The aggregator's pure parts: time buckets, what a reply tells, what an event adds, the metrics.

Metrics are kept per model version and per time bucket (``LOOKALIKE_BUCKET_S``, one
minute by default) as plain counters; a window is a run of buckets and its metrics are
ratios of the summed counters, so any window can be read back from the same buckets.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lookalike import contracts as c
from lookalike.errors import InvalidMessage
from lookalike.events import FeedbackEvent

AT_K = 5  # CTR@5: clicks and impressions of the top 5 results
POSITIVE_EVENTS = ("click", "add_to_cart", "purchase")  # a training pair labelled +1
NEGATIVE_EVENTS = ("dismiss",)  # -1
LABELLED_EVENTS = POSITIVE_EVENTS + NEGATIVE_EVENTS  # "new feedback" for the trigger policy

# The counters of one (model version, bucket); every metric is a ratio of these.
COUNTERS = (
    "replies",  # ok replies the model gave
    "events",  # feedback events joined to their reply (all kinds)
    "impressions",
    "impressions_at_5",  # impressions of items shown at rank 1..5
    "clicks",
    "clicks_at_5",
    "clicks_ranked",  # clicks on an item the reply did show (the rest have no rank)
    "click_rank_sum",  # sum of the 1-based ranks of those clicks
    "add_to_cart",
    "purchases",
    "dismisses",
    "unranked",  # events about an item the reply did not show
)
EVENT_COUNTER = {"impression": "impressions", "click": "clicks", "add_to_cart": "add_to_cart",
                 "purchase": "purchases", "dismiss": "dismisses"}


def bucket_of(timestamp_ms: int, bucket_s: int) -> int:
    """The bucket a moment falls in: whole ``bucket_s`` periods since the epoch."""
    return timestamp_ms // (bucket_s * 1000)


def window(now_ms: int, minutes: float, bucket_s: int) -> range:
    """The buckets of the last ``minutes`` up to and including the current one."""
    last = bucket_of(now_ms, bucket_s)
    n = max(1, round(minutes * 60 / bucket_s))
    return range(last - n + 1, last + 1)


def leading_window(first_bucket: int, minutes: float, bucket_s: int) -> range:
    """The first ``minutes`` of buckets from ``first_bucket`` (a model's baseline)."""
    n = max(1, round(minutes * 60 / bucket_s))
    return range(first_bucket, first_bucket + n)


@dataclass(frozen=True)
class ReplyFacts:
    """What the join needs from a reply: which model answered, what it showed in rank order,
    and the item a "more like this" query named (None: an image query, or an indexer older
    than the reply's ``query_item_id``, whose query-vector record then brings it)."""

    request_id: str
    model_version: str
    items: tuple[str, ...]
    query_item: str | None = None


def reply_facts(value: bytes | None) -> ReplyFacts | None:
    """An ok reply -> its facts; None for error replies and anything that is not a reply."""
    try:
        doc = c.parse_reply(value)
    except InvalidMessage:
        return None
    if doc["status"] != "ok" or not isinstance(doc.get("model_version"), str):
        return None
    return ReplyFacts(doc["request_id"], doc["model_version"], tuple(hit["item_id"] for hit in doc["results"]),
                      doc.get("query_item_id"))


def rank_of(item_id: str, items: Iterable[str]) -> int | None:
    """1-based position of ``item_id`` in the reply's results, None if it was not shown."""
    for rank, shown in enumerate(items, start=1):
        if shown == item_id:
            return rank
    return None


def increments(event: FeedbackEvent, rank: int | None) -> dict[str, int]:
    """The counters one joined event adds to its (model version, bucket)."""
    out = {"events": 1, EVENT_COUNTER[event.event]: 1}
    if rank is None:
        out["unranked"] = 1
        return out
    if event.event == "impression" and rank <= AT_K:
        out["impressions_at_5"] = 1
    if event.event == "click":
        out["clicks_ranked"] = 1
        out["click_rank_sum"] = rank
        if rank <= AT_K:
            out["clicks_at_5"] = 1
    return out


def pair_label(event: FeedbackEvent) -> int | None:
    """+1 / -1 for a training pair (query item, this item), None for events that teach nothing."""
    if event.event in POSITIVE_EVENTS:
        return 1
    if event.event in NEGATIVE_EVENTS:
        return -1
    return None


def add_counts(total: dict[str, int], counts: Mapping[str, Any]) -> dict[str, int]:
    for name in COUNTERS:
        total[name] = total.get(name, 0) + int(counts.get(name, 0) or 0)
    return total


def ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def metrics(counts: Mapping[str, int], distinct_items: int, catalog_items: int | None) -> dict[str, Any]:
    """The window's metrics from its summed counters (None where the denominator is 0)."""
    impressions = counts.get("impressions", 0)
    return {
        "replies": counts.get("replies", 0),
        "events": counts.get("events", 0),
        "impressions": impressions,
        "clicks": counts.get("clicks", 0),
        "ctr_at_5": ratio(counts.get("clicks_at_5", 0), counts.get("impressions_at_5", 0)),
        "add_to_cart_rate": ratio(counts.get("add_to_cart", 0), impressions),
        "purchase_rate": ratio(counts.get("purchases", 0), impressions),
        "dismiss_rate": ratio(counts.get("dismisses", 0), impressions),
        "mean_click_rank": ratio(counts.get("click_rank_sum", 0), counts.get("clicks_ranked", 0)),
        "distinct_items_shown": distinct_items,
        "catalog_items": catalog_items,
        "coverage": ratio(distinct_items, catalog_items or 0),
    }
