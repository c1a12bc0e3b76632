"""The embedder's layout and precision choices change speed, not what it computes."""

from __future__ import annotations

import numpy as np
import torch

from lookalike.artifacts import ModelCard
from lookalike.embedder import Embedder
from lookalike.imaging import PreprocessSpec, normalise
from lookalike.model import EmbeddingNet, ModelSpec


def make(arch: str, precision: str = "auto") -> Embedder:
    torch.manual_seed(0)
    spec = ModelSpec(arch=arch, input_size=32, channels=(8, 16, 32, 32), num_classes=3)
    card = ModelCard("test-v1", "2026-01-01T00:00:00+00:00", spec, PreprocessSpec(size=32), ["a", "b", "c"], "0" * 64)
    return Embedder(EmbeddingNet(spec), card, torch.device("cpu"), precision)  # type: ignore[arg-type]


def test_channels_last_gives_the_vectors_of_the_plain_layout() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    for arch in ("seed-cnn", "res-cnn"):
        embedder = make(arch)
        assert embedder.to_input(pixels).is_contiguous(memory_format=torch.channels_last)
        vectors = embedder.embed_pixels(pixels)
        plain = embedder.model.to(memory_format=torch.contiguous_format)
        with torch.inference_mode():
            reference = plain.embed(torch.from_numpy(normalise(pixels, embedder.card.preprocess))).numpy()
        assert vectors.shape == (6, 256) and vectors.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(vectors, reference, atol=1e-5)


def test_cpu_runs_float32_unless_bfloat16_is_asked() -> None:
    for asked in ("auto", "fp16", "fp32"):
        embedder = make("res-cnn", asked)
        assert embedder.precision == "fp32" and embedder.amp_dtype is None
    assert make("res-cnn", "bf16").amp_dtype == torch.bfloat16


def test_bfloat16_on_cpu_gives_unit_float32_vectors_near_float32s() -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    exact = make("res-cnn", "fp32").embed_pixels(pixels)
    half = make("res-cnn", "bf16").embed_pixels(pixels)
    assert half.dtype == np.float32 and half.shape == exact.shape
    np.testing.assert_allclose(np.linalg.norm(half, axis=1), 1.0, atol=1e-5)
    cosines = (half * exact).sum(axis=1)
    assert cosines.min() > 0.999, cosines  # bfloat16 keeps 8 bits of mantissa: near, not equal
    assert not np.array_equal(half, exact)  # it did run in bfloat16


def test_workers_choose_bfloat16_only_where_the_cpu_has_it_in_hardware(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from lookalike import embedder as module

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert module.serving_precision("auto", cuda) == "fp16"
    monkeypatch.setattr(module, "cpu_has_bf16_matmul", lambda: True)
    assert module.serving_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(module, "cpu_has_bf16_matmul", lambda: False)
    assert module.serving_precision("auto", cpu) == "fp32"
    assert module.serving_precision("bf16", cpu) == "bf16"  # asked for: as asked
    assert module.serving_precision("fp32", cuda) == "fp32"


def test_the_amx_probe_answers_on_this_torch() -> None:
    """The probe exists in the torch the project pins (a renamed private function would
    quietly turn bfloat16 off everywhere): it answers what the CPU's flags say."""
    from pathlib import Path

    from lookalike.embedder import cpu_has_bf16_matmul

    assert hasattr(torch.cpu, "_is_amx_tile_supported")
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if "flags" in flags:
        assert cpu_has_bf16_matmul() == (" amx_tile" in flags)


def test_the_embedder_serves_a_folded_copy_and_leaves_the_network_it_was_given() -> None:
    spec = ModelSpec(arch="res-cnn", input_size=32, channels=(8, 16, 32, 32), num_classes=3)
    card = ModelCard("test-v1", "2026-01-01T00:00:00+00:00", spec, PreprocessSpec(size=32), ["a", "b", "c"], "0" * 64)
    net = EmbeddingNet(spec).train()  # e.g. a network still being trained
    embedder = Embedder(net, card, torch.device("cpu"))
    norms = torch.nn.modules.batchnorm._BatchNorm
    assert not any(isinstance(m, norms) for m in embedder.model.modules())
    assert net.training and any(isinstance(m, norms) for m in net.modules())


def test_the_cpu_input_is_imaging_normalise_to_the_bit_in_either_layout() -> None:
    """The embedder normalises in torch, in the channels-last layout the pixels already have;
    training and evaluation use imaging.normalise: the same float32 values, so the same vectors."""
    from workers.inference import use_layout

    embedder = make("res-cnn")
    for batch in (1, 5):
        pixels = np.random.default_rng(batch).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
        expected = torch.from_numpy(normalise(pixels, embedder.card.preprocess))
        for channels_last in (True, False):
            use_layout(embedder, channels_last)
            x = embedder.to_input(pixels)
            layout = torch.channels_last if channels_last else torch.contiguous_format
            assert x.dtype == torch.float32 and x.is_contiguous(memory_format=layout)
            assert torch.equal(x, expected)
        pixels.flags.writeable = False  # a read-only batch (a view of a cache) is taken as well
        assert torch.equal(embedder.to_input(pixels), expected)
