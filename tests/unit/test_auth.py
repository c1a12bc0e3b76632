"""Signed queries (lookalike.auth) and the worker's admission check, without servers."""

from __future__ import annotations

import hashlib
import hmac
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
        pytest.param({**signed(), auth.H_TIMESTAMP: b"yesterday"}, {}, "ASCII digits", id="bad-timestamp"),
        # Hundreds of digits: int() of them would work, but the float arithmetic after it raised OverflowError.
        pytest.param({**signed(), auth.H_TIMESTAMP: b"9" * 400}, {}, "ASCII digits", id="huge-timestamp"),
        pytest.param({**signed(), auth.H_TIMESTAMP: b"-1800000000000"}, {}, "ASCII digits", id="negative-timestamp"),
        pytest.param({**signed(), auth.H_TIMESTAMP: "١٨٠٠".encode()}, {}, "ASCII digits", id="arabic-digits"),
        pytest.param({**signed(), auth.H_SIGNATURE: b"ab" * 1000}, {}, "hex digits", id="long-signature"),
        pytest.param({**signed(), auth.H_SIGNATURE: b"zz" * 32}, {}, "hex digits", id="non-hex-signature"),
        pytest.param({**signed(), auth.H_CLIENT_ID: b"c" * 129}, {}, "over 128 bytes", id="long-client-id"),
        pytest.param({**signed(), auth.H_CLIENT_ID: b"\xff\xfe"}, {}, "not UTF-8", id="non-utf8-client-id"),
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
    expected = (b"24:LOOKALIKE-HMAC-SHA256-V2,5:req-1,9:client-id,6:shop-1,1:k,1:5,8:reply-to,17:lookalike.replies,"
                b"12:timestamp-ms,13:1800000000000,64:" + hashlib.sha256(IMAGE).hexdigest().encode() + b",")
    assert auth.canonical_request(b"req-1", headers, IMAGE) == expected


def test_parts_cannot_be_re_split() -> None:
    """V1 joined ``name:value`` lines: one header ``a`` of ``1\nb:2`` read like two headers. Now
    every part carries its length, so moving bytes between parts changes what is signed."""
    one = auth.canonical_request(b"req-1", {"a": b"1,1:b,1:2"}, IMAGE)
    two = auth.canonical_request(b"req-1", {"a": b"1", "b": b"2"}, IMAGE)
    assert one != two
    assert auth.canonical_request(b"req-1", {"a": b"x"}, IMAGE) != auth.canonical_request(b"req-1x", {"a": b""}, IMAGE)
    assert auth.canonical_request(b"", {"ab": b"c"}, IMAGE) != auth.canonical_request(b"", {"a": b"bc"}, IMAGE)
    # A newline in a header is signed like any other byte (V1 had to refuse it).
    assert check(signed(headers={**BASE, "note": b"a\nb"})) == "shop-1"
    with pytest.raises(Unauthorized, match="does not verify"):
        check({**signed(headers={**BASE, "note": b"a\nb"}), "note": b"a\nc"})


def test_a_v1_signature_is_refused() -> None:
    headers = {**BASE, auth.H_CLIENT_ID: b"shop-1", auth.H_TIMESTAMP: str(NOW).encode()}
    lines = [b"LOOKALIKE-HMAC-SHA256", b"req-1", *(n.encode() + b":" + headers[n] for n in sorted(headers)),
             hashlib.sha256(IMAGE).hexdigest().encode()]
    v1 = hmac.new(b"k" * 32, b"\n".join(lines), hashlib.sha256).hexdigest().encode()
    with pytest.raises(Unauthorized, match="does not verify"):
        check({**headers, auth.H_SIGNATURE: v1})


def test_an_unknown_client_costs_the_same_hmac(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same canonical request is built and MACed for an unknown id as for a known one."""
    unknown, wrong_key = signed("shop-9"), signed(secret="x" * 32)
    calls: list[int] = []
    real = auth._hmac
    monkeypatch.setattr(auth, "_hmac", lambda secret, *args: calls.append(len(secret)) or real(secret, *args))
    for headers in (unknown, wrong_key):
        with pytest.raises(Unauthorized):
            check(headers)
    assert calls == [64, 32]  # one HMAC each: the unknown id's under the dummy key, the known one's under its key


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
