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
from lookalike.settings import CommonSettings, IndexerSettings, StackSettings, WorkerSettings

COMPOSE = yaml.safe_load((Path(__file__).resolve().parents[2] / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
FIELDS = set(WorkerSettings.model_fields) | set(IndexerSettings.model_fields) | set(CommonSettings.model_fields)
FIELDS |= set(GatewaySettings.model_fields)


def test_services_and_images() -> None:
    assert {"kafka", "redis", "topics", "model", "worker", "worker-gpu", "indexer", "feedback", "trainer"} <= set(SERVICES)
    assert SERVICES["kafka"]["image"] == f"apache/kafka:{StackSettings().kafka_version}"
    assert SERVICES["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft
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
        settings = WorkerSettings(_env_file=None, **{k[len("LOOKALIKE_"):].lower(): v
                                                     for k, v in SERVICES[name]["environment"].items()
                                                     if k.startswith("LOOKALIKE_") and k != "LOOKALIKE_QUERY_KEYS_FILE"})
        assert settings.query_auth and settings.rate_limit, name
        assert SERVICES[name]["environment"]["LOOKALIKE_QUERY_KEYS_FILE"] == "/secrets/query-keys.json"
        assert "secrets:/secrets:ro" in SERVICES[name]["volumes"]
        assert SERVICES[name]["depends_on"]["keys"]["condition"] == "service_completed_successfully"
    assert SERVICES["keys"]["command"][:2] == ["lookalike", "keys"]
    assert "/secrets/query-keys.json" in SERVICES["keys"]["command"]
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
