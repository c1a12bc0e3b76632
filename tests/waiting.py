"""Bounded waits for tests: poll a condition instead of sleeping a fixed time."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class Watched(Protocol):
    """What a wait can report on failure and check while it waits (the pipeline fixture)."""

    def logs_tail(self, chars: int = ...) -> str: ...

    def alive(self) -> bool: ...


def wait_for(predicate: Callable[[], T], timeout_s: float, what: str, pipeline: Watched | None = None, *,
             logs: Path | None = None, alive: bool = False, every_s: float = 0.2) -> T:
    """Poll ``predicate`` until it returns something truthy (returned) or ``timeout_s`` passes
    (AssertionError naming ``what``, the last value and the services' logs). ``alive``: fail at
    once when one of the pipeline's services died."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        if alive and pipeline is not None:
            assert pipeline.alive(), f"a service died while waiting for {what}:\n{pipeline.logs_tail()}"
        last = predicate()
        if last:
            return last
        time.sleep(every_s)
    tail = pipeline.logs_tail() if pipeline is not None else ""
    if logs is not None and logs.exists():
        tail += logs.read_text(errors="replace")[-4000:]
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what} (last: {last!r})\n{tail}")
