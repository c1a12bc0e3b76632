"""docker-compose.yml cannot run here (no Docker engine); keep it consistent with the code."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml

from control.cli import build_parser
from gateway.settings import GatewaySettings
from lookalike import credentials
from lookalike.settings import CommonSettings, IndexerSettings, StackSettings, WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
FIELDS = set(WorkerSettings.model_fields) | set(IndexerSettings.model_fields) | set(CommonSettings.model_fields)
FIELDS |= set(GatewaySettings.model_fields)


def test_services_and_images() -> None:
    assert {"secrets", "kafka", "redis", "kafka-setup", "model", "worker", "worker-gpu", "indexer", "feedback",
            "trainer"} <= set(SERVICES)
    assert SERVICES["kafka"]["image"] == f"apache/kafka:{StackSettings().kafka_version}"
    assert "process.roles=broker,controller" in credentials.server_properties(credentials.BrokerLayout(), "pw")  # KRaft
    assert SERVICES["redis"]["image"].startswith("redis:")


@pytest.mark.parametrize("name", ["kafka", "redis", "worker", "worker-gpu", "indexer", "feedback"])
def test_long_running_services_have_healthchecks(name: str) -> None:
    assert SERVICES[name]["healthcheck"]["test"]


def test_every_lookalike_variable_is_a_setting() -> None:
    for name, service in SERVICES.items():
        for var in (service.get("environment") or {}):
            if var.startswith("LOOKALIKE_"):
                assert var[len("LOOKALIKE_"):].lower() in FIELDS, f"{name}: {var} is not read by any settings class"


def test_commands_exist() -> None:
    subcommands = set(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    for name, service in SERVICES.items():
        command = service.get("command")
        if not command or name in {"kafka", "redis", "prometheus", "grafana"}:
            continue
        if command[:2] == ["python", "-m"]:
            assert importlib.util.find_spec(command[2]) is not None, f"{name}: no module {command[2]}"
        else:
            assert command[0] == "lookalike" and command[1] in subcommands, f"{name}: {command}"
    for name in ("worker", "indexer", "feedback"):
        assert SERVICES[name]["healthcheck"]["test"][1:3] == ["lookalike", "health"]


def test_compose_runs_every_service_the_local_runner_runs() -> None:
    """`lookalike services up` and `docker compose up` start the same services (docs/feedback.md)."""
    from control.services import SERVICES as LOCAL

    modules = {tuple(s["command"][2:3]) for s in SERVICES.values() if s.get("command", [])[:2] == ["python", "-m"]}
    assert {(module,) for module in LOCAL.values()} <= modules
    assert "/data:ro" in " ".join(SERVICES["trainer"]["volumes"])  # the champion's recipe trains on /data


def test_gpu_worker_reserves_a_gpu_and_volumes_are_named() -> None:
    devices = SERVICES["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert SERVICES["worker-gpu"]["environment"]["LOOKALIKE_DEVICE"] == "cuda"
    used = {v.split(":")[0] for s in SERVICES.values() for v in s.get("volumes", []) if not v.startswith(("$", "/", "."))}
    assert used <= set(COMPOSE["volumes"])
    assert {"kafka-data", "redis-data", "models"} <= used


def test_queries_are_signed_and_rate_limited_in_compose() -> None:
    for name in ("worker", "worker-gpu"):
        env = {k[len("LOOKALIKE_"):].lower(): v for k, v in SERVICES[name]["environment"].items()
               if k.startswith("LOOKALIKE_") and not k.endswith("_FILE") and not k.startswith("LOOKALIKE_KAFKA_")}
        settings = WorkerSettings(_env_file=None, **env)
        assert settings.query_auth and settings.rate_limit, name
        assert SERVICES[name]["environment"]["LOOKALIKE_QUERY_KEYS_FILE"] == "/secrets/query-keys.json"
        assert "worker-secrets:/secrets:ro" in SERVICES[name]["volumes"]
    assert WorkerSettings(_env_file=None).query_auth is False  # the local demo


# -- Prometheus and Grafana (deploy/): no promtool or Grafana here, so check what can be
# checked statically: files parse, mounts exist, targets and metric names match the code.
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROMETHEUS = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
ALERTS = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
DASHBOARD = json.loads((DEPLOY / "grafana" / "dashboards" / "lookalike.json").read_text())
METRIC = re.compile(r"\b(lookalike_[a-z_]+|process_[a-z_]+|up)\b")


def exported_names() -> set[str]:
    """Every series name lookalike.metrics can expose (histograms: _bucket/_sum/_count)."""
    from lookalike import metrics

    names = set()
    for name in metrics.METRIC_NAMES:
        names |= {name, f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return names | {"process_cpu_seconds_total", "process_resident_memory_bytes", "up"}


def test_prometheus_and_grafana_are_services_with_their_files_mounted() -> None:
    assert {"prometheus", "grafana"} <= set(SERVICES)
    root = Path(__file__).resolve().parents[2]
    for name in ("prometheus", "grafana"):
        for volume in SERVICES[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (root / source).exists(), f"{name} mounts {source}, which is not in the repo"
            else:
                assert source in COMPOSE["volumes"]
        assert SERVICES[name]["healthcheck"]["test"]
    assert "/etc/prometheus/alerts.yml" in PROMETHEUS["rule_files"]
    assert SERVICES["worker"]["environment"]["LOOKALIKE_METRICS_HOST"] == "0.0.0.0"


def test_scrape_targets_are_the_services_on_their_metrics_ports() -> None:
    jobs = {job["job_name"]: job for job in PROMETHEUS["scrape_configs"]}
    worker = jobs["lookalike-worker"]["dns_sd_configs"][0]
    indexer = jobs["lookalike-indexer"]["dns_sd_configs"][0]
    assert worker["port"] == WorkerSettings().worker_metrics_port
    assert indexer["port"] == IndexerSettings().indexer_metrics_port
    assert set(worker["names"]) <= set(SERVICES) and set(indexer["names"]) <= set(SERVICES)
    assert "worker" in worker["names"] and indexer["names"] == ["indexer", "indexer-shard-0", "indexer-shard-1"]


def test_alert_rules_cover_the_issue_and_use_exported_metrics() -> None:
    rules = [rule for group in ALERTS["groups"] for rule in group["rules"]]
    names = {rule["alert"] for rule in rules}
    assert {"LookalikeQueryLatencySLO", "LookalikeConsumerLag", "LookalikeErrorRate", "LookalikeSnapshotAge",
            "LookalikeStaleModel"} <= names
    known = exported_names()
    for rule in rules:
        assert rule["expr"] and rule["for"] and rule["labels"]["severity"] in {"page", "ticket"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        used = set(METRIC.findall(rule["expr"]))
        assert used and used <= known, f"{rule['alert']}: unknown metrics {used - known}"
        assert rule["expr"].count("(") == rule["expr"].count(")"), rule["alert"]


def test_dashboard_is_provisioned_and_queries_exported_metrics() -> None:
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "lookalike.yml").read_text())
    datasource = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    uid = datasource["datasources"][0]["uid"]
    known = exported_names()
    titles = set()
    for panel in DASHBOARD["panels"]:
        titles.add(panel["title"])
        assert panel["datasource"]["uid"] == uid
        for target in panel["targets"]:
            used = set(METRIC.findall(target["expr"]))
            assert used and used <= known, f"{panel['title']}: unknown metrics {used - known}"
    assert len(titles) == len(DASHBOARD["panels"]) >= 10


def test_two_gateways_behind_a_proxy_each_with_its_own_reply_topic() -> None:
    gateways = [SERVICES[name] for name in ("gateway-1", "gateway-2")]
    assert [g["command"] for g in gateways] == [["python", "-m", "gateway"]] * 2
    instances = {g["environment"]["LOOKALIKE_GATEWAY_INSTANCE"] for g in gateways}
    assert len(instances) == 2  # distinct reply topics
    conf = (Path(__file__).resolve().parents[2] / "deploy/nginx/gateway.conf").read_text()
    for name, g in zip(("gateway-1", "gateway-2"), gateways, strict=True):
        assert f"server {name}:{g['environment']['LOOKALIKE_GATEWAY_PORT']}" in conf
    assert SERVICES["gateway-proxy"]["ports"] == ["127.0.0.1:8480:8080"] and "listen 8080" in conf


# -- secure by default (docs/security.md#the-compose-deployment). No Docker engine here: the
# file is checked against what lookalike/credentials.py writes and what the settings read.
def lookalike_services() -> dict[str, dict]:
    """The services that run Lookalike code against Kafka (all on the Lookalike image but the
    secrets init and the model training, which touch neither Kafka nor Redis)."""
    return {name: s for name, s in SERVICES.items()
            if s.get("image", "").startswith("lookalike:") and name not in {"secrets", "model"}}


def settings_class(service: dict) -> type[CommonSettings]:
    from lookalike.settings import TrainerSettings

    command = service["command"]
    module = command[2] if command[:2] == ["python", "-m"] else None
    return {"workers": WorkerSettings, "indexer": IndexerSettings, "gateway": GatewaySettings,
            "feedback": TrainerSettings, "training.service": TrainerSettings}.get(module, CommonSettings)


def secrets_volume(service: dict) -> str:
    [volume] = [v.split(":")[0] for v in service.get("volumes", []) if v.split(":")[1:2] == ["/secrets"]]
    assert volume.endswith("-secrets") and service["volumes"][[v.split(":")[0] for v in service["volumes"]].index(
        volume)].endswith(":ro"), volume
    return volume


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the `secrets` service writes, here under a temporary folder instead of /init."""
    root = tmp_path_factory.mktemp("compose-secrets")
    credentials.init(root)
    return root


def test_the_init_service_makes_every_secret_volume(made: Path) -> None:
    init = SERVICES["secrets"]
    assert init["command"] == ["lookalike", "secrets", "init", "--root", "/init"]
    assert init["restart"] == "no" and init["user"] == "0:0"  # root: to give files to kafka's and redis' users
    mounts = dict(v.split(":")[:2] for v in init["volumes"])
    assert {volume: path.removeprefix("/init/") for volume, path in mounts.items()} == {
        f"{p.name}-secrets" if p.name != "ca" else "secrets-ca": p.name for p in made.iterdir()}
    assert set(mounts) <= set(COMPOSE["volumes"])
    # Nobody else mounts the CA's key; every other secrets volume is mounted read-only by its users.
    for name, service in SERVICES.items():
        if name != "secrets":
            assert not any(v.startswith("secrets-ca:") for v in service.get("volumes", [])), name
            assert all(v.endswith(":ro") for v in service.get("volumes", []) if "secrets:" in v), name
    # Written with their final modes (tests/unit/test_credentials.py checks how).
    for path in made.rglob("*"):
        if path.is_file():
            assert path.stat().st_mode & 0o777 == (0o644 if path.suffix == ".pem" else 0o600), path


def test_kafka_has_no_plaintext_listener_and_an_authorizer(made: Path) -> None:
    kafka = SERVICES["kafka"]
    assert "environment" not in kafka  # configured only by the server.properties the init service wrote
    assert kafka["entrypoint"] == ["/bin/sh", "/deploy/start.sh"]
    assert "kafka-secrets:/secrets:ro" in kafka["volumes"]
    script = (ROOT / "deploy" / "kafka" / "start.sh").read_text()
    assert "./deploy/kafka/start.sh:/deploy/start.sh:ro" in kafka["volumes"]
    assert "conf=/secrets/server.properties" in script and "kafka-server-start.sh \"$conf\"" in script
    props = dict(line.split("=", 1) for line in (made / "kafka" / "server.properties").read_text().splitlines())
    protocols = dict(pair.split(":") for pair in props["listener.security.protocol.map"].split(","))
    assert "PLAINTEXT" not in protocols.values() and "SASL_PLAINTEXT" not in protocols.values()
    listeners = {entry.split("://")[0]: entry.rsplit(":", 1)[1] for entry in props["listeners"].split(",")}
    # The one published port is the HOST listener, SASL_SSL, on loopback.
    published = next(n for n, port in listeners.items() if port == "19092")
    assert kafka["ports"] == ["127.0.0.1:19092:19092"] and protocols[published] == "SASL_SSL"
    assert props["authorizer.class.name"].endswith("StandardAuthorizer")
    assert props["allow.everyone.if.no.acl.found"] == "false"
    for path in ("ssl.keystore.location", "ssl.truststore.location"):
        assert (made / "kafka" / Path(props[path]).name).is_file()  # /secrets/... in the container
    assert "client.properties" in kafka["healthcheck"]["test"][1]  # the health check authenticates too
    assert (made / "kafka" / "cluster-id").is_file()


def test_redis_requires_a_password(made: Path) -> None:
    redis = SERVICES["redis"]
    assert redis["command"] == ["redis-server", "/secrets/redis.conf"]
    assert "redis-secrets:/secrets:ro" in redis["volumes"]
    conf = (made / "redis" / "redis.conf").read_text()
    password = (made / "redis" / "password").read_text()
    assert f"requirepass {password}\n" in conf and len(password) >= 32
    assert "REDISCLI_AUTH" in redis["healthcheck"]["test"][1]  # PONG only with the password


def test_every_service_has_its_own_credentials(made: Path) -> None:
    """Each service, with its environment and its own secrets volume (as the init service made
    it), authenticates to Kafka as its identity over TLS and to Redis with the password."""
    services = lookalike_services()
    assert {"kafka-setup", "gateway-1", "gateway-2", "worker", "worker-gpu", "indexer", "feedback", "trainer",
            "indexer-shard-0", "indexer-shard-1"} <= set(services)
    users = json.loads((made / "admin" / "scram-users.json").read_text())
    identities = {i.name: i for i in credentials.IDENTITIES}
    seen = set()
    for name, service in services.items():
        volume = secrets_volume(service)
        folder = made / volume.removesuffix("-secrets")
        env = {k[len("LOOKALIKE_"):].lower(): v.replace("/secrets/", f"{folder}/") if isinstance(v, str) else v
               for k, v in service["environment"].items() if k.startswith("LOOKALIKE_")}
        settings = settings_class(service)(_env_file=None, **env)
        assert all(not str(v).startswith("/secrets/") or Path(str(v).replace("/secrets/", f"{folder}/")).is_file()
                   for v in service["environment"].values()), name
        if name == "kafka-setup":  # the admin: its client certificate on the INTERNAL (mutual TLS) listener
            assert settings.kafka_security_protocol == "SSL" and settings.kafka_ssl_cert_file and volume == "admin-secrets"
            assert settings.kafka_bootstrap == "kafka:9094"
            continue
        user = settings.kafka_sasl_username
        assert settings.kafka_security_protocol == "SASL_SSL" and settings.kafka_sasl_mechanism == "SCRAM-SHA-512"
        assert user in identities and volume == f"{user}-secrets", name
        assert settings.kafka_sasl_password.get_secret_value() == users[user], name  # what kafka-setup provisions
        assert settings.kafka_ssl_ca_file and settings.kafka_ssl_check_hostname
        if identities[user].redis:
            assert settings.redis_password.get_secret_value() == (made / "redis" / "password").read_text(), name
        else:
            assert "LOOKALIKE_REDIS_PASSWORD_FILE" not in service["environment"], name
        for value in service["environment"].values():  # no secret inline in the file
            assert str(value) not in users.values()
        if isinstance(settings, IndexerSettings):  # every indexer signs snapshots with the one key init made
            assert settings.snapshot_key_file == folder / "snapshot-key" and settings.snapshot_key_file.is_file(), name
        seen.add(user)
    assert seen == set(identities) - {"client"}  # `client` is the host's (docker-compose.yml header)
    # The gateway signs only as `web`; the worker verifies `demo` and `web`.
    gateway_keys = json.loads((made / "gateway" / "query-keys.json").read_text())
    assert set(gateway_keys) == {"web"}


def test_services_wait_for_the_setup_and_old_one_shots_are_gone() -> None:
    assert not {"topics", "keys", "keys-web"} & set(SERVICES)
    assert "secrets" not in COMPOSE["volumes"]  # the old shared volume
    for name, service in lookalike_services().items():
        if name != "kafka-setup":
            assert service["depends_on"]["kafka-setup"]["condition"] == "service_completed_successfully", name
    assert SERVICES["kafka-setup"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    for name in ("kafka", "redis"):
        assert SERVICES[name]["depends_on"]["secrets"]["condition"] == "service_completed_successfully"
