"""``python -m onehop``: run an indexer that embeds its own queries, until SIGTERM/SIGINT."""

from __future__ import annotations

import logging

from indexer.service import Indexer
from lookalike import logs, metrics
from lookalike.runtime import serve
from lookalike.settings import IndexerSettings, WorkerSettings
from lookalike.topics import ensure_topics_if_allowed
from onehop.app import OneHop

log = logging.getLogger("onehop")


def main() -> None:
    settings = IndexerSettings()
    logs.configure(settings.log_format, "indexer")
    if settings.query_embedding != "indexer":
        raise SystemExit("python -m onehop embeds the queries in the indexer: set LOOKALIKE_QUERY_EMBEDDING=indexer "
                         "here and on the workers (they then embed the catalog only)")
    ensure_topics_if_allowed(settings)
    indexer = Indexer(settings)
    one_hop = OneHop(indexer, WorkerSettings())
    metrics.instrument_indexer(settings, indexer)
    log.info("indexer %s embeds its own queries from %s (group %s)", settings.indexer_group,
             settings.queries_topic, one_hop.settings.worker_group)
    serve(lambda: indexer.run(extra=lambda: {"one-hop queries": one_hop.loop().run()}))


if __name__ == "__main__":
    main()
