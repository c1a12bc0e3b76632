"""Security wiring without servers: secrets stay out of reprs and logs, client configs carry
TLS and SASL, the worker answers refused queries with error replies, the local broker's
secured listeners, and no pickle anywhere."""

from __future__ import annotations

import ast
import json
import logging
import re
from pathlib import Path

import pytest
from pydantic import SecretStr

from control.stack.local import KafkaBroker, RedisServer
from lookalike import auth
from lookalike import contracts as c
from lookalike.clients import confluent_config, redacted
from lookalike.embedder import Embedder
from lookalike.settings import CommonSettings, StackSettings, WorkerSettings
from tests.images import jpeg_bytes
from tests.tls import make_tls
from workers.stages import Source

REPO = Path(__file__).resolve().parents[2]
PASSWORD = "s3cret-sasl-password-xyzzy"


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return make_tls(tmp_path_factory.mktemp("tls"))


def sasl_ssl(tls) -> CommonSettings:  # type: ignore[no-untyped-def]
    return CommonSettings(
        _env_file=None, kafka_bootstrap="b1:9093,b2:9093", kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512", kafka_sasl_username="lookalike-worker",
        kafka_sasl_password=SecretStr(PASSWORD), kafka_ssl_ca_file=tls.ca_file,
        redis_url=SecretStr("rediss://redis:6380/0"), redis_password=SecretStr("redis-" + PASSWORD),
        redis_ssl_ca_file=tls.ca_file,
    )


def test_client_configs_carry_tls_and_scram(tls) -> None:  # type: ignore[no-untyped-def]
    settings = sasl_ssl(tls)
    conf = confluent_config(settings)
    assert conf["security.protocol"] == "SASL_SSL" and conf["sasl.mechanism"] == "SCRAM-SHA-512"
    assert conf["sasl.username"] == "lookalike-worker" and conf["sasl.password"] == PASSWORD
    assert conf["ssl.ca.location"] == str(tls.ca_file) and conf["ssl.endpoint.identification.algorithm"] == "https"
    mtls = CommonSettings(_env_file=None, kafka_security_protocol="SSL", kafka_ssl_ca_file=tls.ca_file,
                          kafka_ssl_cert_file=tls.client_cert, kafka_ssl_key_file=tls.client_key,
                          kafka_ssl_check_hostname=False)
    assert confluent_config(mtls)["ssl.certificate.location"] == str(tls.client_cert)
    assert confluent_config(mtls)["ssl.endpoint.identification.algorithm"] == "none"
    assert "ssl.ca.location" not in confluent_config(CommonSettings(_env_file=None))


def test_incomplete_security_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="needs kafka_sasl_mechanism"):
        CommonSettings(_env_file=None, kafka_security_protocol="SASL_SSL")
    with pytest.raises(ValueError, match="go together"):
        CommonSettings(_env_file=None, kafka_security_protocol="SSL", kafka_ssl_cert_file=Path("c.pem"))


def test_secrets_stay_out_of_reprs_dumps_and_logged_configs(tls, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    settings = sasl_ssl(tls)
    shown = [repr(settings), str(settings), settings.model_dump_json(), json.dumps(redacted(confluent_config(settings))),
             repr(redacted(confluent_config(settings)))]
    client = CommonSettings(_env_file=None)
    from lookalike.settings import ClientSettings

    signing = ClientSettings(_env_file=None, client_key=SecretStr("client-key-" + PASSWORD))
    shown += [repr(signing), signing.model_dump_json()]
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("lookalike.test").info("kafka config %s", redacted(confluent_config(settings)))
    shown.append(caplog.text)
    for text in shown:
        assert PASSWORD not in text
    assert "**********" in shown[-1]
    assert client.kafka_sasl_password is None


def test_the_codebase_never_logs_a_raw_client_config() -> None:
    """Logging a config is only allowed through redacted()."""
    pattern = re.compile(r"log\.\w+\([^)]*(confluent_config|producer_config)\(")
    offenders = [str(p) for p in source_files() if pattern.search(p.read_text())]
    assert not offenders


def test_worker_answers_unsigned_and_forged_queries_with_unauthorized(embedder: Embedder) -> None:
    from workers.app import EmbeddingWorker, ModelSet

    settings = WorkerSettings(_env_file=None, kafka_bootstrap="127.0.0.1:9", query_auth=True,
                              query_keys={"shop-1": SecretStr("k" * 32)})
    worker = EmbeddingWorker(settings, ModelSet(settings, embedder))
    image = jpeg_bytes(1)
    base = {c.H_REPLY_TO: settings.replies_topic.encode()}
    good = auth.sign("shop-1", "k" * 32, b"ok", base, image)
    forged = auth.sign("shop-1", "x" * 32, b"forged", base, image)
    src = Source(settings.queries_topic, 0, 1)
    records, errors = worker.query_batch([(b"ok", image, good, src), (b"unsigned", image, base, src),
                                          (b"forged", image, forged, src)])
    assert [r[0] for r in records] == [b"ok"]
    replies = {json.loads(rec[1])["request_id"]: json.loads(rec[1]) for _topic, rec in errors}
    assert set(replies) == {"unsigned", "forged"}
    assert {r["error"]["code"] for r in replies.values()} == {"unauthorized"}


def test_errors_before_authentication_never_go_to_the_callers_reply_to(embedder: Embedder) -> None:
    """An unsigned or forged query naming a reply-to gets its error on the default replies topic;
    a signed query's errors (here: over its rate) go where it asked."""
    from workers.app import EmbeddingWorker, ModelSet

    settings = WorkerSettings(_env_file=None, kafka_bootstrap="127.0.0.1:9", query_auth=True,
                              query_keys={"shop-1": SecretStr("k" * 32)})
    worker = EmbeddingWorker(settings, ModelSet(settings, embedder))
    chosen = f"{settings.reply_topic_prefix}.victim"
    worker.reply_topics.exists = lambda topic: True  # type: ignore[method-assign]  # every topic exists
    image = jpeg_bytes(1)
    base = {c.H_REPLY_TO: chosen.encode(), c.H_K: b"5"}
    src = Source(settings.queries_topic, 0, 1)
    cases = [(b"unsigned", image, base, src),
             (b"forged", image, auth.sign("shop-1", "x" * 32, b"forged", base, image), src),
             (b"huge-ts", image, {**auth.sign("shop-1", "k" * 32, b"huge-ts", base, image),
                                  auth.H_TIMESTAMP: b"9" * 400}, src),
             (b"bad-k", image, auth.sign("shop-1", "k" * 32, b"bad-k", {**base, c.H_K: b"many"}, image), src)]
    _records, errors = worker.query_batch(cases)
    where = {json.loads(rec[1])["request_id"]: topic for topic, rec in errors}
    assert where == {"unsigned": settings.replies_topic, "forged": settings.replies_topic,
                     "huge-ts": settings.replies_topic, "bad-k": chosen}
    # The runtime's last-resort path (a stage that raised) decides the same way.
    from lookalike.runtime import Record

    for key, value, headers, _src in cases[:2]:
        [out] = worker.query_failed(Record(settings.queries_topic, 0, 1, key, value, headers), RuntimeError("boom"))
        assert out.topic == settings.replies_topic
    signed = auth.sign("shop-1", "k" * 32, b"signed", base, image)
    [out] = worker.query_failed(Record(settings.queries_topic, 0, 1, b"signed", image, signed), RuntimeError("boom"))
    assert out.topic == chosen
    # A verification that itself failed proves nothing either.
    worker.guard.authenticate = lambda *_: (_ for _ in ()).throw(RuntimeError("bug"))  # type: ignore[method-assign]
    [out] = worker.query_failed(Record(settings.queries_topic, 0, 1, b"signed", image, signed), RuntimeError("boom"))
    assert out.topic == settings.replies_topic


def test_broker_secured_listeners_and_scram_users(tmp_path: Path, tls) -> None:  # type: ignore[no-untyped-def]
    settings = StackSettings(kafka_port=29290, controller_port=29291, kafka_sasl_ssl_port=29292, kafka_ssl_port=29293,
                             state_dir=tmp_path, kafka_tls_keystore=tls.keystore,
                             kafka_tls_keystore_password=SecretStr(tls.keystore_password),
                             kafka_tls_truststore=tls.ca_file, kafka_ssl_client_auth="required",
                             kafka_scram_users={"worker": SecretStr("pw-1")}, kafka_authorizer=True)
    broker = KafkaBroker(settings)
    props = dict(line.split("=", 1) for line in broker.server_properties().splitlines() if line)
    assert props["listeners"].endswith("SASL_SSL://127.0.0.1:29292,SSL://127.0.0.1:29293")
    assert "CONTROLLER" not in props["advertised.listeners"]
    assert props["inter.broker.listener.name"] == "PLAINTEXT"
    assert props["sasl.enabled.mechanisms"] == "SCRAM-SHA-512"
    assert props["listener.name.ssl.ssl.client.auth"] == "required"
    assert props["ssl.keystore.location"] == str(tls.keystore)
    assert props["authorizer.class.name"].endswith("StandardAuthorizer")
    assert broker.scram_arguments() == ["--add-scram", "SCRAM-SHA-512=[name=worker,password=pw-1]"]
    plain = KafkaBroker(StackSettings(kafka_port=29290, controller_port=29291, state_dir=tmp_path))
    assert "sasl.enabled.mechanisms" not in plain.server_properties()
    with pytest.raises(Exception, match="keystore"):
        KafkaBroker(StackSettings(kafka_ssl_port=29293, state_dir=tmp_path)).server_properties()


def test_redis_config_puts_the_password_in_a_file_not_argv(tmp_path: Path, tls) -> None:  # type: ignore[no-untyped-def]
    server = RedisServer(StackSettings(redis_port=26549, state_dir=tmp_path, redis_password=SecretStr("pw-2"),
                                       redis_tls_cert_file=tls.ca_file.parent / "server.pem",
                                       redis_tls_key_file=tls.ca_file.parent / "server.key",
                                       redis_tls_ca_file=tls.ca_file))
    config = server.config(tmp_path)
    assert "requirepass pw-2" in config and "tls-port 26549" in config and "port 0" in config
    assert server.url == "rediss://127.0.0.1:26549/0"


# -- no pickle -----------------------------------------------------------------------------
def source_files() -> list[Path]:
    """Every Python file of the repository, whatever package it is in (hidden folders such as
    .venv and .git aside): a new package is scanned without anyone adding it here."""
    return sorted(p for p in REPO.rglob("*.py")
                  if not any(part.startswith(".") for part in p.relative_to(REPO).parts))


def test_the_scans_cover_every_package() -> None:
    scanned = {p.relative_to(REPO).parts[0] for p in source_files()}
    packages = {p.parent.name for p in REPO.glob("*/__init__.py")}
    assert packages <= scanned and {"feedback", "control", "workers", "indexer", "training"} <= scanned


BANNED_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def unsafe_loads(source: str, where: str = "<source>") -> list[str]:
    """Pickle imports, weights_only other than True, allow_pickle other than False, torch.load
    without weights_only, read_pickle calls."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        at = f"{where}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            problems += [f"{at} imports {a.name}" for a in node.names if a.name.split(".")[0] in BANNED_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in BANNED_MODULES:
            problems.append(f"{at} imports from {node.module}")
        elif isinstance(node, ast.keyword) and node.arg in {"weights_only", "allow_pickle"}:
            wanted = node.arg == "weights_only"  # weights_only must be True, allow_pickle must be False
            if not (isinstance(node.value, ast.Constant) and node.value.value is wanted):
                problems.append(f"{at} {node.arg}={ast.unparse(node.value)}")
        elif isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            if name in {"torch.load", "torch.jit.load"} and not any(k.arg == "weights_only" for k in node.keywords):
                problems.append(f"{at} {name} without weights_only=True")
            if name.endswith("read_pickle"):
                problems.append(f"{at} {name}")
    return problems


def test_the_pickle_scan_finds_what_it_looks_for() -> None:
    bad = """
import pickle
from joblib import load
import torch, numpy as np
torch.load("m.pt")
torch.load("m.pt", weights_only=False)
np.load("a.npy", allow_pickle=True)
pd.read_pickle("x")
"""
    assert len(unsafe_loads(bad)) == 6
    assert unsafe_loads("import torch\ntorch.load('m.pt', weights_only=True)\nnp.load('a', allow_pickle=False)") == []


def test_no_pickle_and_no_unsafe_loads_anywhere() -> None:
    """Nothing that crosses a process or a network is unpickled: weights are safetensors, caches
    npz without object arrays, snapshots JSON + hnswlib's own format (all checksummed)."""
    files = source_files()
    assert len(files) > 30 and REPO / "lookalike" / "artifacts.py" in files
    problems = [p for path in files for p in unsafe_loads(path.read_text(), str(path.relative_to(REPO)))]
    assert not problems, "\n".join(problems)


def test_acl_grants_are_least_privilege() -> None:
    from lookalike.acls import SERVICES, grants, kafka_acls_commands, topic_namespace

    s = CommonSettings(_env_file=None)
    assert topic_namespace(s) == "lookalike."
    worker = {(g.operation, g.name, g.pattern) for g in grants("worker", s, group="lookalike-worker")}
    assert ("READ", "lookalike.catalog", "literal") in worker
    assert ("WRITE", "lookalike.catalog.vectors.", "prefixed") in worker  # one topic per model version
    assert ("WRITE", "lookalike.replies", "prefixed") in worker
    indexer = {(g.operation, g.name, g.pattern) for g in grants("indexer", s, group="lookalike-indexer")}
    client = {(g.operation, g.name) for g in grants("query-client", s)}
    assert client == {("WRITE", "lookalike.queries"), ("READ", "lookalike.replies"), ("WRITE", "lookalike.feedback")}
    for service in SERVICES:
        for g in grants(service, s, group=f"lookalike-{service}"):
            # Nobody but the worker writes catalog vectors, nobody writes the catalog but the feed, no
            # cluster-wide rights.
            assert g.resource != "cluster"
            if g.operation == "WRITE":
                assert g.name in {"lookalike.replies", "lookalike.catalog.vectors.", "lookalike.queries.vectors",
                                  "lookalike.deadletter", "lookalike.queries", "lookalike.catalog",
                                  "lookalike.queries.partials", "lookalike.feedback", "lookalike.triggers",
                                  "lookalike.models"}
                assert g.name != "lookalike.triggers" or service == "feedback"
                assert g.name != "lookalike.models" or service == "trainer"
                assert g.name != "lookalike.catalog" or service == "catalog-feed"
                assert "catalog.vectors" not in g.name or service == "worker"
    # The indexer writes replies, and with index shards partial answers and resolved item queries.
    assert {name for op, name, _ in indexer if op == "WRITE"} == {
        "lookalike.replies", "lookalike.queries.partials", "lookalike.queries.vectors"}
    # The feedback loop and the gateway (they had no grants before).
    feedback = {(g.resource, g.operation, g.name) for g in grants("feedback", s)}
    assert {("topic", "READ", "lookalike.feedback"), ("topic", "READ", "lookalike.replies"),
            ("topic", "READ", "lookalike.queries.vectors"), ("topic", "READ", "lookalike.catalog.vectors."),
            ("topic", "WRITE", "lookalike.triggers"), ("group", "READ", "lookalike-feedback")} <= feedback
    assert {(g.resource, g.operation, g.name) for g in grants("trainer", s)} == {
        ("topic", "READ", "lookalike.triggers"), ("topic", "WRITE", "lookalike.models"),
        ("group", "READ", "lookalike-trainer")}
    gateway = {(g.operation, g.name, g.pattern) for g in grants("gateway", s)}
    assert ("READ", "lookalike.replies.gateway-", "prefixed") in gateway  # its own reply topics only
    assert ("CREATE", "lookalike.replies.gateway-", "prefixed") in gateway
    assert not any(g.resource == "group" for g in grants("gateway", s))  # assigned partitions, no commits
    line = kafka_acls_commands("User:w", grants("worker", s))[0]
    assert "--operation Describe --topic lookalike. --resource-pattern-type prefixed" in line
