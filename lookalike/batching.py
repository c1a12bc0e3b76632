"""Micro-batches for the consumer runtime's loops: a batch leaves as soon as a handler is free.

A ticker-driven take (faust's ``take_events(max, within)``, which the services used before
the runtime) wakes on a fixed ticker: a lone query waits up to
``within`` for the next tick, and queries that arrive while a batch is embedded are held
back until it is done and a whole ``within`` has passed again. :class:`MicroBatches` has no
ticker. The first item that arrives while nothing is pending is handed out at once (after
at most ``wait_s`` for company, counted from its arrival), and whatever arrives while the
taker is busy is the next batch, up to ``max_size``: an idle path costs nothing, a lone
query never waits, and under load the batches grow by themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class MicroBatches(Generic[T]):
    """A FIFO of items that ``get`` hands out in batches; ``put`` waits while ``max_pending``
    items are pending, which holds back the reader (and so the consumer's fetches).

    Many takers may wait at once (the indexer has ``query_concurrency`` of them, 256): an
    item wakes one of them, the longest waiting, as :class:`asyncio.Queue` does. (An
    ``asyncio.Event`` would wake them all for every item, and all but one would go back
    to sleep: 256 task switches per query, most of the indexer's CPU at 300 queries/s.)"""

    def __init__(self, max_size: int, wait_s: float = 0.0, max_pending: int | None = None) -> None:
        if max_size < 1:
            raise ValueError(f"max_size must be at least 1, not {max_size}")
        self.max_size = max_size
        self.wait_s = max(wait_s, 0.0)
        self.max_pending = max(max_pending or 4 * max_size, max_size)
        self._items: deque[tuple[float, T]] = deque()  # (arrival, item)
        self._takers: deque[asyncio.Future[None]] = deque()  # takers waiting for an item, oldest first
        self._arrived = asyncio.Event()  # for a taker that collects company (wait_s)
        self._room = asyncio.Event()
        self._room.set()

    def __len__(self) -> int:
        return len(self._items)

    def _wake_one(self) -> None:
        while self._takers:
            taker = self._takers.popleft()
            if not taker.done():
                taker.set_result(None)
                return

    async def put(self, item: T) -> None:
        while len(self._items) >= self.max_pending:
            self._room.clear()
            await self._room.wait()
        self._items.append((time.monotonic(), item))
        self._wake_one()
        self._arrived.set()

    async def get(self) -> list[T]:
        """The next batch: at least one item, at most ``max_size``, oldest first."""
        while not self._items:
            taker = asyncio.get_running_loop().create_future()
            self._takers.append(taker)
            try:
                await taker
            except BaseException:
                taker.cancel()
                with contextlib.suppress(ValueError):
                    self._takers.remove(taker)
                if self._items and taker.done() and not taker.cancelled():
                    self._wake_one()  # woken, then cancelled: the item goes to the next taker
                raise
        if self.wait_s:
            deadline = self._items[0][0] + self.wait_s
            while len(self._items) < self.max_size and (left := deadline - time.monotonic()) > 0:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except TimeoutError:
                    break
            if not self._items:  # another taker took them meanwhile
                return await self.get()
        batch = [self._items.popleft()[1] for _ in range(min(self.max_size, len(self._items)))]
        self._room.set()
        if self._items:
            self._wake_one()  # more than a batch is pending: the next taker need not wait for a put
        return batch
