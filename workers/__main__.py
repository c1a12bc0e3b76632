"""``python -m workers``: run the embedding worker until SIGTERM/SIGINT."""

from __future__ import annotations

import logging

import faust

from lookalike.embedder import Embedder
from lookalike.settings import WorkerSettings
from lookalike.topics import check_copartitioned, ensure_topics
from workers.app import create_app

log = logging.getLogger("workers")


def main() -> None:
    settings = WorkerSettings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ensure_topics(settings)
    check_copartitioned(settings)
    embedder = Embedder.from_store(settings.models_path, settings.model_version, settings.device, settings.torch_threads)
    app = create_app(settings, embedder)
    log.info("worker %s: model %s, catalog %s, queries %s", settings.worker_group, embedder.version,
             settings.catalog_topic, settings.queries_topic)
    faust.Worker(app, loglevel="INFO").execute_from_commandline()


if __name__ == "__main__":
    main()
