"""The consumer runtime without Kafka: isolation, effects before commits, failed sends."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

import pytest

from lookalike.runtime import Loop, Offsets, Output, Record, SendFailed, dead_letter


def rec(offset: int, value: bytes = b"ok", partition: int = 0, topic: str = "in") -> Record:
    return Record(topic, partition, offset, f"k{offset}".encode(), value, {"h": b"1"})


class FakeSource:
    """Hands out the scripted records once, then nothing; remembers commits."""

    def __init__(self, records: list[Record]) -> None:
        self.records = list(records)
        self.commits: list[dict[tuple[str, int], int]] = []
        self.closed = False

    async def subscribe(self, topics: Sequence[str], on_revoke) -> None:  # type: ignore[no-untyped-def]
        pass

    async def fetch(self, max_records: int, timeout_s: float) -> list[Record]:
        out, self.records = self.records[:max_records], self.records[max_records:]
        if not out:
            await asyncio.sleep(timeout_s)
        return out

    async def commit(self, offsets: Mapping[tuple[str, int], int]) -> bool:
        self.commits.append(dict(offsets))
        return True

    def commit_now(self, offsets: Mapping[tuple[str, int], int]) -> None:
        self.commits.append(dict(offsets))

    async def close(self) -> None:
        self.closed = True

    def last_commit(self) -> dict[tuple[str, int], int]:
        out: dict[tuple[str, int], int] = {}
        for c in self.commits:
            out.update(c)
        return out


class FakeSender:
    """Acknowledges everything, except: ``refuse`` values fail for good, ``flaky`` values time out once."""

    def __init__(self, refuse: bytes | None = None, flaky: bytes | None = None) -> None:
        self.sent: list[Output] = []
        self.refuse, self.flaky = refuse, flaky
        self.attempts = 0

    async def send_all(self, outputs: Sequence[Output]) -> list[SendFailed]:
        failures = []
        for o in outputs:
            self.attempts += 1
            if o.value == self.refuse:
                failures.append(SendFailed(o, "too large", permanent=True))
            elif o.value == self.flaky:
                self.flaky = None
                failures.append(SendFailed(o, "timed out", permanent=False))
            else:
                self.sent.append(o)
        return failures


async def run_until(loop: Loop, predicate, timeout_s: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    task = asyncio.create_task(loop.run())
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.3)  # let the committer run once more
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_offsets_commit_up_to_the_first_record_without_its_effect() -> None:
    offsets = Offsets()
    offsets.read([rec(i) for i in range(5)])
    offsets.done([rec(0), rec(1), rec(3)])
    assert offsets.due() == {("in", 0): 2}
    offsets.done([rec(2)])
    assert offsets.due() == {("in", 0): 4}
    offsets.done([rec(4)])
    assert offsets.due() == {("in", 0): 5}
    assert offsets.due(held={("in", 0): 3}) == {("in", 0): 3}  # a stage still holds record 3
    offsets.committed({("in", 0): 5})
    assert offsets.due() == {}


def test_a_record_the_stage_fails_on_gets_its_error_answer_and_the_rest_goes_on() -> None:
    records = [rec(0), rec(1, b"poison"), rec(2)]
    source, sender = FakeSource(records), FakeSender()

    async def handle(batch: list[Record]) -> list[Output]:
        if any(r.value == b"poison" for r in batch):
            raise RecursionError("maximum recursion depth exceeded")  # what a deep JSON did to the parsers
        return [Output("out", r.key, r.value, answers=r) for r in batch]

    loop = Loop(name="t", service="test", source=source, sender=sender, handle=handle,  # type: ignore[arg-type]
                on_error=lambda r, e: [dead_letter("dead", r, e)], batch_max=10)
    asyncio.run(run_until(loop, lambda: len(sender.sent) == 3))
    assert [(o.topic, o.key) for o in sender.sent] == [("out", b"k0"), ("dead", b"k1"), ("out", b"k2")]
    dead = dict(sender.sent[1].headers)  # type: ignore[arg-type]
    assert dead["error-code"] == b"internal" and b"recursion" in dead["error-message"]
    assert dead["source-offset"] == b"1" and dead["h"] == b"1"
    assert loop.isolated == 1
    assert source.last_commit() == {("in", 0): 3}
    assert source.closed


def test_a_send_refused_for_good_becomes_the_records_error_answer() -> None:
    source, sender = FakeSource([rec(0, b"huge"), rec(1)]), FakeSender(refuse=b"huge")

    async def handle(batch: list[Record]) -> list[Output]:
        return [Output("replies", r.key, r.value, answers=r) for r in batch]

    def too_large(record: Record, exc: Exception) -> list[Output]:
        return [Output("replies", record.key, b"error:" + getattr(exc, "code", "?").encode())]

    loop = Loop(name="t", service="test", source=source, sender=sender, handle=handle,  # type: ignore[arg-type]
                on_error=too_large, batch_max=1)
    asyncio.run(run_until(loop, lambda: len(sender.sent) == 2))
    assert sorted(o.value for o in sender.sent) == [b"error:internal", b"ok"]  # a librdkafka size refusal: too_large
    assert source.last_commit() == {("in", 0): 2}


def test_a_send_that_timed_out_is_retried_before_the_commit() -> None:
    source, sender = FakeSource([rec(0, b"slow")]), FakeSender(flaky=b"slow")

    async def handle(batch: list[Record]) -> list[Output]:
        return [Output("out", r.key, r.value) for r in batch]

    loop = Loop(name="t", service="test", source=source, sender=sender, handle=handle)  # type: ignore[arg-type]
    asyncio.run(run_until(loop, lambda: len(sender.sent) == 1))
    assert sender.attempts == 2
    assert source.last_commit() == {("in", 0): 1}


def test_nothing_is_committed_while_an_effect_is_pending() -> None:
    """A slow record in flight holds the commit point of its partition; others move on."""
    source, sender = FakeSource([rec(0, b"slow"), rec(1), rec(0, partition=1)]), FakeSender()

    async def scenario() -> None:
        gate = asyncio.Event()

        async def handle(batch: list[Record]) -> list[Output]:
            if batch[0].value == b"slow":
                await gate.wait()
            return [Output("out", r.key, r.value) for r in batch]

        loop = Loop(name="t", service="test", source=source, sender=sender, handle=handle,  # type: ignore[arg-type]
                    batch_max=1, in_flight=4)
        task = asyncio.create_task(loop.run())
        while len(sender.sent) < 2:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        held = source.last_commit()
        assert held[("in", 1)] == 1 and held.get(("in", 0), 0) == 0  # partition 0 waits for offset 0
        gate.set()
        while len(sender.sent) < 3:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert source.last_commit() == {("in", 0): 2, ("in", 1): 1}

    asyncio.run(scenario())


def test_run_forever_ends_everything_when_one_task_returns_or_fails() -> None:
    from lookalike.runtime import run_forever

    async def forever(cancelled: list[str], name: str) -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            cancelled.append(name)

    async def stop_soon() -> None:
        await asyncio.sleep(0.05)

    async def fail_soon() -> None:
        await asyncio.sleep(0.05)
        raise RuntimeError("the loop itself broke")

    cancelled: list[str] = []
    asyncio.run(asyncio.wait_for(run_forever(forever(cancelled, "a"), stop_soon()), 5))
    assert cancelled == ["a"]
    with pytest.raises(RuntimeError, match="broke"):
        asyncio.run(asyncio.wait_for(run_forever(forever(cancelled, "b"), fail_soon()), 5))
    assert cancelled == ["a", "b"]


def test_a_service_freezes_its_heap_as_set_up_before_its_loops_run() -> None:
    """A full collection in a process that imported torch walks ~400,000 objects (0.2-0.4 s
    here, a stall of every loop): ``serve`` freezes them first. Run in a child process, so
    this test's own interpreter is left alone."""
    import subprocess
    import sys

    code = (
        "import gc\n"
        "from lookalike.runtime import serve\n"
        "alive = [object() for _ in range(10)] + [[i] for i in range(1000)]\n"
        "async def main():\n"
        "    print(gc.get_freeze_count())\n"
        "print(gc.get_freeze_count())\n"
        "serve(main)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    before, during = (int(n) for n in out.stdout.split())
    assert before == 0
    assert during > 1000  # the modules, and what main's caller set up


def test_triaged_records_skip_the_stage_and_their_acks_are_awaited_apart() -> None:
    """Load shedding's fast lane: a record triage answers never reaches the stage, is answered
    even while the stage is stuck on a batch, and is committed once its answer is acknowledged."""
    records = [rec(i, b"late" if i % 2 else b"fresh") for i in range(6)]
    source, sender = FakeSource(records), FakeSender(flaky=b"late-answer")
    release = asyncio.Event()
    handled: list[bytes] = []

    async def handle(batch: list[Record]) -> list[Output]:
        await release.wait()  # the stage is busy until the late ones are answered
        handled.extend(r.key or b"" for r in batch)
        return [Output("out", r.key, r.value, answers=r) for r in batch]

    def triage(record: Record) -> list[Output] | None:
        return [Output("out", record.key, b"late-answer", answers=record)] if record.value == b"late" else None

    loop = Loop(name="t", service="test", source=source, sender=sender, handle=handle,  # type: ignore[arg-type]
                batch_max=1, fetch_max=6, triage=triage)

    async def scenario() -> None:
        task = asyncio.create_task(loop.run())
        deadline = asyncio.get_running_loop().time() + 5
        while len(sender.sent) < 3:  # the three late ones (one of them sent twice: a timeout, retried)
            assert asyncio.get_running_loop().time() < deadline, "the late records were not answered"
            await asyncio.sleep(0.01)
        assert not handled  # ... while the stage still held its first batch
        release.set()
        while len(sender.sent) < 6:
            assert asyncio.get_running_loop().time() < deadline, "the fresh records were not answered"
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert handled == [b"k0", b"k2", b"k4"]
    assert sorted(o.key for o in sender.sent if o.value == b"late-answer") == [b"k1", b"k3", b"k5"]
    assert loop.triaged == 3
    assert source.last_commit() == {("in", 0): 6}


def test_a_triage_that_fails_leaves_the_record_to_the_stage() -> None:
    source, sender = FakeSource([rec(0, b"boom"), rec(1)]), FakeSender()

    async def handle(batch: list[Record]) -> list[Output]:
        return [Output("out", r.key, r.value, answers=r) for r in batch]

    def triage(record: Record) -> list[Output] | None:
        raise RuntimeError("a triage bug")

    loop = Loop(name="t", service="test", source=source, sender=sender, handle=handle,  # type: ignore[arg-type]
                batch_max=4, triage=triage)
    asyncio.run(run_until(loop, lambda: len(sender.sent) == 2))
    assert sorted(o.value for o in sender.sent) == [b"boom", b"ok"] and loop.triaged == 0
