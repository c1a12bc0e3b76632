"""CPU and memory of the stack's processes while a benchmark phase runs (psutil)."""

from __future__ import annotations

import threading
import time
from typing import Any

import psutil


class ResourceMonitor:
    """Samples each named process every ``interval_s``; ``phase(name)`` marks what runs."""

    def __init__(self, pids: dict[str, int], interval_s: float = 0.5) -> None:
        self.procs = {}
        for name, pid in pids.items():
            try:
                self.procs[name] = psutil.Process(pid)
            except psutil.Error:
                continue
        self.interval_s = interval_s
        self.samples: list[tuple[float, str, float, int]] = []  # time, process, cpu seconds, rss bytes
        self.phases: list[tuple[str, float, float | None]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, name="bench-resources", daemon=True)

    def start(self) -> ResourceMonitor:
        self.thread.start()
        return self

    def run(self) -> None:
        while not self.stop.is_set():
            now = time.monotonic()
            for name, proc in self.procs.items():
                try:
                    with proc.oneshot():
                        cpu = proc.cpu_times()
                        self.samples.append((now, name, cpu.user + cpu.system, proc.memory_info().rss))
                except psutil.Error:
                    continue
            self.stop.wait(self.interval_s)

    def begin(self, phase: str) -> None:
        self.end()
        self.phases.append((phase, time.monotonic(), None))

    def end(self) -> None:
        if self.phases and self.phases[-1][2] is None:
            name, start, _ = self.phases[-1]
            self.phases[-1] = (name, start, time.monotonic())

    def close(self) -> None:
        self.end()
        self.stop.set()
        self.thread.join(timeout=5)

    def summary(self) -> dict[str, dict[str, dict[str, Any]]]:
        """phase -> process -> CPU (in cores: 1.0 is one core busy) and peak RSS."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for phase, start, end in self.phases:
            end = end or time.monotonic()
            for name in self.procs:
                rows = [(t, cpu, rss) for t, n, cpu, rss in self.samples if n == name and start <= t <= end]
                if len(rows) < 2:
                    continue
                cores = (rows[-1][1] - rows[0][1]) / max(1e-9, rows[-1][0] - rows[0][0])
                out.setdefault(phase, {})[name] = {"cpu_cores": round(cores, 2),
                                                   "rss_peak_mb": round(max(r[2] for r in rows) / 1e6, 1)}
        return out


def local_pids(extra: dict[str, int] | None = None) -> dict[str, int]:
    """The local stack's and services' processes (``lookalike stack up`` / ``services up``)."""
    from control.services import LocalServices
    from control.stack import LocalStack
    from lookalike.settings import StackSettings

    stack_settings = StackSettings()
    stack, services = LocalStack(stack_settings), LocalServices(stack_settings)
    # every service on the box: the aggregator reads each reply, and its share of the cores is
    # part of what the query path can have (it was 0.39 cores at 150 queries/s, docs/benchmarks.md)
    found = {name: services.daemon(name).pid() for name in ("worker", "indexer", "feedback", "trainer", "gateway")}
    found |= {"kafka": stack.kafka.daemon.pid(), "redis": stack.redis.daemon.pid()}
    return {**{k: v for k, v in found.items() if v}, **(extra or {})}
