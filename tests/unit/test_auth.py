"""Signed queries (lookalike.auth) and the worker's admission check, without servers."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from pydantic import SecretStr

from lookalike import auth
from lookalike import contracts as c
from lookalike.errors import ConfigError, Unauthorized
from lookalike.settings import WorkerSettings

KEYS = {"shop-1": SecretStr("k" * 32), "shop-2": SecretStr("another-key-of-32-characters-xx")}
NOW = 1_800_000_000_000
IMAGE = b"\xff\xd8 not really a jpeg, the signature does not care"
BASE = {c.H_REPLY_TO: b"lookalike.replies", c.H_K: b"5"}


def signed(client: str = "shop-1", secret: str = "k" * 32, *, at: int = NOW, value: bytes | None = IMAGE,
           headers: dict[str, bytes] | None = None) -> dict[str, bytes]:
    return auth.sign(client, secret, b"req-1", headers if headers is not None else BASE, value, now_ms=at)


def check(headers: dict[str, bytes], *, key: bytes = b"req-1", value: bytes | None = IMAGE, now: int = NOW) -> str:
    return auth.verify(KEYS, key, headers, value, window_s=300, now_ms=now)


def test_a_signed_query_verifies_as_its_client() -> None:
    assert check(signed()) == "shop-1"
    assert check(signed("shop-2", "another-key-of-32-characters-xx")) == "shop-2"
    assert check(signed(value=None), value=None) == "shop-1"  # item-id queries: no image
    assert check(signed(at=NOW - 299_000)) == "shop-1"  # inside the window, both sides
    assert check(signed(at=NOW + 299_000)) == "shop-1"


@pytest.mark.parametrize(
    ("headers", "kwargs", "says"),
    [
        pytest.param(BASE, {}, "unsigned", id="unsigned"),
        pytest.param({k: v for k, v in signed().items() if k != auth.H_SIGNATURE}, {}, "unsigned", id="no-signature"),
        pytest.param(signed(at=NOW - 301_000), {}, "old", id="stale"),
        pytest.param(signed(at=NOW + 301_000), {}, "future", id="future"),
        pytest.param(signed(secret="x" * 32), {}, "does not verify", id="wrong-key"),
        pytest.param(signed("shop-9"), {}, "does not verify", id="unknown-client"),
        pytest.param(signed(), {"value": IMAGE + b"!"}, "does not verify", id="tampered-image"),
        pytest.param(signed(), {"value": None}, "does not verify", id="image-removed"),
        pytest.param(signed(), {"key": b"req-2"}, "does not verify", id="other-request-key"),
        pytest.param({**signed(), c.H_K: b"100"}, {}, "does not verify", id="tampered-header"),
        pytest.param({**signed(), c.H_REPLY_TO: b"lookalike.elsewhere"}, {}, "does not verify", id="tampered-reply-to"),
        pytest.param({**signed(), c.H_ITEM_ID: b"15970"}, {}, "does not verify", id="added-header"),
        pytest.param({k: v for k, v in signed().items() if k != c.H_K}, {}, "does not verify", id="removed-header"),
        pytest.param({**signed(), auth.H_CLIENT_ID: b"shop-2"}, {}, "does not verify", id="other-client-id"),
        pytest.param({**signed(), auth.H_TIMESTAMP: str(NOW + 1).encode()}, {}, "does not verify", id="new-timestamp"),
        pytest.param({**signed(), auth.H_TIMESTAMP: b"yesterday"}, {}, "malformed", id="bad-timestamp"),
        pytest.param({**signed(), "note": b"a\nb"}, {}, "newline", id="newline-in-header"),
    ],
)
def test_refusals(headers: dict[str, bytes], kwargs: dict, says: str) -> None:
    with pytest.raises(Unauthorized) as err:
        check(headers, **kwargs)
    assert says in str(err.value)
    assert err.value.code == "unauthorized"


def test_unknown_client_and_wrong_key_read_the_same() -> None:
    messages = set()
    for headers in (signed("shop-9"), signed(secret="x" * 32)):
        with pytest.raises(Unauthorized) as err:
            check(headers)
        messages.add(str(err.value))
    assert len(messages) == 1


def test_canonical_request_is_the_documented_one() -> None:
    headers = {"k": b"5", "client-id": b"shop-1", "timestamp-ms": b"1800000000000", "reply-to": b"lookalike.replies",
               "signature": b"ignored"}
    expected = (b"LOOKALIKE-HMAC-SHA256\nreq-1\nclient-id:shop-1\nk:5\nreply-to:lookalike.replies\n"
                b"timestamp-ms:1800000000000\n" + hashlib.sha256(IMAGE).hexdigest().encode())
    assert auth.canonical_request(b"req-1", headers, IMAGE) == expected


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_openssl_computes_the_same_signature(tmp_path: Path) -> None:
    """The recipe of docs/security.md for clients without an HMAC library of their own."""
    headers = signed()
    canonical = tmp_path / "canonical"
    canonical.write_bytes(auth.canonical_request(b"req-1", headers, IMAGE))
    done = subprocess.run(["openssl", "dgst", "-sha256", "-hmac", "k" * 32, "-r", str(canonical)],
                          capture_output=True, text=True, check=True)
    assert done.stdout.split()[0] == headers[auth.H_SIGNATURE].decode()


def test_keys_from_settings_and_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"shop-3": "a-key-that-is-long-enough"}))
    keys = auth.load_keys({"shop-1": SecretStr("k" * 32)}, path)
    assert set(keys) == {"shop-1", "shop-3"} and keys["shop-3"].get_secret_value() == "a-key-that-is-long-enough"
    path.write_text(json.dumps({"shop-4": "short"}))
    with pytest.raises(ConfigError, match="shorter"):
        auth.load_keys({}, path)
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        auth.load_keys({}, path)
    with pytest.raises(ConfigError):
        auth.load_keys({}, tmp_path / "missing.json")
    assert len(auth.new_key()) >= 43


def test_worker_settings_read_keys_from_json_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOKALIKE_QUERY_AUTH", "1")
    monkeypatch.setenv("LOOKALIKE_QUERY_KEYS", json.dumps({"shop-1": "k" * 32}))
    settings = WorkerSettings()
    assert settings.query_auth and settings.query_keys["shop-1"].get_secret_value() == "k" * 32
    assert "k" * 32 not in repr(settings)
