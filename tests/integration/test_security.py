"""Security on real servers: a private Kafka broker with a SASL_SSL (SCRAM-SHA-512) and a
mutual-TLS listener, an authorizer with exactly the documented ACLs, a private Redis with a
password behind TLS, and the worker and indexer (each as its own Kafka user) answering signed,
rate-limited queries through all of it. Certificates and passwords are made here."""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import pytest
import redis
from confluent_kafka import KafkaError, Producer
from confluent_kafka.admin import AdminClient
from pydantic import SecretStr

from control.stack.local import KafkaBroker, RedisServer
from lookalike import auth
from lookalike import contracts as c
from lookalike.acls import bindings, grants
from lookalike.clients import confluent_config, producer_config, redis_client
from lookalike.settings import ClientSettings, StackSettings
from lookalike.snapshots import snapshot_namespace
from lookalike.status import indexer_status
from lookalike.topics import ensure_topics
from producers.catalog_feed import CatalogFeed
from tests.conftest import Cluster
from tests.images import jpeg_bytes
from tests.integration.conftest import Pipeline, start_pipeline, stop_pipeline, topic_env, warm_up
from tests.tls import Tls, make_tls

pytestmark = pytest.mark.integration

# Private ports (this test's range): plain/controller/SASL_SSL/SSL, and Redis over TLS.
KAFKA, CONTROLLER, SASL_SSL, SSL, REDIS = 29210, 29211, 29212, 29213, 26510
USERS = ("worker", "indexer", "shop")
CLIENT_KEYS = {"shop": auth.new_key(), "burst": auth.new_key()}
RATE, BURST = 1.0, 4
TLS_PRINCIPAL = "User:CN=catalog-tls"
SIGNED_SCRIPT = Path(__file__).resolve().parents[2] / "docs" / "examples" / "signed-query-with-kcat.sh"


@dataclass
class Secured:
    pipeline: Pipeline
    broker: KafkaBroker
    redis_server: RedisServer
    tls: Tls
    passwords: dict[str, str]
    redis_password: str
    env: dict[str, str]  # the shop's client variables (SASL_SSL, Redis, signing)

    def client_settings(self, **overrides: object) -> ClientSettings:
        return self.pipeline.settings.model_copy(update=overrides)


def kafka_env(user: str, password: str, tls: Tls) -> dict[str, str]:
    return {
        "LOOKALIKE_KAFKA_BOOTSTRAP": f"127.0.0.1:{SASL_SSL}",
        "LOOKALIKE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "LOOKALIKE_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "LOOKALIKE_KAFKA_SASL_USERNAME": user,
        "LOOKALIKE_KAFKA_SASL_PASSWORD": password,
        "LOOKALIKE_KAFKA_SSL_CA_FILE": str(tls.ca_file),
    }


def apply_acls(admin: AdminClient, principal: str, acl_bindings: list) -> None:
    for future in admin.create_acls(acl_bindings, request_timeout=30).values():
        future.result(timeout=30)


@pytest.fixture(scope="module")
def secured(tiny_model, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("secured")
    tls = make_tls(root / "tls", client="catalog-tls")
    passwords = {user: secrets.token_urlsafe(18) for user in USERS}
    redis_password = secrets.token_urlsafe(18)
    stack = StackSettings(
        kafka_port=KAFKA, controller_port=CONTROLLER, kafka_sasl_ssl_port=SASL_SSL, kafka_ssl_port=SSL,
        redis_port=REDIS, state_dir=root / "stack", kafka_heap="384m", kafka_tls_keystore=tls.keystore,
        kafka_tls_keystore_password=SecretStr(tls.keystore_password), kafka_tls_truststore=tls.ca_file,
        kafka_ssl_client_auth="required", kafka_authorizer=True,
        kafka_scram_users={user: SecretStr(pw) for user, pw in passwords.items()},
        redis_password=SecretStr(redis_password), redis_tls_cert_file=root / "tls" / "server.pem",
        redis_tls_key_file=root / "tls" / "server.key", redis_tls_ca_file=tls.ca_file,
    )
    broker, redis_server = KafkaBroker(stack), RedisServer(stack)
    pipeline = None
    try:
        redis_server.up()
        broker.up()
        # The admin: ANONYMOUS on the loopback PLAINTEXT listener is the broker's super user.
        prefix = f"sec-{uuid.uuid4().hex[:8]}"
        # Reply-to topics only under <prefix>.replies: the services' Write ACL covers those and nothing else.
        topics = {**topic_env(prefix), "LOOKALIKE_REPLY_TOPIC_PREFIX": f"{prefix}.replies"}
        admin_settings = ClientSettings(_env_file=None, kafka_bootstrap=broker.bootstrap,
                                        **{k[len("LOOKALIKE_"):].lower(): v for k, v in topics.items()
                                           if k[len("LOOKALIKE_"):].lower() in ClientSettings.model_fields})
        ensure_topics(admin_settings)
        admin = AdminClient(confluent_config(admin_settings))
        for principal, service_grants in [
            ("User:worker", grants("worker", admin_settings, group=f"{prefix}-worker")),
            ("User:indexer", grants("indexer", admin_settings, group=f"{prefix}-indexer")),
            ("User:shop", grants("query-client", admin_settings) + grants("catalog-feed", admin_settings)),
            (TLS_PRINCIPAL, grants("catalog-feed", admin_settings) + grants("query-client", admin_settings)),
        ]:
            apply_acls(admin, principal, bindings(principal, service_grants))
        common = {
            "LOOKALIKE_REPLY_TOPIC_PREFIX": topics["LOOKALIKE_REPLY_TOPIC_PREFIX"],
            "LOOKALIKE_REDIS_PASSWORD": redis_password,
            "LOOKALIKE_REDIS_SSL_CA_FILE": str(tls.ca_file),
            "LOOKALIKE_QUERY_AUTH": "1",
            "LOOKALIKE_QUERY_KEYS": json.dumps(CLIENT_KEYS),
            "LOOKALIKE_RATE_LIMIT": "1",
            "LOOKALIKE_RATE_LIMIT_PER_S": str(RATE),
            "LOOKALIKE_RATE_LIMIT_BURST": str(BURST),
            "LOOKALIKE_SNAPSHOT_INTERVAL_S": "1",
            "LOOKALIKE_CLIENT_ID": "shop",
            "LOOKALIKE_CLIENT_KEY": CLIENT_KEYS["shop"],
            **kafka_env("shop", passwords["shop"], tls),
        }
        cluster = Cluster(f"127.0.0.1:{SASL_SSL}", redis_server.url, "private secured stack")
        (root / "pipeline").mkdir()
        pipeline = start_pipeline(
            cluster, tiny_model[0], root / "pipeline", common, prefix=prefix, create_topics=False,
            service_env={name: kafka_env(name, passwords[name], tls) for name in ("worker", "indexer")},
        )
        warm_up(pipeline, jpeg_bytes(seed=500), timeout_s=120)
        yield Secured(pipeline, broker, redis_server, tls, passwords, redis_password, common)
    finally:
        if pipeline is not None:
            stop_pipeline(pipeline)
        broker.down()
        redis_server.down()


def test_services_answer_signed_queries_through_sasl_ssl(secured: Secured) -> None:
    pipeline = secured.pipeline
    feed = pipeline.feed()
    feed.publish("sec-1", jpeg_bytes(seed=501), {"title": "secured"})
    feed.flush()
    with pipeline.client() as client:
        reply = client.ask(jpeg_bytes(seed=501), min_position=feed.positions, timeout_s=20)
    assert reply["status"] == "ok", reply
    assert reply["results"][0]["item_id"] == "sec-1"
    # The services ran as their own users with only their ACLs, and logged none of the secrets.
    logs = pipeline.log_text("worker") + pipeline.log_text("indexer")
    for secret in [*secured.passwords.values(), secured.redis_password, *CLIENT_KEYS.values()]:
        assert secret not in logs


def ask_raw(secured: Secured, request_id: str, image: bytes, headers: dict[str, bytes]) -> dict:
    """A query with exactly these headers, from an unsigning client with the shop's Kafka user."""
    with secured.pipeline.client() as client:
        client.settings = client.settings.model_copy(update={"client_key": None})
        client.send(image, request_id=request_id, headers=headers)
        return client.wait(request_id, timeout_s=20)


def test_unsigned_forged_and_stale_queries_get_unauthorized(secured: Secured) -> None:
    image = jpeg_bytes(seed=502)
    replies_topic = secured.pipeline.settings.replies_topic
    standard = {c.H_REPLY_TO: replies_topic.encode(), c.H_K: b"5"}
    stale_ms = int(time.time() * 1000) - 10 * 60 * 1000
    cases = {
        "unsigned": {},
        "forged": auth.sign("shop", auth.new_key(), b"forged", standard, image),
        "stale": auth.sign("shop", CLIENT_KEYS["shop"], b"stale", standard, image, now_ms=stale_ms),
        "tampered": {**auth.sign("shop", CLIENT_KEYS["shop"], b"tampered", standard, image), c.H_K: b"50"},
    }
    for request_id, headers in cases.items():
        reply = ask_raw(secured, request_id, image, headers)
        jsonschema.validate(reply, c.schema("reply"))
        assert reply["status"] == "error" and reply["error"]["code"] == "unauthorized", (request_id, reply)
    good = auth.sign("shop", CLIENT_KEYS["shop"], b"good", standard, image)
    assert ask_raw(secured, "good", image, good)["status"] == "ok"


def test_a_client_over_its_rate_gets_rate_limited(secured: Secured) -> None:
    settings = secured.client_settings(client_id="burst", client_key=SecretStr(CLIENT_KEYS["burst"]))
    from producers.query_client import QueryClient

    image = jpeg_bytes(seed=503)
    with QueryClient(settings) as client:
        started = time.monotonic()
        sent = [client.send(image) for _ in range(3 * BURST)]
        elapsed = time.monotonic() - started
        codes = [(r["error"] or {}).get("code", "ok") for r in (client.wait(i, timeout_s=20) for i in sent)]
    assert set(codes) <= {"ok", "rate_limited"}, codes
    # The burst, plus what the bucket earned while the queries went out (and some slack for the worker's pace).
    assert BURST <= codes.count("ok") <= BURST + int(RATE * (elapsed + 2)) + 1, codes
    assert codes.count("rate_limited") >= 3 * BURST - BURST - int(RATE * (elapsed + 2)) - 1
    # Another client's bucket is its own.
    with secured.pipeline.client() as shop:
        assert shop.ask(image, timeout_s=20)["status"] == "ok"


def connection_errors(settings: ClientSettings, codes: set[int], timeout_s: float = 15) -> tuple[list[KafkaError], float]:
    """Connect a producer and collect the client errors until one of ``codes`` shows up."""
    errors: list[KafkaError] = []
    producer = Producer(producer_config(settings, error_cb=errors.append))
    started = time.monotonic()
    while time.monotonic() - started < timeout_s and not any(e.code() in codes for e in errors):
        producer.poll(0.2)  # serves error_cb
    elapsed = time.monotonic() - started
    del producer
    return errors, elapsed


def test_a_wrong_kafka_password_is_refused_quickly(secured: Secured) -> None:
    wrong = secured.client_settings(kafka_sasl_password=SecretStr("not-the-password"))
    errors, elapsed = connection_errors(wrong, {KafkaError._AUTHENTICATION})
    auth_errors = [e for e in errors if e.code() == KafkaError._AUTHENTICATION]
    assert auth_errors, errors
    assert "invalid credentials" in auth_errors[0].str(), auth_errors[0].str()
    assert elapsed < 15

    # The same user with the right password is let in.
    AdminClient(confluent_config(secured.pipeline.settings)).list_topics(timeout=10)


def test_acls_refuse_what_a_user_was_not_granted(secured: Secured) -> None:
    """The shop may write queries and catalog items, not the vector topics the worker writes."""
    settings = secured.pipeline.settings
    producer = Producer(producer_config(settings))
    outcome: list[KafkaError | None] = []
    producer.produce(settings.catalog_vectors_topic, key=b"forged", value=b"\0" * 1024,
                     on_delivery=lambda err, _msg: outcome.append(err))
    producer.flush(20)
    assert outcome and outcome[0] is not None
    assert outcome[0].code() in {KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.CLUSTER_AUTHORIZATION_FAILED}, outcome


def test_mutual_tls_listener_feeds_the_catalog(secured: Secured) -> None:
    """A catalog publisher authenticated by its client certificate on the SSL listener; what
    it publishes is then found through the SASL_SSL side."""
    tls = secured.tls
    mtls = secured.client_settings(
        kafka_bootstrap=f"127.0.0.1:{SSL}", kafka_security_protocol="SSL", kafka_sasl_mechanism=None,
        kafka_sasl_username=None, kafka_sasl_password=None, kafka_ssl_cert_file=tls.client_cert,
        kafka_ssl_key_file=tls.client_key,
    )
    feed = CatalogFeed(mtls)
    feed.publish("via-mtls", jpeg_bytes(seed=504), {"title": "published over mutual TLS"})
    report = feed.flush()
    assert report.published == 1 and report.failed == 0
    with secured.pipeline.client() as client:
        reply = client.ask(jpeg_bytes(seed=504), min_position=feed.positions, timeout_s=20)
    assert reply["status"] == "ok" and reply["results"][0]["item_id"] == "via-mtls"
    # Without a client certificate the handshake is refused.
    anonymous = mtls.model_copy(update={"kafka_ssl_cert_file": None, "kafka_ssl_key_file": None})
    refused = {KafkaError._SSL, KafkaError._TRANSPORT}
    errors, _ = connection_errors(anonymous, refused)
    assert any(e.code() in refused and "certificate" in e.str() for e in errors), errors
    # A client that does not trust the test CA refuses the broker in turn.
    untrusting = mtls.model_copy(update={"kafka_ssl_ca_file": None})
    errors, _ = connection_errors(untrusting, refused)
    assert any("certificate verify failed" in e.str() for e in errors), errors


def test_redis_needs_the_password_and_tls(secured: Secured) -> None:
    settings = secured.pipeline.settings
    group = secured.pipeline.env["LOOKALIKE_INDEXER_GROUP"]
    # The indexer publishes its status and snapshots into the password-protected Redis.
    statuses = indexer_status(settings, group)
    assert statuses and statuses[0].caught_up
    current = f"{snapshot_namespace(group, statuses[0].model_version)}:current"  # the serving model's snapshots
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not redis_client(settings).get(current):
        time.sleep(0.5)
    assert redis_client(settings).get(current)
    # Without the password, with a wrong one, or without TLS, Redis refuses.
    with pytest.raises(redis.AuthenticationError):
        indexer_status(settings.model_copy(update={"redis_password": None}), group)
    with pytest.raises(redis.AuthenticationError):
        redis_client(settings.model_copy(update={"redis_password": SecretStr("wrong")})).ping()
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(f"redis://127.0.0.1:{REDIS}/0", password=secured.redis_password, socket_timeout=3).ping()


@pytest.mark.skipif(shutil.which("kcat") is None or shutil.which("openssl") is None, reason="needs kcat and openssl")
def test_kcat_signs_a_query_as_documented(secured: Secured, tmp_path: Path) -> None:
    """docs/examples/signed-query-with-kcat.sh: a signed query from no Lookalike code. Over the
    mutual-TLS listener: Debian's kcat links librdkafka 2.0.2, whose SCRAM Kafka 4 rejects
    (fixed in librdkafka 2.6.1, see docs/security.md)."""
    image = tmp_path / "query.jpg"
    image.write_bytes(jpeg_bytes(seed=501))
    tls = secured.tls
    kcat_opts = (f"-X security.protocol=SSL -X ssl.ca.location={tls.ca_file} "
                 f"-X ssl.certificate.location={tls.client_cert} -X ssl.key.location={tls.client_key}")
    run_env = {**secured.pipeline.env, "LOOKALIKE_KAFKA_BOOTSTRAP": f"127.0.0.1:{SSL}", "KCAT_OPTS": kcat_opts,
               "LOOKALIKE_CLIENT_ID": "shop", "LOOKALIKE_CLIENT_KEY": CLIENT_KEYS["shop"]}
    done = subprocess.run([str(SIGNED_SCRIPT), str(image), f"kcat-{uuid.uuid4().hex[:6]}"], env=run_env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    reply = json.loads(done.stdout)
    assert reply["status"] == "ok", reply
    # The same script with a wrong key gets the error reply.
    run_env["LOOKALIKE_CLIENT_KEY"] = auth.new_key()
    done = subprocess.run([str(SIGNED_SCRIPT), str(image)], env=run_env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["error"]["code"] == "unauthorized"
