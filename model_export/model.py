"""The whole scoring model: uint8 images -> normalise -> backbone -> RecLag head -> outputs.

This is the module that is traced to ONNX, and the one the evaluator and the parity check run
in PyTorch, so the served graph and the measured model are the same code.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .reclag import RecLagHead


class Normalize(nn.Module):
    """uint8 [B, H, W, C] -> float [B, C, H, W], (x/255 - mean) / std. In-graph, so only
    bytes cross to the device."""

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: Tensor) -> Tensor:
        x = images.permute(0, 3, 1, 2).to(torch.float32) / 255.0
        return (x - self.mean) / self.std


class GatedModel(nn.Module):
    """Backbone plus memory head; forward(images uint8 NHWC, log_lambda) -> bundle outputs."""

    def __init__(self, normalize: Normalize, backbone: nn.Module, head: RecLagHead):
        super().__init__()
        self.normalize, self.backbone, self.head = normalize, backbone, head

    def features(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.backbone(self.normalize(images))

    def forward(self, images: Tensor, log_lambda: Tensor) -> tuple[Tensor, ...]:
        phi, logits = self.features(images)
        out = self.head(phi, logits, log_lambda)
        from hopgate.bundle import OUTPUTS

        return tuple(out[k] for k in OUTPUTS)

    def run(self, images: Tensor, log_lambda: float) -> dict[str, Tensor]:
        """Eager call with named outputs (evaluation, parity)."""
        from hopgate.bundle import OUTPUTS

        return dict(zip(OUTPUTS, self(images, torch.tensor(log_lambda, dtype=torch.float32))))
