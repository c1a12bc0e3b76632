"""``python -m workers``: run the embedding worker until SIGTERM/SIGINT."""

from __future__ import annotations

import logging

from lookalike import logs, metrics
from lookalike.runtime import serve
from lookalike.settings import WorkerSettings
from lookalike.topics import ensure_topics_if_allowed
from workers.app import ModelSet, Worker

log = logging.getLogger("workers")


def main() -> None:
    settings = WorkerSettings()
    logs.configure(settings.log_format, "worker")
    ensure_topics_if_allowed(settings)
    models = ModelSet(settings)
    worker = Worker(settings, models)
    metrics.instrument_worker(settings, models)
    log.info("worker %s: catalog %s, queries %s, models from %s", settings.worker_group,
             settings.catalog_topic, settings.queries_topic, settings.models_path)
    serve(worker.run)


if __name__ == "__main__":
    main()
