"""The worker's pure stages, tested without Kafka.

``parse_catalog`` / ``parse_query`` validate one message and decode its image;
``embed_catalog`` / ``embed_queries`` run a batch through the model; the ``*_record``
functions build the outgoing records. The loops (``workers.app``, on
:mod:`lookalike.runtime`) only poll, batch, call these, produce and commit.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from lookalike import contracts as c
from lookalike.embedder import Embedder
from lookalike.errors import ErrorCode, InvalidMessage
from lookalike.imaging import DecodeBudget, PreprocessSpec, decode_pixels
from lookalike.settings import CommonSettings

Record = tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]  # key, value, headers
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    """Where a message came from, for dead letters and logs."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None = None


@dataclass(frozen=True)
class CatalogUpsert:
    """A catalog image whose key and metadata are valid; its bytes not decoded yet."""

    item_id: str
    image_bytes: bytes
    metadata_raw: bytes  # forwarded as it came, validated JSON
    source: Source


@dataclass(frozen=True)
class CatalogImage:
    """A catalog image decoded to the model's input: what a batch holds until it is embedded
    (never the decoded picture, which may be a 40 Mpx bomb)."""

    item_id: str
    pixels: np.ndarray  # uint8 (S, S, 3)
    metadata_raw: bytes
    source: Source


@dataclass(frozen=True)
class CatalogRemoval:
    item_id: str
    source: Source


@dataclass(frozen=True)
class Query:
    request_key: bytes
    request_id: str
    options: c.QueryOptions
    pixels: np.ndarray | None  # the model's uint8 input (size, size, 3); None for "more like this item"
    source: Source
    timings_ms: dict[str, float] = field(default_factory=dict)
    deadline_ms: int | None = None  # Unix ms (c.query_deadline_ms); passed on to the indexer


@dataclass(frozen=True)
class Rejected:
    """A message that cannot be processed, with the reason."""

    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]
    error: InvalidMessage
    source: Source


def refusing_unexpected(parse):  # type: ignore[no-untyped-def]
    """Whatever a parser raises on hostile input becomes an InvalidMessage (code ``internal``
    when it is not one already): one message must never stop a batch or a service."""

    @functools.wraps(parse)
    def guarded(*args, **kwargs):  # type: ignore[no-untyped-def]
        try:
            return parse(*args, **kwargs)
        except InvalidMessage:
            raise
        except Exception as exc:
            log.exception("unexpected failure while validating a message")
            raise InvalidMessage(f"{type(exc).__name__}: {exc}", code=ErrorCode.INTERNAL) from exc

    return guarded


def own_topics(settings: CommonSettings) -> frozenset[str]:
    """Lookalike's own topics: never a query's reply-to, although they share its prefix."""
    return frozenset({settings.catalog_topic, settings.queries_topic, settings.deadletter_topic,
                      settings.catalog_vectors_topic, settings.query_vectors_topic} - {settings.replies_topic})


@refusing_unexpected
def parse_catalog_record(key: bytes | None, value: bytes | None, headers: Mapping[str, bytes],
                         source: Source) -> CatalogUpsert | CatalogRemoval:
    """A catalog event's key and metadata checked, its image not decoded. Raises InvalidMessage."""
    c.check_header_limits(headers)
    item_id = c.decode_key(key, "item id (key)")
    if value is None:
        return CatalogRemoval(item_id, source)
    metadata_raw = headers.get(c.H_METADATA, b"")
    c.decode_metadata(metadata_raw)  # validate only; the indexer stores it
    return CatalogUpsert(item_id, value, metadata_raw, source)


@refusing_unexpected
def decode_catalog(upsert: CatalogUpsert, settings: CommonSettings, spec: PreprocessSpec,
                   budget: DecodeBudget | None = None) -> CatalogImage:
    """A checked catalog image -> the model's input, decoded no larger than ``spec`` needs."""
    pixels = decode_pixels(upsert.image_bytes, spec, max_bytes=settings.max_image_bytes,
                           max_pixels=settings.max_image_pixels, budget=budget)
    return CatalogImage(upsert.item_id, pixels, upsert.metadata_raw, upsert.source)


def parse_catalog(key: bytes | None, value: bytes | None, headers: Mapping[str, bytes], source: Source,
                  settings: CommonSettings, spec: PreprocessSpec,
                  budget: DecodeBudget | None = None) -> CatalogImage | CatalogRemoval:
    """A catalog event -> an image ready to embed, or a removal (tombstone). Raises InvalidMessage."""
    parsed = parse_catalog_record(key, value, headers, source)
    return parsed if isinstance(parsed, CatalogRemoval) else decode_catalog(parsed, settings, spec, budget)


@refusing_unexpected
def parse_query(
    key: bytes | None, value: bytes | None, headers: Mapping[str, bytes], source: Source, settings: CommonSettings,
    spec: PreprocessSpec | None = None, deadline_ms: int | None = None,
) -> Query:
    """A query -> its options and the model's uint8 input made from its image (``spec``: the
    serving model's; JPEGs decode at a reduced scale as the catalog's do, and the decoded
    picture is let go at once, so a batch of queries holds small arrays, never pictures).
    Raises InvalidMessage."""
    started = time.perf_counter()
    c.check_header_limits(headers)
    request_id = c.decode_key(key, "request id (key)")
    options = c.parse_query_headers(
        headers,
        default_reply_to=settings.replies_topic,
        default_k=settings.default_k,
        max_k=settings.max_k,
        reply_topic_prefix=settings.reply_topic_prefix,
        forbidden_reply_topics=own_topics(settings),
    )
    pixels = None
    if options.item_id is None:
        if value is None:
            raise InvalidMessage("query has no image and no item-id header", code=ErrorCode.BAD_IMAGE)
        pixels = decode_pixels(value, spec or PreprocessSpec(), max_bytes=settings.max_query_image_bytes,
                               max_pixels=settings.max_image_pixels)
    timings = {"decode": (time.perf_counter() - started) * 1000}
    if source.timestamp_ms is not None:
        timings["queue"] = max(0.0, time.time() * 1000 - source.timestamp_ms - timings["decode"])
    return Query(key or b"", request_id, options, pixels, source, timings, deadline_ms)


def reply_destination(headers: Mapping[str, bytes], settings: CommonSettings) -> str:
    """Where an error reply for a broken query goes: its reply-to when that one is valid."""
    try:
        return c.parse_query_headers(
            {c.H_REPLY_TO: headers[c.H_REPLY_TO]} if c.H_REPLY_TO in headers else {},
            default_reply_to=settings.replies_topic,
            default_k=settings.default_k,
            max_k=settings.max_k,
            reply_topic_prefix=settings.reply_topic_prefix,
            forbidden_reply_topics=own_topics(settings),
        ).reply_to
    except InvalidMessage:
        return settings.replies_topic


def request_id_of(key: bytes | None) -> str:
    """A printable request id even for a key that is not valid UTF-8 (for error replies)."""
    if not key:
        return "(missing)"
    return key[: c.MAX_KEY_BYTES].decode("utf-8", errors="backslashreplace")


def embed_catalog(embedder: Embedder, images: Sequence[CatalogImage]) -> list[Record]:
    """Catalog images -> catalog-vector records, keyed by item id."""
    vectors = embedder.embed_pixels(np.stack([img.pixels for img in images]))
    return catalog_vector_records(embedder, images, vectors)


def catalog_vector_records(embedder: Embedder, items: Sequence[CatalogImage | CatalogUpsert],
                           vectors: np.ndarray) -> list[Record]:
    """Each item's vector record: the vector, the model version and the item's metadata."""
    return [
        (
            img.item_id.encode(),
            c.encode_vector(vec),
            [
                (c.H_MODEL_VERSION, embedder.version.encode()),
                (c.H_VECTOR_DTYPE, c.VECTOR_DTYPE.encode()),
                (c.H_VECTOR_DIM, str(embedder.dim).encode()),
                (c.H_METADATA, img.metadata_raw),
                (c.H_SOURCE_OFFSET, f"{img.source.partition}:{img.source.offset}".encode()),
            ],
        )
        for img, vec in zip(items, vectors, strict=True)
    ]


def removal_record(removal: CatalogRemoval, model_version: str) -> Record:
    """A tombstone on the vector topic: the indexer deletes the item, compaction forgets it."""
    source = f"{removal.source.partition}:{removal.source.offset}".encode()
    return (removal.item_id.encode(), None, [(c.H_MODEL_VERSION, model_version.encode()), (c.H_SOURCE_OFFSET, source)])


def embed_queries(embedder: Embedder, queries: Sequence[Query]) -> list[Record]:
    """Queries -> query-vector records keyed by request id, options and timings in headers."""
    with_image = [q for q in queries if q.pixels is not None]
    started = time.perf_counter()
    vectors = (embedder.embed_pixels(np.stack([q.pixels for q in with_image])) if with_image  # type: ignore[misc]
               else np.zeros((0, embedder.dim), np.float32))
    embed_ms = (time.perf_counter() - started) * 1000
    by_id = {id(q): vec for q, vec in zip(with_image, vectors, strict=True)}
    records = []
    for q in queries:
        vec = by_id.get(id(q))
        timings = dict(q.timings_ms)
        if vec is not None:
            timings["embed"] = embed_ms
        headers = [
            (c.H_REPLY_TO, q.options.reply_to.encode()),
            (c.H_K, str(q.options.k).encode()),
            (c.H_MODEL_VERSION, embedder.version.encode()),
            (c.H_TIMINGS, json.dumps(timings).encode()),
        ]
        if q.source.timestamp_ms is not None:
            headers.append((c.H_QUERY_TS, str(q.source.timestamp_ms).encode()))
        if q.options.item_id is not None:
            headers.append((c.H_ITEM_ID, q.options.item_id.encode()))
        if q.options.min_position is not None:
            headers.append((c.H_MIN_POSITION, c.format_position(q.options.min_position)))
        if q.deadline_ms is not None:
            headers.append((c.H_DEADLINE, str(q.deadline_ms).encode()))
        records.append((q.request_key, None if vec is None else c.encode_vector(vec), headers))
    return records


def deadletter_record(rejected: Rejected) -> Record:
    """The original message, with why it was refused and where it came from.

    A message refused as ``too_large`` keeps neither its value nor its headers (the dead
    letter would be as large, possibly over what the producer may send); a header says how
    large the value was.
    """
    value = rejected.value
    if rejected.error.code == "too_large":
        headers = [(c.H_ORIGINAL_VALUE_BYTES, str(len(value or b"")).encode())]
        value = None
    else:
        headers = [(name, value) for name, value in rejected.headers.items()
                   if not name.startswith(("error-", "source-"))]
    headers += [
        (c.H_ERROR_CODE, rejected.error.code.encode()),
        (c.H_ERROR_MESSAGE, str(rejected.error)[:1000].encode("utf-8", "backslashreplace")),
        (c.H_SOURCE_TOPIC, rejected.source.topic.encode()),
        (c.H_SOURCE_PARTITION, str(rejected.source.partition).encode()),
        (c.H_SOURCE_OFFSET, str(rejected.source.offset).encode()),
    ]
    return (rejected.key, value, headers)


def error_reply_record(rejected: Rejected, model_version: str | None) -> Record:
    error = rejected.error
    reply = c.error_reply(request_id_of(rejected.key), error.code, str(error), model_version=model_version)
    return (rejected.key or b"", c.encode_reply(reply), [])
