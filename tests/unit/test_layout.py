"""The package layout as a contract: the core imports no service and no face, services meet
only through the core (topics, typed Redis records), the gateway (an edge service) uses the core
and the producers, and the face may import everything."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CORE = "lookalike"
FACE = {"control", "benchmarks"}
CLIENTS = {"producers"}
SERVICES = {"workers", "indexer", "feedback", "training"}
# The HTTP gateway is a service that is also a client: it may use the core and the producers
# (it speaks the same contract as a Kafka client would), and nothing imports it but the face.
EDGE = {"gateway"}
# A composite runs two services' stages in one process (onehop: the indexer with the worker's
# query stage): it may import the core and the services it composes, and nothing imports it
# but the face.
COMPOSITES = {"onehop": {"indexer", "workers"}}
PACKAGES = {CORE, *FACE, *CLIENTS, *SERVICES, *EDGE, *COMPOSITES}


def imports_of(package: str, root: Path = REPO) -> dict[str, set[str]]:
    """Top-level project packages each module of ``package`` imports, by file (lazy imports included)."""
    found: dict[str, set[str]] = {}
    for path in sorted((root / package).rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in PACKAGES and top != package:
                    found.setdefault(str(path.relative_to(root)), set()).add(name)
    return found


def offenders(package: str, allowed: set[str], root: Path = REPO) -> list[str]:
    return [f"{path}: {name}" for path, names in imports_of(package, root).items()
            for name in sorted(names) if name.split(".")[0] not in allowed]


def test_the_core_imports_no_service_client_or_face() -> None:
    assert offenders(CORE, set()) == []


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_a_service_imports_only_the_core(service: str) -> None:
    assert offenders(service, {CORE}) == []


def test_the_gateway_imports_only_the_core_and_the_producers() -> None:
    for package in EDGE:
        assert offenders(package, {CORE, *CLIENTS}) == []


def test_nothing_but_the_face_imports_the_gateway() -> None:
    for package in PACKAGES - FACE - EDGE:
        assert [name for names in imports_of(package).values() for name in names if name.startswith("gateway")] == []


def test_clients_import_only_the_core() -> None:
    for package in CLIENTS:
        assert offenders(package, {CORE}) == []


def test_the_check_sees_a_violation(tmp_path: Path) -> None:
    """The scan itself finds a lazy import of a service inside a function."""
    (tmp_path / "lookalike").mkdir()
    (tmp_path / "lookalike" / "bad.py").write_text("def f():\n    from workers.stages import decode\n")
    assert offenders(CORE, set(), tmp_path) == ["lookalike/bad.py: workers.stages"]


CONSUMER_FACTORIES = {"Consumer", "DeserializingConsumer", "AIOKafkaConsumer", "AIOConsumer", "App", "faust_app"}


def consumers_built(package: str, root: Path = REPO) -> list[str]:
    """Calls in ``package`` that construct a Kafka consumer (or a faust app, which owns one)."""
    found = []
    for path in sorted((root / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
                if name in CONSUMER_FACTORIES:
                    found.append(f"{path.relative_to(root)}:{node.lineno}: {name}(...)")
    return found


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_services_consume_only_through_the_runtime(service: str) -> None:
    """Every service's loop runs on lookalike.runtime; none builds a consumer of its own."""
    assert consumers_built(service) == []


def test_the_consumer_check_sees_one(tmp_path: Path) -> None:
    (tmp_path / "workers").mkdir()
    (tmp_path / "workers" / "loop.py").write_text(
        "from confluent_kafka import Consumer\n\ndef f(config):\n    return Consumer(config)\n")
    assert consumers_built("workers", tmp_path) == ["workers/loop.py:4: Consumer(...)"]


def test_a_composite_imports_the_core_and_what_it_composes_and_only_the_face_imports_it() -> None:
    for package, parts in COMPOSITES.items():
        assert offenders(package, {CORE, *parts}) == []
        for other in PACKAGES - FACE - {package}:
            assert not any(name.split(".")[0] == package for names in imports_of(other).values() for name in names)
