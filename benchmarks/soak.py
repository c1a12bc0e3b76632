"""A soak with chaos: the five services under steady traffic for N minutes, a fault every few minutes.

    python -m benchmarks.soak --minutes 30          # on the local stack that LOOKALIKE_STACK_* names

It runs on the local stack (``LocalStack(StackSettings())``: the ports and state folder of
``LOOKALIKE_STACK_*``; started when it is not up, and then stopped again), because it
restarts that broker and stops that Redis. The services are subprocesses on topics,
groups and Redis keys of the run's own (a ``bench-soak-…`` prefix, removed in a finally
by :func:`lookalike.cleanup.remove_prefix`), started as the integration tests start them
(tests/integration/conftest.py), with a champion the run trains first (a short recipe on a
subset of ``--data``, into the run's own model store).

Traffic, all along: ``--rate`` queries/s from an outside client (a plain confluent-kafka
producer and reply consumer, each query keyed by a unique request id:
tests/integration/steady.py), catalog adds, updates and removals at ``--catalog-rate``/s,
simulated shoppers whose feedback triggers one retraining (producers/shoppers.py) and so
one live switch.

Faults: the trainer is killed with -9 while it trains (when it holds the training lease);
the others come in turn, one every ``min(3 min, run / (faults + 1))``: kill -9 of the worker,
the indexer, the aggregator, the gateway, a broker restart (SIGTERM, start), Redis away
(``SHUTDOWN SAVE``, started again ``--redis-away-s`` later with its data, as a persistent
Redis would come back). A killed service is started again at once, as a supervisor would;
one that dies by itself is restarted too and counted as a crash.

At the end it checks, prints a table and writes ``--out`` (JSON); exit 1 when a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import random
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from control.loop import settings_from
from control.stack.local import LocalStack
from lookalike import rollout
from lookalike.artifacts import ModelStore
from lookalike.catalog import CatalogItem, iter_catalog
from lookalike.cleanup import remove_prefix
from lookalike.clients import redis_client
from lookalike.ledger import FeedbackLedger
from lookalike.registry import Registry
from lookalike.settings import FeedbackSettings, StackSettings, default_home
from producers.catalog_feed import CatalogFeed
from producers.shoppers import ShopperRun

REPO = Path(__file__).resolve().parents[1]
ROTATION = ("worker", "indexer", "feedback", "gateway", "broker", "redis")
SERVICES = ("worker", "indexer", "feedback", "trainer", "gateway")
RSS_LIMIT = 0.10  # growth after warm-up


@dataclass(frozen=True)
class SoakOptions:
    """The run's knobs (``python -m benchmarks.soak --help``)."""

    minutes: float = 30.0
    data: Path = Path("../shared/datasets/fashion-9k")
    classes: int = 8  # the largest article types of ``data``
    per_class: int = 80  # items of each: the live catalog's pool and the champion's training data
    catalog_start: int = 320  # items published before the traffic starts
    rate: float = 50.0  # outside client's queries per second
    catalog_rate: float = 5.0  # adds, updates and removals per second
    shopper_rate: float = 2.0
    trigger_feedback: int = 30  # labelled events that trigger the retraining
    faults: tuple[str, ...] = ROTATION
    kill_trainer: bool = True  # mid-training
    redis_away_s: float = 30.0
    fault_every_s: float = 180.0  # at most; less in a short run
    warmup_s: float = 60.0  # RSS baselines are taken this long after a start (and after the switch)
    drain_s: float = 180.0  # after the traffic: the wait for every reply, every feedback count
    switch_wait_s: float = 300.0  # the traffic goes on this long past the end while the switch is not done
    out: Path = Path("out/soak.json")
    home: Path | None = None  # the run's folder (logs, model store); default under LOOKALIKE_HOME
    seed: int = 11


@dataclass
class Fault:
    name: str
    at_s: float  # since the traffic started
    took_s: float = 0.0  # down and up again (for a kill: the restart is at once)
    note: str = ""


@dataclass
class Soak:
    """One run: its stack, services, traffic, faults and samples."""

    options: SoakOptions
    stack: LocalStack
    prefix: str = field(default_factory=lambda: f"bench-soak-{uuid.uuid4().hex[:8]}")
    faults: list[Fault] = field(default_factory=list)
    kills: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SERVICES, 0))
    crashes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SERVICES, 0))
    rss: list[dict[str, Any]] = field(default_factory=list)  # {"t", "service", "pid", "kb"}
    started: dict[int, float] = field(default_factory=dict)  # pid -> start (monotonic)
    expected: dict[str, int | None] = field(default_factory=dict)  # item id -> revision (None: removed)
    catalog_ops: dict[str, int] = field(default_factory=lambda: {"add": 0, "update": 0, "remove": 0})
    t0: float = 0.0
    switched_at: float | None = None

    def __post_init__(self) -> None:
        self.home = self.options.home or default_home() / "soak" / self.prefix
        self.home.mkdir(parents=True, exist_ok=True)
        self.stopping = threading.Event()
        self.lock = threading.RLock()  # the procs map: the fault thread and the supervisor restart services

    # -- setup -------------------------------------------------------------------------
    def dataset(self) -> list[CatalogItem]:
        """``per_class`` items of each of the ``classes`` largest article types, as a dataset
        folder of the run's own (styles.csv and links to the images: nothing is copied)."""
        items = [i for i in iter_catalog(self.options.data) if i.label]
        by_label: dict[str, list[CatalogItem]] = {}
        for item in items:
            by_label.setdefault(str(item.label), []).append(item)
        labels = sorted(by_label, key=lambda k: -len(by_label[k]))[: self.options.classes]
        chosen = [i for label in labels for i in by_label[label][: self.options.per_class]]
        data = self.home / "data"
        (data / "images").mkdir(parents=True, exist_ok=True)
        with (self.options.data / "styles.csv").open(newline="") as src:
            rows = list(csv.DictReader(src))
        wanted = {i.item_id for i in chosen}
        with (data / "styles.csv").open("w", newline="") as dst:
            writer = csv.DictWriter(dst, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(r for r in rows if r["id"] in wanted)
        for item in chosen:
            link = data / "images" / Path(item.image_path).name
            if not link.exists():
                link.symlink_to(Path(item.image_path).resolve())
        return list(iter_catalog(data))

    def train_champion(self, data: Path) -> str:
        from training.train import TrainConfig, train

        store = ModelStore(self.home / "models")
        config = TrainConfig(data=data, min_count=5, size=32, channels=(8, 16, 32, 64), epochs=1, batch_size=32,
                             patience=None, threads=1, cache_dir=self.home / "cache", split="random")
        card = train(config, store, progress=False)  # the first model of a store: the gate makes it champion
        self.champion = card.version
        return card.version

    def env(self) -> dict[str, str]:
        from tests.integration.consistency import SNAPSHOT_ENV

        return {
            **SNAPSHOT_ENV,  # snapshots every second, the writer's lease short: the end check reads one
            "LOOKALIKE_SNAPSHOT_CHUNK_BYTES": str(4 << 20),  # not the recovery tests' many small chunks
            "LOOKALIKE_SNAPSHOT_EVERY_ITEMS": "500",
            "LOOKALIKE_STATUS_INTERVAL_S": "1",
            "LOOKALIKE_GATEWAY_PORT": "0",
            "LOOKALIKE_ROLLOUT_POLL_S": "0.5",
            "LOOKALIKE_ROLLOUT_GRACE_S": "10",
            "LOOKALIKE_POLICY_INTERVAL_S": "1",
            "LOOKALIKE_TRIGGER_MIN_FEEDBACK": str(self.options.trigger_feedback),
            "LOOKALIKE_TRIGGER_DROP_FRACTION": "0",
            "LOOKALIKE_TRIGGER_CATALOG_GROWTH": "0",  # the catalog churns all along
            "LOOKALIKE_TRIGGER_DRIFT": "0",
            "LOOKALIKE_TRAINER_EPOCHS": "4",  # the champion's 1-epoch recipe trained longer: a better challenger
            "LOOKALIKE_TRAINER_THREADS": "1",
            "LOOKALIKE_LEASE_TTL_S": "10",  # the killed trainer's lease lapses soon
        }

    def start(self) -> None:
        from tests.conftest import Cluster
        from tests.integration.conftest import start_pipeline

        items = self.dataset()
        print(f"== soak {self.prefix}: stack {self.stack.kafka.bootstrap} / {self.stack.redis.url}, home {self.home}",
              flush=True)
        champion = self.train_champion(self.home / "data")
        print(f"   champion {champion} (1 epoch on {len(items)} items); services starting", flush=True)
        cluster = Cluster(self.stack.kafka.bootstrap, self.stack.redis.url, "soak stack")
        self.pipeline = start_pipeline(cluster, self.home / "models", self.home, self.env(), prefix=self.prefix)
        for name in ("feedback", "trainer", "gateway"):
            self.pipeline.start(name)
        for proc in self.pipeline.procs.values():
            self.started[proc.pid] = time.monotonic()
        self.settings = self.pipeline.settings
        self.feedback_settings = settings_from(FeedbackSettings, self.pipeline.env)
        self.items = {i.item_id: i for i in items}
        self.images = {i.item_id: Path(i.image_path).read_bytes() for i in items}
        feed = CatalogFeed(self.settings)
        for item in items[: self.options.catalog_start]:
            feed.publish(item.item_id, self.images[item.item_id], {**item.metadata, "rev": 0})
            self.expected[item.item_id] = 0
        feed.flush(120)
        from lookalike.status import wait_for_index

        wait_for_index(self.options.catalog_start, 600, settings=self.settings,
                       group=self.pipeline.env["LOOKALIKE_INDEXER_GROUP"], check=self.check_alive)
        self.wait_answering()

    def check_alive(self) -> None:
        if not self.pipeline.alive():
            raise RuntimeError("a service died while starting:\n" + self.pipeline.logs_tail())

    def wait_answering(self, timeout_s: float = 180) -> None:
        from lookalike.errors import ReplyTimeout

        deadline = time.monotonic() + timeout_s
        image = self.images[next(iter(self.expected))]
        with self.pipeline.client(impressions=False) as client:
            while time.monotonic() < deadline:
                self.check_alive()
                try:
                    if client.ask(image, timeout_s=5)["status"] == "ok":
                        return
                except ReplyTimeout:
                    continue
        raise RuntimeError("the pipeline did not answer:\n" + self.pipeline.logs_tail())

    # -- the supervisor, samples, faults ------------------------------------------------
    def restart(self, name: str, *, kill: bool) -> None:
        with self.lock:
            if kill:
                self.pipeline.kill(name)
                self.kills[name] += 1
            else:
                self.crashes[name] += 1
            proc = self.pipeline.start(name)
            self.started[proc.pid] = time.monotonic()

    def supervise(self) -> None:
        """Every second: restart a service that died by itself; every 5 s: sample RSS."""
        next_sample = 0.0
        while not self.stopping.wait(1.0):
            with self.lock:
                for name, proc in list(self.pipeline.procs.items()):
                    if proc.poll() is not None:
                        print(f"   !! {name} (pid {proc.pid}) exited with {proc.returncode}; restarted", flush=True)
                        self.restart(name, kill=False)
                procs = dict(self.pipeline.procs)
            if time.monotonic() >= next_sample:
                next_sample = time.monotonic() + 5.0
                for name, proc in procs.items():
                    kb = vm_rss_kb(proc.pid)
                    if kb is not None:
                        self.rss.append({"t": time.monotonic(), "service": name, "pid": proc.pid, "kb": kb})

    def churn(self) -> None:
        """Catalog adds, updates and removals at ``catalog_rate``/s, flushed every second."""
        rng = random.Random(self.options.seed)
        feed = CatalogFeed(self.settings)
        pool = sorted(self.items)
        interval, n, start = 1.0 / self.options.catalog_rate, 0, time.monotonic()
        low, high = int(self.options.catalog_start * 0.8), int(self.options.catalog_start * 1.2)
        while not self.stopping.is_set():
            present = [i for i in pool if self.expected.get(i) is not None]
            absent = [i for i in pool if self.expected.get(i) is None]
            op = rng.choice(["add", "update", "update", "remove"])
            if (op == "add" and not absent) or (op == "remove" and len(present) <= low):
                op = "update"
            if len(present) >= high and op == "add":
                op = "remove"
            if op == "add":
                item_id = rng.choice(absent)
                self.expected[item_id] = 0
            else:
                item_id = rng.choice(present)
                self.expected[item_id] = None if op == "remove" else (self.expected[item_id] or 0) + 1
            rev = self.expected[item_id]
            if rev is None:
                feed.remove(item_id)
            else:
                feed.publish(item_id, self.images[item_id], {**self.items[item_id].metadata, "rev": rev})
            self.catalog_ops[op] += 1
            n += 1
            if n % max(1, int(self.options.catalog_rate)) == 0:
                feed.flush(600)  # a broker restart holds it here: the schedule catches up after
            delay = start + n * interval - time.monotonic()
            if delay > 0:
                self.stopping.wait(delay)
        feed.flush(600)

    def schedule(self) -> list[tuple[float, str]]:
        faults = self.options.faults
        every = min(self.options.fault_every_s, self.options.minutes * 60 / (len(faults) + 1))
        return [(every * (i + 1), name) for i, name in enumerate(faults)]

    def inject(self, name: str) -> Fault:
        fault = Fault(name, time.monotonic() - self.t0)
        began = time.monotonic()
        if name in SERVICES:
            self.restart(name, kill=True)
            fault.note = "kill -9, restarted at once"
        elif name == "broker":
            self.stack.kafka.down()
            time.sleep(2)
            self.stack.kafka.up()
            fault.note = "SIGTERM, started again"
        elif name == "redis":
            with contextlib.suppress(Exception):  # the connection closes as it goes
                redis_client(self.settings).shutdown(save=True)  # nothing written after its data is saved
            self.stack.redis.daemon.stop(timeout_s=15)
            time.sleep(self.options.redis_away_s)
            self.stack.redis.up()  # loads the dump it saved
            (self.stack.settings.state_dir / "redis" / "dump.rdb").unlink(missing_ok=True)
            fault.note = f"SHUTDOWN SAVE, away {self.options.redis_away_s:g} s, started with its data"
        fault.took_s = round(time.monotonic() - began, 1)
        print(f"   fault at {fault.at_s:.0f} s: {name} ({fault.note}, {fault.took_s} s)", flush=True)
        return fault

    def watch_training(self, ledger: FeedbackLedger, killed: list[bool]) -> None:
        """Kill the trainer once, while it holds the training lease; note the switch."""
        try:
            if self.options.kill_trainer and not killed[0] and ledger.lease_holder():
                time.sleep(1.0)
                if ledger.lease_holder():
                    killed[0] = True
                    fault = Fault("trainer", time.monotonic() - self.t0)
                    self.restart("trainer", kill=True)
                    fault.note = "kill -9 while it held the training lease, restarted at once"
                    self.faults.append(fault)
                    print(f"   fault at {fault.at_s:.0f} s: trainer ({fault.note})", flush=True)
            if self.switched_at is None:
                r = rollout.redis_client(self.feedback_settings)
                if any(e["event"] == "switch" for e in rollout.read_events(r, self.feedback_settings, count=50)):
                    self.switched_at = time.monotonic()
                    print(f"   live switch at {self.switched_at - self.t0:.0f} s", flush=True)
        except Exception:  # Redis away: next time
            pass

    # -- the run -------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from tests.integration.steady import SteadyStream

        o = self.options
        queries = [(self.images[i], i) for i in list(self.items)[:200]]
        stream = SteadyStream(self.settings, queries, rate=o.rate, duration_s=o.minutes * 60, drain_s=o.drain_s)
        shoppers = ShopperRun(self.settings, list(self.items.values()), rate=o.shopper_rate, lanes=2, seed=o.seed)
        threads = [threading.Thread(target=self.supervise, daemon=True), threading.Thread(target=self.churn, daemon=True)]
        ledger = FeedbackLedger.connect(self.feedback_settings)
        self.measures = {"start": self.measure()}
        self.t0 = time.monotonic()
        stream.start()
        shoppers.start()
        for thread in threads:
            thread.start()
        pending = self.schedule()
        trainer_killed = [False]
        print(f"== traffic: {o.rate:g} queries/s, catalog {o.catalog_rate:g}/s, shoppers {o.shopper_rate:g}/s for "
              f"{o.minutes:g} min; faults at {[(round(t), n) for t, n in pending]} s, the trainer's while it trains",
              flush=True)
        end = self.t0 + o.minutes * 60
        while time.monotonic() < end or (self.switched_at is None and time.monotonic() < end + o.switch_wait_s):
            if time.monotonic() >= end:  # the switch is late: the traffic goes on a while
                stream.duration_s = time.monotonic() - self.t0 + 5
            if pending and time.monotonic() - self.t0 >= pending[0][0]:
                self.faults.append(self.inject(pending.pop(0)[1]))
            self.watch_training(ledger, trainer_killed)
            time.sleep(0.5)
        traffic_s = time.monotonic() - self.t0
        shoppers.stop()
        self.stopping.set()
        for thread in threads:
            thread.join(60)
        print(f"== traffic stopped after {traffic_s:.0f} s; draining replies", flush=True)
        report = stream.join()
        return self.check(report, shoppers, traffic_s)

    def measure(self) -> dict[str, Any]:
        client = redis_client(self.settings)
        memory = client.info("memory")["used_memory"]
        persistent: dict[str, int] = {}  # keys without a TTL, by kind: their first four parts
        for key in client.scan_iter(count=1000):
            if client.ttl(key) == -1:
                kind = ":".join(key.decode(errors="replace").split(":")[:4])
                persistent[kind] = persistent.get(kind, 0) + 1
        return {"redis_used_memory": int(memory), "redis_keys": int(client.dbsize()),
                "redis_keys_without_ttl": sum(persistent.values()), "redis_kinds_without_ttl": persistent,
                "kafka_log_bytes": du_bytes(self.stack.kafka.dir / "data")}

    # -- the checks ------------------------------------------------------------------------
    def check(self, report: Any, shoppers: ShopperRun, traffic_s: float) -> dict[str, Any]:
        checks: dict[str, dict[str, Any]] = {}

        def judge(name: str, ok: bool, figures: str, **extra: Any) -> None:
            checks[name] = {"ok": bool(ok), "figures": figures, **extra}

        judge("queries: one reply each", report.answered == report.sent,
              f"{report.answered}/{report.sent} answered, errors {report.errors or 0}, "
              f"{report.duplicates} duplicates (at least once), slowest {report.max_latency_s:.1f} s",
              sent=report.sent, answered=report.answered, errors=report.errors, duplicates=report.duplicates,
              unanswered=report.unanswered)
        judge("feedback: counted once", *self.check_feedback(shoppers))
        judge("index = compacted catalog", *self.check_index())
        judge("retraining and live switch", *self.check_switch())
        judge("RSS growth < 10 % after warm-up", *self.check_rss())
        end = self.measure()
        start = self.measures["start"]
        # A kind of key without a TTL that grows with the traffic would grow without bound; a new
        # model version brings a few kinds of its own (its snapshots, its status, its sample).
        before = start["redis_kinds_without_ttl"]
        grown = {k: (before.get(k, 0), n) for k, n in end["redis_kinds_without_ttl"].items() if n > before.get(k, 0) + 20}
        judge("Redis bounded", not grown,
              f"used_memory {mb(start['redis_used_memory'])} -> {mb(end['redis_used_memory'])} MB, keys "
              f"{start['redis_keys']} -> {end['redis_keys']}, without a TTL {start['redis_keys_without_ttl']} -> "
              f"{end['redis_keys_without_ttl']}" + (f", grown: {grown}" if grown else "")
              + " (the rest expire: the reply join records after a day)", start=start, end=end)
        judge("Kafka log bounded", True,
              f"{mb(start['kafka_log_bytes'])} -> {mb(end['kafka_log_bytes'])} MB "
              f"({(end['kafka_log_bytes'] - start['kafka_log_bytes']) / max(report.sent, 1) / 1024:.1f} KB per query; "
              "the queries/replies topics keep 24 h, the catalog topics are compacted)")
        judge("no service died by itself", not any(self.crashes.values()),
              ", ".join(f"{n} {self.kills[n]} killed / {self.crashes[n]} crashed" for n in SERVICES))
        return {"prefix": self.prefix, "minutes": self.options.minutes, "traffic_s": round(traffic_s, 1),
                "options": {k: str(v) for k, v in asdict(self.options).items()},
                "faults": [asdict(f) for f in self.faults], "restarts": {n: self.kills[n] + self.crashes[n]
                                                                          for n in SERVICES},
                "kills": self.kills, "crashes": self.crashes, "catalog_ops": self.catalog_ops,
                "switched_at_s": round(self.switched_at - self.t0, 1) if self.switched_at else None,
                "checks": checks, "ok": all(c["ok"] for c in checks.values())}

    def check_feedback(self, shoppers: ShopperRun) -> tuple[bool, str]:
        from feedback.store import FeedbackStore

        sent = sum(r.events for r in shoppers.snapshot())
        store = FeedbackStore.connect(self.feedback_settings)
        deadline = time.monotonic() + self.options.drain_s
        totals: dict[str, int] = {}
        while time.monotonic() < deadline:
            totals = store.totals()
            if totals.get("events", 0) + totals.get("late", 0) >= sent:
                break
            time.sleep(1)
        counted = totals.get("events", 0) + totals.get("late", 0)
        return counted == sent, (f"{sent} events sent by {len(shoppers.snapshot())} shopper queries, {counted} counted "
                                 f"by the aggregator, {totals.get('duplicates', 0)} replayed copies dropped")

    def check_index(self) -> tuple[bool, str]:
        from lookalike.status import indexer_status
        from tests.integration.consistency import (
            assert_same_items,
            ends_of,
            fresh_replay,
            indexer_settings,
            snapshot_at,
            snapshot_store,
        )

        catalog = compacted(self.settings)
        mine = {i for i, rev in self.expected.items() if rev is not None}
        settings = indexer_settings(self.pipeline)
        catalog_end = ends_of(settings, settings.catalog_topic)
        group = self.pipeline.env["LOOKALIKE_INDEXER_GROUP"]
        deadline, status = time.monotonic() + 180, None
        while time.monotonic() < deadline:
            status = self.pipeline.status()
            if status and status.caught_up and not status.target_version and all(
                    status.catalog_position.get(p, 0) >= end for p, end in catalog_end.items() if end):
                break
            time.sleep(1)
        if status is None:
            return False, f"no status of the running indexer ({indexer_status(self.settings, group)})"
        try:
            replayed, ends, repeats = fresh_replay(self.pipeline, status.model_version)
            recovered = snapshot_at(self.pipeline, snapshot_store(self.pipeline, self.stack.redis.url), ends, 180)
            assert_same_items(recovered, replayed)
        except AssertionError as exc:
            return False, f"the running index against a fresh replay of its vector topic: {str(exc)[:500]}"
        ids = recovered.item_ids()
        other_meta = [i for i in ids & set(catalog) if dict(recovered.metadata(i)) != catalog[i]]
        ok = ids == set(catalog) == mine and not other_meta
        return ok, (f"{len(ids)} items served by {status.model_version}, {len(catalog)} in the compacted catalog topic, "
                    f"{len(mine)} the harness left; ids equal: {ids == set(catalog) == mine}; vectors and metadata equal "
                    f"to a fresh replay of {sum(ends.values())} vector records ({repeats} repeated upserts); metadata "
                    f"unlike the catalog's: {len(other_meta)}")

    def check_switch(self) -> tuple[bool, str]:
        store = ModelStore(self.home / "models")
        decisions = [d for d in Registry(store).decisions() if d["action"] == "promote" and d["challenger"] != self.champion]
        r = rollout.redis_client(self.feedback_settings)
        switches = [e for e in rollout.read_events(r, self.feedback_settings, count=50) if e["event"] == "switch"]
        accepted = [d for d in decisions if d["accepted"]]
        return bool(accepted and switches), (f"{len(decisions)} retraining decision(s) "
                                             f"({'; '.join(d['reason'] for d in decisions) or 'none'}), "
                                             f"{len(switches)} switch(es)")

    def check_rss(self) -> tuple[bool, str]:
        """Per service, per process (a restarted one is compared with itself, never with the
        one it replaced): the RSS ``warmup_s`` after its start, or after the live switch when
        that came later (a new index is built beside the old one, the trainer trained), against
        its last sample. Only processes with ``warmup_s`` of samples after that baseline are judged."""
        settle = (self.switched_at or 0) + 10
        parts, ok = [], True
        self.rss_growth: dict[str, list[dict[str, Any]]] = {}
        for name in SERVICES:
            pids = sorted({s["pid"] for s in self.rss if s["service"] == name}, key=lambda p: self.started.get(p, 0))
            for pid in pids:
                samples = [s for s in self.rss if s["pid"] == pid]
                since = max(self.started.get(pid, 0) + self.options.warmup_s, settle)
                after = [s for s in samples if s["t"] >= since]
                if len(after) < 2 or after[-1]["t"] - after[0]["t"] < self.options.warmup_s:
                    continue
                growth = after[-1]["kb"] / after[0]["kb"] - 1
                self.rss_growth.setdefault(name, []).append(
                    {"pid": pid, "baseline_mb": round(after[0]["kb"] / 1024, 1), "end_mb": round(after[-1]["kb"] / 1024, 1),
                     "over_s": round(after[-1]["t"] - after[0]["t"]), "growth": round(growth, 4)})
                ok = ok and growth < RSS_LIMIT
            judged = self.rss_growth.get(name, [])
            figures = ", ".join(f"{g['baseline_mb']}->{g['end_mb']} MB ({g['growth']:+.1%} over {g['over_s']} s)"
                                for g in judged)
            parts.append(f"{name} {figures or 'not judged (no process lived long enough)'}")
        return ok, "; ".join(parts)

    def stop(self) -> Any:
        from tests.integration.conftest import stop_services

        self.stopping.set()
        if hasattr(self, "pipeline"):
            stop_services(self.pipeline)
        return remove_prefix(settings_from(FeedbackSettings, {"LOOKALIKE_KAFKA_BOOTSTRAP": self.stack.kafka.bootstrap,
                                                              "LOOKALIKE_REDIS_URL": self.stack.redis.url}), self.prefix)


def vm_rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def du_bytes(path: Path) -> int:
    """Disk used (not the apparent size: the broker preallocates 10 MB sparse index files per segment)."""
    done = subprocess.run(["du", "-s", "--block-size=1", str(path)], capture_output=True, text=True, check=False)
    return int(done.stdout.split()[0]) if done.returncode == 0 and done.stdout else 0


def mb(n: int) -> str:
    return f"{n / 2**20:.1f}"


def compacted(settings: Any) -> dict[str, dict[str, Any]]:
    """The catalog topic read from its beginning to its end now, as compaction leaves it:
    item id -> metadata of the latest record, removed items left out."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    from lookalike import contracts as c
    from lookalike.clients import confluent_config
    from tests.integration.consistency import ends_of

    ends = ends_of(settings, settings.catalog_topic)
    consumer = Consumer(confluent_config(settings, **{"group.id": f"soak-read-{uuid.uuid4().hex[:8]}",
                                                      "enable.auto.commit": False}))
    consumer.assign([TopicPartition(settings.catalog_topic, p, OFFSET_BEGINNING) for p in ends])
    read, latest = dict.fromkeys(ends, 0), {}
    deadline = time.monotonic() + 120
    try:
        while any(read[p] < ends[p] for p in ends) and time.monotonic() < deadline:
            for msg in consumer.consume(1000, timeout=1.0):
                if msg.error() is not None or msg.offset() >= ends[msg.partition()]:
                    continue
                read[msg.partition()] = msg.offset() + 1
                headers = dict(msg.headers() or [])
                latest[msg.key().decode()] = (None if msg.value() is None
                                              else json.loads(headers.get(c.H_METADATA) or b"{}"))
    finally:
        consumer.close()
    return {k: v for k, v in latest.items() if v is not None}


def render(result: dict[str, Any]) -> str:
    lines = [f"soak {result['prefix']}: {result['traffic_s'] / 60:.1f} min of traffic, "
             f"faults: {', '.join(f['name'] + ' at ' + str(round(f['at_s'])) + ' s' for f in result['faults'])}",
             f"restarts per service: {result['restarts']}",
             f"{'check':34} {'ok':4} figures", "-" * 100]
    for name, check in result["checks"].items():
        lines.append(f"{name:34} {'yes' if check['ok'] else 'NO':4} {check['figures']}")
    return "\n".join(lines)


def run_soak(options: SoakOptions, stack: LocalStack | None = None) -> dict[str, Any]:
    """The whole run on ``stack`` (default: the one LOOKALIKE_STACK_* names); returns the result."""
    stack = stack or LocalStack(StackSettings())
    was_up = stack.kafka.running() and stack.redis.answers()
    stack.up()
    soak = Soak(options, stack)
    result: dict[str, Any] = {"prefix": soak.prefix, "ok": False}
    try:
        soak.start()
        result = soak.run()
        result["rss_growth"] = getattr(soak, "rss_growth", {})
    finally:
        left = soak.stop()
        result["left_behind"] = left.summary() if left else None
        if left:
            result["ok"] = False
        if not was_up:
            stack.down()
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--data", type=Path, default=SoakOptions.data)
    p.add_argument("--rate", type=float, default=SoakOptions.rate)
    p.add_argument("--catalog-rate", type=float, default=SoakOptions.catalog_rate)
    p.add_argument("--faults", nargs="*", default=list(ROTATION), choices=ROTATION)
    p.add_argument("--redis-away-s", type=float, default=SoakOptions.redis_away_s)
    p.add_argument("--warmup-s", type=float, default=SoakOptions.warmup_s)
    p.add_argument("--out", type=Path, default=SoakOptions.out)
    args = p.parse_args(argv)
    options = SoakOptions(minutes=args.minutes, data=args.data, rate=args.rate, catalog_rate=args.catalog_rate,
                          faults=tuple(args.faults), redis_away_s=args.redis_away_s, warmup_s=args.warmup_s, out=args.out)
    result = run_soak(options)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    if "checks" in result:
        print("\n" + render(result))
    print(f"\nleft behind: {result['left_behind'] or 'nothing'}; results in {args.out}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

