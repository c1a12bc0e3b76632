"""The docker compose deployment's secrets: made once at first start, provisioned on the broker.

``lookalike secrets init`` (the one-shot ``secrets`` service, as root) makes what is missing
under ``--root``, one folder per named volume, each mounted only by the service that needs
it (docker-compose.yml, docs/running.md#secrets-in-the-compose-deployment):

    ca/        the CA's key and certificate (only the init service mounts it)
    kafka/     the broker's key in a PKCS#12 keystore, its server.properties (keystore
               password inside), a client.properties for its health check, the cluster id
    redis/     redis.conf with requirepass, and the password for the health check
    admin/     a client certificate (CN=admin, a super user on the broker's mutual-TLS
               INTERNAL listener) and every SCRAM user's password, to provision them
    <identity> (worker, indexer, feedback, trainer, gateway, client): its SCRAM password,
               the CA, the Redis password where it uses Redis, its signing keys

Every file is written by :func:`write_secret`: created under a temporary name with its
final mode (0600 for secrets, 0644 for certificates) and owner, then renamed into place,
so no secret is ever readable by anyone else, not even for a moment. Nothing here prints
or logs a secret; the CLI reports file names only.

``lookalike secrets provision`` (the one-shot ``kafka-setup`` service, as the admin) then
upserts the SCRAM users, creates the topics and applies :mod:`lookalike.acls` per identity.
Run again after ``init --rotate`` it changes the rotated passwords in place.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from lookalike.settings import CommonSettings

log = logging.getLogger(__name__)

SCRAM_ITERATIONS = 8192


@dataclass(frozen=True)
class Identity:
    """A Kafka user: the services of :mod:`lookalike.acls` it is granted, and whether it uses Redis."""

    name: str
    grants: tuple[str, ...]
    redis: bool


IDENTITIES: tuple[Identity, ...] = (
    Identity("worker", ("worker",), redis=True),
    Identity("indexer", ("indexer",), redis=True),
    Identity("feedback", ("feedback",), redis=True),
    Identity("trainer", ("trainer",), redis=True),
    Identity("gateway", ("gateway",), redis=False),
    # Host-side tools (lookalike query / ingest / shoppers): ask, record impressions, feed the catalog.
    Identity("client", ("query-client", "catalog-feed"), redis=False),
)
ADMIN_PRINCIPAL = "User:CN=admin"  # the admin's client certificate, on the INTERNAL listener
BROKER_PRINCIPAL = "User:CN=kafka"  # the broker's own certificate: controller and inter-broker traffic
SIGNING_CLIENTS = ("demo", "web")  # query-signing keys: `demo` for the host, `web` for the gateways
# The images' users (docker-compose.yml): apache/kafka runs as appuser, redis drops to redis,
# the Lookalike image runs as lookalike (Dockerfile).
DEFAULT_OWNERS: dict[str, tuple[int, int]] = {"kafka": (1000, 1000), "redis": (999, 999), "*": (10001, 10001)}


def write_secret(path: Path, data: bytes, *, mode: int = 0o600, owner: tuple[int, int] | None = None) -> None:
    """Write ``data`` to ``path`` with ``mode`` and ``owner`` from the first byte on: a new file
    under a temporary name (O_EXCL, O_NOFOLLOW), owned before anything is written, then renamed."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        if owner is not None and os.geteuid() == 0:
            os.fchown(fd, *owner)
        os.fchmod(fd, mode)  # os.open's mode is masked by the umask; this is the mode it was created for
        with os.fdopen(fd, "wb", closefd=False) as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    finally:
        os.close(fd)
    os.replace(tmp, path)


class SecretsDir:
    """The folders under ``root`` and who owns them; makes each file once."""

    def __init__(self, root: Path, owners: Mapping[str, tuple[int, int]] | None = None) -> None:
        self.root = Path(root)
        self.owners = {**DEFAULT_OWNERS, **(owners or {})}
        self.made: list[str] = []

    def folder(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(mode=0o700, parents=True, exist_ok=True)  # a volume's root exists already (root, 0755)
        if os.geteuid() == 0:
            os.chown(path, *self.owner(name))
        path.chmod(0o700)
        return path

    def owner(self, folder: str) -> tuple[int, int]:
        return self.owners.get(folder, self.owners["*"])

    def put(self, folder: str, name: str, data: bytes, *, mode: int = 0o600, replace: bool = False) -> Path:
        path = self.folder(folder) / name
        if replace or not path.exists():
            write_secret(path, data, mode=mode, owner=self.owner(folder))
            self.made.append(f"{folder}/{name}")
        return path

    def read(self, folder: str, name: str) -> bytes:
        return (self.root / folder / name).read_bytes()

    def has(self, folder: str, name: str) -> bool:
        return (self.root / folder / name).is_file()

    def password(self, folder: str, name: str, *, rotate: bool = False) -> str:
        """The password in ``folder/name``, made (32 random bytes, URL-safe) if missing or ``rotate``."""
        if rotate or not self.has(folder, name):
            self.put(folder, name, secrets.token_urlsafe(32).encode(), replace=True)
        return self.read(folder, name).decode()


# -- TLS ------------------------------------------------------------------------------
def _tls_material(sd: SecretsDir, broker_hosts: Iterable[str]) -> tuple[bytes, bytes, bytes, bytes, bytes]:
    """(CA certificate, broker key, broker certificate, admin key, admin certificate) as PEM,
    made with the CA on first start and read back after."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    names = ("ca.pem", "broker.key", "broker.pem", "admin.key", "admin.pem")
    if all(sd.has("ca", n) for n in names):
        return tuple(sd.read("ca", n) for n in names)  # type: ignore[return-value]
    now = dt.datetime.now(dt.UTC)

    def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name("Lookalike compose CA")
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=3650))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))

    def leaf(cn: str, usages: list, sans: list | None = None) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca_name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
                   .not_valid_after(now + dt.timedelta(days=825))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage(usages), critical=False))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return pem_key(key), builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    sans: list = []
    for host in broker_hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    # The broker's certificate is also its client certificate towards its own controller listener.
    broker_key, broker_cert = leaf("kafka", [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], sans)
    admin_key, admin_cert = leaf("admin", [ExtendedKeyUsageOID.CLIENT_AUTH])
    material = (ca.public_bytes(serialization.Encoding.PEM), broker_key, broker_cert, admin_key, admin_cert)
    sd.put("ca", "ca.key", pem_key(ca_key))  # kept for issuing more certificates; no service mounts it
    for n, data in zip(names, material, strict=True):
        sd.put("ca", n, data, mode=0o644 if n.endswith(".pem") else 0o600)
    return material


def _keystore(ca_pem: bytes, key_pem: bytes, cert_pem: bytes, password: str) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import pkcs12

    key = serialization.load_pem_private_key(key_pem, None)
    return pkcs12.serialize_key_and_certificates(
        b"kafka", key, x509.load_pem_x509_certificate(cert_pem), [x509.load_pem_x509_certificate(ca_pem)],  # type: ignore[arg-type]
        serialization.BestAvailableEncryption(password.encode()))


# -- the broker -----------------------------------------------------------------------
@dataclass(frozen=True)
class BrokerLayout:
    """Where the compose broker listens: services on BROKER (SASL_SSL), the host on HOST
    (SASL_SSL, published on loopback), the admin and inter-broker traffic on INTERNAL
    (mutual TLS), the controller on CONTROLLER (mutual TLS). No PLAINTEXT listener."""

    host: str = "kafka"
    broker_port: int = 9092
    controller_port: int = 9093
    internal_port: int = 9094
    host_port: int = 19092
    advertised_host: str = "127.0.0.1"
    secrets_dir: str = "/secrets"  # the kafka volume, as the broker container mounts it
    data_dir: str = "/var/lib/kafka/data"


def server_properties(layout: BrokerLayout, keystore_password: str) -> str:
    lo, d = layout, layout.secrets_dir
    scram = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
    lines = [
        "process.roles=broker,controller",
        "node.id=1",
        f"controller.quorum.voters=1@{lo.host}:{lo.controller_port}",
        "metadata.max.idle.interval.ms=5000",  # one controller's no-op records: 2 a second by default (the local stack's note)
        f"listeners=BROKER://:{lo.broker_port},CONTROLLER://:{lo.controller_port},"
        f"INTERNAL://:{lo.internal_port},HOST://:{lo.host_port}",
        f"advertised.listeners=BROKER://{lo.host}:{lo.broker_port},INTERNAL://{lo.host}:{lo.internal_port},"
        f"HOST://{lo.advertised_host}:{lo.host_port}",
        "listener.security.protocol.map=BROKER:SASL_SSL,HOST:SASL_SSL,INTERNAL:SSL,CONTROLLER:SSL",
        "controller.listener.names=CONTROLLER",
        "inter.broker.listener.name=INTERNAL",
        "sasl.enabled.mechanisms=SCRAM-SHA-512",
        f"listener.name.broker.scram-sha-512.sasl.jaas.config={scram}",
        f"listener.name.host.scram-sha-512.sasl.jaas.config={scram}",
        "ssl.keystore.type=PKCS12",
        f"ssl.keystore.location={d}/broker.p12",
        f"ssl.keystore.password={keystore_password}",
        f"ssl.key.password={keystore_password}",
        "ssl.truststore.type=PEM",
        f"ssl.truststore.location={d}/ca.pem",
        "ssl.endpoint.identification.algorithm=https",
        "listener.name.internal.ssl.client.auth=required",
        "listener.name.controller.ssl.client.auth=required",
        "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        f"super.users={BROKER_PRINCIPAL};{ADMIN_PRINCIPAL}",
        "allow.everyone.if.no.acl.found=false",
        f"log.dirs={lo.data_dir}",
        "num.partitions=1",
        "offsets.topic.replication.factor=1",
        "transaction.state.log.replication.factor=1",
        "transaction.state.log.min.isr=1",
        "share.coordinator.state.topic.replication.factor=1",
        "group.initial.rebalance.delay.ms=0",
        "auto.create.topics.enable=false",
        "message.max.bytes=16777216",
    ]
    return "\n".join(lines) + "\n"


def broker_client_properties(layout: BrokerLayout, keystore_password: str) -> str:
    """The broker's own client config (its health check): mutual TLS on INTERNAL as CN=kafka."""
    d = layout.secrets_dir
    return "\n".join([
        "security.protocol=SSL", "ssl.keystore.type=PKCS12", f"ssl.keystore.location={d}/broker.p12",
        f"ssl.keystore.password={keystore_password}", f"ssl.key.password={keystore_password}",
        "ssl.truststore.type=PEM", f"ssl.truststore.location={d}/ca.pem",
    ]) + "\n"


def redis_conf(password: str) -> str:
    # Persistence on: index snapshots and model metadata must survive a restart.
    return "\n".join(["port 6379", "appendonly yes", "save 60 1", "dir /data", "protected-mode yes",
                      f"requirepass {password}"]) + "\n"


def init(root: Path, *, owners: Mapping[str, tuple[int, int]] | None = None, rotate: Iterable[str] = (),
         layout: BrokerLayout | None = None) -> list[str]:
    """Make what is missing under ``root`` (module docstring); ``rotate``: identities whose
    Kafka password is made anew, ``redis``, or ``signing-key-demo`` / ``signing-key-web``.
    Returns the files written (names, never contents)."""
    layout = layout or BrokerLayout()
    rotate = set(rotate)
    rotatable = {i.name for i in IDENTITIES} | {"redis"} | {f"signing-key-{c}" for c in SIGNING_CLIENTS}
    if rotate - rotatable:
        raise ValueError(f"cannot rotate {sorted(rotate - rotatable)}: one of {sorted(rotatable)}")
    old_umask = os.umask(0o077)  # nothing made here is for anyone but its owner, unless said so
    try:
        return _init(SecretsDir(root, owners), layout, rotate)
    finally:
        os.umask(old_umask)


def _init(sd: SecretsDir, layout: BrokerLayout, rotate: set[str]) -> list[str]:
    ca_pem, broker_key, broker_cert, admin_key, admin_cert = _tls_material(
        sd, {layout.host, "localhost", layout.advertised_host})

    keystore_password = sd.password("kafka", "keystore-password")
    sd.put("kafka", "broker.p12", _keystore(ca_pem, broker_key, broker_cert, keystore_password))
    sd.put("kafka", "ca.pem", ca_pem, mode=0o644)
    sd.put("kafka", "server.properties", server_properties(layout, keystore_password).encode())
    sd.put("kafka", "client.properties", broker_client_properties(layout, keystore_password).encode())
    sd.put("kafka", "cluster-id", _cluster_id().encode())

    redis_password = sd.password("redis", "password", rotate="redis" in rotate)
    sd.put("redis", "redis.conf", redis_conf(redis_password).encode(), replace="redis" in rotate)

    sd.put("admin", "ca.pem", ca_pem, mode=0o644)
    sd.put("admin", "admin.pem", admin_cert, mode=0o644)
    sd.put("admin", "admin.key", admin_key)

    signing = {client: sd.password("worker", f"signing-key-{client}", rotate=f"signing-key-{client}" in rotate)
               for client in SIGNING_CLIENTS}
    sd.put("worker", "query-keys.json", json.dumps(signing).encode(), replace=True)
    sd.put("gateway", "query-keys.json", json.dumps({"web": signing["web"]}).encode(), replace=True)
    sd.put("client", "query-key", signing["demo"].encode(), replace=True)
    sd.put("indexer", "snapshot-key", secrets.token_hex(32).encode())  # manifests' HMAC key (never in Redis)

    users = {}
    for identity in IDENTITIES:
        users[identity.name] = sd.password(identity.name, "kafka-password", rotate=identity.name in rotate)
        sd.put(identity.name, "ca.pem", ca_pem, mode=0o644)
        if identity.redis:
            sd.put(identity.name, "redis-password", redis_password.encode(), replace="redis" in rotate)
    sd.put("admin", "scram-users.json", json.dumps(users).encode(), replace=True)
    return [name for name in sd.made if not name.endswith(".tmp")]


def _cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes, URL-safe base64 without padding, never starting with '-'."""
    import base64

    while True:
        cid = base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid


# -- provisioning ---------------------------------------------------------------------
def upsert_scram_users(admin_settings: CommonSettings, users: Mapping[str, str]) -> None:
    """Create or change SCRAM-SHA-512 users (KIP-554) as the admin."""
    from confluent_kafka.admin import AdminClient, ScramCredentialInfo, ScramMechanism, UserScramCredentialUpsertion

    from lookalike.clients import confluent_config

    admin = AdminClient(confluent_config(admin_settings))
    info = ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, SCRAM_ITERATIONS)
    upserts = [UserScramCredentialUpsertion(user, info, password.encode(), secrets.token_bytes(16))
               for user, password in sorted(users.items())]
    for future in admin.alter_user_scram_credentials(upserts, request_timeout=30).values():
        future.result(timeout=30)


def identity_bindings(settings: CommonSettings, identity: Identity, groups: Mapping[str, str] | None = None) -> list:
    """The ACL bindings of ``identity`` (``User:<name>``): its services' grants from lookalike.acls."""
    from lookalike.acls import bindings, grants

    groups = groups or {}
    wanted = [g for service in identity.grants for g in grants(service, settings, group=groups.get(service))]  # type: ignore[arg-type]
    return bindings(f"User:{identity.name}", wanted)


def provision(admin_settings: CommonSettings, users: Mapping[str, str], *,
              groups: Mapping[str, str] | None = None, identities: Iterable[Identity] = IDENTITIES) -> dict[str, int]:
    """SCRAM users, topics, ACLs: what a secured broker needs before the services start.
    Idempotent (ACLs that exist are left as they are). Returns the ACL count per identity."""
    from confluent_kafka.admin import AdminClient

    from lookalike.acls import wait_until_enforced
    from lookalike.clients import confluent_config
    from lookalike.topics import ensure_topics

    identities = list(identities)
    missing = [i.name for i in identities if i.name not in users]
    if missing:
        raise ValueError(f"no password for {missing}")
    upsert_scram_users(admin_settings, {i.name: users[i.name] for i in identities})
    ensure_topics(admin_settings)
    admin = AdminClient(confluent_config(admin_settings))
    counts, every = {}, []
    for identity in identities:
        acl_bindings = identity_bindings(admin_settings, identity, groups)
        for future in admin.create_acls(acl_bindings, request_timeout=30).values():
            future.result(timeout=30)
        counts[identity.name] = len(acl_bindings)
        every += acl_bindings
    wait_until_enforced(admin, every)  # the services start as soon as this returns
    return counts
