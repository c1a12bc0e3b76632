"""The worker's catalog batch keeps catalog order between images and removals: the
vector topic is replayed in order, so a delete written before the upsert it follows in
the catalog would bring the deleted item back (found by the worker kill -9 test, whose
backlogs make batches that hold both)."""

from __future__ import annotations

import torch

from lookalike.artifacts import ModelCard
from lookalike.embedder import Embedder
from lookalike.imaging import PreprocessSpec
from lookalike.model import EmbeddingNet, ModelSpec
from lookalike.settings import WorkerSettings
from tests.images import jpeg_bytes
from workers.app import EmbeddingWorker, ModelSet
from workers.stages import Source


def test_removals_keep_their_place_among_the_images() -> None:
    torch.manual_seed(0)
    spec = ModelSpec(input_size=32, channels=(8, 16), num_classes=3)
    card = ModelCard("test-v1", "2026-01-01T00:00:00+00:00", spec, PreprocessSpec(size=32), ["a", "b", "c"], "0" * 64)
    settings = WorkerSettings(_env_file=None, kafka_bootstrap="127.0.0.1:9")
    worker = EmbeddingWorker(settings, ModelSet(settings, Embedder(EmbeddingNet(spec), card, torch.device("cpu"))))
    script = [("a", 1), ("a", None), ("b", 2), ("c", None), ("a", 3), ("a", None), ("d", 4)]
    events = [(item.encode(), jpeg_bytes(seed) if seed else None, {}, Source(settings.catalog_topic, 1, offset))
              for offset, (item, seed) in enumerate(script)]
    try:
        out, dead = worker.catalog_batch(events, "test-v1")
    finally:
        worker.query_thread.shutdown()
        worker.catalog_thread.shutdown()
    assert not dead
    assert [(key.decode(), value is not None) for _, (key, value, _) in out] == \
        [(item, seed is not None) for item, seed in script]
    assert {partition for partition, _ in out} == {1}
