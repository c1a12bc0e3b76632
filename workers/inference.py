"""Where the worker's model calls run: one thread for queries, one for the catalog.

Queries and catalog batches want different things from the CPU. A query batch is one or
two images and a latency target of a few milliseconds: on a CPU shared with the broker
and the indexer, one torch thread does it faster and with a far shorter tail than two,
because an OpenMP parallel region waits for its slowest thread and a preempted thread
stalls the whole region. A catalog batch is 64 images where throughput counts: all
cores. And a query must never queue behind a catalog batch (about 150 ms on two cores),
so each path has its own thread, with its own torch thread count, and the catalog thread
(with the OpenMP threads it starts) may run at a lower priority (``catalog_nice``).

OpenMP thread counts are per calling thread: :class:`InferenceThread` sets its count
before each call when another value is in force (the first call in a thread, or after a
model load that set torch's global count), which costs nothing when it is already right.

The model's layout is chosen here too (:func:`use_layout`): on this project's CPUs oneDNN's
convolutions are much faster on channels-last tensors (batch 64: 1.4-1.8x; one image:
about 10 %, docs/benchmarks.md), and the vectors are the same to 1e-6.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from lookalike.embedder import Embedder

log = logging.getLogger(__name__)
R = TypeVar("R")


def use_layout(embedder: Embedder, channels_last: bool) -> Embedder:
    """Put the model's weights in channels-last (or the default contiguous) layout. The
    first convolution then makes its output channels-last from any input, and the rest of
    the network stays so."""
    embedder.model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    embedder.channels_last = channels_last  # and the input it makes
    return embedder


def nice_thread(nice: int, name: str = "") -> None:
    """Run the calling thread ``nice`` steps below the process's priority (0: leave it). Linux:
    a thread's niceness is its own, and the OpenMP threads it starts inherit it. Relative to
    the process's: a service started under `nice` keeps the order of its threads."""
    if nice:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(),
                           min(os.getpriority(os.PRIO_PROCESS, 0) + nice, 19))
        except OSError as exc:
            log.warning("%s thread: cannot set niceness %d: %s", name or threading.current_thread().name, nice, exc)


class InferenceThread:
    """One thread that runs model calls with ``torch_threads`` intra-op threads (0: torch's
    default, as it was when the first InferenceThread was made) at niceness ``nice``."""

    _default_threads: int | None = None

    def __init__(self, name: str, torch_threads: int = 0, nice: int = 0) -> None:
        if InferenceThread._default_threads is None:
            InferenceThread._default_threads = torch.get_num_threads()
        self.name = name
        self.torch_threads = torch_threads or InferenceThread._default_threads
        self.nice = nice
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=self._start)

    def _start(self) -> None:
        nice_thread(self.nice, self.name)

    def _call(self, fn: Callable[..., R], *args: Any) -> R:
        if torch.get_num_threads() != self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        return fn(*args)

    async def run(self, fn: Callable[..., R], *args: Any) -> R:
        """``fn(*args)`` in this thread, awaited from the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._call, fn, *args)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
