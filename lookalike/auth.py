"""Signed queries: per-client keys and an HMAC-SHA256 over what a query asks.

A client signs the *canonical request* (docs/security.md spells it out for other
languages): a sequence of netstrings (``<decimal byte length>:<bytes>,``), so no value
can pose as a boundary between two others::

    ns("LOOKALIKE-HMAC-SHA256-V2") ns(<request key>)
    ns(<header name>) ns(<header value>)   for every header but ``signature``, sorted by name
    ns(<hex SHA-256 of the value>)         (of zero bytes when the value is null)

concatenated, everything as the raw bytes that travel. The headers must include
``client-id`` and ``timestamp-ms`` (milliseconds since the epoch, at most 15 digits); the
hex HMAC-SHA256 of the canonical request under the client's key goes into ``signature``.
The worker refuses a query that is unsigned, signed by an unknown client or with the
wrong key, altered after signing (key, any header, the image), or whose timestamp is
further than the replay window from its clock. Headers are bounded before they are
converted, and an unknown client id costs the same HMAC as a known one.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from pathlib import Path

from pydantic import SecretStr

from lookalike.errors import ConfigError, Unauthorized

H_CLIENT_ID = "client-id"
H_TIMESTAMP = "timestamp-ms"
H_SIGNATURE = "signature"
SCHEME = b"LOOKALIKE-HMAC-SHA256-V2"  # V1 joined lines with "\n" and had to refuse newlines in headers
MIN_KEY_CHARS = 16
MAX_CLIENT_ID_BYTES = 128
MAX_TIMESTAMP_DIGITS = 15  # milliseconds since the epoch: 13 digits until the year 2286
SIGNATURE_HEX_CHARS = 64
# Verifying for an unknown client id costs one HMAC under this key, as a known id does, so
# the time a refusal takes does not tell which ids exist.
_DUMMY_KEY = hashlib.sha256(b"lookalike: no such client").hexdigest().encode()


def netstring(part: bytes) -> bytes:
    """``<decimal length>:<bytes>,``: a part that carries its own length (cannot be re-split)."""
    return str(len(part)).encode("ascii") + b":" + part + b","


def canonical_request(key: bytes, headers: Mapping[str, bytes], value: bytes | None) -> bytes:
    """The bytes a client signs (module docstring, docs/security.md)."""
    parts = [SCHEME, key]
    for name in sorted(headers, key=lambda n: n.encode("utf-8", "surrogateescape")):
        if name != H_SIGNATURE:
            parts += [name.encode("utf-8", "surrogateescape"), headers[name]]
    parts.append(hashlib.sha256(value or b"").hexdigest().encode("ascii"))
    return b"".join(netstring(part) for part in parts)


def _hmac(secret: bytes, key: bytes, headers: Mapping[str, bytes], value: bytes | None) -> str:
    return hmac.new(secret, canonical_request(key, headers, value), hashlib.sha256).hexdigest()


def signature(secret: str, key: bytes, headers: Mapping[str, bytes], value: bytes | None) -> str:
    return _hmac(secret.encode(), key, headers, value)


def sign(client_id: str, secret: str, key: bytes, headers: Mapping[str, bytes], value: bytes | None,
         *, now_ms: int | None = None) -> dict[str, bytes]:
    """``headers`` plus ``client-id``, ``timestamp-ms`` and the ``signature`` over all of them."""
    stamped = {**headers, H_CLIENT_ID: client_id.encode(),
               H_TIMESTAMP: str(now_ms if now_ms is not None else int(time.time() * 1000)).encode()}
    stamped.pop(H_SIGNATURE, None)
    return {**stamped, H_SIGNATURE: signature(secret, key, stamped, value).encode()}


def verify(keys: Mapping[str, SecretStr], key: bytes, headers: Mapping[str, bytes], value: bytes | None,
           *, window_s: float, now_ms: int | None = None) -> str:
    """The client id of a correctly signed, fresh query. Raises Unauthorized saying why not."""
    missing = [h for h in (H_CLIENT_ID, H_TIMESTAMP, H_SIGNATURE) if not headers.get(h)]
    if missing:
        raise Unauthorized(f"unsigned query: header(s) {', '.join(missing)} missing (docs/security.md)")
    client_id, signed_at, claimed = _signed_headers(headers)
    now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
    skew_s = (now_ms - signed_at) / 1000
    if abs(skew_s) > window_s:
        when = "old" if skew_s > 0 else "in the future"
        raise Unauthorized(f"timestamp-ms is {abs(skew_s):.0f}s {when}; queries are accepted within ±{window_s:.0f}s")
    secret = keys.get(client_id)
    expected = _hmac(secret.get_secret_value().encode() if secret is not None else _DUMMY_KEY, key, headers, value)
    matches = hmac.compare_digest(expected, claimed)
    # One message for an unknown client and a wrong key: the reply does not say which ids exist.
    if secret is None or not matches:
        raise Unauthorized("signature does not verify (unknown client id, wrong key, or the query was altered)")
    return client_id


def _signed_headers(headers: Mapping[str, bytes]) -> tuple[str, int, str]:
    """client-id, timestamp-ms and signature, each bounded and checked before it is converted."""
    raw_client, raw_time, raw_signature = headers[H_CLIENT_ID], headers[H_TIMESTAMP], headers[H_SIGNATURE]
    if len(raw_client) > MAX_CLIENT_ID_BYTES:
        raise Unauthorized(f"client-id is over {MAX_CLIENT_ID_BYTES} bytes")
    if len(raw_time) > MAX_TIMESTAMP_DIGITS or not raw_time.isdigit():  # bytes.isdigit: ASCII 0-9 only
        raise Unauthorized(f"timestamp-ms must be 1 to {MAX_TIMESTAMP_DIGITS} ASCII digits (milliseconds since the epoch)")
    claimed = raw_signature.strip().lower()
    if len(claimed) != SIGNATURE_HEX_CHARS or not all(ch in b"0123456789abcdef" for ch in claimed):
        raise Unauthorized(f"signature must be {SIGNATURE_HEX_CHARS} hex digits (HMAC-SHA256)")
    try:
        client_id = raw_client.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Unauthorized("client-id header is not UTF-8") from exc
    return client_id, int(raw_time), claimed.decode("ascii")


def load_keys(inline: Mapping[str, SecretStr], path: Path | None) -> dict[str, SecretStr]:
    """Client keys from the settings and from a JSON file ``{"client id": "key", ...}``."""
    keys = dict(inline)
    if path is not None:
        try:
            raw = json.loads(Path(path).read_text("utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"query keys file {path}: {exc}") from exc
        if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
            raise ConfigError(f"query keys file {path} must be a JSON object of client id -> key strings")
        keys.update({client: SecretStr(key) for client, key in raw.items()})
    weak = sorted(client for client, key in keys.items() if len(key.get_secret_value()) < MIN_KEY_CHARS)
    if weak:
        raise ConfigError(f"query keys of {weak} are shorter than {MIN_KEY_CHARS} characters")
    return keys


def new_key() -> str:
    """A fresh client key: 32 random bytes, URL-safe base64 (43 characters)."""
    import secrets

    return secrets.token_urlsafe(32)
