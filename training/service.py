"""The trainer service: consumes retraining triggers, trains a challenger, puts it through the gate.

``python -m training.service`` (or ``lookalike trainer``). For each trigger on
``LOOKALIKE_TRIGGERS_TOPIC``:

1. absorb it if a training already finished since it was raised (an older generation)
   or if another trainer holds the lease (:func:`lookalike.ledger.trainer_decision`);
2. take the lease in Redis (renewed while training, released after), so the
   aggregator absorbs further triggers meanwhile;
3. retrain the champion's recipe (its card's training config: same data, same split)
   plus the feedback pairs' contrastive term (:mod:`training.pairs`);
4. ``Registry.propose``: promotion only through the gate, which records its decision;
5. record the training in Redis (next generation, baselines for the policy) and publish
   the outcome on ``LOOKALIKE_MODELS_TOPIC`` (``lookalike/schemas/decision.schema.json``).

The trigger's offset is committed after all of that: a crash mid-training retrains.
A refused challenger stays in the store under its version and the ``challenger``
alias; the champion, and everything serving, stay as they were.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import redis
from confluent_kafka import Producer

from lookalike.artifacts import CHAMPION, ModelStore
from lookalike.clients import producer_config
from lookalike.errors import InvalidMessage, LookalikeError
from lookalike.events import Trigger, decision_event, parse_trigger
from lookalike.ledger import FeedbackLedger, trainer_decision
from lookalike.registry import Registry
from lookalike.runtime import Loop, Output, Record, Sender, Source, dead_letter, freeze_heap, run_forever
from lookalike.settings import TrainerSettings
from lookalike.status import indexer_status
from training.train import TrainConfig, train

log = logging.getLogger(__name__)


# TrainConfig fields added with the split by period, at the values that reproduce older recipes.
LEGACY_RECIPE: dict[str, Any] = {"split": "random", "shoot_augment": False, "shoot_strength": 1.0, "aux_labels": (),
                                 "ema_decay": 0.0, "flip_average": False}


def config_from_card(raw: dict[str, Any], settings: TrainerSettings) -> TrainConfig:
    """The champion's training configuration, with the trainer's overrides; never promotes by itself."""
    fields = set(TrainConfig.__dataclass_fields__)
    values = {k: v for k, v in raw.items() if k in fields}
    for name in ("data", "cache_dir"):
        if values.get(name) is not None:
            values[name] = Path(values[name])
    if "channels" in values:
        values["channels"] = tuple(values["channels"])
    if "aux_labels" in values:
        values["aux_labels"] = tuple(values["aux_labels"])
    for name, value in LEGACY_RECIPE.items():  # a card from before these fields: its recipe as it was
        values.setdefault(name, value)
    config = TrainConfig(**values)
    overrides: dict[str, Any] = {"promote": False}
    if settings.trainer_data is not None:
        overrides["data"] = settings.trainer_data
    if settings.trainer_epochs:
        overrides["epochs"] = settings.trainer_epochs
    if settings.trainer_threads:
        overrides["threads"] = settings.trainer_threads
    return replace(config, **overrides)


class LeaseKeeper:
    """Renews the trainer's lease every third of its TTL until stopped."""

    def __init__(self, store: FeedbackLedger, owner: str, ttl_s: float) -> None:
        self.store, self.owner, self.ttl_s = store, owner, ttl_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="lease", daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.ttl_s / 3):
            try:
                if not self.store.renew_lease(self.owner, self.ttl_s):
                    log.warning("the training lease was lost (expired or taken); triggers may not be absorbed")
            except Exception as exc:  # Redis away: the lease may lapse, training goes on
                log.warning("cannot renew the training lease: %s", exc)

    def __enter__(self) -> LeaseKeeper:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        with contextlib.suppress(Exception):
            self.store.release_lease(self.owner)


class Trainer:
    """What the service does with one trigger; :meth:`run` is the consumer loop around it."""

    def __init__(self, settings: TrainerSettings, models: ModelStore | None = None,
                 store: FeedbackLedger | None = None, producer: Producer | None = None) -> None:
        self.settings = settings
        self.models = models or ModelStore(settings.models_path)
        self.store = store or FeedbackLedger.connect(settings)
        self.producer = producer or Producer(producer_config(settings))
        self.owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.training_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="training")

    def catalog_items(self) -> int | None:
        with contextlib.suppress(Exception):
            counts = [s.items for s in indexer_status(self.settings, self.settings.indexer_group)]
            return max(counts) if counts else None
        return None

    def handle(self, trigger: Trigger) -> dict[str, Any] | None:
        """Train for ``trigger`` unless it is absorbed; returns the outcome published, or None."""
        generation = int(self.store.last_training()["generation"])
        acquired = trigger.generation >= generation and self.store.acquire_lease(self.owner, self.settings.lease_ttl_s)
        verdict = trainer_decision(trigger.generation, generation, lease_acquired=acquired)
        if verdict != "train":
            log.info("trigger %s absorbed: %s (generation %d, current %d)", trigger.trigger_id, verdict,
                     trigger.generation, generation)
            self.store.count(f"trainer_absorbed:{verdict}")
            return None
        with LeaseKeeper(self.store, self.owner, self.settings.lease_ttl_s):
            labelled = self.store.totals().get("labelled", 0)  # feedback counted up to now feeds this training
            catalog = self.catalog_items()
            outcome = self._train_and_propose(trigger, catalog)
            self.store.record_training(outcome=outcome["outcome"], catalog_items=catalog, labelled=labelled,
                                       trigger_id=trigger.trigger_id, challenger=outcome["challenger"] or "")
            key = (outcome["challenger"] or trigger.trigger_id).encode()
            self.producer.produce(self.settings.models_topic, key=key, value=json.dumps(outcome).encode())
            self.producer.flush(30)
        log.info("trigger %s: %s (%s)", trigger.trigger_id, outcome["outcome"], outcome["reason"])
        return outcome

    def _train_and_propose(self, trigger: Trigger, catalog: int | None) -> dict[str, Any]:
        s = self.settings
        champion = self.models.aliases().get(CHAMPION)
        if champion is None:
            return decision_event(trigger.trigger_id, "failed", "no champion to retrain: train one with `lookalike train`")
        try:
            card = self.models.card(champion)
            config = config_from_card(dict(card.training.get("config") or {}), s)
            pairs = self.store.pairs()
            log.info("trigger %s: retraining %s's recipe (%d epochs) with %d feedback pairs", trigger.trigger_id,
                     champion, config.epochs, len(pairs))
            challenger = train(
                config, self.models, progress=False, feedback_pairs=pairs,
                pair_options={"weight": s.pair_weight, "margin": s.pair_margin, "batch": s.pair_batch},
                card_extra={"trigger": trigger.to_json(), "catalog_items": catalog, "retrained_from": champion},
            )
            decision = Registry(self.models, metric=s.gate_metric, margin=s.gate_margin).propose(challenger.version)
        except (LookalikeError, OSError, ValueError, KeyError, RuntimeError) as exc:
            log.exception("trigger %s: training failed", trigger.trigger_id)
            return decision_event(trigger.trigger_id, "failed", f"training failed: {exc}", champion=champion)
        return decision_event(trigger.trigger_id, "promoted" if decision.accepted else "refused", decision.reason,
                              decision=asdict(decision), pairs=challenger.training.get("feedback_pairs", {}))

    async def handle_records(self, records: list[Record]) -> list[Output]:
        """The runtime's stage: each trigger handled in a thread (a training takes minutes);
        while Redis is away it waits and tries again, so nothing is committed before the
        training and its bookkeeping are done."""
        loop = asyncio.get_running_loop()
        dead: list[Output] = []
        for record in records:
            try:
                trigger = parse_trigger(record.value)
            except InvalidMessage as exc:
                log.warning("trigger %s refused: %s", record.where(), exc)
                self.store.count("trainer_invalid_triggers")
                dead.append(dead_letter(self.settings.deadletter_topic, record, exc))
                continue
            while True:
                try:
                    await loop.run_in_executor(self.training_thread, self.handle, trigger)
                    break
                except redis.RedisError as exc:  # the lease and the bookkeeping live there: wait for it
                    log.warning("trigger %s: Redis is unavailable (%s); retrying", trigger.trigger_id, exc)
                    await asyncio.sleep(2.0)
        return dead

    def failed(self, record: Record, exc: Exception) -> list[Output]:
        """A trigger the stage failed on: dead-lettered with its reason (the loop goes on)."""
        return [dead_letter(self.settings.deadletter_topic, record, exc)]

    def run(self, stop: threading.Event | None = None) -> None:
        """Consume triggers until ``stop`` is set; each is committed after it was handled (a
        trigger being handled when ``stop`` comes is not: the next trainer takes it again)."""
        stop = stop or threading.Event()
        s = self.settings
        log.info("trainer %s: triggers from %s, models in %s", self.owner, s.triggers_topic, self.models.root)

        async def until_stopped() -> None:
            while not stop.is_set():
                await asyncio.sleep(0.2)

        async def serve() -> None:
            sender = Sender(s)
            triggers = Loop(name="triggers", service="trainer", sender=sender, handle=self.handle_records,
                            on_error=self.failed,
                            source=Source(s, group=s.trainer_group, name="triggers",
                                          **{"max.poll.interval.ms": min(s.max_training_s * 1000, 86_400_000)}),
                            topics=[s.triggers_topic], batch_max=1)
            try:
                await run_forever(triggers.run(), until_stopped(), names=("triggers", "stop"))
            finally:
                sender.close()
                self.producer.flush(10)

        asyncio.run(serve())


def main() -> None:
    """``python -m training.service``."""
    import signal

    from lookalike import logs
    from lookalike.topics import ensure_topics_if_allowed

    settings = TrainerSettings()
    logs.configure(settings.log_format, "trainer")
    ensure_topics_if_allowed(settings)  # with ACLs, `lookalike topics create` made them
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    trainer = Trainer(settings)
    freeze_heap()  # set up: what it imported is never walked by a collection again
    trainer.run(stop)


if __name__ == "__main__":
    main()
