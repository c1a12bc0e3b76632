"""Fixtures shared by the unit tests."""

from __future__ import annotations

import pytest
import torch

from lookalike.artifacts import ModelCard
from lookalike.embedder import Embedder
from lookalike.imaging import PreprocessSpec
from lookalike.model import EmbeddingNet, ModelSpec


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    """A tiny untrained model (32 px, 3 classes) on the CPU: what the worker and stage tests embed with."""
    torch.manual_seed(0)
    spec = ModelSpec(input_size=32, channels=(8, 16), num_classes=3)
    card = ModelCard("test-v1", "2026-01-01T00:00:00+00:00", spec, PreprocessSpec(size=32), ["a", "b", "c"], "0" * 64)
    return Embedder(EmbeddingNet(spec), card, torch.device("cpu"))
