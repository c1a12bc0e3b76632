"""The shoppers' behaviour model (docs/feedback.md#shoppers), without servers."""

from __future__ import annotations

import io
import random
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from producers.shoppers import Action, Behaviour, decide, precision_at_k, shopper_photo

MODEL = Behaviour(click_same=0.4, click_other=0.05, rank_decay=0.8, cart_after_click=0.5, purchase_after_cart=0.5,
                  dismiss_other=0.3)


def hits(*labels: str | None) -> list[dict]:
    return [{"item_id": f"i{rank}", "score": 0.9, "metadata": {} if label is None else {"articleType": label}}
            for rank, label in enumerate(labels, start=1)]


def test_same_type_is_likelier_and_rank_decays() -> None:
    assert MODEL.click_probability(True, 1) == pytest.approx(0.4)
    assert MODEL.click_probability(False, 1) == pytest.approx(0.05)
    assert MODEL.click_probability(True, 3) == pytest.approx(0.4 * 0.8**2)
    assert MODEL.click_probability(True, 5) > MODEL.click_probability(False, 1)


def test_click_rates_follow_the_model() -> None:
    """Over many shoppers the click rate per rank and type is the documented probability."""
    rng = random.Random(1)
    results = hits("Shirts", "Shoes", "Shirts", "Shoes", "Shirts")
    n = 20_000
    clicks: Counter[int] = Counter()
    for _ in range(n):
        for action in decide("Shirts", results, MODEL, rng):
            if action.event == "click":
                clicks[action.rank] += 1
    for rank, same in [(1, True), (2, False), (3, True), (4, False), (5, True)]:
        expected = MODEL.click_probability(same, rank)
        assert clicks[rank] / n == pytest.approx(expected, abs=4 * (expected * (1 - expected) / n) ** 0.5 + 1e-3)
    assert clicks[1] > clicks[3] > clicks[5] > clicks[2]


def test_the_funnel_and_dismissals() -> None:
    """A purchase follows a cart that follows a click, of the same item; only other types are dismissed."""
    rng = random.Random(2)
    results = hits("Shirts", "Shoes", "Watches", "Shirts", "Shoes")
    events: Counter[str] = Counter()
    for _ in range(5_000):
        actions = decide("Shirts", results, MODEL, rng)
        seen: dict[str, list[str]] = {}
        for a in actions:
            seen.setdefault(a.item_id, []).append(a.event)
            events[a.event] += 1
        for item, kinds in seen.items():
            assert kinds in (["click"], ["click", "add_to_cart"], ["click", "add_to_cart", "purchase"], ["dismiss"]), kinds
            if kinds == ["dismiss"]:
                assert results[int(item[1:]) - 1]["metadata"]["articleType"] != "Shirts"
    assert events["click"] > events["add_to_cart"] > events["purchase"] > 0
    assert events["dismiss"] > 0


def test_no_label_no_results() -> None:
    rng = random.Random(3)
    assert decide("Shirts", [], MODEL, rng) == []
    # without a query label every result counts as another type: clicked at click_other at most
    never = Behaviour(click_same=1.0, click_other=0.0, dismiss_other=0.0)
    assert decide(None, hits("Shirts", None), never, rng) == []
    always = Behaviour(click_same=1.0, click_other=0.0, rank_decay=1.0, cart_after_click=0.0, dismiss_other=0.0)
    assert decide("Shirts", hits("Shirts", None, "Shirts"), always, rng) == [Action("click", "i1", 1),
                                                                              Action("click", "i3", 3)]


def test_precision_at_k() -> None:
    assert precision_at_k("Shirts", hits("Shirts", "Shoes", "Shirts", None, "Shirts")) == pytest.approx(3 / 5)
    assert precision_at_k("Shirts", hits("Shirts", "Shirts", "Shoes", "Shoes", "Shoes", "Shirts"), k=2) == 1.0
    assert precision_at_k(None, hits("Shirts")) is None
    assert precision_at_k("Shirts", []) is None


def test_a_shopper_photo_is_a_portrait_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "square.jpg"
    Image.new("RGB", (224, 224), "red").save(path)
    photo = shopper_photo(path)
    with Image.open(io.BytesIO(photo)) as img:
        assert img.format == "JPEG" and img.size == (300, 400)
