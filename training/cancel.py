"""Stopping a training from outside: the trainer service's SIGTERM reaches the loops that take the time.

A training is minutes of batches, embeddings and (on a cold cache) image decoding, all in
one thread. :func:`stop_on` makes a :class:`threading.Event` that thread's stop request;
:func:`check` raises :class:`TrainingStopped` once it is set, and the loops of
:mod:`training.train` and :mod:`training.data` call it once per batch or decoded image,
so a set event ends the training within one batch (well under a second on the 2-core box).
Nothing is stored before the end of :func:`training.train.train`, so a stopped training
leaves no model behind.

A context variable, not an argument threaded through every function: outside
:func:`stop_on` (``lookalike train``, the tests, the benchmarks) :func:`check` costs a
lookup and never raises.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from contextvars import ContextVar

_stop: ContextVar[threading.Event | None] = ContextVar("training_stop", default=None)


class TrainingStopped(Exception):
    """The training was asked to stop; nothing of it was stored."""


@contextlib.contextmanager
def stop_on(event: threading.Event) -> Iterator[None]:
    """Within the block, in this thread, a set ``event`` stops the training at its next check."""
    token = _stop.set(event)
    try:
        yield
    finally:
        _stop.reset(token)


def check() -> None:
    """Raise :class:`TrainingStopped` if this thread's training was asked to stop."""
    event = _stop.get()
    if event is not None and event.is_set():
        raise TrainingStopped("the training was asked to stop")
