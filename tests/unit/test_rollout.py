"""The rollout state machine (pure) and its compare-and-set on a real Redis server is in
tests/integration/test_rollout.py; here, every transition and the live-version sets."""

from __future__ import annotations

from lookalike.rollout import RolloutController, RolloutState

next_state = RolloutController.next_state


def never(_: str) -> bool:
    return False


def always(_: str) -> bool:
    return True


def test_first_champion_initialises_serving() -> None:
    new, event = next_state(None, "a", never, 10.0)
    assert new == RolloutState(serving="a", switched_at=10.0) and event["event"] == "init"


def test_nothing_to_serve_changes_nothing() -> None:
    assert next_state(None, None, always, 1.0)[0] is None
    assert next_state(RolloutState(serving="a"), None, always, 1.0)[0] is None


def test_new_champion_starts_a_build_and_switches_only_when_ready() -> None:
    state = RolloutState(serving="a")
    started, event = next_state(state, "b", never, 5.0)
    assert started == RolloutState(serving="a", target="b", started_at=5.0) and event["event"] == "start"
    assert next_state(started, "b", never, 6.0)[0] is None  # still building
    switched, event = next_state(started, "b", always, 9.0)
    assert switched == RolloutState(serving="b", previous="a", switched_at=9.0)
    assert event == {"event": "switch", "serving": "b", "previous": "a", "build_s": 4.0, "at": 9.0}
    assert next_state(switched, "b", always, 10.0)[0] is None  # settled


def test_champion_changing_again_mid_build_replaces_the_target() -> None:
    building = RolloutState(serving="a", target="b", started_at=1.0)
    new, event = next_state(building, "c", always, 2.0)
    assert new == RolloutState(serving="a", target="c", started_at=2.0)
    assert event["replaces_target"] == "b"


def test_champion_going_back_mid_build_abandons_it() -> None:
    building = RolloutState(serving="a", target="b", started_at=1.0)
    new, event = next_state(building, "a", always, 2.0)
    assert new == RolloutState(serving="a") and event["event"] == "abandon"


def test_live_versions_keep_the_previous_only_for_the_grace_period() -> None:
    state = RolloutState(serving="b", previous="a", switched_at=100.0)
    assert state.active(now=110.0, grace_s=30.0) == ["b", "a"]
    assert state.active(now=131.0, grace_s=30.0) == ["b"]
    assert state.embedding() == ["b"]
    building = RolloutState(serving="b", target="a", previous="a", switched_at=100.0)
    assert building.active(now=110.0, grace_s=30.0) == ["b", "a"]
    assert building.embedding() == ["b", "a"]


def test_state_round_trips_through_redis_strings() -> None:
    state = RolloutState(serving="b", target=None, previous="a", started_at=1.5, switched_at=2.25)
    assert RolloutState.from_redis(state.to_redis()) == state
