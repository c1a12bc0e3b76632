"""Answering query vectors: wait (alone) for the query's version and ``min-position``,
search that version's index, reply (or, with shards, send a partial answer)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping

from confluent_kafka import KafkaException

from indexer import stages
from indexer.shards import LOOKUP, SEARCH, own_position, partial_headers
from indexer.versions import Pools, VersionIndex
from lookalike import contracts as c
from lookalike import metrics
from lookalike.errors import BadHeader, ErrorCode, InvalidMessage, ModelMismatch, UnknownItem, code_of
from lookalike.rollout import RolloutState
from lookalike.runtime import Loop, Output, Record, Sender, SendFailed, Source
from lookalike.settings import IndexerSettings

log = logging.getLogger(__name__)

Out = tuple[str, bytes, bytes | None, list[tuple[str, bytes]]]  # a record to produce: topic, key, value, headers


def left_s(headers: Mapping[str, bytes], wait_s: float) -> float:
    """``wait_s``, or less where the query's deadline comes sooner: a query does not wait past
    it (it is then answered deadline_exceeded)."""
    with contextlib.suppress(InvalidMessage):
        if c.H_DEADLINE in headers:
            deadline_ms = c.parse_int(headers[c.H_DEADLINE], what=c.H_DEADLINE, lo=0, hi=2**62)
            return max(0.0, min(wait_s, deadline_ms / 1000 - time.time()))
    return wait_s


class Answering:
    """The query path of an :class:`indexer.service.Indexer`."""

    settings: IndexerSettings
    pools: Pools
    versions: dict[str, VersionIndex]
    state: RolloutState | None
    started: asyncio.Event
    sender: Sender | None
    catalog_partitions: int | None

    # -- queries ------------------------------------------------------------------
    def version_for(self, headers: Mapping[str, bytes]) -> VersionIndex | None:
        version = headers.get(c.H_MODEL_VERSION, b"").decode("utf-8", "replace")
        return self.versions.get(version)

    async def ready_for(self, headers: Mapping[str, bytes]) -> None:
        """Wait until the query's version has caught up (at most ``catch_up_wait_s``; later
        it is answered ``not_ready``), then for its ``min-position`` (at most
        ``min_position_wait_s``; a partition the catalog does not have is answered at once)."""
        s = self.settings
        if not self.started.is_set():  # (wait_for makes a task: not for every query once started)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.started.wait(), left_s(headers, s.catch_up_wait_s))
        vi = self.version_for(headers)
        if vi is None:
            return  # answered with model_mismatch
        if not vi.caught_up.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(vi.caught_up.wait(), left_s(headers, s.catch_up_wait_s))
        if c.H_MIN_POSITION in headers:  # read-your-writes: wait (bounded) for the index to get there
            with contextlib.suppress(InvalidMessage):  # a malformed one is answered by answer()
                required = self.check_partitions(c.parse_position(headers[c.H_MIN_POSITION]))
                await vi.wait_for_position(required, left_s(headers, s.min_position_wait_s))

    def ready_now(self, headers: Mapping[str, bytes]) -> bool:
        """Would :meth:`ready_for` return at once? (An indexer that embeds its own queries
        answers those at once and leaves the others to this query loop, where each waits alone.)"""
        if not self.started.is_set():
            return False
        vi = self.version_for(headers)
        if vi is None:
            return True  # answered at once: model_mismatch
        if not vi.caught_up.is_set():
            return False
        if c.H_MIN_POSITION not in headers:
            return True
        try:
            required = self.check_partitions(c.parse_position(headers[c.H_MIN_POSITION]))
        except InvalidMessage:
            return True  # answered at once: bad_header
        return stages.reached(vi.catalog_position, own_position(self.settings, required))

    def check_partitions(self, position: dict[int, int]) -> dict[int, int]:
        """A position that names a partition the catalog topic does not have can never be
        reached: BadHeader, before anything waits for it."""
        known = self.catalog_partitions
        missing = sorted(p for p in position if known is not None and p >= known)
        if missing:
            raise BadHeader(f"min-position names catalog partition {missing[0]}; the catalog topic has "
                            f"{known} partitions (0..{known - 1})")
        return position

    async def watch_catalog_partitions(self) -> None:
        """How many partitions the catalog topic has, looked up now and every 30 s (a topic
        can grow); until it is known, no min-position is refused for its partition."""
        s = self.settings
        source = Source(s, group=f"{s.query_group}.meta", name="catalog-meta")
        try:
            while True:
                try:
                    found = await source.partitions(s.catalog_topic, wait_s=0)
                except KafkaException as exc:  # the broker is away: keep what is known, look again later
                    log.warning("cannot look up the catalog topic's partitions: %s", exc)
                    found = []
                if found:
                    self.catalog_partitions = max(found) + 1
                await asyncio.sleep(30 if found else 5)
        finally:
            await source.close()

    def answer(self, key: bytes | None, value: bytes | None, headers: dict[str, bytes],
               timings_ms: Mapping[str, float] | None = None) -> list[Out]:
        """One query vector -> the records to produce: its reply (one index), or this shard's
        partial answer or resolved item (shards, :mod:`indexer.shards`). ``timings_ms``: this
        indexer's own stage timings, added to the reply's. Never raises."""
        s = self.settings
        vi = self.version_for(headers)
        serving = self.state.serving if self.state else None
        dim = vi.index.dim if vi is not None and vi.index is not None else None
        if dim is None and value and len(value) % 4 == 0:
            dim = len(value) // 4  # no index yet to check against: an empty index answers below
        try:
            query = stages.parse_query_vector(key, value, headers, dim=dim, default_reply_to=s.replies_topic)
        except InvalidMessage as exc:
            if s.sharded and s.index_shard != 0:
                return []  # every shard sees the same malformed record: shard 0 alone answers it
            reply = c.error_reply(key.decode("utf-8", "replace") if key else "(missing)", exc.code, str(exc))
            metrics.observe_reply(reply)
            return [(s.replies_topic, key or b"", c.fit_reply(reply, s.max_reply_bytes), [])]
        query.timings_ms.update(timings_ms or {})
        version = vi.version if vi is not None else serving
        index_version = vi.index_version if vi is not None else None
        phase = LOOKUP if s.sharded and query.item_id is not None else SEARCH
        try:
            c.check_deadline(query.deadline_ms, time.time() * 1000, "indexer")  # before any search
            if vi is None:
                raise ModelMismatch(f"query embedded by model {query.model_version}; this indexer holds "
                                    f"{sorted(self.versions)} (serving {serving})")
            if vi.index is None or len(vi.index) == 0:
                raise InvalidMessage("the index is empty: no catalog item has been indexed yet", code=ErrorCode.EMPTY_INDEX)
            if not vi.caught_up.is_set():
                raise InvalidMessage(f"the index of {vi.version} is still catching up with its feed (waited "
                                     f"{s.catch_up_wait_s}s)", code=ErrorCode.NOT_READY)
            if query.min_position is not None:
                self.check_partitions(query.min_position)
            position = vi.catalog_position
            if not stages.reached(position, own_position(s, query.min_position)):
                raise InvalidMessage(
                    f"the index has not reached position {query.min_position} within "
                    f"{s.min_position_wait_s}s (it is at {position})", code=ErrorCode.NOT_READY)
            if phase == LOOKUP:
                return [self.resolve(vi, query, key, headers)]
            reply = stages.answer(vi.index, query, model_version=vi.version, index_version=index_version,
                                  index_position=position)
        except (InvalidMessage, UnknownItem) as exc:
            reply = c.error_reply(query.request_id, exc.code, str(exc), model_version=version,
                                  index_version=index_version, timings_ms=query.timings_ms)
        except Exception as exc:  # a bug must not stop the service; the client still gets an answer
            log.exception("query %s failed", query.request_id, extra={"request_id": query.request_id})
            reply = c.error_reply(query.request_id, "internal", f"{type(exc).__name__}: {exc}",
                                  model_version=version, index_version=index_version)
        if not s.sharded:
            metrics.observe_reply(reply)
            return [(query.reply_to, query.request_key, c.fit_reply(reply, s.max_reply_bytes), [])]
        return [(s.partials_topic, query.request_key, c.fit_reply(reply, s.max_reply_bytes),
                 partial_headers(s, phase=phase, reply_to=query.reply_to, k=query.k,
                                 query_ts=query.query_timestamp_ms, waits=query.min_position is not None))]

    def resolve(self, vi: VersionIndex, query: stages.QueryVector, key: bytes | None,
                headers: Mapping[str, bytes]) -> Out:
        """A "more like this" query on a shard: the item's vector as a new query vector for
        every shard to search (the item left out). Raises UnknownItem where this shard does
        not hold the item; the caller makes that its ``lookup`` answer."""
        s = self.settings
        assert vi.index is not None and query.item_id is not None
        if query.item_id not in vi.index:
            raise UnknownItem(f"item {query.item_id!r} is not in shard {s.index_shard} of {s.index_shards}")
        vector = vi.index.vector(query.item_id)
        forwarded = [(name, raw) for name, raw in headers.items() if name not in (c.H_ITEM_ID, c.H_LOOKUP_OF)]
        forwarded.append((c.H_LOOKUP_OF, query.item_id.encode()))
        return (s.query_vectors_topic, key or b"", c.encode_vector(vector), forwarded)

    # -- the loops ----------------------------------------------------------------
    async def answer_records(self, records: list[Record]) -> list[Output]:
        """Answer query vectors (one per call: each waits alone for its version and
        ``min-position``, never holding another query; ``query_concurrency`` at once)."""
        loop = asyncio.get_running_loop()
        metrics.observe_batch("indexer", "query", len(records))
        out: list[Output] = []
        for record in records:
            if c.H_ANSWERED in record.headers:  # an indexer embedded and answered it already (onehop/app.py)
                continue
            # hop: the query vector's produce (the worker's clock) -> here (this one's): the second
            # Kafka hop, with the event loop's wait for this record.
            timings = {"hop": max(0.0, time.time() * 1000 - record.timestamp_ms)} if record.timestamp_ms else {}
            await self.ready_for(record.headers)
            answered = await loop.run_in_executor(self.pools.search, self.answer, record.key, record.value,
                                                  record.headers, timings)
            out += [Output(topic, key, value, headers or None, answers=record) for topic, key, value, headers in answered]
        return out

    def answer_failed(self, record: Record, exc: Exception) -> list[Output]:
        """A query vector the stage failed on, or whose reply the broker refused (too large):
        an error reply to the replies topic (its reply-to may be what was refused)."""
        s = self.settings
        if s.sharded and s.index_shard != 0:
            return []  # shard 0 answers for all
        code = code_of(exc)
        request_id = record.key.decode("utf-8", "replace") if record.key else "(missing)"
        reply = c.error_reply(request_id, code, f"{exc}"[:500])
        metrics.observe_reply(reply)
        reply_to = s.replies_topic
        if isinstance(exc, SendFailed) and exc.code == ErrorCode.TOO_LARGE:
            reply_to = exc.output.topic  # the topic took no record that large; the client waits there
        elif not isinstance(exc, SendFailed):  # the reply-to itself is fine: use it when it parses
            with contextlib.suppress(InvalidMessage, KeyError, UnicodeDecodeError):
                reply_to = stages.parse_query_vector(record.key, record.value, record.headers, dim=None,
                                                     default_reply_to=s.replies_topic).reply_to
        return [Output(reply_to, record.key or b"", c.encode_reply(reply))]

    def query_loop(self) -> Loop:
        s = self.settings
        assert self.sender is not None, "the loops start inside run()"
        return Loop(name="answer-queries", service="indexer", source=Source(s, group=s.query_group, name="queries"),
                    topics=[s.query_vectors_topic], sender=self.sender, handle=self.answer_records,
                    on_error=self.answer_failed, batch_max=1, in_flight=s.query_concurrency, fetch_wait_s=0.05)
