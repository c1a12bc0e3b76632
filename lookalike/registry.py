"""The promotion gate: a challenger becomes champion only if it beats the champion on the
same golden split by a margin; every decision is recorded, and a promotion can be rolled back.

The figure compared is the out-of-period precision@5 (``period_precision_at_5``: the
newest product ids held out, queried as shopper photos against the training split; see
docs/training.md). A random split leaves near-twins of most test items in the catalog
and rewards recall of siblings, so it is not what decides. Cards measured on a random
split (made before the split by period) have no such figure; two of them on the same
split are still compared on ``precision_at_5``, as they were.

Decisions are appended to ``decisions.jsonl`` in the model store; the champions a
promotion replaced are kept in ``champion_history.json`` for ``rollback``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

from lookalike.artifacts import CHAMPION, ModelStore, write_atomic
from lookalike.errors import ModelArtifactError

CHALLENGER = "challenger"
GATE_METRIC = "period_precision_at_5"
LEGACY_METRIC = "precision_at_5"  # the random split's, for cards that have nothing else
DECISIONS_FILE = "decisions.jsonl"
HISTORY_FILE = "champion_history.json"


@dataclass(frozen=True)
class Decision:
    action: str  # "promote" | "rollback"
    accepted: bool
    challenger: str | None
    champion_before: str | None
    champion_after: str | None
    metric: str
    challenger_value: float | None
    champion_value: float | None
    margin: float
    reason: str
    at: float


class Registry:
    """Champion/challenger aliases over a :class:`ModelStore`, behind a gate."""

    def __init__(self, store: ModelStore, metric: str = GATE_METRIC, margin: float = 0.005,
                 legacy_metric: str | None = LEGACY_METRIC) -> None:
        self.store = store
        self.metric = metric
        self.margin = margin
        self.legacy_metric = legacy_metric

    def _metric(self, version: str, metric: str | None = None) -> float | None:
        value = self.store.card(version).metrics.get(metric or self.metric)
        return float(value) if isinstance(value, int | float) else None

    def _compared_on(self, challenger: str, champion: str | None) -> str:
        """The gate's metric; the legacy one only when neither card has the gate's."""
        if self.legacy_metric is None or self._metric(challenger) is not None:
            return self.metric
        if champion is not None and self._metric(champion) is not None:
            return self.metric
        return self.legacy_metric

    def _record(self, decision: Decision) -> Decision:
        self.store.root.mkdir(parents=True, exist_ok=True)
        with (self.store.root / DECISIONS_FILE).open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(asdict(decision)) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        return decision

    def history(self) -> list[str]:
        path = self.store.root / HISTORY_FILE
        return list(json.loads(path.read_text())) if path.is_file() else []

    def decisions(self) -> list[dict[str, Any]]:
        path = self.store.root / DECISIONS_FILE
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]

    def propose(self, challenger: str) -> Decision:
        """Name a model the challenger and put it through the gate."""
        version = self.store.resolve(challenger)
        self.store.set_alias(CHALLENGER, version)
        return self.promote(version)

    def promote(self, challenger: str) -> Decision:
        """Promote ``challenger`` if it beats the champion by the margin on the same split."""
        version = self.store.resolve(challenger)
        aliases = self.store.aliases()
        champion = aliases.get(CHAMPION)
        metric = self._compared_on(version, champion)
        new_value = self._metric(version, metric)
        old_value = self._metric(champion, metric) if champion else None

        def decide(accepted: bool, reason: str) -> Decision:
            if accepted:
                if champion:
                    write_atomic(self.store.root / HISTORY_FILE, json.dumps([*self.history(), champion]).encode())
                self.store.set_alias(CHAMPION, version)
            return self._record(Decision("promote", accepted, version, champion, version if accepted else champion,
                                         metric, new_value, old_value, self.margin, reason, time.time()))

        if champion is None:
            return decide(True, "no champion yet")
        if champion == version:
            return decide(False, "already the champion")
        if new_value is None:
            return decide(False, f"the challenger's card has no {metric}")
        if self.store.card(version).data_split_sha256 != self.store.card(champion).data_split_sha256:
            return decide(False, "measured on another split than the champion: not comparable "
                                 "(`lookalike models promote` after retraining the champion's recipe on this split)")
        if old_value is not None and new_value < old_value + self.margin:
            return decide(False, f"{metric} {new_value:.4f} does not beat the champion's {old_value:.4f} "
                                 f"by {self.margin}")
        if old_value is None:
            return decide(True, f"{metric} {new_value:.4f}; the champion's card has none to compare")
        return decide(True, f"{metric} {new_value:.4f} beats the champion's {old_value:.4f} by at least {self.margin}")

    def rollback(self) -> Decision:
        """Make the champion that the last promotion replaced champion again."""
        history = self.history()
        champion = self.store.aliases().get(CHAMPION)
        if not history:
            raise ModelArtifactError("nothing to roll back to: no earlier champion is recorded")
        previous = history[-1]
        self.store.set_alias(CHAMPION, previous)
        write_atomic(self.store.root / HISTORY_FILE, json.dumps(history[:-1]).encode())
        metric = self._compared_on(previous, None)
        return self._record(Decision("rollback", True, None, champion, previous, metric,
                                     None, self._metric(previous, metric), self.margin, "rollback", time.time()))
