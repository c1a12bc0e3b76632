"""The feedback loop's pure parts: the contract, window maths, metrics, the trigger policy, de-duplication."""

from __future__ import annotations

import json

import numpy as np
import pytest

from feedback import windows as w
from feedback.policy import (
    PolicyInputs,
    TriggerPolicy,
    drift_null,
    due_reasons,
    emit_decision,
    mean_cosine_drift,
)
from lookalike.errors import InvalidMessage
from lookalike.events import (
    FeedbackEvent,
    Reason,
    decision_event,
    make_feedback,
    make_trigger,
    parse_feedback,
    parse_trigger,
)
from lookalike.settings import FeedbackSettings
from lookalike.topics import topic_specs


def value(**fields: object) -> bytes:
    doc = {"request_id": "req-1", "item_id": "15970", "event": "click", "timestamp": 1_700_000_000_000, **fields}
    return json.dumps({k: v for k, v in doc.items() if v is not None}).encode()


def test_feedback_round_trip() -> None:
    event = make_feedback("dismiss", request_id="r", item_id="i", user_id="session-7", timestamp_ms=5)
    key, raw = event.encode()
    assert key == b"session-7"
    assert parse_feedback(key, raw) == FeedbackEvent("session-7", "r", "i", "dismiss", 5)


@pytest.mark.parametrize(
    ("key", "raw", "code", "says"),
    [
        (None, value(), "bad_key", "missing"),
        (b"\xff", value(), "bad_key", "UTF-8"),
        (b"u", None, "bad_feedback", "null"),
        (b"u", b"{not json", "bad_feedback", "JSON"),
        (b"u", b"[1]", "bad_feedback", "object"),
        (b"u", value(event="like"), "bad_feedback", "event"),
        (b"u", value(timestamp="yesterday"), "bad_feedback", "timestamp"),
        (b"u", value(timestamp=True), "bad_feedback", "timestamp"),
        (b"u", value(timestamp=-1), "bad_feedback", "timestamp"),
        (b"u", value(request_id=""), "bad_feedback", "request_id"),
        (b"u", value(item_id="a\nb"), "bad_feedback", "item_id"),
        (b"u", value(item_id=None), "bad_feedback", "item_id"),
        (b"u", value(colour="red"), "bad_feedback", "colour"),
        (b"u", b" " * 20_000, "too_large", "limit"),
    ],
)
def test_feedback_refused_with_a_clear_reason(key: bytes | None, raw: bytes | None, code: str, says: str) -> None:
    with pytest.raises(InvalidMessage) as err:
        parse_feedback(key, raw)
    assert err.value.code == code
    assert says in str(err.value)


def test_feedback_context_is_allowed() -> None:
    assert parse_feedback(b"u", value(context={"page": "pdp"})).event == "click"


def test_trigger_and_decision_documents() -> None:
    trigger = make_trigger("v1", 3, [Reason("feedback_volume", "many", {"new_feedback": 12, "threshold": 10})])
    _, raw = trigger.encode()
    assert parse_trigger(raw) == trigger
    with pytest.raises(InvalidMessage):
        parse_trigger(json.dumps({**trigger.to_json(), "reasons": []}).encode())
    with pytest.raises(InvalidMessage):
        parse_trigger(b"\x00")
    doc = decision_event("t", "refused", "no better", decision={"challenger": "v2", "accepted": False,
                                                                "champion_before": "v1", "champion_after": "v1"})
    assert doc["champion_after"] == "v1" and doc["outcome"] == "refused"


def test_topics_include_the_feedback_loop() -> None:
    specs = {s.name: s for s in topic_specs(FeedbackSettings())}
    assert specs["lookalike.feedback"].config["cleanup.policy"] == "delete"
    assert "lookalike.triggers" in specs and "lookalike.models" in specs


def test_bucket_and_window_maths() -> None:
    assert w.bucket_of(0, 60) == 0
    assert w.bucket_of(59_999, 60) == 0
    assert w.bucket_of(60_000, 60) == 1
    now = 10 * 60_000 + 5  # inside bucket 10
    assert w.window(now, 3, 60) == range(8, 11)
    assert w.window(now, 0.1, 60) == range(10, 11)  # at least the current bucket
    assert w.leading_window(4, 2, 60) == range(4, 6)
    assert w.window(now, 1, 30) == range(19, 21)


def test_reply_facts() -> None:
    ok = {"request_id": "r", "status": "ok", "model_version": "v1",
          "results": [{"item_id": "a", "score": 1.0, "metadata": {}}, {"item_id": "b", "score": 0.5, "metadata": {}}]}
    assert w.reply_facts(json.dumps(ok).encode()) == w.ReplyFacts("r", "v1", ("a", "b"))
    more_like = {**ok, "query_item_id": "q"}  # a "more like this q" reply names its query item
    assert w.reply_facts(json.dumps(more_like).encode()) == w.ReplyFacts("r", "v1", ("a", "b"), "q")
    assert w.reply_facts(json.dumps({**ok, "query_item_id": 7}).encode()) is None
    assert w.reply_facts(json.dumps({**ok, "status": "error"}).encode()) is None
    assert w.reply_facts(b"\xff") is None
    assert w.reply_facts(None) is None


def ev(kind: str, item: str = "x") -> FeedbackEvent:
    return FeedbackEvent("u", "r", item, kind, 0)  # type: ignore[arg-type]


def test_increments_and_metrics() -> None:
    items = ["a", "b", "c", "d", "e", "f"]
    total: dict[str, int] = {}
    for kind, item in [("impression", i) for i in items] + [("click", "b"), ("click", "f"), ("dismiss", "a"),
                                                              ("purchase", "b"), ("click", "zz")]:
        w.add_counts(total, w.increments(ev(kind, item), w.rank_of(item, items)))
    assert total["impressions"] == 6 and total["impressions_at_5"] == 5
    assert total["clicks"] == 3 and total["clicks_at_5"] == 1 and total["unranked"] == 1
    m = w.metrics(total, distinct_items=6, catalog_items=60)
    assert m["ctr_at_5"] == pytest.approx(1 / 5)
    assert m["mean_click_rank"] == pytest.approx((2 + 6) / 2)
    assert m["purchase_rate"] == pytest.approx(1 / 6)
    assert m["dismiss_rate"] == pytest.approx(1 / 6)
    assert m["coverage"] == pytest.approx(0.1)
    empty = w.metrics({}, 0, None)
    assert empty["ctr_at_5"] is None and empty["coverage"] is None


def test_pair_labels() -> None:
    assert [w.pair_label(ev(k)) for k in ("impression", "click", "add_to_cart", "purchase", "dismiss")] == [
        None, 1, 1, 1, -1]


POLICY = TriggerPolicy(min_feedback=10, drop_metric="ctr_at_5", drop_fraction=0.2, min_impressions=100,
                       catalog_growth=0.5, drift=0.1, drift_min_queries=20, cooldown_s=60)


def test_policy_feedback_volume() -> None:
    assert due_reasons(PolicyInputs("v1", new_feedback=9), POLICY) == []
    (reason,) = due_reasons(PolicyInputs("v1", new_feedback=10), POLICY)
    assert reason.reason == "feedback_volume" and reason.numbers["new_feedback"] == 10


def test_policy_metric_drop() -> None:
    base = {"ctr_at_5": 0.30, "impressions": 500}
    assert due_reasons(PolicyInputs("v1", baseline=base, recent={"ctr_at_5": 0.25, "impressions": 500}), POLICY) == []
    (reason,) = due_reasons(PolicyInputs("v1", baseline=base, recent={"ctr_at_5": 0.24, "impressions": 500}), POLICY)
    assert reason.reason == "metric_drop" and reason.numbers["recent"] == 0.24
    # too few impressions in a window: no verdict
    assert due_reasons(PolicyInputs("v1", baseline=base, recent={"ctr_at_5": 0.0, "impressions": 99}), POLICY) == []


def test_policy_catalog_growth_and_drift() -> None:
    assert due_reasons(PolicyInputs("v1", catalog_items=149, catalog_baseline=100), POLICY) == []
    (growth,) = due_reasons(PolicyInputs("v1", catalog_items=150, catalog_baseline=100), POLICY)
    assert growth.reason == "catalog_growth" and growth.numbers["growth"] == pytest.approx(0.5)
    assert due_reasons(PolicyInputs("v1", drift=0.5, drift_queries=19), POLICY) == []
    (drift,) = due_reasons(PolicyInputs("v1", drift=0.5, drift_queries=20), POLICY)
    assert drift.reason == "query_drift"


def test_policy_all_reasons_in_one_and_cooldown() -> None:
    inputs = PolicyInputs("v1", new_feedback=50, catalog_items=300, catalog_baseline=100, drift=0.9,
                          drift_queries=50, seconds_since_training=61)
    assert [r.reason for r in due_reasons(inputs, POLICY)] == ["feedback_volume", "catalog_growth", "query_drift"]
    cooling = PolicyInputs("v1", new_feedback=50, seconds_since_training=59)
    assert due_reasons(cooling, POLICY) == []
    off = TriggerPolicy(min_feedback=0, drop_fraction=0, catalog_growth=0, drift=0, cooldown_s=0)
    assert due_reasons(inputs, off) == []


def test_drift_measure() -> None:
    rng = np.random.default_rng(0)
    catalog = rng.normal(size=(500, 16)) + 3.0
    same = rng.normal(size=(200, 16)) + 3.0
    other = rng.normal(size=(200, 16)) - 3.0
    assert mean_cosine_drift(same, catalog) < 0.05
    assert mean_cosine_drift(other, catalog) > 1.5
    assert mean_cosine_drift(np.empty((0, 16)), catalog) is None


def unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_queries_like_the_catalog_are_not_drift_however_far_their_mean_lands() -> None:
    """Unit vectors spread over the sphere, as the champion's are (the catalog's mean has a
    small norm). Queries drawn from the catalog's own distribution, not from the stored
    sample, land far from the sample's mean by chance, over the 0.1 threshold, and must not
    trigger; queries from one corner must. Over 40 seeds: the old null, which drew its rows
    from the sample and compared them with the whole sample's mean, fired on all 40."""
    dim, stored, queries = 64, 480, 206  # the demo's sample (5 % of 9,577) and the bench's first queries
    corner_dir = np.zeros(dim)
    corner_dir[0] = 2.0
    false_alarms = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        sample = unit_rows(rng.normal(size=(stored, dim)) + 0.1)
        like = unit_rows(rng.normal(size=(queries, dim)) + 0.1)
        corner = unit_rows(rng.normal(size=(queries, dim)) + 0.1 + corner_dir)
        null = drift_null(sample, queries)
        drift, shifted = mean_cosine_drift(like, sample), mean_cosine_drift(corner, sample)
        assert drift is not None and shifted is not None and null is not None
        assert drift >= POLICY.drift  # the threshold alone fires on this
        false_alarms += bool(due_reasons(PolicyInputs("v1", drift=drift, drift_queries=queries, drift_null=null), POLICY))
        assert shifted > null
        (reason,) = due_reasons(PolicyInputs("v1", drift=shifted, drift_queries=queries, drift_null=null), POLICY)
        assert reason.reason == "query_drift" and reason.numbers["null_99"] == pytest.approx(null, abs=1e-6)
    assert false_alarms <= 2  # a 99th percentile: about 0.4 in 40
    assert drift_null(sample[:1], 10) is None and drift_null(sample, 0) is None
    assert drift_null(sample[:3], 500) is not None  # fewer rows than 2 n: a split of what there is


def test_dedup_rules() -> None:
    due = [Reason("manual", "m")]
    assert emit_decision([], lease_held=False, trigger_pending=False) == "nothing_due"
    assert emit_decision(due, lease_held=True, trigger_pending=False) == "training_running"
    assert emit_decision(due, lease_held=False, trigger_pending=True) == "trigger_pending"
    assert emit_decision(due, lease_held=False, trigger_pending=False) == "emit"
    # the trainer's side (skip a trigger handled or answered already, wait for the lease):
    # tests/integration/test_feedback.py, against Redis


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOKALIKE_TRIGGER_MIN_FEEDBACK", "7")
    monkeypatch.setenv("LOOKALIKE_FEEDBACK_TOPIC", "x.feedback")
    s = FeedbackSettings()
    assert TriggerPolicy.from_settings(s).min_feedback == 7 and s.feedback_topic == "x.feedback"


def test_a_hostile_vector_of_another_size_does_not_stop_the_drift_measure() -> None:
    from feedback.policy import mean_cosine_drift
    from feedback.store import sample_matrix

    good = [np.ones(4, "<f4").tobytes() for _ in range(3)]
    hostile = [np.ones(2, "<f4").tobytes(), np.full(4, np.nan, "<f4").tobytes(), b"abc", b""]
    sample = sample_matrix(good + hostile)
    assert sample.shape == (3, 4)
    assert mean_cosine_drift(sample, sample) == 0.0
    assert mean_cosine_drift(sample, sample_matrix([np.ones(2, "<f4").tobytes()])) is None  # two sizes: no figure
