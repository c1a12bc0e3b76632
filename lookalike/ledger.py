"""The part of the feedback loop's Redis state that the aggregator and the trainer share:
training pairs, totals, the last training, the pending trigger and the trainer's lease.

The aggregator (``feedback/``) writes pairs and totals and raises triggers; the trainer
(``training/service.py``) reads pairs, takes the lease and records each training. Both
meet here and on topics, never in each other's modules. Keys (``{ns}`` is
``LOOKALIKE_FEEDBACK_GROUP``)::

    lookalike:feedback:{ns}:pairs                   list: JSON training pairs, newest first, capped
    lookalike:feedback:{ns}:totals                  hash: labelled, events, invalid, pending, late, duplicates, ...
    lookalike:feedback:{ns}:last-training           hash: generation, labelled, catalog_items, at, outcome, trigger_id
    lookalike:feedback:{ns}:catalog-baseline        hash: {model}:items, {model}:first_seen (catalog growth)
    lookalike:feedback:{ns}:trigger-pending         a trigger id, while a trigger is out and not yet taken
    lookalike:feedback:{ns}:trainer-lease           the training trainer's id, with a TTL it renews
    lookalike:feedback:{ns}:triggers                hash: trigger id -> JSON record of what became of it
                                                    (:data:`TRIGGER_STATES`), the newest ``TRIGGERS_KEPT``
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal, Self

import redis

from lookalike.clients import redis_client
from lookalike.events import Trigger, now_ms
from lookalike.settings import FeedbackSettings

# What became of a trigger. ``pending``: raised, not yet taken; ``waiting``: taken, the
# lease is another trainer's (training, or dead and its lease not yet expired);
# ``training``; ``interrupted``: its training was stopped (SIGTERM), it is trained again
# when read again; then one of the final states: ``done`` (trained: promoted, refused or
# failed), ``stale`` (a training finished after it was raised), ``superseded`` (a newer
# trigger or a newer champion answers it).
TriggerState = Literal["pending", "waiting", "training", "interrupted", "done", "stale", "superseded"]
TRIGGER_STATES: tuple[TriggerState, ...] = ("pending", "waiting", "training", "interrupted", "done", "stale",
                                            "superseded")
FINAL_STATES = frozenset({"done", "stale", "superseded"})
TRIGGERS_KEPT = 100


# KEYS[1]: the catalog-baseline hash; ARGV: model version, its catalog's items now, now (s),
# the settling span (s). The first sighting of a model starts its baseline; for the span
# after it the baseline follows the catalog up (the index filling), then it stays.
NOTE_CATALOG = """
local first_field, items_field = ARGV[1] .. ':first_seen', ARGV[1] .. ':items'
local first = redis.call('HGET', KEYS[1], first_field)
if not first then
  redis.call('HSET', KEYS[1], first_field, ARGV[3], items_field, ARGV[2])
  return 1
end
if tonumber(ARGV[3]) - tonumber(first) <= tonumber(ARGV[4]) then
  local seen = tonumber(redis.call('HGET', KEYS[1], items_field) or '0')
  if tonumber(ARGV[2]) > seen then redis.call('HSET', KEYS[1], items_field, ARGV[2]) end
end
return 0
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

    def note_catalog(self, model_version: str, catalog_items: int, now: float | None = None) -> None:
        """The catalog indexed for ``model_version`` has ``catalog_items`` items now. Its
        baseline for catalog growth is the largest size seen in the first
        ``trigger_baseline_minutes`` after the model was first seen indexed: a new stack's
        first catalog load, or a new champion's index filling, is not growth."""
        now = time.time() if now is None else now
        self.r.eval(NOTE_CATALOG, 1, self.key("catalog-baseline"), model_version, catalog_items, f"{now:.3f}",
                    self.s.trigger_baseline_minutes * 60)

    def catalog_baseline(self, model_version: str | None) -> int | None:
        """What catalog growth is measured from for ``model_version``: the catalog it was
        indexed with (settled, :meth:`note_catalog`) or the catalog at the last training
        (a refused challenger answered the growth too), whichever is larger."""
        sizes = [self.last_training().get("catalog_items")]
        if model_version:
            raw = self.r.hget(self.key("catalog-baseline"), f"{model_version}:items")
            sizes.append(int(raw) if raw else None)
        known = [n for n in sizes if n]
        return max(known) if known else None

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
        if "trigger_id" in extra:  # its trigger is done in the same transaction: a restart never trains it again
            record = self.trigger_record(str(extra["trigger_id"])) or {"trigger_id": str(extra["trigger_id"])}
            record |= {"state": "done", "outcome": outcome, "updated_ms": now_ms(),
                       **({"challenger": str(extra["challenger"])} if extra.get("challenger") else {})}
            pipe.hset(self.key("triggers"), record["trigger_id"], json.dumps(record))
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
        """A trigger that could not be sent: no longer out, and no record of it (it never was)."""
        if self.trigger_pending() == trigger_id:
            self.r.delete(self.key("trigger-pending"))
        self.r.hdel(self.key("triggers"), trigger_id)

    # -- trigger records: what became of each ------------------------------------------
    def note_trigger(self, trigger: Trigger) -> None:
        """Record ``trigger`` as pending unless it is known already (the aggregator when it
        raises one; the trainer when it reads one, a manual trigger included)."""
        record = {"trigger_id": trigger.trigger_id, "state": "pending", "raised_ms": trigger.timestamp_ms,
                  "updated_ms": now_ms(), "model_version": trigger.model_version, "generation": trigger.generation,
                  "reasons": [r.reason for r in trigger.reasons]}
        if self.r.hsetnx(self.key("triggers"), trigger.trigger_id, json.dumps(record)):
            self._trim_triggers()

    def trigger_record(self, trigger_id: str) -> dict[str, Any] | None:
        raw = self.r.hget(self.key("triggers"), trigger_id)
        return json.loads(raw) if raw else None

    def update_trigger(self, trigger: Trigger, state: TriggerState, **fields: Any) -> dict[str, Any]:
        """Set ``trigger``'s state (and fields such as ``owner``, ``why``, ``outcome``); the
        trainer is the only writer once a trigger is read, so read-then-write is safe."""
        self.note_trigger(trigger)
        record = (self.trigger_record(trigger.trigger_id) or {}) | fields | {"state": state, "updated_ms": now_ms()}
        self.r.hset(self.key("triggers"), trigger.trigger_id, json.dumps(record))
        return record

    def triggers(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Trigger records, the newest raised first."""
        records = [json.loads(v) for v in self.r.hvals(self.key("triggers"))]
        records.sort(key=lambda r: (int(r.get("raised_ms") or 0), r["trigger_id"]), reverse=True)
        return records if limit is None else records[:limit]

    def newer_trigger(self, trigger: Trigger) -> dict[str, Any] | None:
        """The newest trigger raised after ``trigger`` (it answers this one too), if any."""
        newer = [r for r in self.triggers() if int(r.get("raised_ms") or 0) > trigger.timestamp_ms
                 and r["trigger_id"] != trigger.trigger_id]
        return newer[0] if newer else None

    def _trim_triggers(self) -> None:
        records = self.triggers()
        if len(records) > TRIGGERS_KEPT:
            self.r.hdel(self.key("triggers"), *[r["trigger_id"] for r in records[TRIGGERS_KEPT:]])

    def count(self, name: str, n: int = 1) -> None:
        self.r.hincrby(self.key("totals"), name, n)
