"""The shipped bundle's PyTorch model, rebuilt from its .onnx weights for the robustness
benchmark (model_export/evaluation/from_bundle.py), scores as onnxruntime does (fast tier: no
training, a few seconds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hopgate.model_export.config import load_config
from hopgate.model_export.data import sources as data
from hopgate.model_export.evaluation.from_bundle import model_from_bundle, parity

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "models" / "default.onnx"


@pytest.fixture(scope="module")
def rebuilt():
    return model_from_bundle(load_config(ROOT / "configs" / "default.yaml"), BUNDLE)


def test_rebuilt_model_matches_onnxruntime(rebuilt):
    model, tau = rebuilt
    rng = np.random.default_rng(0)
    images = np.concatenate([data.fashion_mnist("test").images[:128],
                             rng.integers(0, 256, (32, 28, 28, 1), dtype=np.uint8)])
    assert parity(model, BUNDLE, images, tau) < 1e-2  # raises on any flag or class that differs
    # and it is differentiable in the pixels, which is what the attacks need
    x = torch.from_numpy(images[:4]).float().requires_grad_(True)
    phi, logits = model.features(x)
    model.head.score(phi, logits).sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_a_wrong_weight_fails_the_parity_check(rebuilt):
    model, tau = rebuilt
    images = data.fashion_mnist("test").images[:64]
    bn = model.backbone.stages[2].bn2
    saved = bn.bias.clone()
    try:
        bn.bias += 0.5  # a folded BatchNorm bias read wrongly
        with pytest.raises(ValueError, match="differs from onnxruntime"):
            parity(model, BUNDLE, images, tau)
    finally:
        bn.bias.copy_(saved)


def test_another_architecture_is_refused():
    cfg = load_config(ROOT / "configs" / "default.yaml", {"memory": {"geometry": "dot"}})
    with pytest.raises(ValueError, match="small_resnet with the gaussian gate"):
        model_from_bundle(cfg, BUNDLE)
