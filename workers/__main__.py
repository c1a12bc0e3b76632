"""``python -m workers``: run the embedding worker until SIGTERM/SIGINT."""

from __future__ import annotations

import logging

import faust

from lookalike import logs, metrics
from lookalike.embedder import Embedder
from lookalike.settings import WorkerSettings
from lookalike.topics import check_copartitioned, ensure_topics
from workers.app import create_app

log = logging.getLogger("workers")


def main() -> None:
    settings = WorkerSettings()
    logs.configure(settings.log_format, "worker")
    ensure_topics(settings)
    check_copartitioned(settings)
    embedder = Embedder.from_store(settings.models_path, settings.model_version, settings.device, settings.torch_threads)
    app = create_app(settings, embedder)
    metrics.instrument_worker(settings, embedder)
    log.info("worker %s: model %s, catalog %s, queries %s", settings.worker_group, embedder.version,
             settings.catalog_topic, settings.queries_topic)
    faust.Worker(app, loglevel="INFO",
                 logging_config=logs.logging_config(settings.log_format, "worker")).execute_from_commandline()


if __name__ == "__main__":
    main()
