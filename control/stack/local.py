"""The local stack: Apache Kafka (KRaft, one node) from Maven Central jars, and redis-server.

Everything lives under one state folder (``LOOKALIKE_STACK_STATE_DIR``, default
``~/.lookalike/stack``): broker data and config, Redis' working folder, pid files and
logs. ``up`` is idempotent, ``down`` shuts both down cleanly (SIGTERM, then SIGKILL
after a grace period). Ports are settings, all on 127.0.0.1.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path

from control.stack.process import Daemon, port_open
from lookalike.errors import StackError
from lookalike.settings import StackSettings

log = logging.getLogger(__name__)
HOST = "127.0.0.1"


def new_cluster_id() -> str:
    """A Kafka cluster id: 16 random bytes in URL-safe base64 without padding, never starting
    with "-" (the storage tool would read it as an option: "--cluster-id: expected one
    argument"; 1 id in 64 did, and a test's private broker failed to format). Kafka's own
    ``Uuid.randomUuid`` skips such ids the same way."""
    import base64

    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def _resource(name: str) -> Path:
    return Path(str(resources.files("control.stack").joinpath(name)))


def _run(argv: list[str], what: str, timeout_s: float = 600) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
    except FileNotFoundError as exc:
        raise StackError(f"{what}: {argv[0]} is not installed") from exc
    if done.returncode != 0:
        raise StackError(f"{what} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


def java_binary() -> str:
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    if not java or not Path(java).exists():
        raise StackError("no Java runtime: install a JDK 17+ (Debian: apt-get install openjdk-17-jre-headless)")
    return java


@dataclass
class KafkaBroker:
    settings: StackSettings

    @property
    def dir(self) -> Path:
        return self.settings.state_dir / "kafka"

    @cached_property
    def daemon(self) -> Daemon:
        return Daemon("kafka", self.settings.state_dir, marker="kafka.Kafka")

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.settings.kafka_port}"

    def classpath(self) -> str:
        """The broker's classpath, resolved once per version by Maven into ~/.m2."""
        version = self.settings.kafka_version
        cache = self.settings.state_dir.parent / f"kafka-{version}.classpath"
        if cache.is_file():
            entries = cache.read_text().strip()
            if entries and all(Path(p).is_file() for p in entries.split(os.pathsep)):
                return entries
        if not shutil.which("mvn"):
            raise StackError("Maven (mvn) is needed to fetch the Kafka jars: apt-get install maven")
        cache.parent.mkdir(parents=True, exist_ok=True)
        log.info("resolving org.apache.kafka:kafka_2.13:%s with Maven", version)
        _run(
            [
                "mvn", "-q", "-B", "-f", str(_resource("pom.xml")),
                f"-Dkafka.version={version}", "-Dmdep.includeScope=runtime",
                f"-Dmdep.outputFile={cache}", "dependency:build-classpath",
            ],
            "resolving the Kafka jars",
        )
        return cache.read_text().strip()

    def server_properties(self) -> str:
        s = self.settings
        listeners = [f"PLAINTEXT://{HOST}:{s.kafka_port}", f"CONTROLLER://{HOST}:{s.controller_port}"]
        if s.kafka_sasl_ssl_port:
            listeners.append(f"SASL_SSL://{HOST}:{s.kafka_sasl_ssl_port}")
        if s.kafka_ssl_port:
            listeners.append(f"SSL://{HOST}:{s.kafka_ssl_port}")
        advertised = [listener for listener in listeners if not listener.startswith("CONTROLLER")]
        lines = [
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@{HOST}:{s.controller_port}",
            f"listeners={','.join(listeners)}",
            f"advertised.listeners={','.join(advertised)}",
            "controller.listener.names=CONTROLLER",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL,SSL:SSL",
            "inter.broker.listener.name=PLAINTEXT",
            f"log.dirs={self.dir / 'data'}",
            "num.partitions=4",
            "auto.create.topics.enable=false",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=8",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "share.coordinator.state.topic.replication.factor=1",
            "group.initial.rebalance.delay.ms=0",
            "message.max.bytes=16777216",
            "log.cleaner.backoff.ms=5000",
            # The single controller appends a no-op record every 500 ms by default, which the
            # broker then reads: an idle broker with no topics and no clients took 0.139 cores
            # of this 2-core box, 0.084 with 5 s (docs/benchmarks.md). One node: no peer to fence.
            "metadata.max.idle.interval.ms=5000",
            *self.security_properties(),
            "",
        ]
        return "\n".join(lines)

    def security_properties(self) -> list[str]:
        """TLS, SCRAM and ACL settings of the secured listeners (none without them). The
        inter-broker and controller listeners stay PLAINTEXT on loopback."""
        s = self.settings
        lines: list[str] = []
        if s.kafka_sasl_ssl_port or s.kafka_ssl_port:
            if not s.kafka_tls_keystore or not s.kafka_tls_keystore_password:
                raise StackError("a TLS listener needs kafka_tls_keystore and kafka_tls_keystore_password")
            password = s.kafka_tls_keystore_password.get_secret_value()
            lines += [
                "ssl.keystore.type=PKCS12",
                f"ssl.keystore.location={s.kafka_tls_keystore}",
                f"ssl.keystore.password={password}",
                f"ssl.key.password={password}",
                "ssl.enabled.protocols=TLSv1.3,TLSv1.2",
            ]
            if s.kafka_tls_truststore:
                lines += ["ssl.truststore.type=PEM", f"ssl.truststore.location={s.kafka_tls_truststore}"]
            if s.kafka_ssl_port:
                lines.append(f"listener.name.ssl.ssl.client.auth={s.kafka_ssl_client_auth}")
        if s.kafka_sasl_ssl_port:
            lines += [
                "sasl.enabled.mechanisms=SCRAM-SHA-512",
                "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config="
                "org.apache.kafka.common.security.scram.ScramLoginModule required;",
            ]
        if s.kafka_authorizer:
            lines += [
                "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
                "super.users=User:ANONYMOUS",  # the loopback PLAINTEXT and CONTROLLER listeners
                "allow.everyone.if.no.acl.found=false",
            ]
        return lines

    def scram_arguments(self) -> list[str]:
        """``kafka-storage format`` arguments that create the SCRAM users (KRaft stores them
        in the metadata log from the first start; KIP-900)."""
        out = []
        for name, password in sorted(self.settings.kafka_scram_users.items()):
            out += ["--add-scram", f"SCRAM-SHA-512=[name={name},password={password.get_secret_value()}]"]
        return out

    def _java(self, main: str, *args: str, heap: str = "256m") -> list[str]:
        return [
            java_binary(), f"-Xmx{heap}", f"-Xms{heap}", "-XX:+UseG1GC", "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={_resource('log4j2.properties')}",
            "-cp", self.classpath(), main, *args,
        ]

    def running(self) -> bool:
        return self.daemon.pid() is not None and port_open(HOST, self.settings.kafka_port)

    def admin_config(self) -> dict[str, object]:
        """How the start-up checks reach the broker (the loopback PLAINTEXT listener here)."""
        return {"bootstrap.servers": self.bootstrap}

    def answers(self) -> bool:
        from confluent_kafka.admin import AdminClient

        if not port_open(HOST, self.settings.kafka_port):
            return False
        try:
            AdminClient(self.admin_config()).list_topics(timeout=2)
            return True
        except Exception:
            return False

    def up(self) -> None:
        if self.running() and self.answers():
            return
        if self.daemon.pid() is None:
            for port, variable in ((self.settings.kafka_port, "KAFKA_PORT"), (self.settings.controller_port, "CONTROLLER_PORT")):
                if port_open(HOST, port):
                    raise StackError(f"port {port} is taken by another process; set LOOKALIKE_STACK_{variable}")
        self.dir.mkdir(parents=True, exist_ok=True)
        config = self.dir / "server.properties"
        config.write_text(self.server_properties())
        config.chmod(0o600)  # it may hold the keystore password
        if not (self.dir / "data" / "meta.properties").is_file():
            cluster_id = self._cluster_id()
            _run(self._java("kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(config),
                            *self.scram_arguments()), "kafka storage format")
        if self.daemon.pid() is None:
            self.daemon.start(self._java("kafka.Kafka", str(config), heap=self.settings.kafka_heap))
        self.daemon.wait_until(self.answers, self.settings.start_timeout_s, "the Kafka broker")
        self.daemon.wait_until(self.groups_loaded, self.settings.start_timeout_s, "the Kafka group coordinator")

    def groups_loaded(self) -> bool:
        """The group coordinator has read ``__consumer_offsets`` back: until then a just started
        broker answers ListGroups with COORDINATOR_LOAD_IN_PROGRESS (and lists none of the stored
        groups), and a consumer's first join or commit waits on it."""
        from confluent_kafka.admin import AdminClient

        from lookalike.cleanup import list_groups

        try:  # one listing (timeout 0): an error with it raises
            list_groups(AdminClient(self.admin_config() | {"log_level": 2}), timeout_s=0.0)
        except Exception:
            return False
        return True

    def _cluster_id(self) -> str:
        path = self.dir / "cluster.id"
        if not path.is_file():
            path.write_text(new_cluster_id())
        return path.read_text().strip()

    def down(self) -> bool:
        return self.daemon.stop(timeout_s=60)


@dataclass
class RedisServer:
    settings: StackSettings

    @cached_property
    def daemon(self) -> Daemon:
        return Daemon("redis", self.settings.state_dir, marker="redis-server")

    @property
    def url(self) -> str:
        """Without the password: clients get it from ``LOOKALIKE_REDIS_PASSWORD``."""
        scheme = "rediss" if self.settings.redis_tls_cert_file else "redis"
        return f"{scheme}://{HOST}:{self.settings.redis_port}/0"

    def config(self, work: Path) -> str:
        """redis.conf: a file (mode 0600), so that the password is not on the command line."""
        s = self.settings
        lines = [f"bind {HOST}", "save \"\"", "appendonly no", "daemonize no", f"dir {work}", "protected-mode yes"]
        if s.redis_tls_cert_file:
            lines += ["port 0", f"tls-port {s.redis_port}", f"tls-cert-file {s.redis_tls_cert_file}",
                      f"tls-key-file {s.redis_tls_key_file}", f"tls-ca-cert-file {s.redis_tls_ca_file}",
                      "tls-auth-clients no"]
        else:
            lines.append(f"port {s.redis_port}")
        if s.redis_password:
            lines.append(f"requirepass {s.redis_password.get_secret_value()}")
        return "\n".join(lines) + "\n"

    def binary(self) -> str:
        found = shutil.which("redis-server")
        if found:
            return found
        if os.geteuid() == 0 and shutil.which("apt-get"):
            log.info("installing Debian's redis-server")
            _run(["apt-get", "update", "-q"], "apt-get update")
            _run(["apt-get", "install", "-y", "-q", "redis-server"], "apt-get install redis-server")
            found = shutil.which("redis-server")
        if not found:
            raise StackError("redis-server is not installed (Debian: apt-get install redis-server)")
        return found

    def answers(self) -> bool:
        import redis

        s = self.settings
        password = s.redis_password.get_secret_value() if s.redis_password else None
        tls = {"ssl_ca_certs": str(s.redis_tls_ca_file)} if s.redis_tls_cert_file else {}
        try:
            return bool(redis.Redis.from_url(self.url, socket_timeout=1, password=password, **tls).ping())
        except redis.RedisError:
            return False

    def up(self) -> None:
        if self.daemon.pid() is not None and self.answers():
            return
        if self.daemon.pid() is None and port_open(HOST, self.settings.redis_port):
            raise StackError(f"port {self.settings.redis_port} is taken by another process; set LOOKALIKE_STACK_REDIS_PORT")
        work = self.settings.state_dir / "redis"
        work.mkdir(parents=True, exist_ok=True)
        if self.daemon.pid() is None:
            config = work / "redis.conf"
            config.write_text(self.config(work))
            config.chmod(0o600)
            self.daemon.start([self.binary(), str(config)])
        self.daemon.wait_until(self.answers, 30, "redis-server")

    def down(self) -> bool:
        return self.daemon.stop(timeout_s=15)


class LocalStack:
    """Kafka and Redis together, as `lookalike stack up|down|status` manages them."""

    def __init__(self, settings: StackSettings | None = None) -> None:
        self.settings = settings or StackSettings()
        self.kafka = KafkaBroker(self.settings)
        self.redis = RedisServer(self.settings)

    def up(self) -> None:
        self.redis.up()
        self.kafka.up()

    def down(self) -> None:
        self.kafka.down()
        self.redis.down()

    def status(self) -> dict[str, str]:
        return {
            "kafka": f"{'up' if self.kafka.running() else 'down'} {self.kafka.bootstrap} (pid {self.kafka.daemon.pid()})",
            "redis": f"{'up' if self.redis.answers() else 'down'} {self.redis.url} (pid {self.redis.daemon.pid()})",
            "state": str(self.settings.state_dir),
        }

    def env(self) -> dict[str, str]:
        """The variables that point Lookalike's components at this stack."""
        return {"LOOKALIKE_KAFKA_BOOTSTRAP": self.kafka.bootstrap, "LOOKALIKE_REDIS_URL": self.redis.url}


def main(argv: list[str] | None = None) -> int:
    """``python -m control.stack up|down|status`` (also ``lookalike stack ...``)."""
    args = argv if argv is not None else sys.argv[1:]
    action = args[0] if args else "status"
    stack = LocalStack()
    if action == "up":
        stack.up()
    elif action == "down":
        stack.down()
    elif action != "status":
        print(f"usage: lookalike stack up|down|status (not {action!r})", file=sys.stderr)
        return 2
    for name, line in stack.status().items():
        print(f"{name:6} {line}")
    return 0
