"""Catalog images decoded ahead (workers.app.DecodeAhead): while one batch is embedded, the
next batch's JPEGs are decoded on the decode threads. The batch's records are exactly what
decoding in the batch gives, bad images are still dead letters, and nothing stays held."""

from __future__ import annotations

import numpy as np
import torch

from lookalike.artifacts import ModelCard
from lookalike.embedder import Embedder
from lookalike.imaging import PreprocessSpec
from lookalike.model import EmbeddingNet, ModelSpec
from lookalike.runtime import Record
from lookalike.settings import WorkerSettings
from tests.images import jpeg_bytes
from workers.app import EmbeddingWorker, ModelSet, events_of


def make_worker() -> EmbeddingWorker:
    torch.manual_seed(0)
    spec = ModelSpec(input_size=32, channels=(8, 16), num_classes=3)
    card = ModelCard("test-v1", "2026-01-01T00:00:00+00:00", spec, PreprocessSpec(size=32), ["a", "b", "c"], "0" * 64)
    settings = WorkerSettings(_env_file=None, kafka_bootstrap="127.0.0.1:9")
    return EmbeddingWorker(settings, ModelSet(settings, Embedder(EmbeddingNet(spec), card, torch.device("cpu"))))


def records(topic: str) -> list[Record]:
    script = [("a", jpeg_bytes(1)), ("b", b"not a picture"), ("c", None), ("d", jpeg_bytes(2)), ("e", jpeg_bytes(3))]
    return [Record(topic, 0, offset, key.encode(), value) for offset, (key, value) in enumerate(script)]


def test_decoding_ahead_gives_the_records_of_decoding_in_the_batch() -> None:
    worker = make_worker()
    try:
        batch = records(worker.settings.catalog_topic)
        plain, plain_dead = worker.catalog_batch(events_of(batch), "test-v1")
        ahead = worker.decode_ahead("test-v1")
        assert ahead is not None  # a CPU model: Pillow decodes, ahead
        ahead.submit(batch)
        assert len(ahead) == 4  # the removal has nothing to decode
        early, early_dead = worker.catalog_batch(events_of(batch), "test-v1", True, ahead)
        assert len(ahead) == 0  # every future handed to its batch, none held after
    finally:
        worker.query_thread.shutdown()
        worker.catalog_thread.shutdown()
    assert [(p, k, v is not None) for p, (k, v, _) in early] == [(p, k, v is not None) for p, (k, v, _) in plain]
    for (_, (_, a, _)), (_, (_, b, _)) in zip(early, plain, strict=True):
        if a is not None:
            np.testing.assert_array_equal(np.frombuffer(a, np.float32), np.frombuffer(b, np.float32))
    assert [k for k, _, _ in early_dead] == [k for k, _, _ in plain_dead] == [b"b"]  # the bad image: a dead letter


def test_a_record_decoded_ahead_and_then_handled_alone_is_decoded_again() -> None:
    """After a failed batch the runtime hands its records over one by one: their futures were
    taken by the batch, so each is decoded where it is handled."""
    worker = make_worker()
    try:
        batch = records(worker.settings.catalog_topic)
        ahead = worker.decode_ahead("test-v1")
        assert ahead is not None
        ahead.submit(batch)
        worker.catalog_batch(events_of(batch), "test-v1", True, ahead)
        alone, dead = worker.catalog_batch(events_of(batch[:1]), "test-v1", True, ahead)
    finally:
        worker.query_thread.shutdown()
        worker.catalog_thread.shutdown()
    assert [k for _, (k, v, _) in alone if v is not None] == [b"a"] and not dead
