"""The worker's inference threads (workers.inference): thread counts, priority, separation."""

from __future__ import annotations

import asyncio
import os
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from lookalike.artifacts import ModelCard
from lookalike.embedder import Embedder
from lookalike.imaging import PreprocessSpec
from lookalike.model import EmbeddingNet, ModelSpec
from lookalike.settings import WorkerSettings
from tests.images import jpeg_bytes
from workers.inference import InferenceThread, use_layout
from workers.stages import Source


def embedder_image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 30, 3), dtype=np.uint8))


def test_each_thread_keeps_its_own_torch_thread_count() -> None:
    one, two = InferenceThread("t-one", 1), InferenceThread("t-two", 2)

    def count_after_a_global_change() -> int:
        torch.set_num_threads(2)  # what a model load with torch_threads does, in whichever thread
        return torch.get_num_threads()

    async def scenario() -> list[int]:
        return [await one.run(torch.get_num_threads), await two.run(torch.get_num_threads),
                await one.run(count_after_a_global_change), await one.run(torch.get_num_threads)]

    try:
        assert asyncio.run(scenario()) == [1, 2, 2, 1]
    finally:
        one.shutdown()
        two.shutdown()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's")
def test_a_nice_thread_runs_at_lower_priority_than_the_process() -> None:
    base = os.getpriority(os.PRIO_PROCESS, 0)
    nice = InferenceThread("t-nice", 1, nice=5)
    try:
        mine = asyncio.run(nice.run(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
    finally:
        nice.shutdown()
    assert mine == min(base + 5, 19)
    assert os.getpriority(os.PRIO_PROCESS, 0) == base  # the process (its main thread) keeps its own


def test_a_query_batch_is_embedded_while_a_catalog_batch_holds_the_catalog_thread() -> None:
    from workers.app import EmbeddingWorker, ModelSet

    torch.manual_seed(0)
    spec = ModelSpec(input_size=32, channels=(8, 16), num_classes=3)
    card = ModelCard("test-v1", "2026-01-01T00:00:00+00:00", spec, PreprocessSpec(size=32), ["a", "b", "c"], "0" * 64)
    settings = WorkerSettings(_env_file=None, kafka_bootstrap="127.0.0.1:9")
    worker = EmbeddingWorker(settings, ModelSet(settings, Embedder(EmbeddingNet(spec), card, torch.device("cpu"))))
    release = threading.Event()

    async def scenario() -> int:
        catalog = asyncio.ensure_future(worker.catalog_thread.run(release.wait, 10))
        try:
            records, errors = await asyncio.wait_for(worker.query_thread.run(
                worker.query_batch, [(b"q1", jpeg_bytes(1), {}, Source(settings.queries_topic, 0, 1))]), 5)
            assert not catalog.done() and not errors
            return len(records)
        finally:
            release.set()
            await catalog

    try:
        assert asyncio.run(scenario()) == 1
        assert worker.query_thread.torch_threads == 1  # the default query_torch_threads
    finally:
        worker.query_thread.shutdown()
        worker.catalog_thread.shutdown()


def test_channels_last_gives_the_same_vectors() -> None:
    torch.manual_seed(0)
    for arch in ("seed-cnn", "res-cnn"):
        spec = ModelSpec(arch=arch, input_size=32, channels=(8, 16), num_classes=3)
        card = ModelCard("test-v1", "2026-01-01T00:00:00+00:00", spec, PreprocessSpec(size=32), ["a", "b", "c"],
                         "0" * 64)
        embedder = Embedder(EmbeddingNet(spec), card, torch.device("cpu"))
        pixels = embedder.pixels([embedder_image(seed) for seed in range(4)])
        plain = embedder.embed_pixels(pixels)
        use_layout(embedder, channels_last=True)
        assert embedder.model.features[0].weight.is_contiguous(memory_format=torch.channels_last)
        assert np.allclose(embedder.embed_pixels(pixels), plain, atol=1e-5)
        use_layout(embedder, channels_last=False)
        assert embedder.model.features[0].weight.is_contiguous()
