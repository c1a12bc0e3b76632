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

from lookalike.errors import BadHeader, BadKey, DeadlineExceeded, ErrorCode, InvalidMessage, MessageTooLarge

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
# A query's deadline: Unix time in ms after which its answer is of no use to the asker. Set by
# the client (or the HTTP gateway, from its own deadline), else the record's timestamp plus
# LOOKALIKE_QUERY_DEADLINE_MS; the worker passes the one it used on to the indexer.
H_DEADLINE = "deadline-ms"
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
# On a query vector an indexer embedded and answered itself (onehop/app.py): published
# for the feedback aggregator's drift samples only; no indexer answers it again.
H_ANSWERED = "answered"

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
MAX_VECTOR_DIM = 4096  # a vector-dim header above this is refused before anything is allocated

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


# Bounds of what a parser reads before it converts (docs/contracts.md, "Parsing bounds").
MAX_JSON_DEPTH = 32  # nesting of objects and arrays in any JSON read from a topic
MAX_INT_DIGITS = 19  # a header integer: int64's digits (a timestamp in ms has 13)
_INT_PATTERN = re.compile(rb"-?[0-9]{1,19}")
_POSITION_PATTERN = re.compile(rb"[0-9]{1,9}:[0-9]{1,19}(?:,[0-9]{1,9}:[0-9]{1,19}){0,1023}")
_BRACKET_DELTA = np.zeros(256, dtype=np.int8)
_BRACKET_DELTA[[ord("["), ord("{")]] = 1
_BRACKET_DELTA[[ord("]"), ord("}")]] = -1


def json_depth(raw: bytes) -> int:
    """How deeply ``raw`` nests objects and arrays, counted on the bytes without parsing (a
    bound checked before ``json.loads`` recurses), in linear time whatever the bytes (no
    regular expression: quotes and backslashes can make one take quadratic time).

    Brackets inside strings do not count: a quote opens or closes a string unless an odd
    run of backslashes precedes it (exact for valid JSON; invalid JSON fails to parse later)."""
    if b"[" not in raw and b"{" not in raw:
        return 0
    b = np.frombuffer(raw, dtype=np.uint8)
    index = np.arange(len(b))
    backslash = b == ord("\\")
    last_other = np.maximum.accumulate(np.where(backslash, -1, index))  # the last non-backslash at or before i
    run_before = np.empty(len(b), dtype=np.int64)  # backslashes right before each position
    run_before[0] = 0
    run_before[1:] = index[:-1] - last_other[:-1]
    quote = (b == ord('"')) & (run_before % 2 == 0)
    inside = (np.cumsum(quote) - quote) % 2 == 1  # after an odd number of real quotes: within a string
    delta = np.where(inside, 0, _BRACKET_DELTA[b])
    return int(np.cumsum(delta, dtype=np.int64).max(initial=0))


def parse_json(raw: bytes | str | None, *, what: str, max_bytes: int, max_depth: int = MAX_JSON_DEPTH,
               code: ErrorCode = ErrorCode.INVALID_MESSAGE) -> Any:
    """Untrusted JSON -> a value, reading at most ``max_bytes`` nested at most ``max_depth``
    deep; strict JSON (no NaN or Infinity). Raises InvalidMessage with ``code``, never
    RecursionError, ValueError or UnicodeDecodeError."""
    if raw is None:
        raise InvalidMessage(f"{what} is missing", code=code)
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    if len(data) > max_bytes:
        raise InvalidMessage(f"{what} is {len(data)} bytes, the limit is {max_bytes}", code=code)
    if json_depth(data) > max_depth:
        raise InvalidMessage(f"{what} is nested too deeply (limit {max_depth})", code=code)
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise InvalidMessage(f"{what} is not UTF-8 JSON: {exc}"[:300], code=code) from exc


def parse_int(raw: bytes | None, *, what: str, lo: int, hi: int) -> int:
    """A header's decimal integer in ``lo..hi``: at most MAX_INT_DIGITS digits checked before
    converting (no signs but '-', spaces, '_' or other digit forms). Raises BadHeader."""
    if raw is None or not _INT_PATTERN.fullmatch(raw):
        raise BadHeader(f"{what} header must be a decimal integer of at most {MAX_INT_DIGITS} digits, "
                        f"not {(raw or b'')[:24]!r}")
    value = int(raw)
    if not lo <= value <= hi:
        raise BadHeader(f"{what}={value} is outside {lo}..{hi}")
    return value


def query_deadline_ms(headers: Mapping[str, bytes], timestamp_ms: int | None, default_ms: int) -> int | None:
    """A query's deadline (Unix ms): its ``deadline-ms`` header, else its record's timestamp plus
    ``default_ms``; None when it has neither (or ``default_ms`` is 0). Raises BadHeader."""
    if H_DEADLINE in headers:
        return parse_int(headers[H_DEADLINE], what=H_DEADLINE, lo=0, hi=2**62)
    if not default_ms or not timestamp_ms or timestamp_ms <= 0:
        return None
    return timestamp_ms + default_ms


def check_deadline(deadline_ms: int | None, now_ms: float, who: str) -> None:
    """Raises DeadlineExceeded when ``deadline_ms`` has passed: ``who`` (the worker, the
    indexer) answers such a query at once instead of working on it."""
    if deadline_ms is not None and now_ms > deadline_ms:
        raise DeadlineExceeded(f"the query reached the {who} {now_ms - deadline_ms:.0f} ms after its deadline "
                               f"({H_DEADLINE} {deadline_ms}); it was not worked on")


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
    if not _POSITION_PATTERN.fullmatch(raw):  # bounded before converting: 1..1024 pairs of bounded digits
        raise BadHeader(f"a position must be 1 to 1024 'partition:offset' pairs of non-negative integers "
                        f"joined by ',', not {raw[:100]!r}")
    pairs = [part.split(b":") for part in raw.split(b",")]
    return {int(p): int(o) for p, o in pairs}


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
    """Inverse of :func:`encode_vector`; checks the length against ``dim`` and that every component is finite."""
    if len(raw) != dim * 4:
        raise InvalidMessage(f"vector is {len(raw)} bytes, expected {dim * 4} for dim {dim}", code=ErrorCode.BAD_VECTOR)
    vector = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    if not np.isfinite(vector).all():  # a NaN would poison an index or a drift sample
        raise InvalidMessage("vector has NaN or infinite components", code=ErrorCode.BAD_VECTOR)
    return vector


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
    query_item_id: str | None = None,
) -> dict[str, Any]:
    """The reply document for an answered query (``query_item_id``: the catalog item a "more
    like this" query named; None for an image query)."""
    return {
        "request_id": request_id,
        "status": "ok",
        "query_item_id": query_item_id,
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


# A reply's budget: under the broker's default message.max.bytes (1,048,588), which a topic a
# client made for its replies has unless it says otherwise. Results beyond it lose metadata.
MAX_REPLY_BYTES = 1_000_000


def fit_reply(reply: Mapping[str, Any], max_bytes: int = MAX_REPLY_BYTES) -> bytes:
    """The encoded reply, at most ``max_bytes``: when it is larger, results lose their
    metadata from the last (lowest ranked) up, and the reply says ``metadata_trimmed``:
    the ids and scores are the answer, metadata is a convenience. If even the bare results
    do not fit, a ``too_large`` error reply. Never raises for size."""
    data = encode_reply(reply)
    if len(data) <= max_bytes:
        return data
    results = [dict(r) for r in reply.get("results") or []]
    trimmed = dict(reply, results=results, metadata_trimmed=True)
    over = len(data) - max_bytes
    for result in reversed(results):
        if over <= 0:
            break
        size = len(encode_reply(result.get("metadata") or {}))
        if size > 2:
            result["metadata"] = {}
            over -= size - 2
    data = encode_reply(trimmed)
    if len(data) <= max_bytes:
        return data
    return encode_reply(error_reply(
        str(reply.get("request_id") or "(missing)"), ErrorCode.TOO_LARGE,
        f"the answer is {len(data)} bytes without metadata, over the reply budget of {max_bytes}",
        model_version=reply.get("model_version"), index_version=reply.get("index_version"),
        timings_ms=reply.get("timings_ms") if isinstance(reply.get("timings_ms"), dict) else None))


def parse_reply(raw: bytes | None, *, max_bytes: int = 4 * 1024 * 1024) -> dict[str, Any]:
    """A reply (or a shard's partial answer) read back from a topic -> its document, checked
    for every field the gatherer's merge and the feedback join read. Raises InvalidMessage."""
    doc = parse_json(raw, what="reply", max_bytes=max_bytes)
    problem = _reply_problem(doc)
    if problem:
        raise InvalidMessage(f"not a reply document: {problem}")
    return doc


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _reply_problem(doc: Any) -> str | None:
    if not isinstance(doc, dict):
        return "not an object"
    if not isinstance(doc.get("request_id"), str) or doc.get("status") not in ("ok", "error"):
        return "request_id must be a string and status 'ok' or 'error'"
    results = doc.get("results")
    if not isinstance(results, list) or not all(
            isinstance(r, dict) and isinstance(r.get("item_id"), str) and _number(r.get("score"))
            and isinstance(r.get("metadata", {}), dict) for r in results):
        return "results must be a list of {item_id: string, score: number, metadata: object}"
    if any(doc.get(name) is not None and not isinstance(doc[name], str)
           for name in ("model_version", "index_version", "query_item_id")):
        return "model_version, index_version and query_item_id must be strings or null"
    position = doc.get("index_position", {})
    if not isinstance(position, dict) or not all(
            isinstance(p, str) and p.isascii() and p.isdigit() and len(p) <= 9
            and isinstance(o, int) and not isinstance(o, bool) and 0 <= o < 2**63 for p, o in position.items()):
        return "index_position must map partition numbers to offsets"
    timings = doc.get("timings_ms", {})
    if not isinstance(timings, dict) or not all(_number(v) for v in timings.values()):
        return "timings_ms must map names to numbers"
    error = doc.get("error")
    if error is not None and not (isinstance(error, dict) and isinstance(error.get("code"), str)
                                  and isinstance(error.get("message"), str)):
        return "error must be null or {code: string, message: string}"
    return None


def encode_reply(reply: Mapping[str, Any]) -> bytes:
    # backslashreplace: a message quoting hostile input cannot make the reply unwritable
    return json.dumps(reply, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "backslashreplace")
