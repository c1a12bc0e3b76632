"""docker-compose.yml cannot run here (no Docker engine); keep it consistent with the code."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from lookalike.cli import build_parser
from lookalike.settings import CommonSettings, IndexerSettings, StackSettings, WorkerSettings

COMPOSE = yaml.safe_load((Path(__file__).resolve().parents[2] / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
FIELDS = set(WorkerSettings.model_fields) | set(IndexerSettings.model_fields) | set(CommonSettings.model_fields)


def test_services_and_images() -> None:
    assert {"kafka", "redis", "topics", "model", "worker", "worker-gpu", "indexer"} <= set(SERVICES)
    assert SERVICES["kafka"]["image"] == f"apache/kafka:{StackSettings().kafka_version}"
    assert SERVICES["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft
    assert SERVICES["redis"]["image"].startswith("redis:")


@pytest.mark.parametrize("name", ["kafka", "redis", "worker", "worker-gpu", "indexer"])
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
        if not command or name in {"kafka", "redis"}:
            continue
        if command[:2] == ["python", "-m"]:
            assert importlib.util.find_spec(command[2]) is not None, f"{name}: no module {command[2]}"
        else:
            assert command[0] == "lookalike" and command[1] in subcommands, f"{name}: {command}"
    for name in ("worker", "indexer"):
        assert SERVICES[name]["healthcheck"]["test"][1:3] == ["lookalike", "health"]


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
