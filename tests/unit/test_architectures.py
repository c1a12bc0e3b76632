"""The architecture registry: every registered network builds, embeds unit vectors, keeps
the weight names stored models were saved with, and an unknown name is refused."""

from __future__ import annotations

import pytest
import torch

from lookalike.model import ARCHITECTURES, EmbeddingNet, ModelSpec, architecture

# Weight names of models stored before the registry (a stored model loads by these names).
STORED_NAMES = {
    "seed-cnn": {"features.0.weight", "embedding.weight", "embedding.bias", "classifier.weight", "classifier.bias"},
    "res-cnn": {"features.0.weight", "features.3.conv1.weight", "embedding.0.weight", "embedding.1.weight", "proxies"},
    # the names training.pretrained maps the ImageNet wheels' tensors to
    **{f"effnet-lite{n}": {"features.stem.conv.weight", "features.blocks.0.layers.depthwise.weight",
                           "features.blocks.1.layers.expand.weight", "features.head.bn.running_var",
                           "embedding.0.weight", "embedding.1.weight", "proxies"} for n in range(3)},
}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_every_architecture_builds_and_embeds_unit_vectors(name: str) -> None:
    arch = architecture(name)
    spec = ModelSpec(arch=name, input_size=32, channels=arch.default_channels, num_classes=5)
    net = EmbeddingNet(spec).eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        vectors, logits = net.embed(x), net(x)
    assert vectors.shape == (3, spec.embedding_dim) and logits.shape == (3, 5)
    assert torch.allclose(vectors.norm(dim=1), torch.ones(3), atol=1e-5)
    assert STORED_NAMES[name] <= set(net.state_dict())


def test_the_registry_holds_the_stored_architectures_and_refuses_others() -> None:
    assert set(STORED_NAMES) <= set(ARCHITECTURES)
    with pytest.raises(ValueError, match=r"unknown architecture 'vit'.*res-cnn"):
        EmbeddingNet(ModelSpec(arch="vit"))


def test_narrow_networks_train_in_the_plain_layout() -> None:
    """oneDNN's channels-last 1x1 convolution crashed training on 8/16-channel stages
    (training/train.py: MIN_CHANNELS_LAST_WIDTH); the recipes' widths keep channels-last."""
    from training.train import training_layout

    assert training_layout(ModelSpec(arch="res-cnn", channels=(8, 16))) == torch.contiguous_format
    assert training_layout(ModelSpec(arch="res-cnn", channels=(32, 64, 128, 256))) == torch.channels_last


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_folding_the_batch_norms_keeps_the_vectors(name: str) -> None:
    """Serving folds every batch norm into the layer before it (lookalike.model.fold_batchnorm):
    none is left, and the vectors are those of the network as trained (with running
    statistics that are not the identity, so a fold that dropped them would show)."""
    from lookalike.model import fold_batchnorm

    arch = architecture(name)
    spec = ModelSpec(arch=name, input_size=32, channels=arch.default_channels, num_classes=5)
    net = EmbeddingNet(spec)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    net.eval()
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(EmbeddingNet(spec).train())
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        before = net.embed(x)
        folded = fold_batchnorm(net)
        after = folded.embed(x)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert torch.allclose(before, after, atol=1e-5)
