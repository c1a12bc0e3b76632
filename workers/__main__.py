"""``python -m workers``: run the embedding worker until SIGTERM/SIGINT."""

from __future__ import annotations

import logging

import faust

from lookalike.settings import WorkerSettings
from lookalike.topics import ensure_topics_if_allowed
from workers.app import ModelSet, create_app

log = logging.getLogger("workers")


def main() -> None:
    settings = WorkerSettings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ensure_topics_if_allowed(settings)
    models = ModelSet(settings)
    app = create_app(settings, models)
    log.info("worker %s: catalog %s, queries %s, models from %s", settings.worker_group,
             settings.catalog_topic, settings.queries_topic, settings.models_path)
    faust.Worker(app, loglevel="INFO").execute_from_commandline()


if __name__ == "__main__":
    main()
