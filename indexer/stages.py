"""The indexer's pure stages: vector records -> index mutations, query vectors -> replies."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from indexer.index import Delete, Mutation, Upsert, VectorIndex
from lookalike import contracts as c
from lookalike.errors import ErrorCode, InvalidMessage, ModelMismatch

MAX_K = 10_000  # the settings' own bound on max_k; the worker checked the client's k against max_k
MAX_TIMINGS_BYTES = 4096


@dataclass(frozen=True)
class VectorEvent:
    """One record of the catalog-vector topic, decoded."""

    mutation: Mutation
    model_version: str | None
    dim: int | None
    source: tuple[int, int] | None = None  # (catalog partition, offset) it was made from


def parse_vector_record(key: bytes | None, value: bytes | None, headers: Mapping[str, bytes]) -> VectorEvent:
    """A catalog-vector record -> an upsert or a delete. Raises InvalidMessage."""
    item_id = c.decode_key(key, "item id (key)")
    model_version = headers.get(c.H_MODEL_VERSION, b"").decode("utf-8", "replace") or None
    source = None
    if c.H_SOURCE_OFFSET in headers:
        position = c.parse_position(headers[c.H_SOURCE_OFFSET])
        if len(position) != 1:
            raise InvalidMessage("source-offset header must be one 'partition:offset'", code=ErrorCode.BAD_HEADER)
        source = next(iter(position.items()))
    if value is None:
        return VectorEvent(Delete(item_id), model_version, None, source)
    dim = c.parse_int(headers.get(c.H_VECTOR_DIM), what="vector-dim", lo=1, hi=c.MAX_VECTOR_DIM)
    vector = c.decode_vector(value, dim)
    metadata = c.decode_metadata(headers.get(c.H_METADATA))
    return VectorEvent(Upsert(item_id, vector, metadata), model_version, dim, source)


@dataclass(frozen=True)
class QueryVector:
    request_key: bytes
    request_id: str
    reply_to: str
    k: int
    item_id: str | None
    vector: np.ndarray | None
    model_version: str | None
    query_timestamp_ms: int | None
    timings_ms: dict[str, float] = field(default_factory=dict)
    min_position: dict[int, int] | None = None
    exclude: str | None = None  # a shard resolved this vector from this item: leave it out of the results
    deadline_ms: int | None = None  # Unix ms; past it the query is answered deadline_exceeded, not searched


def parse_query_vector(
    key: bytes | None, value: bytes | None, headers: Mapping[str, bytes], *, dim: int | None, default_reply_to: str
) -> QueryVector:
    """A query-vector record (written by a worker) -> what to search for and where to reply."""
    request_id = c.decode_key(key, "request id (key)")
    reply_to = headers.get(c.H_REPLY_TO, default_reply_to.encode()).decode("utf-8", "replace")
    if not c.valid_topic_name(reply_to):  # the worker checked the client's; this one came another way
        raise InvalidMessage(f"reply-to {reply_to[:100]!r} is not a topic name", code=ErrorCode.BAD_HEADER)
    k = c.parse_int(headers.get(c.H_K, b"5"), what="k", lo=1, hi=MAX_K)
    ts = c.parse_int(headers[c.H_QUERY_TS], what="query-timestamp-ms", lo=0, hi=2**62) if c.H_QUERY_TS in headers else None
    timings = c.parse_json(headers.get(c.H_TIMINGS, b"{}"), what="timings header", max_bytes=MAX_TIMINGS_BYTES,
                           max_depth=1, code=ErrorCode.BAD_HEADER)
    if not isinstance(timings, dict) or not all(isinstance(v, int | float) and not isinstance(v, bool)
                                                for v in timings.values()):
        raise InvalidMessage("timings header must be a JSON object of numbers", code=ErrorCode.BAD_HEADER)
    item_id = headers[c.H_ITEM_ID].decode("utf-8", "replace") if c.H_ITEM_ID in headers else None
    vector = None
    if item_id is None:
        if value is None or dim is None:
            raise InvalidMessage("query vector is missing", code=ErrorCode.BAD_VECTOR)
        vector = c.decode_vector(value, dim)
    model_version = headers.get(c.H_MODEL_VERSION, b"").decode("utf-8", "replace") or None
    min_position = c.parse_position(headers[c.H_MIN_POSITION]) if c.H_MIN_POSITION in headers else None
    exclude = headers[c.H_LOOKUP_OF].decode("utf-8", "replace") if c.H_LOOKUP_OF in headers else None
    deadline = c.parse_int(headers[c.H_DEADLINE], what=c.H_DEADLINE, lo=0, hi=2**62) if c.H_DEADLINE in headers else None
    return QueryVector(key or b"", request_id, reply_to, k, item_id, vector, model_version, ts, dict(timings),
                       min_position, exclude, deadline)


def reached(position: Mapping[int, int], required: Mapping[int, int] | None) -> bool:
    """Does an index at ``position`` (next offsets) include the records at ``required``?"""
    return not required or all(position.get(p, 0) > offset for p, offset in required.items())


def covers(position: Mapping[int, int], other: Mapping[int, int]) -> bool:
    """Has an index at ``position`` seen every catalog record an index at ``other`` has
    (both next offsets)?"""
    return all(position.get(p, 0) >= offset for p, offset in other.items())


def rank(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best first; equal (rounded) scores by item id, so one index and merged shards order
    ties alike."""
    return sorted(results, key=lambda r: (-r["score"], r["item_id"]))


def answer(
    index: VectorIndex,
    query: QueryVector,
    *,
    model_version: str | None,
    index_version: str | None,
    index_position: Mapping[int, int],
) -> dict[str, Any]:
    """Search the index for a query and build its reply. Raises InvalidMessage."""
    if query.model_version != model_version:
        raise ModelMismatch(f"query embedded by model {query.model_version}, the index serves {model_version}")
    started = time.perf_counter()
    if query.item_id is not None:
        hits = index.search(index.vector(query.item_id), query.k, exclude=query.item_id)
    else:
        hits = index.search(query.vector, query.k, exclude=query.exclude)  # type: ignore[arg-type]
    timings = dict(query.timings_ms)
    timings["search"] = (time.perf_counter() - started) * 1000
    if query.query_timestamp_ms is not None:
        timings["total"] = time.time() * 1000 - query.query_timestamp_ms
    results = rank([{"item_id": h.item_id, "score": round(h.score, 6), "metadata": dict(h.metadata)} for h in hits])
    return c.ok_reply(
        query.request_id,
        results,
        model_version=model_version,
        index_version=index_version,
        index_position=index_position,
        timings_ms=timings,
        query_item_id=query.item_id or query.exclude,
    )
