"""Running Lookalike's own services as local daemons: the worker and the indexer (the query
path), the feedback aggregator and the trainer (the feedback loop, docs/feedback.md)."""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass

from control.stack.process import Daemon
from lookalike.errors import StackError
from lookalike.settings import StackSettings

# name -> the module run with ``python -m``; started in this order, stopped in the reverse one.
SERVICES = {"worker": "workers", "indexer": "indexer", "feedback": "feedback", "trainer": "training.service",
            "gateway": "gateway"}  # the gateway: the HTTP API and the shopper's page (docs/gateway.md)
# The trainer trains on the machine's CPU when a trigger comes: niced, so the query path comes first.
NICE = {"trainer": 10}


def module_of(name: str, env: dict[str, str] | None = None) -> str:
    """The module a service runs: with LOOKALIKE_QUERY_EMBEDDING=indexer the indexer is
    ``onehop``, the indexer that embeds its own queries (docs/scaling.md)."""
    if name == "indexer" and {**os.environ, **(env or {})}.get("LOOKALIKE_QUERY_EMBEDDING") == "indexer":
        return "onehop"
    return SERVICES[name]


@dataclass
class LocalServices:
    stack: StackSettings

    def daemon(self, name: str) -> Daemon:
        # the indexer runs as "-m indexer" or "-m onehop" (module_of): either one is this service's process
        marker = ("-m indexer", "-m onehop") if name == "indexer" else f"-m {SERVICES[name]}"
        return Daemon(name, self.stack.state_dir, marker=marker)

    def up(self, env: dict[str, str] | None = None) -> dict[str, int]:
        """Start the services that are not running; returns their pids."""
        pids = {}
        for name in SERVICES:
            daemon = self.daemon(name)
            pid = daemon.pid()
            if pid is None:
                nice = ["nice", "-n", str(NICE[name])] if NICE.get(name) and shutil.which("nice") else []
                pid = daemon.start([*nice, sys.executable, "-m", module_of(name, env)], env={**os.environ, **(env or {})})
            pids[name] = pid
        return pids

    def down(self) -> None:
        for name in reversed(SERVICES):
            self.daemon(name).stop(timeout_s=30)

    def status(self) -> dict[str, str]:
        """One line per service: up (pid) or down, and its log file."""
        lines = {}
        for name in SERVICES:
            daemon = self.daemon(name)
            pid = daemon.pid()
            lines[name] = f"{'up' if pid else 'down':4} pid {pid or '-':<8} log {daemon.log_file}"
        return lines


def indexer_alive(daemon: Daemon) -> None:
    """A ``check`` for :func:`lookalike.status.wait_for_index`: raise if the indexer daemon died."""
    if daemon.pid() is None:
        raise StackError(f"the indexer is not running; last lines of {daemon.log_file}:\n{daemon.log_tail()}")
