"""``python -m indexer``: run the indexer until SIGTERM/SIGINT."""

from __future__ import annotations

import logging

import faust

from indexer.service import create_app
from lookalike.settings import IndexerSettings
from lookalike.topics import ensure_topics_if_allowed


def main() -> None:
    settings = IndexerSettings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ensure_topics_if_allowed(settings)
    faust.Worker(create_app(settings), loglevel="INFO").execute_from_commandline()


if __name__ == "__main__":
    main()
