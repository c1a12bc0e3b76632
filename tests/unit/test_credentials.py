"""The compose deployment's secrets (lookalike/credentials.py): made once, with their final
modes from the first byte, rotated on request, never printed."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs12

from control.cli import main as cli_main
from lookalike import credentials
from lookalike.credentials import IDENTITIES, BrokerLayout, init, write_secret


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def secret_values(root: Path) -> list[str]:
    out = [p.read_text() for p in root.glob("*/kafka-password")] + [(root / "redis" / "password").read_text()]
    out += list(json.loads((root / "worker" / "query-keys.json").read_text()).values())
    out.append((root / "kafka" / "keystore-password").read_text())
    return out


def test_write_secret_creates_the_file_with_its_final_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file is opened with O_EXCL and the wanted mode, and never chmod'ed by path afterwards."""
    opened: list[tuple[str, int, int]] = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, flags, m=0o777, **kw: opened.append((str(path), flags, m))
                        or real_open(path, flags, m, **kw))
    monkeypatch.setattr(os, "chmod", lambda *a, **kw: pytest.fail(f"chmod after creation: {a}"))
    monkeypatch.setattr(Path, "chmod", lambda *a, **kw: pytest.fail(f"chmod after creation: {a}"))
    old = os.umask(0o022)
    try:
        write_secret(tmp_path / "s", b"x")
        write_secret(tmp_path / "c.pem", b"y", mode=0o644)
    finally:
        os.umask(old)
    assert [m for _p, _f, m in opened] == [0o600, 0o644]
    assert all(f & os.O_EXCL and f & os.O_CREAT for _p, f, _m in opened)
    assert mode(tmp_path / "s") == 0o600 and mode(tmp_path / "c.pem") == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pem", "s"]  # no temporary file left


def test_init_makes_every_secret_once_with_modes(tmp_path: Path) -> None:
    made = init(tmp_path)
    assert made
    for identity in IDENTITIES:
        folder = tmp_path / identity.name
        assert mode(folder) == 0o700
        assert mode(folder / "kafka-password") == 0o600 and len((folder / "kafka-password").read_text()) >= 43
        assert mode(folder / "ca.pem") == 0o644
        assert (folder / "redis-password").exists() == identity.redis
    passwords = [(tmp_path / i.name / "kafka-password").read_text() for i in IDENTITIES]
    assert len(set(passwords)) == len(passwords)
    assert json.loads((tmp_path / "admin" / "scram-users.json").read_text()) == dict(
        zip([i.name for i in IDENTITIES], passwords, strict=True))
    for folder in ("kafka", "redis", "admin", "ca"):
        for path in (tmp_path / folder).iterdir():
            assert mode(path) == (0o644 if path.suffix == ".pem" else 0o600), path
    # Signing keys: the worker verifies demo and web, the gateway signs as web only, the host as demo.
    worker_keys = json.loads((tmp_path / "worker" / "query-keys.json").read_text())
    assert set(worker_keys) == {"demo", "web"}
    assert json.loads((tmp_path / "gateway" / "query-keys.json").read_text()) == {"web": worker_keys["web"]}
    assert (tmp_path / "client" / "query-key").read_text() == worker_keys["demo"]
    assert len((tmp_path / "indexer" / "snapshot-key").read_text()) == 64
    assert not (tmp_path / "gateway" / "redis-password").exists()
    # Redis: requirepass is the password every Redis user got.
    conf = (tmp_path / "redis" / "redis.conf").read_text()
    assert f"requirepass {(tmp_path / 'redis' / 'password').read_text()}\n" in conf
    assert (tmp_path / "worker" / "redis-password").read_text() == (tmp_path / "redis" / "password").read_text()

    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    init(tmp_path)  # a restart of the stack: nothing changes
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_the_broker_gets_tls_and_no_plaintext_listener(tmp_path: Path) -> None:
    init(tmp_path)
    props = dict(line.split("=", 1) for line in (tmp_path / "kafka" / "server.properties").read_text().splitlines())
    protocols = dict(pair.split(":") for pair in props["listener.security.protocol.map"].split(","))
    assert set(protocols.values()) <= {"SASL_SSL", "SSL"}
    listeners = {entry.split("://")[0] for entry in props["listeners"].split(",")}
    assert listeners == set(protocols)
    assert props["listener.name.internal.ssl.client.auth"] == props["listener.name.controller.ssl.client.auth"] == "required"
    assert props["sasl.enabled.mechanisms"] == "SCRAM-SHA-512"
    assert props["allow.everyone.if.no.acl.found"] == "false"
    assert props["super.users"] == "User:CN=kafka;User:CN=admin"
    password = (tmp_path / "kafka" / "keystore-password").read_text()
    assert props["ssl.keystore.password"] == password
    key, cert, chain = pkcs12.load_key_and_certificates((tmp_path / "kafka" / "broker.p12").read_bytes(),
                                                        password.encode())
    assert key is not None and cert is not None and len(chain) == 1
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"kafka", "localhost"} <= set(sans.get_values_for_type(x509.DNSName))  # what clients connect to
    admin = x509.load_pem_x509_certificate((tmp_path / "admin" / "admin.pem").read_bytes())
    assert admin.subject.rfc4514_string() == "CN=admin"
    other = credentials.server_properties(BrokerLayout(host="127.0.0.1", broker_port=1, controller_port=2,
                                                       internal_port=3, host_port=4), "pw")
    assert "controller.quorum.voters=1@127.0.0.1:2" in other and "HOST://127.0.0.1:4" in other


def test_rotation_changes_only_what_was_asked(tmp_path: Path) -> None:
    init(tmp_path)
    before = {i.name: (tmp_path / i.name / "kafka-password").read_text() for i in IDENTITIES}
    redis_before = (tmp_path / "redis" / "password").read_text()
    init(tmp_path, rotate=["worker"])
    after = {i.name: (tmp_path / i.name / "kafka-password").read_text() for i in IDENTITIES}
    assert after["worker"] != before["worker"]
    assert {k: v for k, v in after.items() if k != "worker"} == {k: v for k, v in before.items() if k != "worker"}
    assert json.loads((tmp_path / "admin" / "scram-users.json").read_text())["worker"] == after["worker"]
    init(tmp_path, rotate=["redis"])
    new_redis = (tmp_path / "redis" / "password").read_text()
    assert new_redis != redis_before
    assert f"requirepass {new_redis}" in (tmp_path / "redis" / "redis.conf").read_text()
    assert all((tmp_path / i.name / "redis-password").read_text() == new_redis for i in IDENTITIES if i.redis)
    keys = json.loads((tmp_path / "worker" / "query-keys.json").read_text())
    init(tmp_path, rotate=["signing-key-web"])
    rotated = json.loads((tmp_path / "worker" / "query-keys.json").read_text())
    assert rotated["web"] != keys["web"] and rotated["demo"] == keys["demo"]
    assert json.loads((tmp_path / "gateway" / "query-keys.json").read_text()) == {"web": rotated["web"]}
    with pytest.raises(ValueError, match="cannot rotate"):
        init(tmp_path, rotate=["nobody"])


def test_the_cli_never_prints_a_secret(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["secrets", "init", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert "file(s) written" in out.out
    for secret in secret_values(tmp_path):
        assert secret not in out.out + out.err
