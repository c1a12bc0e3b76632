"""The feedback loop's wire contracts: feedback events, retraining triggers, trainer outcomes.

docs/contracts.md describes them for people; ``lookalike/schemas/{feedback,trigger,decision}.schema.json``
are the machine-readable part. :func:`parse_feedback` is what the aggregator runs on
every record: it raises :class:`InvalidMessage` with a stable code and a message that
names the field, never anything else.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal

import jsonschema

from lookalike import contracts as c
from lookalike.errors import ErrorCode, InvalidMessage

FeedbackKind = Literal["impression", "click", "add_to_cart", "purchase", "dismiss"]
FEEDBACK_EVENTS: tuple[FeedbackKind, ...] = ("impression", "click", "add_to_cart", "purchase", "dismiss")
TRIGGER_REASONS = ("feedback_volume", "metric_drop", "catalog_growth", "query_drift", "manual")
MAX_FEEDBACK_BYTES = 16 * 1024
MAX_TRIGGER_BYTES = 64 * 1024

# Error codes of refused feedback (dead-letter header ``error-code``).
BAD_FEEDBACK = ErrorCode.BAD_FEEDBACK
# a missing or malformed key is ``bad_key``, as everywhere; too large is ``too_large``


@cache
def _validator(name: str) -> jsonschema.protocols.Validator:
    schema = c.schema(name)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def validate(document: Any, name: str, what: str) -> None:
    """Raise InvalidMessage(bad_feedback) naming the first offending field, if ``document`` breaks schema ``name``."""
    error = jsonschema.exceptions.best_match(_validator(name).iter_errors(document))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(the document)"
        raise InvalidMessage(f"{what}: {where}: {error.message[:300]}", code=BAD_FEEDBACK)


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class FeedbackEvent:
    """What a user did with an item a reply showed them."""

    user_id: str  # the record key: a user or session id
    request_id: str
    item_id: str
    event: FeedbackKind
    timestamp_ms: int

    def to_json(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "item_id": self.item_id, "event": self.event,
                "timestamp": self.timestamp_ms}

    def encode(self) -> tuple[bytes, bytes]:
        """(key, value) of the record."""
        return self.user_id.encode("utf-8"), json.dumps(self.to_json(), separators=(",", ":")).encode("utf-8")

    @property
    def dedup_key(self) -> str:
        """One click on one shown item counts once, however often it is sent (replays, double taps)."""
        return f"{self.request_id}\x1f{self.item_id}\x1f{self.event}"


def make_feedback(event: str, *, request_id: str, item_id: str, user_id: str,
                  timestamp_ms: int | None = None) -> FeedbackEvent:
    """A feedback event checked against the contract (raises InvalidMessage like the aggregator would)."""
    made = FeedbackEvent(user_id, request_id, item_id, event, now_ms() if timestamp_ms is None else timestamp_ms)  # type: ignore[arg-type]
    key, value = made.encode()
    return parse_feedback(key, value)


def parse_feedback(key: bytes | None, value: bytes | None) -> FeedbackEvent:
    """A feedback record -> :class:`FeedbackEvent`. Raises InvalidMessage (bad_key, too_large, bad_feedback)."""
    user_id = c.decode_key(key, "user/session id (key)")
    if value is None:
        raise InvalidMessage("feedback value is missing (null)", code=BAD_FEEDBACK)
    if len(value) > MAX_FEEDBACK_BYTES:
        raise InvalidMessage(f"feedback is {len(value)} bytes, the limit is {MAX_FEEDBACK_BYTES}", code=ErrorCode.TOO_LARGE)
    doc = c.parse_json(value, what="feedback", max_bytes=MAX_FEEDBACK_BYTES, max_depth=4, code=BAD_FEEDBACK)
    if isinstance(doc, dict) and isinstance(doc.get("timestamp"), bool):  # JSON true is no timestamp
        raise InvalidMessage("feedback: timestamp: must be an integer, not a boolean", code=BAD_FEEDBACK)
    validate(doc, "feedback", "feedback")
    return FeedbackEvent(user_id, doc["request_id"], doc["item_id"], doc["event"], int(doc["timestamp"]))


@dataclass(frozen=True)
class Reason:
    """One reason to retrain, with the numbers that made it due."""

    reason: str
    message: str
    numbers: dict[str, float | str | None] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"reason": self.reason, "message": self.message, "numbers": dict(self.numbers)}


@dataclass(frozen=True)
class Trigger:
    """A request to train a challenger: every reason that was due, in one event."""

    trigger_id: str
    model_version: str | None
    generation: int
    reasons: tuple[Reason, ...]
    timestamp_ms: int

    def to_json(self) -> dict[str, Any]:
        return {"trigger_id": self.trigger_id, "model_version": self.model_version, "generation": self.generation,
                "reasons": [r.to_json() for r in self.reasons], "timestamp": self.timestamp_ms}

    def encode(self) -> tuple[bytes, bytes]:
        return self.trigger_id.encode(), json.dumps(self.to_json(), separators=(",", ":")).encode()


def make_trigger(model_version: str | None, generation: int, reasons: Sequence[Reason]) -> Trigger:
    return Trigger(uuid.uuid4().hex, model_version, generation, tuple(reasons), now_ms())


def parse_trigger(value: bytes | None) -> Trigger:
    """A trigger record's value -> :class:`Trigger`. Raises InvalidMessage (bad_feedback)."""
    doc = c.parse_json(value or b"", what="trigger", max_bytes=MAX_TRIGGER_BYTES, max_depth=8, code=BAD_FEEDBACK)
    validate(doc, "trigger", "trigger")
    reasons = tuple(Reason(r["reason"], r["message"], dict(r["numbers"])) for r in doc["reasons"])
    return Trigger(doc["trigger_id"], doc["model_version"], int(doc["generation"]), reasons, int(doc["timestamp"]))


def decision_event(trigger_id: str, outcome: Literal["promoted", "refused", "failed"], reason: str, *,
                   decision: Mapping[str, Any] | None = None, champion: str | None = None,
                   **extra: Any) -> dict[str, Any]:
    """The trainer's outcome for one trigger (the models topic); ``decision``: the registry's record."""
    d = dict(decision or {})
    doc = {
        "trigger_id": trigger_id,
        "outcome": outcome,
        "challenger": d.get("challenger"),
        "accepted": bool(d.get("accepted", False)),
        "reason": reason,
        "champion_before": d.get("champion_before", champion),
        "champion_after": d.get("champion_after", champion),
        "metric": d.get("metric"),
        "challenger_value": d.get("challenger_value"),
        "champion_value": d.get("champion_value"),
        "margin": d.get("margin"),
        "timestamp": now_ms(),
        **extra,
    }
    validate(doc, "decision", "decision")
    return doc
