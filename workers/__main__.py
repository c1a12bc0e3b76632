"""``python -m workers``: run the embedding worker until SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import os
import sys

import faust

from lookalike import logs, metrics
from lookalike.settings import WorkerSettings
from lookalike.topics import ensure_topics_if_allowed

log = logging.getLogger("workers")

# GNU OpenMP (torch's intra-op threads) spins after every parallel region by default, taking
# CPU from the broker and the indexer on the same cores, and a team whose thread is preempted
# stalls; sleeping waits were measured better on a shared CPU (docs/benchmarks.md). OpenMP
# reads these once, when torch loads it: a value set in the environment wins.
OPENMP_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def main() -> None:
    if "torch" not in sys.modules:
        for name, value in OPENMP_DEFAULTS.items():
            os.environ.setdefault(name, value)
    from workers.app import ModelSet, create_app  # imports torch, after the OpenMP settings

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
