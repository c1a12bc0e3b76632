"""Blue/green model rollout: which model version answers queries, and the switch to a new one.

Every model version has its own catalog-vector topic (:func:`lookalike.topics.vectors_topic`),
filled by the workers' consumer group for that version, which reads the compacted
catalog from its beginning. An index is built per version from its topic. So a new
champion is rolled out like this:

1. the registry names a new champion (``lookalike models promote``, or the trainer);
2. an indexer's :class:`RolloutController` sees the champion differ from the serving
   version and records it as the ``target`` (one compare-and-set in Redis);
3. workers start a consumer group for the target: the whole catalog is re-embedded with
   the new model into the target's topic, while queries are still embedded by the
   serving model and answered by the serving index;
4. every indexer replica builds the target's index; once each has caught up (it holds
   every catalog offset the serving index holds), the controller switches: ``serving``
   becomes the target, in one transaction;
5. workers embed new queries with the new model within a poll interval; the old index
   keeps answering the queries already embedded by the old model for a grace period,
   then it is dropped and the old version's consumer group stops.

A query carries the version of the model that embedded it and is answered only by the
index of that version, so no reply ever mixes models. Rollback is the same path in the
other direction; the old version's topic and consumer group offsets still exist, so it
resumes where it stopped instead of re-embedding everything.

The state is one Redis hash per deployment (named after the catalog topic); transitions
are appended to a capped event list for ``lookalike rollout``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

import redis
from pydantic import BaseModel, ConfigDict

from lookalike import clients
from lookalike.artifacts import ModelStore
from lookalike.errors import ModelArtifactError
from lookalike.settings import CommonSettings

log = logging.getLogger(__name__)

EVENTS_KEPT = 200


class RolloutState(BaseModel):
    """Which model version serves, which one is being built, and the previous one (kept for
    the grace period after a switch). Stored as one Redis hash (:meth:`to_redis`)."""

    model_config = ConfigDict(frozen=True)

    serving: str | None = None
    target: str | None = None  # being built; None when no rollout runs
    previous: str | None = None  # serving before the last switch (kept for the grace period)
    started_at: float = 0.0
    switched_at: float = 0.0

    @property
    def building(self) -> bool:
        return self.target is not None

    def active(self, now: float, grace_s: float) -> list[str]:
        """Versions whose index must be kept current: serving, target, and the previous one
        while queries it embedded may still be in flight."""
        out = [v for v in (self.serving, self.target) if v]
        if self.previous and self.previous not in out and now - self.switched_at < grace_s:
            out.append(self.previous)
        return out

    def embedding(self) -> list[str]:
        """Versions the workers embed the catalog with: serving and target."""
        return [v for v in (self.serving, self.target) if v]

    def to_redis(self) -> dict[str, str]:
        return {k: ("" if v is None else str(v)) for k, v in self.model_dump().items()}

    @classmethod
    def from_redis(cls, raw: dict[str, str]) -> RolloutState:
        return cls(
            serving=raw.get("serving") or None,
            target=raw.get("target") or None,
            previous=raw.get("previous") or None,
            started_at=float(raw.get("started_at") or 0),
            switched_at=float(raw.get("switched_at") or 0),
        )


def state_key(settings: CommonSettings) -> str:
    return f"lookalike:rollout:{settings.catalog_topic}"


def events_key(settings: CommonSettings) -> str:
    return f"{state_key(settings)}:events"


def redis_client(settings: CommonSettings, **kwargs: object) -> redis.Redis:
    """A client for the rollout state (with the deployment's AUTH/TLS settings), strings decoded."""
    return clients.redis_client(settings, **{"socket_timeout": 5, "decode_responses": True, **kwargs})


def read_state(client: redis.Redis, settings: CommonSettings) -> RolloutState | None:
    raw = client.hgetall(state_key(settings))
    return RolloutState.from_redis(raw) if raw else None


def read_events(client: redis.Redis, settings: CommonSettings, count: int = 20) -> list[dict[str, object]]:
    return [json.loads(e) for e in client.lrange(events_key(settings), 0, count - 1)]


def desired_version(settings: CommonSettings) -> str | None:
    """The version that should serve: the pinned one (``LOOKALIKE_MODEL_VERSION``), else the
    model store's champion; None when there is neither."""
    if settings.model_version:
        return settings.model_version
    try:
        return ModelStore(settings.models_path).resolve(None)
    except (ModelArtifactError, OSError, ValueError):
        return None


class RolloutController:
    """Moves the rollout state towards the desired version. Every indexer replica runs one;
    each transition is a compare-and-set (WATCH/MULTI), so concurrent replicas agree."""

    def __init__(self, client: redis.Redis, settings: CommonSettings) -> None:
        self.client = client
        self.settings = settings

    def tick(self, desired: str | None, ready: Callable[[str], bool]) -> RolloutState | None:
        """One step. ``ready(target)``: has every indexer replica caught up on the target?"""
        key = state_key(self.settings)
        with self.client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(key)
                raw = pipe.hgetall(key)
                state = RolloutState.from_redis(raw) if raw else None
                new, event = self.next_state(state, desired, ready, time.time())
                if new is None or new == state:
                    pipe.unwatch()
                    return state
                pipe.multi()
                pipe.delete(key)
                pipe.hset(key, mapping=new.to_redis())
                pipe.lpush(events_key(self.settings), json.dumps(event))
                pipe.ltrim(events_key(self.settings), 0, EVENTS_KEPT - 1)
                pipe.execute()
            except redis.WatchError:  # another replica moved first; look again next tick
                return None
        log.info("rollout: %s", event)
        return new

    @staticmethod
    def next_state(state: RolloutState | None, desired: str | None, ready: Callable[[str], bool],
                   now: float) -> tuple[RolloutState | None, dict[str, object]]:
        """The transition (pure): -> (new state or None for no change, the event to record)."""
        if desired is None:
            return None, {}
        if state is None or state.serving is None:
            new = RolloutState(serving=desired, switched_at=now)
            return new, {"event": "init", "serving": desired, "at": now}
        if desired == state.serving:
            if state.target:  # the champion went back before the switch: abandon the build
                return state.model_copy(update={"target": None, "started_at": 0.0}), {"event": "abandon", "target": state.target,
                                                     "serving": state.serving, "at": now}
            return None, {}
        if desired != state.target:
            event = {"event": "start", "serving": state.serving, "target": desired, "at": now}
            if state.target:
                event["replaces_target"] = state.target
            return state.model_copy(update={"target": desired, "started_at": now}), event
        if ready(desired):
            new = RolloutState(serving=desired, previous=state.serving, switched_at=now)
            return new, {"event": "switch", "serving": desired, "previous": state.serving,
                         "build_s": round(now - state.started_at, 3), "at": now}
        return None, {}
