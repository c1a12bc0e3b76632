"""``python -m workers``: run the embedding worker until SIGTERM/SIGINT."""

from __future__ import annotations

import logging

import faust

from lookalike import logs, metrics
from lookalike.settings import WorkerSettings
from lookalike.topics import ensure_topics_if_allowed
from workers.app import ModelSet, create_app

log = logging.getLogger("workers")


def main() -> None:
    settings = WorkerSettings()
    logs.configure(settings.log_format, "worker")
    ensure_topics_if_allowed(settings)
    models = ModelSet(settings)
    app = create_app(settings, models)
    metrics.instrument_worker(settings, models)
    log.info("worker %s: catalog %s, queries %s, models from %s", settings.worker_group,
             settings.catalog_topic, settings.queries_topic, settings.models_path)
    faust.Worker(app, loglevel="INFO",
                 logging_config=logs.logging_config(settings.log_format, "worker")).execute_from_commandline()


if __name__ == "__main__":
    main()
