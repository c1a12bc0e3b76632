"""The query path's micro-batches (lookalike.batching), without Kafka."""

from __future__ import annotations

import asyncio
import time

import pytest

from lookalike.batching import MicroBatches


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_a_lone_item_leaves_at_once() -> None:
    async def scenario() -> tuple[list[int], float]:
        batches: MicroBatches[int] = MicroBatches(16, wait_s=0)
        await batches.put(1)
        started = time.monotonic()
        return await batches.get(), time.monotonic() - started

    batch, waited = run(scenario())
    assert batch == [1] and waited < 0.05


def test_what_arrives_while_the_taker_is_busy_is_the_next_batch_oldest_first_and_capped() -> None:
    async def scenario() -> list[list[int]]:
        batches: MicroBatches[int] = MicroBatches(3)
        for i in range(5):
            await batches.put(i)
        return [await batches.get(), await batches.get()]

    assert run(scenario()) == [[0, 1, 2], [3, 4]]


def test_get_waits_for_the_first_item() -> None:
    async def scenario() -> list[int]:
        batches: MicroBatches[str] = MicroBatches(4)
        taker = asyncio.ensure_future(batches.get())
        await asyncio.sleep(0.05)
        assert not taker.done()
        await batches.put("q")
        return await taker

    assert run(scenario()) == ["q"]


def test_a_wait_collects_company_for_at_most_wait_s_after_the_first_item() -> None:
    async def scenario() -> tuple[list[int], list[int], float]:
        batches: MicroBatches[int] = MicroBatches(8, wait_s=0.2)
        await batches.put(1)
        taker = asyncio.ensure_future(batches.get())
        await asyncio.sleep(0.02)
        await batches.put(2)  # within the wait: same batch
        first = await taker
        await batches.put(3)
        await asyncio.sleep(0.3)  # the wait is counted from its arrival: over already
        started = time.monotonic()
        second = await batches.get()
        return first, second, time.monotonic() - started

    first, second, waited = run(scenario())
    assert first == [1, 2] and second == [3] and waited < 0.05


def test_a_full_batch_does_not_wait() -> None:
    async def scenario() -> tuple[list[int], float]:
        batches: MicroBatches[int] = MicroBatches(2, wait_s=5)
        await batches.put(1)
        await batches.put(2)
        started = time.monotonic()
        return await batches.get(), time.monotonic() - started

    batch, waited = run(scenario())
    assert batch == [1, 2] and waited < 0.05


def test_put_holds_the_reader_back_while_max_pending_items_wait() -> None:
    async def scenario() -> tuple[bool, bool, list[int]]:
        batches: MicroBatches[int] = MicroBatches(2, max_pending=2)
        await batches.put(1)
        await batches.put(2)
        third = asyncio.ensure_future(batches.put(3))
        await asyncio.sleep(0.05)
        held = not third.done()
        first = await batches.get()
        await asyncio.wait_for(third, 1)
        return held, third.done(), first + await batches.get()

    held, released, items = run(scenario())
    assert held and released and items == [1, 2, 3]


def test_max_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_size"):
        MicroBatches(0)


def test_an_item_wakes_one_waiting_taker_not_all_of_them() -> None:
    """256 takers wait (the indexer's query concurrency); each item wakes exactly one, and
    every item is handed out exactly once."""

    async def scenario() -> tuple[list[list[int]], int]:
        batches: MicroBatches[int] = MicroBatches(1)
        taken: list[list[int]] = []

        async def taker() -> None:
            while True:
                taken.append(await batches.get())

        takers = [asyncio.ensure_future(taker()) for _ in range(256)]
        await asyncio.sleep(0.01)
        # A taker that wakes and finds nothing waits again on a new future: count them.
        loop = asyncio.get_running_loop()
        made = 0
        create_future = loop.create_future

        def counting() -> asyncio.Future[None]:
            nonlocal made
            made += 1
            return create_future()

        loop.create_future = counting  # type: ignore[method-assign]
        for i in range(100):
            await batches.put(i)
            await asyncio.sleep(0)
        await asyncio.sleep(0.05)
        loop.create_future = create_future  # type: ignore[method-assign]
        for t in takers:
            t.cancel()
        await asyncio.gather(*takers, return_exceptions=True)
        return taken, made

    taken, waits = run(scenario())
    assert sorted(i for batch in taken for i in batch) == list(range(100))
    # the taker that got an item waits again: about one new wait per item (an Event would
    # have woken all 256 for each item: ~25,000 new waits)
    assert waits <= 2 * 100 + 10, waits


def test_a_taker_cancelled_after_its_wake_up_passes_the_item_on() -> None:
    async def scenario() -> list[str]:
        batches: MicroBatches[str] = MicroBatches(4)
        first = asyncio.ensure_future(batches.get())
        second = asyncio.ensure_future(batches.get())
        await asyncio.sleep(0.01)
        await batches.put("q")  # wakes the first taker...
        first.cancel()  # ...which is cancelled before it runs
        await asyncio.gather(first, return_exceptions=True)
        return await asyncio.wait_for(second, 1)

    assert run(scenario()) == ["q"]
