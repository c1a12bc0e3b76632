"""``python -m indexer``: run the indexer until SIGTERM/SIGINT."""

from __future__ import annotations

from indexer.service import Indexer
from lookalike import logs, metrics
from lookalike.runtime import serve
from lookalike.settings import IndexerSettings
from lookalike.topics import ensure_topics_if_allowed


def main() -> None:
    settings = IndexerSettings()
    logs.configure(settings.log_format, "indexer")
    if settings.query_embedding == "indexer":  # the workers leave the queries to indexers that embed
        raise SystemExit("LOOKALIKE_QUERY_EMBEDDING=indexer: run `python -m onehop`, the indexer that embeds its "
                         "own queries (this one would answer none of them)")
    ensure_topics_if_allowed(settings)
    indexer = Indexer(settings)
    metrics.instrument_indexer(settings, indexer)
    serve(indexer.run)


if __name__ == "__main__":
    main()
