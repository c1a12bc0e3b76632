"""Simulated shoppers: they ask with product photos, look at the 5 results and act on them.

The behaviour model (:class:`Behaviour`, :func:`decide`) is pure and documented in
docs/feedback.md#shoppers: a result of the query product's type (``articleType``) is
more likely to be clicked, a higher rank more likely than a lower one; a click may lead
to the cart and the cart to a purchase; a result of another type may be dismissed; a
click may lead to a "more like this" query for the clicked item (those make the training
pairs, docs/feedback.md#the-trainer). :class:`ShopperRun` sends such shoppers against a
live stack at a chosen rate and keeps one :class:`QueryRecord` per query.
"""

from __future__ import annotations

import io
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from lookalike.catalog import CatalogItem
from lookalike.errors import ReplyTimeout
from lookalike.settings import ClientSettings
from producers.feedback import FeedbackProducer
from producers.query_client import QueryClient

log = logging.getLogger(__name__)

LABEL = "articleType"  # the product type a result is judged by (the reply's metadata)


def shopper_photo(path: Path, width: int = 300, height: int = 400) -> bytes:
    """A catalog image as a shopper would send it: portrait 3:4, another size, re-encoded."""
    with Image.open(path) as img:
        out = io.BytesIO()
        img.convert("RGB").resize((width, height), Image.Resampling.BICUBIC).save(out, "JPEG", quality=90)
        return out.getvalue()


@dataclass(frozen=True)
class Behaviour:
    """What a shopper does with the results shown; every probability is per result.

    P(click | rank r) = (``click_same`` if the result has the query's type else
    ``click_other``) x ``rank_decay`` ** (r - 1). A clicked result goes to the cart with
    ``cart_after_click``, a carted one is bought with ``purchase_after_cart``. A result
    of another type that was not clicked is dismissed with ``dismiss_other``. After a
    click, the shopper asks "more like this" of the clicked item with ``more_like_this``.
    """

    click_same: float = 0.35
    click_other: float = 0.04
    rank_decay: float = 0.85
    cart_after_click: float = 0.3
    purchase_after_cart: float = 0.5
    dismiss_other: float = 0.2
    more_like_this: float = 0.25

    def click_probability(self, same_type: bool, rank: int) -> float:
        return (self.click_same if same_type else self.click_other) * self.rank_decay ** (rank - 1)


@dataclass(frozen=True)
class Action:
    event: str  # click, add_to_cart, purchase, dismiss
    item_id: str
    rank: int  # 1-based


def result_label(hit: dict[str, Any]) -> str | None:
    meta = hit.get("metadata") or {}
    label = meta.get(LABEL)
    return str(label) if label is not None else None


def decide(query_label: str | None, results: Sequence[dict[str, Any]], behaviour: Behaviour,
           rng: random.Random) -> list[Action]:
    """The shopper's actions on one reply's results (in rank order), drawn from ``rng``."""
    actions: list[Action] = []
    for rank, hit in enumerate(results, start=1):
        item_id = str(hit["item_id"])
        same = query_label is not None and result_label(hit) == query_label
        if rng.random() < behaviour.click_probability(same, rank):
            actions.append(Action("click", item_id, rank))
            if rng.random() < behaviour.cart_after_click:
                actions.append(Action("add_to_cart", item_id, rank))
                if rng.random() < behaviour.purchase_after_cart:
                    actions.append(Action("purchase", item_id, rank))
        elif not same and rng.random() < behaviour.dismiss_other:
            actions.append(Action("dismiss", item_id, rank))
    return actions


def precision_at_k(query_label: str | None, results: Sequence[dict[str, Any]], k: int = 5) -> float | None:
    """Share of the top ``k`` results that have the query's type (None without a label or results)."""
    top = list(results)[:k]
    if query_label is None or not top:
        return None
    return sum(result_label(hit) == query_label for hit in top) / len(top)


@dataclass
class QueryRecord:
    """One shopper query as the shopper saw it."""

    sent_at: float  # time.time()
    latency_s: float
    status: str  # ok, error (an error reply), timeout (no reply in time)
    kind: str  # photo, more_like_this
    model_version: str | None = None
    precision_at_5: float | None = None
    clicks_at_5: int = 0
    events: int = 0  # feedback events sent (impressions included)
    error: str | None = None


@dataclass
class ShopperRun:
    """Shoppers asking a live stack, ``lanes`` at a time, ``rate`` queries a second in all.

    ``photos``: the products shoppers photograph (their ``label`` is the query's type).
    Each lane has its own query client; each query is one new shopper (a session id).
    """

    settings: ClientSettings
    photos: Sequence[CatalogItem]
    rate: float = 2.0
    lanes: int = 2
    behaviour: Behaviour = field(default_factory=Behaviour)
    seed: int = 0
    timeout_s: float = 10.0
    records: list[QueryRecord] = field(default_factory=list)
    on_record: Callable[[QueryRecord], None] | None = None
    stopping: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._photo_cache: dict[str, bytes] = {}
        self._sent = 0
        self._started = 0.0
        self._threads: list[threading.Thread] = []

    def photo(self, item: CatalogItem) -> bytes:
        with self._lock:
            cached = self._photo_cache.get(item.item_id)
        if cached is None:
            cached = shopper_photo(item.image_path)
            with self._lock:
                self._photo_cache[item.item_id] = cached
        return cached

    def _next_slot(self) -> float | None:
        """When this lane may send its next query (the run's schedule is shared); None: stop."""
        with self._lock:
            if self.stopping.is_set():
                return None
            at = self._started + self._sent / self.rate
            self._sent += 1
            return at

    def _keep(self, record: QueryRecord) -> None:
        with self._lock:
            self.records.append(record)
        if self.on_record is not None:
            self.on_record(record)

    def _ask(self, client: QueryClient, feedback: FeedbackProducer, rng: random.Random, shopper: str,
             image: bytes | None, item_id: str | None, label: str | None, kind: str) -> tuple[QueryRecord, list]:
        sent_at, t = time.time(), time.perf_counter()
        try:
            reply = client.ask(image, item_id=item_id, k=5, timeout_s=self.timeout_s)
        except ReplyTimeout as exc:
            return QueryRecord(sent_at, time.perf_counter() - t, "timeout", kind, error=str(exc)[:200]), []
        latency = time.perf_counter() - t
        if reply["status"] != "ok":
            return QueryRecord(sent_at, latency, "error", kind, reply.get("model_version"),
                               error=str(reply.get("error"))[:200]), []
        results = reply["results"]
        actions = decide(label, results, self.behaviour, rng)
        shown = feedback.impressions(reply, shopper)
        for action in actions:
            feedback.emit(action.event, request_id=reply["request_id"], item_id=action.item_id, user_id=shopper)
        record = QueryRecord(sent_at, latency, "ok", kind, reply["model_version"], precision_at_k(label, results),
                             clicks_at_5=sum(a.event == "click" and a.rank <= 5 for a in actions),
                             events=len(shown) + len(actions))
        return record, [(a, results[a.rank - 1]) for a in actions if a.event == "click"]

    def _lane(self, lane: int) -> None:
        rng = random.Random(f"{self.seed}-{lane}")
        with QueryClient(self.settings, impressions=False) as client:
            feedback = FeedbackProducer(self.settings, client.producer)
            n = 0
            while True:
                at = self._next_slot()
                if at is None:
                    break
                delay = at - time.monotonic()
                if delay > 0 and self.stopping.wait(delay):
                    break
                n += 1
                shopper = f"shopper-{self.seed}-{lane}-{n}"
                item = rng.choice(self.photos)
                record, clicked = self._ask(client, feedback, rng, shopper, self.photo(item), None, item.label, "photo")
                self._keep(record)
                if clicked and rng.random() < self.behaviour.more_like_this:
                    _action, hit = rng.choice(clicked)
                    record, _ = self._ask(client, feedback, rng, shopper, None, str(hit["item_id"]), result_label(hit),
                                          "more_like_this")
                    self._keep(record)
                try:
                    feedback.flush(10)
                except Exception as exc:  # a shopper's feedback lost is logged, the run goes on
                    log.warning("feedback of %s not delivered: %s", shopper, exc)

    def start(self) -> None:
        self._started = time.monotonic()
        for lane in range(self.lanes):
            thread = threading.Thread(target=self._lane, args=(lane,), name=f"shoppers-{lane}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout_s: float = 30.0) -> None:
        self.stopping.set()
        for thread in self._threads:
            thread.join(timeout_s)

    def alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def snapshot(self) -> list[QueryRecord]:
        with self._lock:
            return list(self.records)
