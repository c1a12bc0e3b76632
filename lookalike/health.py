"""Liveness for containers and daemons: services touch a heartbeat file, `lookalike health` checks it.

A service whose event loop is stuck stops touching the file, so the check catches
hangs as well as crashes; it is what docker compose's healthchecks run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from lookalike.artifacts import write_atomic
from lookalike.settings import CommonSettings

HEARTBEAT_EVERY_S = 5.0
STALE_AFTER_S = 30.0


def heartbeat_path(settings: CommonSettings, service: str) -> Path:
    return settings.home / "run" / f"{service}.heartbeat"


def beat(path: Path, **facts: Any) -> None:
    write_atomic(path, json.dumps({"at": time.time(), **facts}).encode())


def check(path: Path, stale_after_s: float = STALE_AFTER_S) -> tuple[bool, str]:
    """(healthy, reason)."""
    try:
        facts = json.loads(path.read_text())
    except (OSError, ValueError):
        return False, f"no heartbeat at {path}"
    age = time.time() - float(facts.get("at", 0))
    if age > stale_after_s:
        return False, f"last heartbeat {age:.0f}s ago"
    return True, f"heartbeat {age:.1f}s ago: {json.dumps(facts)}"
