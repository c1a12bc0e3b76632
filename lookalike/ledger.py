"""The part of the feedback loop's Redis state that the aggregator and the trainer share:
training pairs, totals, the last training, the pending trigger and the trainer's lease.

The aggregator (``feedback/``) writes pairs and totals and raises triggers; the trainer
(``training/service.py``) reads pairs, takes the lease and records each training. Both
meet here and on topics, never in each other's modules. Keys (``{ns}`` is
``LOOKALIKE_FEEDBACK_GROUP``)::

    lookalike:feedback:{ns}:pairs                   list: JSON training pairs, newest first, capped
    lookalike:feedback:{ns}:totals                  hash: labelled, events, invalid, pending, late, duplicates, ...
    lookalike:feedback:{ns}:last-training           hash: generation, labelled, catalog_items, at, outcome,
                                                    catalog_first_seen (before the first training)
    lookalike:feedback:{ns}:trigger-pending         a trigger id, while a trigger is out and not yet taken
    lookalike:feedback:{ns}:trainer-lease           the training trainer's id, with a TTL it renews
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal, Self

import redis

from lookalike.clients import redis_client
from lookalike.settings import FeedbackSettings

Take = Literal["train", "stale", "training_running"]


def trainer_decision(trigger_generation: int, current_generation: int, *, lease_acquired: bool) -> Take:
    """Whether the trainer trains for a trigger. A trigger raised before the last training
    finished (an older generation) was answered by that training: absorbed."""
    if trigger_generation < current_generation:
        return "stale"
    if not lease_acquired:
        return "training_running"
    return "train"


# KEYS[1]: the last-training hash; ARGV: items now, now (s), the settling span (s).
NOTE_CATALOG_BASELINE = """
if redis.call('HEXISTS', KEYS[1], 'at') == 1 then
  redis.call('HSETNX', KEYS[1], 'catalog_items', ARGV[1])
  return 0
end
local first = redis.call('HGET', KEYS[1], 'catalog_first_seen')
if not first then
  redis.call('HSET', KEYS[1], 'catalog_first_seen', ARGV[2])
  redis.call('HSETNX', KEYS[1], 'catalog_items', ARGV[1])
  return 1
end
if tonumber(ARGV[2]) - tonumber(first) <= tonumber(ARGV[3]) then
  local seen = tonumber(redis.call('HGET', KEYS[1], 'catalog_items') or '0')
  if tonumber(ARGV[1]) > seen then redis.call('HSET', KEYS[1], 'catalog_items', ARGV[1]) end
end
return 1
"""


class FeedbackLedger:
    """Reads and writes of the shared keys; every method is a few Redis round trips."""

    def __init__(self, client: redis.Redis, settings: FeedbackSettings) -> None:
        self.r = client
        self.s = settings
        self.prefix = f"lookalike:feedback:{settings.feedback_group}"
        self.keep_s = int(settings.keep_hours * 3600)

    @classmethod
    def connect(cls, settings: FeedbackSettings) -> Self:
        return cls(redis_client(settings, socket_timeout=10), settings)

    def key(self, *parts: object) -> str:
        return ":".join([self.prefix, *(str(p) for p in parts)])

    def totals(self) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in self.r.hgetall(self.key("totals")).items()}

    def pairs(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Training pairs, newest first."""
        return [json.loads(p) for p in self.r.lrange(self.key("pairs"), 0, -1 if limit is None else limit - 1)]

    # -- training bookkeeping, shared with the trainer -------------------------------
    def last_training(self) -> dict[str, Any]:
        raw = {k.decode(): v.decode() for k, v in self.r.hgetall(self.key("last-training")).items()}
        out: dict[str, Any] = dict(raw)
        for name in ("generation", "labelled", "catalog_items"):
            if name in raw:
                out[name] = int(raw[name])
        if "at" in raw:
            out["at"] = float(raw["at"])
        out.setdefault("generation", 0)
        return out

    def note_catalog_baseline(self, catalog_items: int, now: float | None = None) -> None:
        """Before any training is recorded, growth counts from the catalog the serving model
        met: the largest size seen in the first ``trigger_baseline_minutes`` after the first
        sighting, so that loading a catalog into a new stack is not growth. Once a training
        is recorded, its size is the baseline and this leaves it alone."""
        now = time.time() if now is None else now
        self.r.eval(NOTE_CATALOG_BASELINE, 1, self.key("last-training"), catalog_items, f"{now:.3f}",
                    self.s.trigger_baseline_minutes * 60)

    def record_training(self, *, outcome: str, catalog_items: int | None, labelled: int | None = None,
                        **extra: Any) -> int:
        """A training finished (whatever its outcome): the next generation starts; returns it."""
        labelled = self.totals().get("labelled", 0) if labelled is None else labelled
        mapping: dict[str, Any] = {"labelled": labelled, "at": f"{time.time():.3f}", "outcome": outcome,
                                   **{k: str(v) for k, v in extra.items()}}
        if catalog_items is not None:
            mapping["catalog_items"] = catalog_items
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self.key("last-training"), mapping=mapping)
        pipe.hincrby(self.key("last-training"), "generation", 1)
        pipe.delete(self.key("trigger-pending"))
        return int(pipe.execute()[1])

    def lease_holder(self) -> str | None:
        holder = self.r.get(self.key("trainer-lease"))
        return holder.decode() if holder else None

    def acquire_lease(self, owner: str, ttl_s: float) -> bool:
        return bool(self.r.set(self.key("trainer-lease"), owner, nx=True, px=int(ttl_s * 1000)))

    def renew_lease(self, owner: str, ttl_s: float) -> bool:
        """Extend the lease if ``owner`` still holds it (a compare-and-set in Lua)."""
        script = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
                  "return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end")
        return bool(self.r.eval(script, 1, self.key("trainer-lease"), owner, int(ttl_s * 1000)))

    def release_lease(self, owner: str) -> None:
        script = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"
        self.r.eval(script, 1, self.key("trainer-lease"), owner)

    def trigger_pending(self) -> str | None:
        pending = self.r.get(self.key("trigger-pending"))
        return pending.decode() if pending else None

    def claim_trigger(self, trigger_id: str, ttl_s: int) -> bool:
        """Mark a trigger as out; False if another one already is (one trigger per training)."""
        return bool(self.r.set(self.key("trigger-pending"), trigger_id, nx=True, ex=ttl_s))

    def unclaim_trigger(self, trigger_id: str) -> None:
        if self.trigger_pending() == trigger_id:
            self.r.delete(self.key("trigger-pending"))

    def count(self, name: str, n: int = 1) -> None:
        self.r.hincrby(self.key("totals"), name, n)
