"""The wire contracts: topic headers, the vector encoding, and the reply document.

docs/contracts.md describes the same things for people and for clients in other
languages; the JSON Schemas in ``lookalike/schemas`` are the machine-readable part and
the tests validate every reply against them.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import numpy as np

from lookalike.errors import BadHeader, BadKey, ErrorCode, InvalidMessage, MessageTooLarge

# Header names. Kafka headers are (str, bytes) pairs; values are UTF-8 text.
H_METADATA = "metadata"
H_REPLY_TO = "reply-to"
H_K = "k"
H_ITEM_ID = "item-id"
H_MIN_POSITION = "min-position"
H_MODEL_VERSION = "model-version"
H_VECTOR_DTYPE = "vector-dtype"
H_VECTOR_DIM = "vector-dim"
H_QUERY_TS = "query-timestamp-ms"
H_TIMINGS = "timings"
H_ERROR_CODE = "error-code"
H_ERROR_MESSAGE = "error-message"
H_SOURCE_TOPIC = "source-topic"
H_SOURCE_PARTITION = "source-partition"
H_SOURCE_OFFSET = "source-offset"
H_ORIGINAL_VALUE_BYTES = "original-value-bytes"
# Index shards (indexer/shards.py): a partial answer's shard ("1/2"), its phase ("search", or
# "lookup" for a "more like this" item the shard does not hold), how long the gatherer may
# wait for the other shards, and on a query vector a shard resolved from an item id.
H_SHARD = "shard"
H_SHARD_PHASE = "shard-phase"
H_GATHER_WAIT_MS = "gather-wait-ms"
H_LOOKUP_OF = "lookup-of"

MAX_KEY_BYTES = 256
MAX_METADATA_BYTES = 64 * 1024
MAX_METADATA_DEPTH = 16  # nesting of JSON objects and arrays in the metadata header
MAX_HEADERS = 64  # per incoming record
MAX_HEADER_BYTES = 128 * 1024  # names and values of all headers of one incoming record
# Known metadata fields and the JSON types they must have (lookalike/schemas/metadata.schema.json);
# other fields are free-form and kept as they are.
METADATA_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "title": (str,), "gender": (str,), "masterCategory": (str,), "subCategory": (str,), "articleType": (str,),
    "baseColour": (str,), "season": (str,), "year": (str, int), "usage": (str,),
}
_K_PATTERN = re.compile(rb"[0-9]{1,9}")
VECTOR_DTYPE = "float32"

Headers = Sequence[tuple[str, bytes | None]]


def headers_to_dict(headers: Iterable[tuple[str, bytes | None]] | Mapping[str, bytes] | None) -> dict[str, bytes]:
    """Normalise client header lists (or a mapping) to a dict; the last value wins."""
    if not headers:
        return {}
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    out: dict[str, bytes] = {}
    for name, value in pairs:
        out[str(name)] = b"" if value is None else bytes(value)
    return out


def decode_key(key: bytes | None, what: str = "key") -> str:
    """A message key as text: present, UTF-8, at most MAX_KEY_BYTES, no control characters."""
    if not key:
        raise BadKey(f"{what} is missing")
    if len(key) > MAX_KEY_BYTES:
        raise BadKey(f"{what} is {len(key)} bytes, the limit is {MAX_KEY_BYTES}")
    try:
        text = key.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadKey(f"{what} is not valid UTF-8") from exc
    # C0 and C1 control characters and DEL (Unicode category Cc): they break logs and terminals
    if any(unicodedata.category(c) == "Cc" for c in text):
        raise BadKey(f"{what} contains control characters")
    return text


def check_header_limits(headers: Iterable[tuple[str, bytes | None]] | Mapping[str, bytes] | None) -> None:
    """At most MAX_HEADERS headers of MAX_HEADER_BYTES in all, on any incoming record."""
    if not headers:
        return
    pairs = list(headers.items() if isinstance(headers, Mapping) else headers)
    if len(pairs) > MAX_HEADERS:
        raise MessageTooLarge(f"{len(pairs)} headers, the limit is {MAX_HEADERS}")
    size = sum(len(str(name).encode("utf-8", "surrogateescape")) + len(value or b"") for name, value in pairs)
    if size > MAX_HEADER_BYTES:
        raise MessageTooLarge(f"headers are {size} bytes, the limit is {MAX_HEADER_BYTES}")


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")  # NaN, Infinity: Python accepts them, other parsers do not


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


def decode_metadata(raw: bytes | None) -> dict[str, Any]:
    """The ``metadata`` header: a JSON object, or an empty one when absent.

    Refused (BadHeader): not UTF-8, not strict JSON (NaN, Infinity), not an object, nested
    deeper than MAX_METADATA_DEPTH, strings that cannot be written back as UTF-8 (lone
    surrogates escaped as ``\\ud800``: they would break every reply that carries them), or a
    known field of the wrong type. Unknown fields are kept.
    """
    if raw is None or raw == b"":
        return {}
    if len(raw) > MAX_METADATA_BYTES:
        raise BadHeader(f"metadata header is {len(raw)} bytes, the limit is {MAX_METADATA_BYTES}")
    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
        too_deep = _depth(value) > MAX_METADATA_DEPTH
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise BadHeader(f"metadata header is not UTF-8 JSON: {exc}") from exc
    except RecursionError:
        too_deep = True
    if too_deep:
        raise BadHeader(f"metadata header is nested too deeply (limit {MAX_METADATA_DEPTH})")
    if not isinstance(value, dict):
        raise BadHeader("metadata header must be a JSON object")
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadHeader("metadata header has a string that is not valid Unicode (a lone surrogate)") from exc
    for name, types in METADATA_FIELD_TYPES.items():
        if name in value and (not isinstance(value[name], types) or isinstance(value[name], bool)):
            raise BadHeader(f"metadata field {name!r} must be a {' or '.join(t.__name__ for t in types)}")
    return value


@dataclass(frozen=True)
class QueryOptions:
    """What the headers of a query ask for."""

    reply_to: str
    k: int
    item_id: str | None  # set: "more like this catalog item", the image is ignored
    min_position: dict[int, int] | None = None  # catalog partition -> offset the index must include


def parse_query_headers(
    headers: Mapping[str, bytes], *, default_reply_to: str, default_k: int, max_k: int, reply_topic_prefix: str,
    forbidden_reply_topics: Collection[str] = (),
) -> QueryOptions:
    """Validate a query's headers. Raises BadHeader with a message a client can act on.

    ``forbidden_reply_topics``: the service's own topics; they share the prefix, and a reply
    written into the catalog or the vector topics would overwrite items by key.
    Headers this function does not know are ignored.
    """
    reply_to = default_reply_to
    if H_REPLY_TO in headers:
        try:
            reply_to = headers[H_REPLY_TO].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadHeader("reply-to header is not UTF-8") from exc
        if not valid_topic_name(reply_to):
            raise BadHeader(f"reply-to {reply_to!r} is not a valid topic name")
        if reply_to != default_reply_to and not reply_to.startswith(reply_topic_prefix):
            raise BadHeader(f"reply-to {reply_to!r} is outside the allowed prefix {reply_topic_prefix!r}")
        # ... and the topics named after them: every model version's vector topic is "{vectors}.{version}"
        if any(reply_to == t or reply_to.startswith(f"{t}.") for t in forbidden_reply_topics):
            raise BadHeader(f"reply-to {reply_to!r} is one of Lookalike's own topics, not a reply topic")
    k = default_k
    if H_K in headers:
        if not _K_PATTERN.fullmatch(headers[H_K]):  # plain decimal digits: no sign, spaces or "1_0"
            raise BadHeader(f"k header must be a decimal integer, not {headers[H_K][:20]!r}")
        k = int(headers[H_K])
        if not 1 <= k <= max_k:
            raise BadHeader(f"k={k} is outside 1..{max_k}")
    item_id = None
    if H_ITEM_ID in headers:
        item_id = decode_key(headers[H_ITEM_ID], what="item-id header")
    min_position = parse_position(headers[H_MIN_POSITION]) if H_MIN_POSITION in headers else None
    return QueryOptions(reply_to=reply_to, k=k, item_id=item_id, min_position=min_position)


def parse_position(raw: bytes) -> dict[int, int]:
    """``"0:1200,3:57"`` -> {0: 1200, 3: 57}: catalog partition:offset pairs."""
    try:
        pairs = [part.split(":") for part in raw.decode("ascii").split(",") if part.strip()]
        position = {int(p): int(o) for p, o in pairs}
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadHeader(f"min-position must look like 'partition:offset,...', not {raw[:100]!r}") from exc
    if not position or len(position) > 1024 or any(p < 0 or o < 0 for p, o in position.items()):
        raise BadHeader("min-position needs 1 to 1024 non-negative partition:offset pairs")
    return position


def format_position(position: Mapping[int, int]) -> bytes:
    return ",".join(f"{p}:{o}" for p, o in sorted(position.items())).encode()


def valid_topic_name(name: str) -> bool:
    """Kafka's own rule: 1-249 characters of [a-zA-Z0-9._-], not '.' or '..'."""
    if not 0 < len(name) <= 249 or name in {".", ".."}:
        return False
    return all(c.isascii() and (c.isalnum() or c in "._-") for c in name)


def encode_vector(vector: np.ndarray) -> bytes:
    """A vector as the bytes of little-endian float32, the value format of the vector topics."""
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def decode_vector(raw: bytes, dim: int) -> np.ndarray:
    """Inverse of :func:`encode_vector`; checks the length against ``dim``."""
    if len(raw) != dim * 4:
        raise InvalidMessage(f"vector is {len(raw)} bytes, expected {dim * 4} for dim {dim}", code=ErrorCode.BAD_VECTOR)
    return np.frombuffer(raw, dtype="<f4").astype(np.float32)


@cache
def schema(name: str) -> dict[str, Any]:
    """A JSON Schema shipped in ``lookalike/schemas`` (``reply``, ``metadata``)."""
    text = resources.files("lookalike.schemas").joinpath(f"{name}.schema.json").read_text("utf-8")
    return json.loads(text)


def ok_reply(
    request_id: str,
    results: list[dict[str, Any]],
    *,
    model_version: str | None,
    index_version: str | None,
    index_position: Mapping[int, int],
    timings_ms: Mapping[str, float],
) -> dict[str, Any]:
    """The reply document for an answered query."""
    return {
        "request_id": request_id,
        "status": "ok",
        "results": results,
        "model_version": model_version,
        "index_version": index_version,
        "index_position": {str(p): o for p, o in sorted(index_position.items())},
        "timings_ms": {name: round(value, 3) for name, value in timings_ms.items()},
        "error": None,
    }


def error_reply(
    request_id: str,
    code: str,
    message: str,
    *,
    model_version: str | None = None,
    index_version: str | None = None,
    timings_ms: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """The reply document for a query that could not be answered."""
    return {
        "request_id": request_id,
        "status": "error",
        "results": [],
        "model_version": model_version,
        "index_version": index_version,
        "index_position": {},
        "timings_ms": {name: round(value, 3) for name, value in (timings_ms or {}).items()},
        "error": {"code": code, "message": message[:1000]},
    }


def encode_reply(reply: Mapping[str, Any]) -> bytes:
    # backslashreplace: a message quoting hostile input cannot make the reply unwritable
    return json.dumps(reply, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "backslashreplace")
