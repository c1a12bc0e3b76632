"""The worker's query path in-process, under CPU load: policies compared in one run, interleaved.

    python -m benchmarks.query_path --models ~/.lookalike/models --busy 1
    python -m benchmarks.query_path --policy before --policy after --catalog --rounds 4

What runs is the worker's own code (:class:`workers.app.EmbeddingWorker`: ``query_batch``
and ``catalog_batch`` in its inference threads, :class:`lookalike.batching.MicroBatches`),
fed with real JPEG bytes at a fixed rate (open loop) instead of Kafka; a produce
acknowledgement is stood in for by a sleep (``--ack-ms``). Each policy runs in its own
process (OpenMP reads its wait policy once, at start-up), policies alternate within each
round (A B, then B A), and ``--busy`` processes spin to stand for the broker, the indexer
and the client on the same cores. Per query: arrival -> vectors ready (what the worker
adds to publish -> reply), and the worker's own stage timings (queue, decode, embed).

A policy is ``NAME`` (a preset below) or ``NAME:key=value,...`` over the worker's defaults:
WorkerSettings fields (``query_torch_threads``, ``torch_threads``, ``catalog_nice``,
``channels_last``, ``query_batch_wait_ms``, ``query_batch_max``), ``omp`` (the
OMP_WAIT_POLICY the process starts with, e.g. PASSIVE; ``default``: unset), ``switch_ms`` (the GIL's
switch interval), ``shared=1`` (queries and catalog in one inference thread, the thread
count switched per call), ``ticker_ms=N`` (batches as faust's ``take_events`` makes them:
on a fixed ticker, none taken while a batch is processed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.pipeline import percentiles
from lookalike.settings import WorkerSettings, default_data

PRESETS = {
    # the worker before issue 7's change: one inference thread, torch's default thread count
    # for queries too, faust's 5 ms ticker, GNU OpenMP's default (spinning) wait policy, the
    # model in the contiguous layout, one priority
    "before": "shared=1,query_torch_threads=0,query_batch_wait_ms=5,ticker_ms=5,omp=default,catalog_nice=0,"
              "channels_last=0",
    "after": "",  # the worker's defaults, as `python -m workers` starts
}


def parse_policy(text: str) -> tuple[str, dict[str, str]]:
    name, _, spec = text.partition(":")
    spec = spec if ":" in text else PRESETS.get(name, "")
    knobs = dict(kv.split("=", 1) for kv in spec.split(",") if kv)
    return name, knobs


# -- the child: one policy, one round ------------------------------------------------

class TickerBatches:
    """faust's ``take_events(max, within)``: a batch is whatever arrived when the ticker fires
    (or ``max`` items); items arriving while a batch is processed wait until it is done."""

    def __init__(self, max_size: int, within_s: float) -> None:
        self.max_size, self.within_s = max_size, within_s
        self.buffer: list[Any] = []
        self.full = asyncio.Event()
        self.free = asyncio.Event()
        self.free.set()

    async def put(self, item: Any) -> None:
        await self.free.wait()
        self.buffer.append(item)
        if len(self.buffer) >= self.max_size:
            self.full.set()
            while self.full.is_set():
                await asyncio.sleep(0)

    async def get(self) -> list[Any]:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.full.wait(), self.within_s)
            if self.buffer:
                batch, self.buffer = self.buffer, []
                self.free.clear()
                self.full.clear()
                return batch

    def done(self) -> None:
        self.free.set()


def child(config: dict[str, Any]) -> dict[str, Any]:

    from lookalike.batching import MicroBatches
    from lookalike.embedder import Embedder
    from workers import app as worker_app
    from workers.stages import Source

    knobs = dict(config["knobs"])
    shared = knobs.pop("shared", "0") == "1"
    ticker_ms = float(knobs.pop("ticker_ms", "0"))
    knobs.pop("omp", None)
    if "switch_ms" in knobs:  # the GIL's switch interval
        sys.setswitchinterval(float(knobs.pop("switch_ms")) / 1000)
    settings = WorkerSettings(_env_file=None, model_dir=config["models"], **knobs)
    embedder = Embedder.from_store(settings.models_path, settings.model_version, "cpu", 0)
    worker = worker_app.EmbeddingWorker(settings, worker_app.ModelSet(settings, serving=embedder))
    worker.reply_topics.exists = lambda topic: True  # type: ignore[method-assign]  # no broker here
    if shared:  # one executor, the thread count switched per call: the old single inference thread
        worker.catalog_thread._executor = worker.query_thread._executor
    images = [Path(p).read_bytes() for p in config["images"]]
    rate, seconds, warmup = config["rate"], config["seconds"], config["warmup_s"]
    ack_s = config["ack_ms"] / 1000

    async def run() -> dict[str, Any]:
        batches = TickerBatches(settings.query_batch_max, ticker_ms / 1000) if ticker_ms else \
            MicroBatches(settings.query_batch_max, settings.query_batch_wait_ms / 1000)
        arrivals: dict[bytes, float] = {}
        latencies: list[float] = []
        stages: dict[str, list[float]] = {}
        sizes: list[int] = []
        catalog_done = [0]
        measuring = [False]
        stop = asyncio.Event()

        async def send() -> None:
            loop = asyncio.get_running_loop()
            start = loop.time() + 0.2
            if not rate:  # the catalog alone
                await asyncio.sleep(0.2 + warmup)
                measuring[0] = True
                await asyncio.sleep(seconds)
            n = int((warmup + seconds) * rate)
            for i in range(n):
                target = start + i / rate
                await asyncio.sleep(max(0.0, target - loop.time()))
                measuring[0] = i >= warmup * rate
                key = f"q{i}".encode()
                arrivals[key] = time.perf_counter()
                source = Source("queries", 0, i, int(time.time() * 1000))
                await batches.put((key, images[i % len(images)], {}, source))
            await asyncio.sleep(0.5)
            stop.set()

        async def answer() -> None:
            from lookalike import contracts as c

            while True:
                events = await batches.get()
                records, errors = await worker.query_thread.run(worker.query_batch, events)
                assert not errors, errors
                done = time.perf_counter()
                await asyncio.sleep(ack_s)  # the produce and the broker's acknowledgement
                if isinstance(batches, TickerBatches):
                    batches.done()
                if not measuring[0]:
                    continue
                sizes.append(len(events))
                for key, _, headers in records:
                    latencies.append((done - arrivals[key]) * 1000)
                    for stage, ms in json.loads(dict(headers)[c.H_TIMINGS]).items():
                        stages.setdefault(stage, []).append(ms)

        async def catalog() -> None:
            n = config["catalog_batch"]
            i = 0
            while not stop.is_set():
                events = [(f"c{i + j}".encode(), images[(i + j) % len(images)], {}, Source("catalog", 0, i + j))
                          for j in range(n)]
                i += n
                vectors, _ = await worker.catalog_thread.run(worker.catalog_batch, events, embedder.version, False)
                if measuring[0]:
                    catalog_done[0] += len(vectors)

        tasks = [asyncio.ensure_future(answer())]
        if config["catalog"]:
            tasks.append(asyncio.ensure_future(catalog()))
        sender = asyncio.ensure_future(send())
        while not measuring[0]:
            await asyncio.sleep(0.01)
        usage0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        await sender
        usage1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - wall0
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return {
            "latency_ms": latencies, "stages_ms": stages, "batch_sizes": sizes,
            "catalog_images_per_s": round(catalog_done[0] / wall, 1) if config["catalog"] else None,
            "cpu_cores": round((usage1.ru_utime + usage1.ru_stime - usage0.ru_utime - usage0.ru_stime) / wall, 3),
            "torch_threads": {"query": worker.query_thread.torch_threads, "catalog": worker.catalog_thread.torch_threads},
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        }

    result = asyncio.run(run())
    worker.query_thread.shutdown()
    worker.catalog_thread.shutdown()
    return result


# -- the parent: busy load, rounds, policies interleaved ----------------------------

BUSY_LOOP = """
import os, time, random
duty = float(os.environ["DUTY"]); period = 0.010
time.sleep(random.random() * period)
while True:
    end = time.perf_counter() + duty * period
    while time.perf_counter() < end:
        pass
    if duty < 1:
        time.sleep((1 - duty) * period)
"""


def child_env(knobs: dict[str, str]) -> dict[str, str]:
    """The policy's process environment: OMP_WAIT_POLICY as the policy says (unset: as here)."""
    env = dict(os.environ)
    omp = knobs.get("omp")
    if omp == "default":
        env.pop("OMP_WAIT_POLICY", None)
    elif omp is not None:
        env["OMP_WAIT_POLICY"] = omp
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--models", type=Path, help="the model store (default: the worker's settings)")
    parser.add_argument("--images", type=Path, default=default_data() / "images", help="a folder of JPEGs")
    parser.add_argument("--policy", action="append", help="NAME or NAME:key=value,... (repeat; default: before, after)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=50.0, help="queries per second")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--warmup-s", type=float, default=2.0)
    parser.add_argument("--ack-ms", type=float, default=1.0, help="stand-in for produce + broker acknowledgement")
    parser.add_argument("--catalog", action="store_true", help="embed catalog batches back to back meanwhile")
    parser.add_argument("--catalog-batch", type=int, default=64)
    parser.add_argument("--busy", type=int, default=1, help="processes spinning on the CPU meanwhile")
    parser.add_argument("--busy-duty", type=float, default=1.0, help="share of each 10 ms a busy process spins")
    parser.add_argument("--out", type=Path, help="write every round's figures here (JSON)")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0

    models = args.models or WorkerSettings().models_path
    policies = [parse_policy(p) for p in (args.policy or ["before", "after"])]
    images = sorted(str(p) for p in args.images.glob("*.jpg"))[:200]
    if not images:
        parser.error(f"no JPEGs in {args.images}")
    busy = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP], env={**os.environ, "DUTY": str(args.busy_duty)})
            for _ in range(args.busy)]
    rounds: list[dict[str, Any]] = []
    load_before = os.getloadavg()
    try:
        for r in range(args.rounds):
            order = policies if r % 2 == 0 else policies[::-1]
            for name, knobs in order:
                config = {"knobs": knobs, "models": str(models), "images": images, "rate": args.rate,
                          "seconds": args.seconds, "warmup_s": args.warmup_s, "ack_ms": args.ack_ms,
                          "catalog": args.catalog, "catalog_batch": args.catalog_batch}
                out = subprocess.run([sys.executable, "-m", "benchmarks.query_path", "--child", json.dumps(config)],
                                     env=child_env(knobs), capture_output=True, text=True, check=False)
                if out.returncode != 0:
                    print(out.stderr[-3000:], file=sys.stderr)
                    return 1
                result = json.loads(out.stdout.strip().splitlines()[-1])
                result.update(policy=name, round=r, loadavg=os.getloadavg()[0])
                rounds.append(result)
                print(f"round {r} {name:10} latency {percentiles(result['latency_ms'])} "
                      f"catalog {result['catalog_images_per_s']} img/s  cpu {result['cpu_cores']}  "
                      f"load {result['loadavg']:.2f}", flush=True)
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    print(f"\nload average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}; busy {args.busy} x "
          f"{args.busy_duty:g}; {args.rate:g} queries/s, {args.seconds:g} s x {args.rounds} rounds; "
          f"catalog {'on' if args.catalog else 'off'}")
    summary = {}
    for name, knobs in policies:
        mine = [r for r in rounds if r["policy"] == name]
        pooled = [v for r in mine for v in r["latency_ms"]]
        stages = {s: percentiles([v for r in mine for v in r["stages_ms"].get(s, [])])
                  for s in ("queue", "decode", "embed")}
        sizes = [v for r in mine for v in r["batch_sizes"]]
        summary[name] = {"knobs": knobs, "latency_ms": percentiles(pooled),
                         "per_round_p50_p99": [(percentiles(r["latency_ms"]).get("p50"),
                                                percentiles(r["latency_ms"]).get("p99")) for r in mine],
                         "stages_ms": stages, "mean_batch": round(sum(sizes) / max(len(sizes), 1), 2),
                         "catalog_images_per_s": [r["catalog_images_per_s"] for r in mine],
                         "cpu_cores": [r["cpu_cores"] for r in mine], "torch_threads": mine[0]["torch_threads"]}
        print(f"\n{name} {knobs}\n  arrival -> vectors ready: {summary[name]['latency_ms']}"
              f"\n  per round p50/p99: {summary[name]['per_round_p50_p99']}")
        for stage, figures in stages.items():
            print(f"  {stage:7} {figures}")
        print(f"  mean batch {summary[name]['mean_batch']}, worker cpu (cores) {summary[name]['cpu_cores']}, "
              f"catalog img/s {summary[name]['catalog_images_per_s']}, torch threads {summary[name]['torch_threads']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"summary": summary, "rounds": rounds}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
