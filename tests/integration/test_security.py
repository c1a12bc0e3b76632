"""Security on real servers: a private Kafka broker with a SASL_SSL (SCRAM-SHA-512) and a
mutual-TLS listener, an authorizer with exactly the documented ACLs, a private Redis with a
password behind TLS, and the worker and indexer (each as its own Kafka user) answering signed,
rate-limited queries through all of it. Certificates and passwords are made here."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
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
from lookalike.acls import bindings, grants, wait_until_enforced
from lookalike.clients import confluent_config, producer_config, redis_client
from lookalike.settings import ClientSettings, StackSettings
from lookalike.snapshots import snapshot_namespace
from lookalike.status import indexer_status
from lookalike.topics import TopicSpec, ensure_topics, naming_env
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
    wait_until_enforced(admin, acl_bindings)  # a client refused before the broker has them fails for good


@dataclass
class Servers:
    """The private broker (SASL_SSL, mutual TLS, authorizer) and Redis (password, TLS)."""

    broker: KafkaBroker
    redis_server: RedisServer
    tls: Tls
    passwords: dict[str, str]
    redis_password: str
    root: Path


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
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
    try:
        redis_server.up()
        broker.up()
        yield Servers(broker, redis_server, tls, passwords, redis_password, root)
    finally:
        broker.down()
        redis_server.down()


@pytest.fixture(scope="module")
def secured(tiny_model, servers: Servers) -> Iterator[Secured]:  # type: ignore[no-untyped-def]
    root, tls, passwords, redis_password = servers.root, servers.tls, servers.passwords, servers.redis_password
    broker, redis_server = servers.broker, servers.redis_server
    pipeline = None
    try:
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
            stop_pipeline(pipeline, clean=False)  # a private broker and Redis: they go with `servers`


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


# -- every identity of the compose deployment, on the broker with its ACLs only ----------------
Check = tuple[str, str, str, str | None, bool]  # identity, action, topic, group, allowed


def produce_allowed(settings: ClientSettings, topic: str) -> bool:
    """One record through an idempotent producer (as every service's): delivered, or refused by an ACL."""
    outcome: list[KafkaError | None] = []
    producer = Producer(producer_config(settings, **{"message.timeout.ms": 30_000}))
    producer.produce(topic, key=b"acl-check", value=b"{}", on_delivery=lambda err, _msg: outcome.append(err))
    producer.flush(40)
    assert outcome, f"no delivery report for {topic}"
    if outcome[0] is None:
        return True
    assert outcome[0].code() in {KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.CLUSTER_AUTHORIZATION_FAILED}, \
        (topic, outcome[0])
    return False


def read_allowed(settings: ClientSettings, topic: str, group: str | None) -> bool:
    """Read the marker record (``group``: subscribed in that group, then commit; else assigned
    partition 0 as the indexer's feeds, the gateway and the query client do): read, or refused."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

    refusals = {KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.GROUP_AUTHORIZATION_FAILED}
    reported: list[KafkaError] = []  # errors librdkafka reports besides the ones poll() returns
    consumer = Consumer(confluent_config(settings, **{
        "group.id": group or f"lookalike-gateway-{uuid.uuid4().hex}", "enable.auto.commit": False,
        "auto.offset.reset": "earliest", "session.timeout.ms": 6000, "error_cb": reported.append}))
    try:
        if group:
            consumer.subscribe([topic])
        else:
            # An assigned consumer that may not even Describe the topic is told so in the metadata,
            # and then never fetches (no error from poll); Read implies Describe.
            meta = consumer.list_topics(topic, timeout=20).topics[topic]
            if meta.error is not None and meta.error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED:
                return False
            consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if any(e.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED for e in reported):
                return False
            if msg is None:
                continue
            err = msg.error()
            if err is None:
                if group:
                    try:
                        consumer.commit(message=msg, asynchronous=False)
                    except KafkaException as exc:
                        assert exc.args[0].code() in refusals, exc
                        return False
                return True
            if err.code() in refusals and (group or err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED):
                return False
        raise AssertionError(f"neither read nor refused within 40s: {topic} (group {group}); errors {reported}")
    finally:
        consumer.close()


def create_allowed(settings: ClientSettings, topic: str) -> bool:
    from confluent_kafka import KafkaException

    from lookalike.topics import TopicSpec, ensure_topics

    try:
        return ensure_topics(settings, [TopicSpec(topic, 1)]) == [topic]
    except KafkaException as exc:
        assert exc.args[0].code() in {KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.CLUSTER_AUTHORIZATION_FAILED}
        return False


def identity_checks(s: ClientSettings, prefix: str, gateway_topic: str, vectors: str) -> list[Check]:
    """What each service does with Kafka, read from its code (not from lookalike/acls.py), and
    what it must not be able to do."""
    g = {name: f"{prefix}-{name}" for name in ("worker", "indexer", "feedback", "trainer")}
    pattern = f"^{re.escape(s.catalog_vectors_topic)}\\..+$"  # the aggregator's subscription
    yes, no = True, False
    return [
        # workers/app.py: catalog and queries in its groups; vectors, dead letters, (error) replies out.
        ("worker", "read", s.queries_topic, g["worker"], yes),
        ("worker", "read", s.catalog_topic, f"{g['worker']}.catalog.v1", yes),
        ("worker", "produce", vectors, None, yes),
        ("worker", "produce", s.query_vectors_topic, None, yes),
        ("worker", "produce", s.deadletter_topic, None, yes),
        ("worker", "produce", s.replies_topic, None, yes),
        ("worker", "produce", gateway_topic, None, yes),  # a gateway's reply-to
        ("worker", "create", f"{s.catalog_vectors_topic}.v2", None, yes),  # a new model version's vectors
        ("worker", "produce", s.catalog_topic, None, no),
        ("worker", "produce", s.queries_topic, None, no),
        ("worker", "produce", s.feedback_topic, None, no),
        ("worker", "produce", s.triggers_topic, None, no),
        ("worker", "read", s.feedback_topic, g["worker"], no),
        ("worker", "read", s.queries_topic, g["indexer"], no),  # another service's group
        ("worker", "create", f"{prefix}.anything", None, no),
        # indexer/: vectors assigned (no group), query vectors and partials in its groups; replies out.
        ("indexer", "read", vectors, None, yes),
        ("indexer", "read", s.query_vectors_topic, g["indexer"], yes),
        ("indexer", "read", s.partials_topic, f"{g['indexer']}.gather", yes),
        ("indexer", "produce", s.replies_topic, None, yes),
        ("indexer", "produce", gateway_topic, None, yes),
        ("indexer", "produce", s.partials_topic, None, yes),
        ("indexer", "produce", s.query_vectors_topic, None, yes),  # shards: a resolved "more like this"
        ("indexer", "produce", vectors, None, no),
        ("indexer", "produce", s.catalog_topic, None, no),
        ("indexer", "read", s.queries_topic, g["indexer"], no),
        ("indexer", "read", s.catalog_topic, None, no),
        # feedback/service.py: feedback, replies, query vectors in its group; every version's catalog
        # vectors by pattern in {group}.catalog-vectors; triggers and dead letters out.
        ("feedback", "read", s.feedback_topic, g["feedback"], yes),
        ("feedback", "read", s.replies_topic, g["feedback"], yes),
        ("feedback", "read", s.query_vectors_topic, g["feedback"], yes),
        ("feedback", "read", pattern, f"{g['feedback']}.catalog-vectors", yes),
        ("feedback", "produce", s.triggers_topic, None, yes),
        ("feedback", "produce", s.deadletter_topic, None, yes),
        ("feedback", "produce", s.models_topic, None, no),
        ("feedback", "produce", s.query_vectors_topic, None, no),
        ("feedback", "produce", s.queries_topic, None, no),
        ("feedback", "read", s.triggers_topic, g["feedback"], no),
        # training/service.py: triggers in its group; the gate's decisions out.
        ("trainer", "read", s.triggers_topic, g["trainer"], yes),
        ("trainer", "produce", s.models_topic, None, yes),
        ("trainer", "produce", s.triggers_topic, None, no),
        ("trainer", "read", s.feedback_topic, g["trainer"], no),
        ("trainer", "produce", s.catalog_topic, None, no),
        # gateway/: queries and feedback out; its own reply topic (made at start) and the catalog's
        # pictures assigned, no group.
        ("gateway", "produce", s.queries_topic, None, yes),
        ("gateway", "produce", s.feedback_topic, None, yes),
        ("gateway", "read", gateway_topic, None, yes),
        ("gateway", "read", s.catalog_topic, None, yes),
        ("gateway", "create", f"{s.reply_topic_prefix}.gateway-new-{uuid.uuid4().hex[:6]}", None, yes),
        ("gateway", "produce", s.query_vectors_topic, None, no),
        ("gateway", "produce", s.catalog_topic, None, no),
        ("gateway", "produce", s.replies_topic, None, no),
        ("gateway", "read", s.queries_topic, None, no),
        ("gateway", "read", s.replies_topic, None, no),  # the host clients' replies
        ("gateway", "create", f"{prefix}.elsewhere", None, no),
        # producers/: queries, impressions and catalog items out; replies assigned.
        ("client", "produce", s.queries_topic, None, yes),
        ("client", "produce", s.feedback_topic, None, yes),
        ("client", "produce", s.catalog_topic, None, yes),
        ("client", "read", s.replies_topic, None, yes),
        ("client", "produce", s.query_vectors_topic, None, no),  # past the worker's signature check
        ("client", "produce", vectors, None, no),
        ("client", "produce", s.partials_topic, None, no),
        ("client", "produce", s.deadletter_topic, None, no),
        ("client", "produce", s.triggers_topic, None, no),
        ("client", "produce", s.models_topic, None, no),
        ("client", "produce", s.replies_topic, None, no),  # forged answers
        ("client", "read", s.queries_topic, None, no),  # others' queries
        ("client", "read", gateway_topic, None, no),
    ]


def acl_test_names(prefix: str) -> dict[str, str]:
    """Topic and group names of their own, reply-to topics only under <prefix>.replies."""
    names = {k[len("LOOKALIKE_"):].lower(): v for k, v in naming_env(prefix).items()}
    names["reply_topic_prefix"] = f"{prefix}.replies"
    return {k: v for k, v in names.items() if k in ClientSettings.model_fields}


def check_identities(admin: ClientSettings, prefix: str, as_identity) -> list[str]:  # type: ignore[no-untyped-def]
    """Put a record on every topic to read (as ``admin``), run :func:`identity_checks` with
    ``as_identity(name)``'s settings; returns the mismatches, and prints the counts."""
    from concurrent.futures import ThreadPoolExecutor

    vectors, gateway_topic = f"{admin.catalog_vectors_topic}.v1", f"{admin.reply_topic_prefix}.gateway-acl"
    ensure_topics(admin, [TopicSpec(vectors, 1), TopicSpec(gateway_topic, 1)])
    markers = Producer(producer_config(admin))
    readable = [admin.catalog_topic, admin.queries_topic, admin.replies_topic, admin.query_vectors_topic,
                admin.partials_topic, admin.feedback_topic, admin.triggers_topic, vectors, gateway_topic]
    for topic in readable:
        markers.produce(topic, key=b"marker", value=b"{}", partition=0)
    assert markers.flush(30) == 0

    def run(check: Check) -> tuple[Check, bool | str]:
        name, action, topic, group, _allowed = check
        settings = as_identity(name)
        try:
            if action == "produce":
                return check, produce_allowed(settings, topic)
            if action == "create":
                return check, create_allowed(settings, topic)
            return check, read_allowed(settings, topic, group)
        except AssertionError as exc:  # reported with the others below
            return check, f"no answer: {exc}"

    from lookalike import credentials

    checks = identity_checks(admin, prefix, gateway_topic, vectors)
    assert {c[0] for c in checks} == {i.name for i in credentials.IDENTITIES}  # every identity is exercised
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(run, checks))
    allowed_count = sum(1 for (*_, allowed), _got in outcomes if allowed)
    print(f"{len(outcomes)} checks over {len(credentials.IDENTITIES)} identities: {allowed_count} to be allowed, "
          f"{len(outcomes) - allowed_count} to be refused")
    return [f"{name} {action} {topic} (group {group}): "
            f"{got if isinstance(got, str) else 'allowed' if got else 'refused'}, "
            f"expected {'allowed' if allowed else 'refused'}"
            for (name, action, topic, group, allowed), got in outcomes if got is not allowed]


def test_every_identity_does_exactly_its_job(servers: Servers) -> None:
    """The compose deployment's identities (lookalike/credentials.py) provisioned as
    ``lookalike secrets provision`` does it, on this broker with the authorizer on: each one
    can do what its service's code does, and nothing of the rest."""
    from dataclasses import replace

    from lookalike import credentials

    prefix = f"acl-{uuid.uuid4().hex[:8]}"
    admin = ClientSettings(_env_file=None, kafka_bootstrap=servers.broker.bootstrap, partitions=1,
                           **acl_test_names(prefix))
    identities = [replace(i, name=f"{prefix}-{i.name}") for i in credentials.IDENTITIES]
    users = {i.name: secrets.token_urlsafe(24) for i in identities}
    groups = {service: f"{prefix}-{service}" for service in ("worker", "indexer", "feedback", "trainer")}
    counts = credentials.provision(admin, users, groups=groups, identities=identities)
    assert set(counts) == set(users) and all(counts.values())

    def as_identity(name: str) -> ClientSettings:
        return admin.model_copy(update={
            "kafka_bootstrap": f"127.0.0.1:{SASL_SSL}", "kafka_security_protocol": "SASL_SSL",
            "kafka_sasl_mechanism": "SCRAM-SHA-512", "kafka_sasl_username": f"{prefix}-{name}",
            "kafka_sasl_password": SecretStr(users[f"{prefix}-{name}"]), "kafka_ssl_ca_file": servers.tls.ca_file})

    wrong = check_identities(admin, prefix, as_identity)
    assert not wrong, "\n".join(wrong)


# -- the broker as docker-compose.yml configures it ----------------------------------------
# BROKER (SASL_SSL), CONTROLLER (mutual TLS), INTERNAL (mutual TLS), HOST (SASL_SSL): this test's own.
COMPOSE_BROKER, COMPOSE_CONTROLLER, COMPOSE_INTERNAL, COMPOSE_HOST = 29230, 29231, 29232, 29233


@dataclass
class ComposeBroker(KafkaBroker):
    """The local broker started from the server.properties `lookalike secrets init` writes for
    the compose kafka service (listeners on this test's ports, host names localhost/127.0.0.1)."""

    properties: str = ""
    admin: ClientSettings | None = None

    def server_properties(self) -> str:
        return self.properties

    def scram_arguments(self) -> list[str]:
        return []  # the SCRAM users are provisioned through the admin API, as in compose

    def admin_config(self) -> dict[str, object]:
        return confluent_config(self.admin)  # no PLAINTEXT listener: the certificate admin over TLS


def test_the_compose_broker_configuration_on_a_real_broker(tmp_path_factory: pytest.TempPathFactory) -> None:
    """What the compose deployment runs, minus Docker: `secrets init` writes the broker's
    configuration and every identity's secrets, the broker starts from them (TLS controller,
    no PLAINTEXT listener, authorizer), `secrets provision` works as the certificate admin over
    mutual TLS, and every identity does exactly its job with the password init made for it."""
    from lookalike import credentials

    root = tmp_path_factory.mktemp("compose")
    layout = credentials.BrokerLayout(
        host="localhost", broker_port=COMPOSE_BROKER, controller_port=COMPOSE_CONTROLLER,
        internal_port=COMPOSE_INTERNAL, host_port=COMPOSE_HOST, advertised_host="127.0.0.1",
        secrets_dir=str(root / "secrets" / "kafka"), data_dir=str(root / "stack" / "kafka" / "data"))
    credentials.init(root / "secrets", layout=layout)
    secrets_of = root / "secrets"
    prefix = f"compose-{uuid.uuid4().hex[:8]}"
    admin = ClientSettings(
        _env_file=None, kafka_bootstrap=f"localhost:{COMPOSE_INTERNAL}", kafka_security_protocol="SSL",
        kafka_ssl_ca_file=secrets_of / "admin" / "ca.pem", kafka_ssl_cert_file=secrets_of / "admin" / "admin.pem",
        kafka_ssl_key_file=secrets_of / "admin" / "admin.key", partitions=1, **acl_test_names(prefix))
    stack = StackSettings(kafka_port=COMPOSE_BROKER, controller_port=COMPOSE_CONTROLLER,
                          state_dir=root / "stack", kafka_heap="384m")
    broker = ComposeBroker(stack, properties=(secrets_of / "kafka" / "server.properties").read_text(), admin=admin)
    try:
        broker.up()
        users = json.loads((secrets_of / "admin" / "scram-users.json").read_text())
        # What the kafka-setup service runs, with its kind of environment (groups: naming_env's).
        setup_env = {**{k: v for k, v in os.environ.items() if not k.startswith("LOOKALIKE_")},
                     **naming_env(prefix), "LOOKALIKE_REPLY_TOPIC_PREFIX": admin.reply_topic_prefix,
                     "LOOKALIKE_PARTITIONS": "1", "LOOKALIKE_KAFKA_BOOTSTRAP": admin.kafka_bootstrap,
                     "LOOKALIKE_KAFKA_SECURITY_PROTOCOL": "SSL", "LOOKALIKE_KAFKA_SSL_CA_FILE": str(admin.kafka_ssl_ca_file),
                     "LOOKALIKE_KAFKA_SSL_CERT_FILE": str(admin.kafka_ssl_cert_file),
                     "LOOKALIKE_KAFKA_SSL_KEY_FILE": str(admin.kafka_ssl_key_file)}
        done = subprocess.run([sys.executable, "-m", "control.cli", "secrets", "provision", "--users-file",
                               str(secrets_of / "admin" / "scram-users.json")], env=setup_env, capture_output=True,
                              text=True, timeout=300, cwd=Path(__file__).resolve().parents[2])
        assert done.returncode == 0, done.stderr[-3000:]
        assert "provisioned" in done.stdout
        for password in users.values():
            assert password not in done.stdout + done.stderr

        def as_identity(name: str, port: int = COMPOSE_BROKER) -> ClientSettings:
            folder = secrets_of / name  # the identity's own volume
            return admin.model_copy(update={
                "kafka_bootstrap": f"localhost:{port}", "kafka_security_protocol": "SASL_SSL",
                "kafka_sasl_mechanism": "SCRAM-SHA-512", "kafka_sasl_username": name,
                "kafka_sasl_password": SecretStr((folder / "kafka-password").read_text()),
                "kafka_ssl_ca_file": folder / "ca.pem", "kafka_ssl_cert_file": None, "kafka_ssl_key_file": None})

        wrong = check_identities(admin, prefix, as_identity)
        assert not wrong, "\n".join(wrong)
        # The published HOST listener (127.0.0.1, as advertised to the host) takes the host's `client`.
        host = as_identity("client", COMPOSE_HOST).model_copy(update={"kafka_bootstrap": f"127.0.0.1:{COMPOSE_HOST}"})
        assert produce_allowed(host, admin.queries_topic)
        # No listener speaks PLAINTEXT; the INTERNAL one wants a client certificate.
        for port in (COMPOSE_BROKER, COMPOSE_HOST, COMPOSE_INTERNAL, COMPOSE_CONTROLLER):
            plain = ClientSettings(_env_file=None, kafka_bootstrap=f"127.0.0.1:{port}")
            errors, _ = connection_errors(plain, {KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN})
            assert any(e.code() in {KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN} for e in errors), (port, errors)
        anonymous = admin.model_copy(update={"kafka_ssl_cert_file": None, "kafka_ssl_key_file": None})
        errors, _ = connection_errors(anonymous, {KafkaError._SSL, KafkaError._TRANSPORT})
        assert any(e.code() in {KafkaError._SSL, KafkaError._TRANSPORT} for e in errors), errors
        # The broker's log has none of the secrets init made.
        logged = "".join(p.read_text(errors="replace") for p in (root / "stack").rglob("*.log"))
        for path in secrets_of.glob("*/kafka-password"):
            assert path.read_text() not in logged
        assert (secrets_of / "kafka" / "keystore-password").read_text() not in logged
    finally:
        broker.down()
