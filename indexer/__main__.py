"""``python -m indexer``: run the indexer until SIGTERM/SIGINT."""

from __future__ import annotations

import faust

from indexer.service import create_app
from lookalike import logs, metrics
from lookalike.settings import IndexerSettings
from lookalike.topics import ensure_topics_if_allowed


def main() -> None:
    settings = IndexerSettings()
    logs.configure(settings.log_format, "indexer")
    ensure_topics_if_allowed(settings)
    app = create_app(settings)
    metrics.instrument_indexer(settings, app.lookalike_indexer)  # type: ignore[attr-defined]
    faust.Worker(app, loglevel="INFO",
                 logging_config=logs.logging_config(settings.log_format, "indexer")).execute_from_commandline()


if __name__ == "__main__":
    main()
