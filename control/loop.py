"""`make loop` (`lookalike demo --loop`): the feedback loop, run and watched on the demo stack.

Shoppers query the live stack and act on the results; their feedback crosses the
retraining trigger; the trainer retrains the champion's recipe (a short one here) with
the feedback pairs; the gate accepts or refuses the challenger on the golden split and
says why; an accepted model is rolled out blue/green while the shoppers keep querying;
then ``lookalike models rollback`` goes back the same way. The run ends with a table and
a PNG timeline (control/timeline.py).

It runs on the demo's Kafka and Redis but in its own namespace: a run id names its
topics, consumer groups, Redis keys and a home with its own model store. Why not the
demo's own services and champion: the demo's champion is the full recipe (14 epochs,
minutes per epoch on a shared 2-core box); a retraining of that recipe takes as long,
and a shorter one cannot honestly beat it. So the loop trains its own champion with a
deliberately short recipe (``champion_epochs``) and lets the trainer retrain that recipe
longer (``trainer_epochs``): a challenger that can really win, decided by the real gate.
"""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from tqdm.auto import tqdm

from control.services import LocalServices, indexer_alive
from control.timeline import Mark, failed, plot_timeline, render_table, segment_row, segments
from lookalike import rollout
from lookalike.artifacts import ModelStore
from lookalike.catalog import iter_catalog
from lookalike.errors import StackError
from lookalike.ledger import FeedbackLedger
from lookalike.registry import Registry
from lookalike.settings import ClientSettings, CommonSettings, FeedbackSettings, StackSettings, default_home
from lookalike.status import wait_for_index
from lookalike.topics import ensure_topics
from producers.catalog_feed import CatalogFeed
from producers.shoppers import QueryRecord, ShopperRun

log = logging.getLogger(__name__)
S = TypeVar("S", bound=CommonSettings)
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class LoopOptions:
    """The loop run's knobs (``lookalike demo --loop --help``)."""

    data: Path
    catalog_items: int = 2000  # published to the loop's catalog; the photos are other items
    photos: int = 400  # products the shoppers photograph (never in the catalog)
    rate: float = 3.0  # shopper queries per second, in all
    lanes: int = 3  # shoppers asking at the same time
    trigger_feedback: int = 150  # labelled events (click, cart, purchase, dismiss) that trigger a retraining
    champion_epochs: int = 1  # the short recipe of the loop's first champion
    trainer_epochs: int = 3  # the trainer retrains that recipe this long
    channels: tuple[int, ...] = (8, 16, 32, 64)  # a small res-cnn at 32 px: an epoch in ~20 s on one busy core
    size: int = 32
    after_switch_s: float = 60.0  # shoppers on the new model before the rollback
    after_rollback_s: float = 40.0
    max_minutes: float = 25.0  # give up (and say so) after this
    out: Path = Path("out")
    keep: bool = False  # keep the run's topics and Redis keys
    seed: int = 7


def loop_env(prefix: str, home: Path, options: LoopOptions) -> dict[str, str]:
    """The services' environment: the run's own names, and the loop's short settings."""
    return {
        "LOOKALIKE_CATALOG_TOPIC": f"{prefix}.catalog",
        "LOOKALIKE_QUERIES_TOPIC": f"{prefix}.queries",
        "LOOKALIKE_REPLIES_TOPIC": f"{prefix}.replies",
        "LOOKALIKE_DEADLETTER_TOPIC": f"{prefix}.deadletter",
        "LOOKALIKE_CATALOG_VECTORS_TOPIC": f"{prefix}.catalog.vectors",
        "LOOKALIKE_QUERY_VECTORS_TOPIC": f"{prefix}.queries.vectors",
        "LOOKALIKE_PARTIALS_TOPIC": f"{prefix}.queries.partials",
        "LOOKALIKE_FEEDBACK_TOPIC": f"{prefix}.feedback",
        "LOOKALIKE_TRIGGERS_TOPIC": f"{prefix}.triggers",
        "LOOKALIKE_MODELS_TOPIC": f"{prefix}.models",
        "LOOKALIKE_REPLY_TOPIC_PREFIX": f"{prefix}.",
        "LOOKALIKE_WORKER_GROUP": f"{prefix}-worker",
        "LOOKALIKE_INDEXER_GROUP": f"{prefix}-indexer",
        "LOOKALIKE_FEEDBACK_GROUP": f"{prefix}-feedback",
        "LOOKALIKE_TRAINER_GROUP": f"{prefix}-trainer",
        "LOOKALIKE_HOME": str(home),
        "LOOKALIKE_MODEL_DIR": str(home / "models"),
        "LOOKALIKE_PARTITIONS": "2",
        "LOOKALIKE_WORKER_METRICS_PORT": "0",  # the demo's services hold 9410/9411
        "LOOKALIKE_INDEXER_METRICS_PORT": "0",
        "LOOKALIKE_STATUS_INTERVAL_S": "0.5",
        "LOOKALIKE_ROLLOUT_POLL_S": "0.5",
        "LOOKALIKE_ROLLOUT_GRACE_S": "15",
        # the aggregator: 10 s buckets for the timeline; the one trigger reason is feedback volume
        "LOOKALIKE_BUCKET_S": "10",
        "LOOKALIKE_POLICY_INTERVAL_S": "1",
        "LOOKALIKE_TRIGGER_MIN_FEEDBACK": str(options.trigger_feedback),
        "LOOKALIKE_TRIGGER_DROP_FRACTION": "0",
        "LOOKALIKE_TRIGGER_CATALOG_GROWTH": "0",  # the catalog fills up as the run starts
        "LOOKALIKE_TRIGGER_DRIFT": "0",
        # the default cool-down (1 h) keeps it to one training per run
        "LOOKALIKE_TRAINER_EPOCHS": str(options.trainer_epochs),
        # One thread: on a shared 2-core box two torch threads fought the other processes and an
        # epoch took 10x longer (227 s against 21 s measured); niced (control/services.py).
        "LOOKALIKE_TRAINER_THREADS": "1",
        "LOOKALIKE_TORCH_THREADS": "1",  # the worker's catalog batches, for the same reason
        "PYTHONUNBUFFERED": "1",
    }


def settings_from(cls: type[S], env: dict[str, str]) -> S:
    """A settings object from an environment dict (not the process's own)."""
    fields = cls.model_fields
    return cls(**{k[len("LOOKALIKE_"):].lower(): v for k, v in env.items()
                  if k.startswith("LOOKALIKE_") and k[len("LOOKALIKE_"):].lower() in fields})


class Watch:
    """Reads the loop's state once a second and turns changes into marks."""

    def __init__(self, env: dict[str, str], store: ModelStore, champion: str) -> None:
        self.feedback = settings_from(FeedbackSettings, env)
        self.ledger = FeedbackLedger.connect(self.feedback)
        self.redis = rollout.redis_client(self.feedback)
        self.registry = Registry(store)
        self.champion = champion
        self.marks: list[Mark] = []
        self.decision: dict[str, Any] | None = None
        self.switches: list[tuple[float, str]] = []  # (moment, serving after it)
        self.stage = "waiting for the trigger"
        self._seen_events = 0
        self._trigger_seen = False
        self._training_seen = False

    def labelled(self) -> int:
        return self.ledger.totals().get("labelled", 0)

    def poll(self) -> None:
        now = time.time()
        if not self._trigger_seen and (self.ledger.trigger_pending() or self.ledger.lease_holder()):
            self._trigger_seen = True
            self.stage = "trigger out"
        if not self._training_seen and self.ledger.lease_holder():
            self._training_seen = True
            self.stage = "trainer training"
            self.marks.append(Mark(now, "trigger", "the trainer takes it: retraining"))
        if self.decision is None:
            decisions = [d for d in self.registry.decisions() if d["action"] == "promote"
                         and d["challenger"] != self.champion]
            if decisions:
                self.decision = decisions[-1]
                verdict = "accepted" if self.decision["accepted"] else "refused"
                self.marks.append(Mark(self.decision["at"], "gate" if self.decision["accepted"] else "refused",
                                       f"gate {verdict}: {self.decision['reason']}"))
                self.stage = f"gate {verdict}"
        events = list(reversed(rollout.read_events(self.redis, self.feedback, count=50)))
        for event in events[self._seen_events:]:
            if event["event"] == "start":
                self.marks.append(Mark(float(event["at"]), "rollout", f"rollout starts: build {event['target']}"))
                self.stage = f"building {event['target']}"
            elif event["event"] == "switch":
                self.switches.append((float(event["at"]), str(event["serving"])))
                self.marks.append(Mark(float(event["at"]), "switch",
                                       f"switch to {event['serving']} (built in {event.get('build_s', 0):.0f} s)"))
                self.stage = f"switched to {event['serving']}"
        self._seen_events = len(events)

    def serving(self) -> str | None:
        state = rollout.read_state(self.redis, self.feedback)
        return state.serving if state else None


def run_loop(options: LoopOptions) -> int:
    """The whole loop run; returns the exit code (0: a switch was shown and nothing failed in it)."""
    started = time.time()
    run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:4]
    prefix = f"lookalike-loop-{run_id}"
    home = default_home() / "loop" / run_id
    env = loop_env(prefix, home, options)
    settings = settings_from(ClientSettings, env)
    store = ModelStore(settings.models_path)
    out = options.out
    out.mkdir(parents=True, exist_ok=True)
    print(f"== loop {run_id}: topics {prefix}.*, home {home}")
    print(f"   Kafka {settings.kafka_bootstrap}, Redis from LOOKALIKE_REDIS_URL; the demo's own services are left alone")
    if not _stack_answers(settings):
        print(f"no Kafka at {settings.kafka_bootstrap} or no Redis: the loop runs on a running stack; `make demo` first",
              file=sys.stderr)
        return 1
    ensure_topics(settings)

    items = list(iter_catalog(options.data))
    random.Random(options.seed).shuffle(items)
    photos, catalog = items[:options.photos], items[options.photos:options.photos + options.catalog_items]

    print(f"== champion: the short recipe ({options.champion_epochs} epoch, channels {options.channels}, "
          f"{options.size} px) on {options.data}")
    from training.train import TrainConfig, train

    recipe = TrainConfig(data=options.data, epochs=options.champion_epochs, channels=options.channels,
                         size=options.size, patience=None, threads=1, cache_dir=default_home() / "cache")
    champion = train(recipe, store, progress=True)
    print(f"   champion {champion.version}: P@5 {champion.metrics['precision_at_5']:.4f} on the golden split "
          f"({champion.training['train_seconds']:.0f} s)")

    services = LocalServices(StackSettings(state_dir=home / "services"))
    print("== services: worker, indexer, feedback aggregator, trainer (the trainer niced)")
    services.up(env=env)
    records: list[QueryRecord] = []
    shoppers: ShopperRun | None = None
    code = 1
    try:
        print(f"== catalog: {len(catalog)} items")
        feed = CatalogFeed(settings)
        feed.publish_items(catalog)
        feed.flush()
        indexer = services.daemon("indexer")
        wait_for_index(len(catalog), timeout_s=600, settings=settings, group=env["LOOKALIKE_INDEXER_GROUP"],
                       check=lambda: indexer_alive(indexer))
        print(f"   indexed at {(time.time() - started) / 60:.1f} min")

        watch = Watch(env, store, champion.version)
        shoppers = ShopperRun(settings, photos, rate=options.rate, lanes=options.lanes, seed=options.seed,
                              timeout_s=15.0)
        print(f"== shoppers: {options.rate:g} queries/s from {options.lanes} lanes, photos of {len(photos)} products "
              f"not in the catalog; trigger at {options.trigger_feedback} labelled events")
        t0 = time.time()
        shoppers.start()
        code = _watch(options, watch, shoppers, services, env, t0)
        shoppers.stop()
        stopped = time.time()
        time.sleep(3)  # the aggregator counts the last feedback
        records = shoppers.snapshot()
        during = _report(options, watch, records, env, champion.version, t0, stopped, started, run_id)
        if code == 0 and during:
            code = 1  # a switch was shown, but queries failed during it
    finally:
        if shoppers is not None:
            shoppers.stop()
        services.down()
        if not options.keep:
            _clean(settings, prefix)
        print(f"== done in {(time.time() - started) / 60:.1f} min (services stopped), exit code {code}")
    return code


def _stack_answers(settings: CommonSettings) -> bool:
    """Do Kafka and Redis answer (within seconds)?"""
    import redis
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    from lookalike.clients import confluent_config, redis_client

    try:
        AdminClient(confluent_config(settings)).list_topics(timeout=10)
        redis_client(settings, socket_timeout=5).ping()
    except (KafkaException, redis.RedisError, OSError):
        return False
    return True


def _cli(env: dict[str, str], *args: str) -> str:
    """Run ``lookalike ARGS`` as a user would, in the loop's namespace; returns its output."""
    done = subprocess.run([sys.executable, "-m", "control.cli", *args], env={**os.environ, **env}, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    return (done.stdout + done.stderr).strip()


def _watch(options: LoopOptions, watch: Watch, shoppers: ShopperRun, services: LocalServices,
           env: dict[str, str], t0: float) -> int:
    """Follow the run until the rollback was shown (0), the gate refused (2) or time ran out (1)."""
    deadline = t0 + options.max_minutes * 60
    phase_until: float | None = None
    rolled_back = False
    bar = tqdm(total=int(options.max_minutes * 60), unit="s", desc="loop",
               bar_format="{desc}: {n_fmt}s {postfix}", dynamic_ncols=True)
    try:
        while time.time() < deadline:
            time.sleep(1.0)
            bar.update(1)
            watch.poll()
            records = shoppers.snapshot()
            bad = len(failed(records))
            bar.set_postfix_str(f"{len(records)} queries, {bad} failed, labelled {watch.labelled()}"
                                f"/{options.trigger_feedback}, serving {watch.serving()}, {watch.stage}")
            for name in ("worker", "indexer", "feedback", "trainer"):
                if services.daemon(name).pid() is None:
                    raise StackError(f"the {name} died; last lines of its log:\n{services.daemon(name).log_tail()}")
            decision = watch.decision
            if decision is not None and not decision["accepted"] and phase_until is None:
                bar.write(f"gate refused {decision['challenger']}: {decision['reason']}")
                bar.write(f"$ lookalike models promote {decision['challenger']}\n"
                          f"{_cli(env, 'models', 'promote', decision['challenger'])}")
                phase_until = time.time() + 20
            if decision is not None and decision["accepted"] and not rolled_back:
                if any(v == decision["challenger"] for _, v in watch.switches) and phase_until is None:
                    phase_until = time.time() + options.after_switch_s
                if phase_until is not None and time.time() >= phase_until:
                    output = _cli(env, "models", "rollback")
                    rollbacks = [d for d in watch.registry.decisions() if d["action"] == "rollback"]
                    at = rollbacks[-1]["at"] if rollbacks else time.time()  # the CLI's own start-up is not the moment
                    watch.marks.append(Mark(at, "rollback", f"lookalike models rollback: {(output.splitlines() or ['?'])[-1]}"))
                    bar.write(f"$ lookalike models rollback\n{output}")
                    rolled_back, phase_until = True, None
            if rolled_back and phase_until is None and watch.switches and watch.switches[-1][1] == watch.champion:
                phase_until = time.time() + options.after_rollback_s
            if phase_until is not None and time.time() >= phase_until and (rolled_back or not decision["accepted"]):
                return 0 if rolled_back else 2
        bar.write(f"the loop did not finish within {options.max_minutes:g} min (stage: {watch.stage})")
        return 1
    finally:
        bar.close()


def _report(options: LoopOptions, watch: Watch, records: list[QueryRecord], env: dict[str, str], champion: str,
            t0: float, end: float, started: float, run_id: str) -> int:
    """Print the table, write the PNGs; returns the number of queries that failed during the switches.
    ``t0``: the shoppers started, ``end``: they stopped, ``started``: the run started."""
    from feedback.plots import plot_series
    from feedback.report import metrics_series
    from feedback.store import FeedbackStore

    feedback_settings = watch.feedback
    fstore = FeedbackStore.connect(feedback_settings)
    series = metrics_series(feedback_settings, store=fstore)
    segs = segments(records, watch.switches, champion, t0, end)
    rows = []
    for seg in segs:
        buckets = [b for b in fstore.buckets(seg.version)
                   if seg.start <= b * feedback_settings.bucket_s < seg.end]
        rows.append(segment_row(seg, t0, fstore.window_metrics(seg.version, buckets, None) if buckets else None))
    rollouts = [m.at for m in watch.marks if m.kind == "rollout"]
    grace = float(env["LOOKALIKE_ROLLOUT_GRACE_S"])
    during = sum(len(failed(records, start, at + grace + 15)) for start, (at, _v) in zip(rollouts, watch.switches,
                                                                                           strict=False))
    marks = list(watch.marks)
    trigger = _trigger_record(env)
    if trigger is not None:
        marks.append(Mark(trigger["timestamp"] / 1000, "trigger",
                          "trigger: " + "; ".join(r["message"] for r in trigger["reasons"])))
    table = render_table(rows, marks, t0, during, len(failed(records)), time.time() - started)
    timeline = plot_timeline(records, series, marks, t0, options.out / "loop-timeline.png",
                             title=f"the feedback loop, run {run_id}", end=end, bucket_s=feedback_settings.bucket_s)
    plot_series(series, options.out / "loop-metrics.png", feedback_settings.bucket_s,
                title=f"lookalike metrics --plot, loop run {run_id}")
    (options.out / "loop-table.txt").write_text(table + "\n")
    (options.out / "loop-series.json").write_text(json.dumps({"t0": t0, "end": end, "series": series,
                                                              "marks": [asdict(m) for m in marks]}))
    with (options.out / "loop-queries.jsonl").open("w") as fh:
        for r in records:
            fh.write(json.dumps(asdict(r)) + "\n")
    print("\n" + table)
    print(f"\n== timeline: {timeline}; per-version metrics: {options.out / 'loop-metrics.png'}; "
          f"table: {options.out / 'loop-table.txt'}")
    return during


def _trigger_record(env: dict[str, str]) -> dict[str, Any] | None:
    """The run's trigger as the aggregator emitted it (its timestamp and reasons), from the triggers topic."""
    from confluent_kafka import Consumer, TopicPartition

    from lookalike.clients import confluent_config

    settings = settings_from(CommonSettings, env)
    consumer = Consumer(confluent_config(settings, **{"group.id": f"loop-report-{uuid.uuid4().hex}",
                                                      "enable.auto.commit": False}))
    try:
        meta = consumer.list_topics(settings.triggers_topic, timeout=10).topics.get(settings.triggers_topic)
        if meta is None:
            return None
        consumer.assign([TopicPartition(settings.triggers_topic, p, 0) for p in meta.partitions])
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                return json.loads(msg.value())
        return None
    finally:
        consumer.close()


def _clean(settings: CommonSettings, prefix: str) -> None:
    """Delete the run's topics, consumer groups and Redis keys (every name has the run's
    prefix; the services are stopped by now)."""
    from lookalike.cleanup import find, remove

    try:
        found = find(settings, [prefix])
        left = remove(settings, found)
        print(f"== cleaned: {found.summary()} of {prefix} (--keep keeps them)"
              + (f"; left: {left.summary()}, `lookalike stack gc --apply` removes them" if left else ""))
    except Exception as exc:  # cleaning is a courtesy; the run's result stands
        print(f"== could not clean {prefix}: {exc}")
