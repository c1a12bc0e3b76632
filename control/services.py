"""Running Lookalike's own services (worker, indexer) as local daemons."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from control.stack.process import Daemon
from lookalike.errors import StackError
from lookalike.settings import StackSettings

SERVICES = {"worker": "workers", "indexer": "indexer"}
SERVICES["gateway"] = "gateway"  # the HTTP gateway and the shopper's page (docs/gateway.md)


@dataclass
class LocalServices:
    stack: StackSettings

    def daemon(self, name: str) -> Daemon:
        return Daemon(name, self.stack.state_dir, marker=f"-m {SERVICES[name]}")

    def up(self, env: dict[str, str] | None = None) -> dict[str, int]:
        """Start the services that are not running; returns their pids."""
        pids = {}
        for name, module in SERVICES.items():
            daemon = self.daemon(name)
            pid = daemon.pid()
            if pid is None:
                pid = daemon.start([sys.executable, "-m", module], env={**os.environ, **(env or {})})
            pids[name] = pid
        return pids

    def down(self) -> None:
        for name in SERVICES:
            self.daemon(name).stop(timeout_s=30)

    def status(self) -> dict[str, str]:
        return {name: f"pid {self.daemon(name).pid()}  log {self.daemon(name).log_file}" for name in SERVICES}


def indexer_alive(daemon: Daemon) -> None:
    """A ``check`` for :func:`lookalike.status.wait_for_index`: raise if the indexer daemon died."""
    if daemon.pid() is None:
        raise StackError(f"the indexer is not running; last lines of {daemon.log_file}:\n{daemon.log_tail()}")
