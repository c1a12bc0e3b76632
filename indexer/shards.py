"""Index shards: scatter a query to every shard, gather the partial top-k lists into one reply.

With ``LOOKALIKE_INDEX_SHARDS=N`` an indexer instance is shard ``LOOKALIKE_INDEX_SHARD=i``:

* its feed reads only the catalog-vector partitions ``p`` with ``p % N == i`` (vectors stay
  in their catalog partition, so a shard is a fixed slice of the catalog, and its
  positions are catalog offsets of its own partitions);
* it reads *every* query vector, in its own consumer group ``{indexer_group}.shard-{i}``
  (replicas of one shard share that group's partitions), searches its slice and sends the
  partial answer, a reply document of its own top-k, to the partials topic keyed by the
  request, so all partial answers of a request land in one partition;
* every instance also runs a gatherer in the shared group ``{indexer_group}.gather``: it
  holds each request's partial answers until all N shards have answered, or until the
  deadline after the first one (``LOOKALIKE_SHARD_DEADLINE_MS``, plus the query's own
  ``min-position`` wait), merges them and produces the reply to the query's reply-to topic,
  with ``partial: true`` and the shards that answered when one was late.

"More like this" queries name an item, which lives on one shard. A shard that holds it
resolves the item to its vector and sends that as a new query vector (``lookup-of``: the
item, left out of the results) for every shard to search; shards that do not hold it say
so (phase ``lookup``). When all N say so, the reply is ``unknown_item``.

The gatherer commits a partition's offset only up to the first partial answer of a
request still open, so a gatherer that dies mid-request leaves it to the next one
(at-least-once; clients drop a repeated reply by request id).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from indexer import stages
from lookalike import contracts as c
from lookalike import metrics
from lookalike.errors import ErrorCode, InvalidMessage
from lookalike.runtime import Loop, Output, Record, Sender, Source, dead_letter
from lookalike.settings import IndexerSettings

log = logging.getLogger(__name__)

SEARCH, LOOKUP = "search", "lookup"
# An error on one shard that does not sink the merged answer: that shard holds nothing yet.
HARMLESS = frozenset({"empty_index"})
MAX_SHARDS = 1024


def own_position(settings: IndexerSettings, position: Mapping[int, int] | None) -> dict[int, int] | None:
    """The part of a catalog position in this instance's shard (None stays None)."""
    if position is None:
        return None
    return {p: o for p, o in position.items() if settings.owns(p)}


def partial_headers(settings: IndexerSettings, *, phase: str, reply_to: str, k: int,
                    query_ts: int | None, waits: bool) -> list[tuple[str, bytes]]:
    """What the gatherer needs beside the partial reply document itself."""
    wait_ms = settings.shard_deadline_ms + (settings.min_position_wait_s * 1000 if waits else 0)
    headers = [
        (c.H_SHARD, f"{settings.index_shard}/{settings.index_shards}".encode()),
        (c.H_SHARD_PHASE, phase.encode()),
        (c.H_REPLY_TO, reply_to.encode()),
        (c.H_K, str(k).encode()),
        (c.H_GATHER_WAIT_MS, f"{wait_ms:.0f}".encode()),
    ]
    if query_ts is not None:
        headers.append((c.H_QUERY_TS, str(query_ts).encode()))
    return headers


def merge(search: Mapping[int, dict[str, Any]], k: int, shards: int, request_id: str) -> dict[str, Any]:
    """Partial replies of the shards that answered (shard -> reply) -> one reply.

    Results: the k best of all shards' (score, then item id). An error of any shard other
    than an empty index is the answer (the first such shard's). Positions are the union of
    the shards' (each reports its own partitions); timings are the slowest shard's."""
    failed = sorted(i for i, r in search.items() if r.get("status") != "ok" and error_code(r) not in HARMLESS)
    answered = sorted(search)
    if failed:
        reply = dict(search[failed[0]])
    elif all(r.get("status") != "ok" for r in search.values()):
        reply = dict(search[answered[0]])  # every shard that answered is empty
    else:
        oks = [search[i] for i in answered if search[i].get("status") == "ok"]
        results = sorted((r for reply in oks for r in reply.get("results", [])),
                         key=lambda r: (-r["score"], r["item_id"]))[:k]
        position: dict[int, int] = {}
        timings: dict[str, float] = {}
        for part in oks:
            for p, o in part.get("index_position", {}).items():
                position[int(p)] = max(int(o), position.get(int(p), 0))
            for stage, ms in part.get("timings_ms", {}).items():
                timings[stage] = max(float(ms), timings.get(stage, 0.0))
        index_versions = sorted({str(r.get("index_version")) for r in oks if r.get("index_version")})
        reply = c.ok_reply(request_id, results, model_version=oks[0].get("model_version"),
                           index_version="+".join(index_versions) or None, index_position=position,
                           timings_ms=timings, query_item_id=oks[0].get("query_item_id"))
    reply["partial"] = len(answered) < shards
    reply["shards"] = {"answered": answered, "of": shards}
    return reply


def error_code(reply: Mapping[str, Any]) -> str | None:
    error = reply.get("error")
    return error.get("code") if isinstance(error, dict) else None


@dataclass
class Pending:
    """One request's partial answers so far."""

    key: bytes
    reply_to: str
    k: int
    first_seen: float
    wait_s: float
    query_ts: int | None
    search: dict[int, dict[str, Any]] = field(default_factory=dict)
    lookup: dict[int, dict[str, Any]] = field(default_factory=dict)
    offsets: list[tuple[int, int]] = field(default_factory=list)  # (partition, offset) of its records


@dataclass(frozen=True)
class Gathered:
    """A merged reply to produce."""

    reply_to: str
    key: bytes
    reply: dict[str, Any]

    @property
    def value(self) -> bytes:
        return c.encode_reply(self.reply)


class Gatherer:
    """The gathering state machine, apart from Kafka (time is passed in, so tests set it)."""

    def __init__(self, shards: int, *, max_age_s: float = 60.0, remember_s: float = 60.0,
                 max_wait_s: float = 60.0) -> None:
        self.shards = shards
        self.max_age_s = max_age_s
        self.max_wait_s = max_wait_s  # no header makes a request wait longer than this for its shards
        self.remember_s = remember_s
        self.pending: dict[bytes, Pending] = {}
        self.done: dict[bytes, float] = {}  # requests already answered -> when (late partials are dropped)
        self._open: dict[int, set[int]] = {}  # partition -> offsets of open requests' records
        self._next: dict[int, int] = {}  # partition -> offset after the last record seen
        self.late = 0
        self.dropped = 0

    # -- input ----------------------------------------------------------------------
    def add(self, partition: int, offset: int, key: bytes | None, value: bytes | None,
            headers: Mapping[str, bytes], timestamp_ms: int | None, now: float) -> Gathered | None:
        """One partial answer; returns the merged reply once every shard has answered. A
        malformed one raises InvalidMessage (its offset counts as done: the caller
        dead-letters it)."""
        self._next[partition] = max(offset + 1, self._next.get(partition, 0))
        try:
            shard, phase, part, wait_s, query_ts = self._parse(key, value, headers)
        except InvalidMessage as exc:
            self.dropped += 1
            log.warning("partial answer %d@%d dropped: %s", partition, offset, exc)
            raise
        assert key is not None
        if key in self.done:
            self.late += 1
            metrics.observe_error("indexer", "late_shard")
            return None
        if timestamp_ms is not None and time.time() - timestamp_ms / 1000 > self.max_age_s:
            self.dropped += 1  # from before a long outage: its client gave up long ago
            return None
        pending = self.pending.get(key)
        if pending is None:
            pending = self.pending[key] = Pending(key, headers[c.H_REPLY_TO].decode("utf-8", "replace"),
                                                  int(headers[c.H_K]), now, min(wait_s, self.max_wait_s), query_ts)
        pending.wait_s = min(max(pending.wait_s, wait_s), self.max_wait_s)
        (pending.search if phase == SEARCH else pending.lookup)[shard] = part
        pending.offsets.append((partition, offset))
        self._open.setdefault(partition, set()).add(offset)
        if len(pending.search) == self.shards or (len(pending.lookup) == self.shards and not pending.search):
            return self._finish(pending, now)
        return None

    def _parse(self, key: bytes | None, value: bytes | None,
               headers: Mapping[str, bytes]) -> tuple[int, str, dict[str, Any], float, int | None]:
        """-> (shard, phase, the partial reply, how long to wait for the rest in s, query
        timestamp). Every header and the document are bounded and checked before use
        (the merge reads them later, in the tick: nothing there may fail)."""
        if not key or value is None:
            raise InvalidMessage("a partial answer needs a key and a value")
        c.decode_key(key, "request id (key)")
        try:
            shard_text, _, of_text = headers[c.H_SHARD].partition(b"/")
            shard = c.parse_int(shard_text, what="shard", lo=0, hi=MAX_SHARDS - 1)
            of = c.parse_int(of_text, what="shard count", lo=1, hi=MAX_SHARDS)
            phase = headers[c.H_SHARD_PHASE].decode("ascii")
            c.parse_int(headers[c.H_K], what="k", lo=1, hi=stages.MAX_K)
            if not c.valid_topic_name(headers[c.H_REPLY_TO].decode("utf-8")):
                raise InvalidMessage("reply-to is not a topic name", code=ErrorCode.BAD_HEADER)
            wait_ms = c.parse_int(headers.get(c.H_GATHER_WAIT_MS, b"0"), what="gather-wait-ms", lo=0, hi=2**62)
            query_ts = (c.parse_int(headers[c.H_QUERY_TS], what="query-timestamp-ms", lo=0, hi=2**62)
                        if c.H_QUERY_TS in headers else None)
        except (KeyError, UnicodeDecodeError) as exc:
            raise InvalidMessage(f"malformed partial answer headers: {exc!r}", code=ErrorCode.BAD_HEADER) from exc
        part = c.parse_reply(value)
        if of != self.shards:
            raise InvalidMessage(f"from shard {shard}/{of}, but this gatherer merges {self.shards} shards: "
                                 "every indexer of the group needs the same LOOKALIKE_INDEX_SHARDS",
                                 code=ErrorCode.BAD_HEADER)
        if phase not in (SEARCH, LOOKUP) or shard >= of:
            raise InvalidMessage(f"malformed partial answer (shard {shard}/{of}, phase {phase!r})",
                                 code=ErrorCode.BAD_HEADER)
        return shard, phase, part, min(wait_ms, self.max_wait_s * 1000) / 1000, query_ts

    # -- output ---------------------------------------------------------------------
    def expired(self, now: float) -> list[Gathered]:
        """Requests whose deadline passed: their replies, from the shards that answered."""
        late = [p for p in self.pending.values() if now - p.first_seen >= p.wait_s]
        for key in [k for k, t in self.done.items() if now - t > self.remember_s]:
            del self.done[key]
        return [self._finish(p, now) for p in late]

    def next_deadline(self) -> float | None:
        return min((p.first_seen + p.wait_s for p in self.pending.values()), default=None)

    def _finish(self, pending: Pending, now: float) -> Gathered:
        del self.pending[pending.key]
        self.done[pending.key] = now
        for partition, offset in pending.offsets:
            self._open.get(partition, set()).discard(offset)
        request_id = pending.key.decode("utf-8", "replace")
        try:
            reply = self._merged(pending, request_id)
        except Exception as exc:  # a bug must not stop the gatherer (it runs in the tick); the client still hears
            log.exception("merging the partial answers of %s failed", request_id)
            reply = c.error_reply(request_id, ErrorCode.INTERNAL, f"merging partial answers failed: {exc!r}")
        timings = dict(reply.get("timings_ms") or {})
        timings["gather"] = round((now - pending.first_seen) * 1000, 3)
        if pending.query_ts is not None:
            timings["total"] = round(time.time() * 1000 - pending.query_ts, 3)
        reply["timings_ms"] = timings
        return Gathered(pending.reply_to, pending.key, reply)

    def _merged(self, pending: Pending, request_id: str) -> dict[str, Any]:
        if pending.search:
            reply = merge(pending.search, pending.k, self.shards, request_id)
        else:  # only "I do not hold that item" answers (all of them, or the rest were late)
            parts = pending.lookup
            order = sorted(parts, key=lambda i: (error_code(parts[i]) in HARMLESS,  # empty: says least
                                                 error_code(parts[i]) == "unknown_item", i))
            reply = dict(parts[order[0]])  # another error (not ready, model) says more than "not here"
            reply["partial"] = len(parts) < self.shards
            reply["shards"] = {"answered": sorted(parts), "of": self.shards}
        return reply

    def revoke(self, partitions: Iterable[int]) -> None:
        """Partitions moved to another gatherer: it answers their open requests."""
        gone = set(partitions)
        for key in [k for k, p in self.pending.items() if any(part in gone for part, _ in p.offsets)]:
            del self.pending[key]
        for partition in gone:
            self._open.pop(partition, None)
            self._next.pop(partition, None)

    def commit_offsets(self) -> dict[int, int]:
        """Per partition, where a restarted gatherer must begin: the first record of a request
        still open, else after the last record seen."""
        return {p: min(self._open[p]) if self._open.get(p) else nxt for p, nxt in self._next.items()}


class GatherStage:
    """The gatherer as a stage of the consumer runtime: partial answers in, merged replies
    out; a request's records stay held (uncommitted) until its reply is acknowledged."""

    def __init__(self, settings: IndexerSettings) -> None:
        self.settings = settings
        self.gatherer = Gatherer(settings.index_shards, max_age_s=settings.gather_max_age_s,
                                 max_wait_s=settings.shard_deadline_ms / 1000 + settings.min_position_wait_s
                                 + settings.catch_up_wait_s)

    def _outputs(self, gathered: list[Gathered]) -> list[Output]:
        out = []
        for g in gathered:
            metrics.observe_reply(g.reply)
            if g.reply.get("partial"):
                metrics.PARTIAL_REPLIES.inc()
                log.warning("request %s answered by shards %s of %d (the rest were late)",
                            g.key.decode("utf-8", "replace"), g.reply["shards"]["answered"],
                            self.settings.index_shards, extra={"request_id": g.key.decode("utf-8", "replace")})
            out.append(Output(g.reply_to, g.key, c.fit_reply(g.reply, self.settings.max_reply_bytes)))
        return out

    async def handle(self, records: list[Record]) -> list[Output]:
        """Partial answers in, merged replies out; a malformed partial answer is dead-lettered
        here, record by record (the gatherer's state must not see a record twice, which the
        runtime's one-by-one retry of a failed batch would do)."""
        now = time.monotonic()
        done: list[Gathered] = []
        dead: list[Output] = []
        for r in records:
            try:
                if g := self.gatherer.add(r.partition, r.offset, r.key, r.value, r.headers, r.timestamp_ms, now):
                    done.append(g)
            except InvalidMessage as exc:
                metrics.observe_error("indexer", exc.code)
                dead.append(dead_letter(self.settings.deadletter_topic, r, exc))
        return self._outputs(done) + dead

    async def tick(self) -> list[Output]:
        return self._outputs(self.gatherer.expired(time.monotonic()))

    def held(self) -> dict[tuple[str, int], int]:
        return {(self.settings.partials_topic, p): o for p, o in self.gatherer.commit_offsets().items()}

    def revoke(self, partitions: Iterable[tuple[str, int]]) -> None:
        self.gatherer.revoke(p for t, p in partitions if t == self.settings.partials_topic)


def gather_loop(settings: IndexerSettings, sender: Sender) -> Loop:
    """The gatherer of this instance, on the shared ``gather_group``."""
    stage = GatherStage(settings)
    return Loop(name="gather", service="indexer", source=Source(settings, group=settings.gather_group, name="gather"),
                topics=[settings.partials_topic], sender=sender, handle=stage.handle, stage=stage,
                batch_max=500, tick_s=0.01, fetch_wait_s=0.01)
