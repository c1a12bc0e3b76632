"""Signed queries: per-client keys and an HMAC-SHA256 over what a query asks.

A client signs the *canonical request* (docs/security.md spells it out for other
languages)::

    LOOKALIKE-HMAC-SHA256
    <request key>
    <header name>:<header value>      one line per header but ``signature``, sorted by name
    <hex SHA-256 of the value>        (of zero bytes when the value is null)

lines joined by ``\\n``, no trailing newline, everything as the raw UTF-8 bytes that
travel. The headers must include ``client-id`` and ``timestamp-ms`` (milliseconds since
the epoch); the hex HMAC-SHA256 of the canonical request under the client's key goes
into ``signature``. The worker refuses a query that is unsigned, signed by an unknown
client or with the wrong key, altered after signing (key, any header, the image), or
whose timestamp is further than the replay window from its clock.
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
SCHEME = b"LOOKALIKE-HMAC-SHA256"
MIN_KEY_CHARS = 16


def canonical_request(key: bytes, headers: Mapping[str, bytes], value: bytes | None) -> bytes:
    """The bytes a client signs. Raises Unauthorized for a header that would make it ambiguous."""
    lines = [SCHEME, key]
    for name in sorted(headers, key=lambda n: n.encode()):
        if name == H_SIGNATURE:
            continue
        raw = headers[name]
        if "\n" in name or b"\n" in raw:
            raise Unauthorized(f"header {name[:40]!r} contains a newline, which signed queries cannot carry")
        lines.append(name.encode() + b":" + raw)
    lines.append(hashlib.sha256(value or b"").hexdigest().encode())
    return b"\n".join(lines)


def signature(secret: str, key: bytes, headers: Mapping[str, bytes], value: bytes | None) -> str:
    return hmac.new(secret.encode(), canonical_request(key, headers, value), hashlib.sha256).hexdigest()


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
    try:
        client_id = headers[H_CLIENT_ID].decode("utf-8")
        signed_at = int(headers[H_TIMESTAMP].decode("ascii"))
        claimed = headers[H_SIGNATURE].decode("ascii").strip().lower()
    except (UnicodeDecodeError, ValueError) as exc:
        raise Unauthorized("client-id, timestamp-ms or signature header is malformed") from exc
    now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
    skew_s = (now_ms - signed_at) / 1000
    if abs(skew_s) > window_s:
        when = "old" if skew_s > 0 else "in the future"
        raise Unauthorized(f"timestamp-ms is {abs(skew_s):.0f}s {when}; queries are accepted within ±{window_s:.0f}s")
    secret = keys.get(client_id)
    expected = signature(secret.get_secret_value(), key, headers, value) if secret is not None else ""
    # One message for an unknown client and a wrong key: the reply does not say which ids exist.
    if secret is None or not hmac.compare_digest(expected, claimed):
        raise Unauthorized("signature does not verify (unknown client id, wrong key, or the query was altered)")
    return client_id


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
