"""The local stack's pieces that run without starting Kafka (integration tests start it)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from control.stack.local import KafkaBroker
from control.stack.process import Daemon
from lookalike.settings import StackSettings


def test_server_properties_follow_the_settings(tmp_path: Path) -> None:
    broker = KafkaBroker(StackSettings(kafka_port=29092, controller_port=29093, state_dir=tmp_path))
    props = dict(line.split("=", 1) for line in broker.server_properties().splitlines() if line)
    assert props["process.roles"] == "broker,controller"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:29092,CONTROLLER://127.0.0.1:29093"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:29093"
    assert props["log.dirs"] == str(tmp_path / "kafka" / "data")
    assert props["auto.create.topics.enable"] == "false"
    assert broker.bootstrap == "127.0.0.1:29092"


def test_daemon_start_stop_and_stale_pid_file(tmp_path: Path) -> None:
    daemon = Daemon("sleeper", tmp_path, marker="lookalike-test-sleeper")
    assert daemon.pid() is None
    pid = daemon.start([sys.executable, "-c", "import time, sys; time.sleep(60)", "lookalike-test-sleeper"])
    assert daemon.pid() == pid
    # Until the child has exec'd its command line is empty, and an empty one counts as anyone's
    # (a loaded box showed it): the markers are told apart once it is there.
    cmdline = Path(f"/proc/{pid}/cmdline")
    deadline = time.monotonic() + 30
    while b"lookalike-test-sleeper" not in cmdline.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.01)
    # one of several markers (the indexer runs as "-m indexer" or "-m onehop"); none of them: not ours
    assert Daemon("sleeper", tmp_path, marker=("-m nothing", "lookalike-test-sleeper")).pid() == pid
    assert Daemon("sleeper", tmp_path, marker=("-m nothing", "-m onehop")).pid() is None
    assert daemon.stop(timeout_s=5)
    assert daemon.pid() is None and not daemon.pid_file.exists()
    # A pid file naming a live process that is not ours (this test runner) is stale.
    daemon.pid_file.write_text(f"{__import__('os').getpid()}\n")
    assert daemon.pid() is None


def test_daemon_escalates_to_sigkill(tmp_path: Path) -> None:
    daemon = Daemon("stubborn", tmp_path, marker="stubborn")
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
    daemon.start([sys.executable, "-c", code, "stubborn"])
    deadline = time.monotonic() + 10
    while "ready" not in daemon.log_file.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    started = time.monotonic()
    assert daemon.stop(timeout_s=1)
    assert time.monotonic() - started < 5
    assert daemon.pid() is None


def test_a_cluster_id_never_reads_as_an_option() -> None:
    from control.stack.local import new_cluster_id

    ids = [new_cluster_id() for _ in range(2000)]  # ~31 would start with "-" without the check
    assert all(len(i) == 22 and not i.startswith("-") for i in ids)
    assert len(set(ids)) == len(ids)


def test_one_hop_runs_onehop_in_place_of_the_indexer(monkeypatch: pytest.MonkeyPatch) -> None:
    """LOOKALIKE_QUERY_EMBEDDING=indexer: `lookalike services up` starts `python -m onehop`,
    and a plain indexer refuses to start (it would answer no query)."""
    import indexer.__main__ as plain
    from control.services import module_of

    monkeypatch.delenv("LOOKALIKE_QUERY_EMBEDDING", raising=False)
    assert module_of("indexer") == "indexer" and module_of("worker") == "workers"
    assert module_of("indexer", {"LOOKALIKE_QUERY_EMBEDDING": "indexer"}) == "onehop"
    assert module_of("worker", {"LOOKALIKE_QUERY_EMBEDDING": "indexer"}) == "workers"
    monkeypatch.setenv("LOOKALIKE_QUERY_EMBEDDING", "indexer")
    with pytest.raises(SystemExit, match="python -m onehop"):
        plain.main()
