"""The trainer service: consumes retraining triggers, trains a challenger, puts it through the gate.

``python -m training.service`` (or ``lookalike trainer``). For each trigger on
``LOOKALIKE_TRIGGERS_TOPIC``:

1. skip it if its record in Redis (:meth:`lookalike.ledger.FeedbackLedger.trigger_record`)
   says it was handled already (``done``, ``stale``, ``superseded``: a restart before its
   offset was committed), or if something newer answers it (:meth:`Trainer.superseded`: a
   training finished since it was raised, a newer trigger, a champion made after it);
2. take the lease in Redis (renewed while training, released after), so the aggregator
   absorbs further triggers meanwhile; while another trainer holds it, wait (a live one's
   training makes this trigger stale; a killed one's lease expires);
3. retrain the champion's recipe (its card's training config: same data, same split)
   plus the feedback pairs' contrastive term (:mod:`training.pairs`);
4. ``Registry.propose``: promotion only through the gate, which records its decision;
5. record the training in Redis (next generation, baselines for the policy, the trigger
   ``done``, in one transaction) and publish the outcome on ``LOOKALIKE_MODELS_TOPIC``
   (``lookalike/schemas/decision.schema.json``).

The trigger's offset is committed after all of that. Exactly once, across restarts and
kill -9: a trainer killed mid-training leaves the trigger ``training`` (not final), so it is
trained again; one killed after the model was stored but before step 5 finds that model
(:meth:`Trainer.finished_challenger`) and finishes the bookkeeping instead of training
again; one killed after step 5 finds the record ``done``. SIGTERM (:attr:`Trainer.stop`)
stops a training at its next batch (:mod:`training.cancel`): nothing is stored, the
trigger is ``interrupted`` and its offset is not committed, so the next start trains it.
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
from datetime import datetime
from pathlib import Path
from typing import Any

import redis
from confluent_kafka import Producer

from lookalike.artifacts import CHAMPION, ModelStore
from lookalike.clients import producer_config
from lookalike.errors import InvalidMessage, LookalikeError
from lookalike.events import Trigger, decision_event, parse_trigger
from lookalike.ledger import FINAL_STATES, FeedbackLedger, TriggerState
from lookalike.registry import Registry
from lookalike.runtime import Loop, Output, Record, Sender, Source, dead_letter, freeze_heap, run_forever
from lookalike.settings import TrainerSettings
from lookalike.status import indexer_status
from training import cancel
from training.cancel import TrainingStopped
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
        self.stop = threading.Event()  # SIGTERM: the training in progress stops at its next batch

    def catalog_items(self) -> int | None:
        with contextlib.suppress(Exception):
            counts = [s.items for s in indexer_status(self.settings, self.settings.indexer_group)]
            return max(counts) if counts else None
        return None

    def handle(self, trigger: Trigger) -> dict[str, Any] | None:
        """Train for ``trigger`` unless it was handled already or something newer answers it;
        returns the outcome published, or None. Raises :class:`TrainingStopped` when
        :attr:`stop` is set meanwhile (the trigger is then ``interrupted``: trained again when
        read again)."""
        store = self.store
        store.note_trigger(trigger)  # a manual trigger, or one raised before records were kept
        record = store.trigger_record(trigger.trigger_id) or {}
        if record.get("state") in FINAL_STATES:  # trained (or skipped) before a restart; its offset was not committed
            log.info("trigger %s was handled before (%s%s); not again", trigger.trigger_id, record["state"],
                     f": {record['outcome']}" if record.get("outcome") else "")
            store.count("trainer_skipped:handled")
            return None
        finished = self.finished_challenger(trigger)  # trained before a kill, its bookkeeping not done
        skip = self.acquire(trigger, check=finished is None)
        if skip is not None:
            state, why = skip
            log.info("trigger %s skipped: %s", trigger.trigger_id, why)
            store.update_trigger(trigger, state, why=why)
            store.count(f"trainer_skipped:{state}")
            return None
        with LeaseKeeper(store, self.owner, self.settings.lease_ttl_s):
            attempts = int(record.get("attempts", 0)) + (finished is None)
            store.update_trigger(trigger, "training", owner=self.owner, attempts=attempts)
            labelled = store.totals().get("labelled", 0)  # feedback counted up to now feeds this training
            catalog = self.catalog_items()
            try:
                with cancel.stop_on(self.stop):
                    outcome = self._train_and_propose(trigger, catalog, finished)
            except TrainingStopped:
                log.warning("trigger %s: training stopped on request; nothing stored, it trains again when read "
                            "again", trigger.trigger_id)
                store.update_trigger(trigger, "interrupted", why="the trainer was stopped during the training")
                raise
            store.record_training(outcome=outcome["outcome"], catalog_items=catalog, labelled=labelled,
                                  trigger_id=trigger.trigger_id, challenger=outcome["challenger"] or "")
            key = (outcome["challenger"] or trigger.trigger_id).encode()
            self.producer.produce(self.settings.models_topic, key=key, value=json.dumps(outcome).encode())
            self.producer.flush(30)
        log.info("trigger %s: %s (%s)", trigger.trigger_id, outcome["outcome"], outcome["reason"])
        return outcome

    def superseded(self, trigger: Trigger) -> tuple[TriggerState, str] | None:
        """Why ``trigger`` need not be trained any more, or None: a training finished after it
        was raised (an older generation), a newer trigger is out, or the champion was made
        after it was raised (a promotion by hand, another store's training)."""
        generation = int(self.store.last_training()["generation"])
        if trigger.generation < generation:
            return "stale", f"a training finished since it was raised (generation {trigger.generation}, now {generation})"
        newer = self.store.newer_trigger(trigger)
        if newer is not None:
            return "superseded", f"trigger {newer['trigger_id']}, raised after it, answers it"
        champion = self.models.aliases().get(CHAMPION)
        if champion is not None and champion != trigger.model_version:
            made_ms = datetime.fromisoformat(self.models.card(champion).created_at).timestamp() * 1000
            if made_ms > trigger.timestamp_ms:
                return "superseded", f"the champion {champion} was made after it was raised"
        return None

    def acquire(self, trigger: Trigger, *, check: bool = True) -> tuple[TriggerState, str] | None:
        """Take the training lease for ``trigger``, waiting while another trainer holds it
        (training: its outcome may make this trigger stale; killed: its lease expires within
        ``lease_ttl_s``); returns why it need not be trained instead (``check``)."""
        waiting = False
        while True:
            if self.store.acquire_lease(self.owner, self.settings.lease_ttl_s):
                skip = self.superseded(trigger) if check else None
                if skip is not None:
                    self.store.release_lease(self.owner)
                return skip
            skip = self.superseded(trigger) if check else None
            if skip is not None:
                return skip
            if not waiting:
                holder = self.store.lease_holder()
                log.info("trigger %s waits: the training lease is %s's", trigger.trigger_id, holder)
                self.store.update_trigger(trigger, "waiting", holder=holder)
                waiting = True
            if self.stop.wait(1.0):
                raise TrainingStopped("the trainer was stopped while waiting for the lease")

    def finished_challenger(self, trigger: Trigger) -> str | None:
        """A stored model trained for ``trigger`` (a trainer killed between storing it and
        recording the training), newest first among those made since the trigger was raised."""
        for version in reversed(self.models.versions()):
            try:
                card = self.models.card(version)
            except LookalikeError:
                continue
            if (card.training.get("trigger") or {}).get("trigger_id") == trigger.trigger_id:
                return version
            if datetime.fromisoformat(card.created_at).timestamp() * 1000 < trigger.timestamp_ms - 1000:
                return None  # older than the trigger: so are the rest
        return None

    def _train_and_propose(self, trigger: Trigger, catalog: int | None, finished: str | None) -> dict[str, Any]:
        s = self.settings
        registry = Registry(self.models, metric=s.gate_metric, margin=s.gate_margin)
        if finished is not None:  # trained already: its recorded decision, or the gate now
            card = self.models.card(finished)
            decided = [d for d in registry.decisions() if d.get("challenger") == finished]
            decision = decided[-1] if decided else asdict(registry.propose(finished))
            log.info("trigger %s: %s was trained for it before a restart; %s", trigger.trigger_id, finished,
                     "its decision stands" if decided else "put through the gate now")
            return decision_event(trigger.trigger_id, "promoted" if decision["accepted"] else "refused",
                                  decision["reason"], decision=decision, pairs=card.training.get("feedback_pairs", {}))
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
            decision = registry.propose(challenger.version)
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
                except TrainingStopped:
                    # Its offset must not be committed: wait here for the stop watcher to cancel the loop.
                    await asyncio.Event().wait()
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
        self.stop = stop = stop or self.stop  # set: a training in progress stops at its next batch
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

        try:
            asyncio.run(serve())
        finally:
            self.training_thread.shutdown(wait=True)  # a stopped training ends at its next batch


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
