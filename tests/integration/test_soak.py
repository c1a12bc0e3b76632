"""The soak with chaos (benchmarks/soak.py), 3 minutes of it: the five services under 50 queries/s,
catalog churn and shoppers, the worker, the indexer and the trainer (while it trains) killed
with -9, the broker restarted and Redis away 15 s, on a private broker and Redis of its own
(it restarts them: the session's cluster is not touched). Every check of the soak must hold."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from benchmarks.soak import SoakOptions, render, run_soak
from lookalike.settings import StackSettings

pytestmark = pytest.mark.integration

# The private stack's ports: this test file's own range.
KAFKA_PORT, CONTROLLER_PORT, REDIS_PORT = 29160, 29161, 29162
DATA = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "fashion-9k"


@pytest.mark.timeout(1800)
def test_soak_3_minutes_with_chaos(tmp_path: Path) -> None:
    from control.stack.local import LocalStack, java_binary

    try:
        java_binary()
    except Exception as exc:
        pytest.skip(f"a private broker needs Java: {exc}")
    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server to start and stop a private Redis")
    if not (DATA / "styles.csv").is_file():
        pytest.skip(f"the soak's catalog images are the dataset's: {DATA} is missing")
    settings = StackSettings(kafka_port=KAFKA_PORT, controller_port=CONTROLLER_PORT, redis_port=REDIS_PORT,
                             state_dir=tmp_path / "stack", kafka_heap="384m", start_timeout_s=120)
    cached = StackSettings().state_dir.parent / f"kafka-{settings.kafka_version}.classpath"
    if cached.is_file():  # resolved once per machine: reuse it instead of asking Maven again
        shutil.copy(cached, settings.state_dir.parent / cached.name)
    options = SoakOptions(minutes=3, data=DATA, faults=("worker", "indexer", "broker", "redis"), redis_away_s=15,
                          warmup_s=30, home=tmp_path / "soak", out=tmp_path / "soak.json")
    result = run_soak(options, LocalStack(settings))  # starts the private stack and stops it again
    (tmp_path / "soak.json").write_text(json.dumps(result, indent=2, default=str))
    table = render(result) if "checks" in result else json.dumps(result, default=str)
    print("\n" + table)
    assert result["left_behind"] is None, result["left_behind"]
    failed = [name for name, check in result["checks"].items() if not check["ok"]]
    assert not failed, f"failed: {failed}\n{table}"
    assert result["kills"]["worker"] >= 1 and result["kills"]["indexer"] >= 1
    assert [f["name"] for f in result["faults"] if f["name"] in ("broker", "redis")] == ["broker", "redis"]
