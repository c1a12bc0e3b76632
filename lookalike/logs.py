"""Service logs: plain text (default) or one JSON object per line (``LOOKALIKE_LOG_FORMAT=json``).

JSON lines carry the time, level, logger, message, the service name, and the ids a log call
names in ``extra`` (``request_id``, ``item_id``, ``code``, ``topic``, ``partition``,
``offset``), so a query can be followed from the worker's log to the indexer's by its
request id.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CONTEXT_FIELDS = ("request_id", "item_id", "code", "topic", "partition", "offset")


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def __init__(self, service: str = "") -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.service:
            doc["service"] = self.service
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                doc[name] = value
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


def configure(log_format: str, service: str, level: int = logging.INFO) -> None:
    """Logging for a service process, set once at its start."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter(service) if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
