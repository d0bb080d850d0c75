"""The PyTorch model of a built bundle, rebuilt from the weights in its ``.onnx`` file.

The robustness benchmark needs gradients, so it attacks the PyTorch model; a bundle's work dir
(``backbone.pt``, ``memory.pt``) is not shipped, and rebuilding it retrains for an hour on two
shared cores, into a model that differs from the shipped one wherever the CPU rounds floats
differently. This reads the shipped bundle's own weights instead: the exporter folds each
BatchNorm into the convolution before it (``<conv>.weight`` and ``<conv>.weight_bias``), so
the BatchNorms are set to the identity plus that bias; the gaussian head's lifted banks are
cut back to the fitted memories and lifted again by the same code (``reclag.lift_banks``),
which must give back the bundle's biases. ``parity`` then checks the rebuilt model against
onnxruntime on real images, as the export's parity gate does. Small residual backbones only
(``small_resnet``: what the shipped config trains).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from hopgate.bundle import load_meta

from ..config import BuildConfig
from ..export import ort_session, run_ort
from ..model import GatedModel
from ..recipe import make_backbone, make_head
from ..reclag import PAD, lift_banks


def _weights(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def model_from_bundle(cfg: BuildConfig, path: Path) -> tuple[GatedModel, float]:
    """(the bundle's model in PyTorch, its calibrated threshold), for ``cfg``'s architecture."""
    if cfg.backbone.name != "small_resnet" or cfg.memory.geometry != "gaussian":
        raise ValueError("rebuilding from a bundle covers small_resnet with the gaussian gate")
    meta = load_meta(path)
    w = _weights(path)
    net, norm = make_backbone(cfg, len(meta.class_names))
    state = {}
    for name in net.state_dict():
        key = f"backbone.{name}"
        if key in w:
            state[name] = torch.from_numpy(w[key].copy())
    # each BatchNorm follows a bias-free conv whose folded weight and bias the bundle holds
    for name, mod in net.named_modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            parent, _, idx = name.rpartition(".")
            conv = (f"{parent}.{int(idx) - 1}" if idx.isdigit()
                    else f"{parent}.{idx.replace('bn', 'conv')}" if parent else idx)
            bias = torch.from_numpy(w[f"backbone.{conv}.weight_bias"].copy())
            state[f"{name}.weight"] = torch.ones_like(bias)
            state[f"{name}.bias"] = bias
            state[f"{name}.running_mean"] = torch.zeros_like(bias)
            state[f"{name}.running_var"] = torch.full_like(bias, 1.0 - mod.eps)
            state[f"{name}.num_batches_tracked"] = torch.tensor(0)
    net.load_state_dict(state, strict=True)
    mean, whitener = (torch.from_numpy(w[f"head.{k}"].copy()) for k in ("mean", "whitener"))
    dim = whitener.shape[1]
    c, m = len(meta.class_names), cfg.memory.memories
    lifted = next(torch.from_numpy(v.copy()) for v in w.values() if v.shape == (c, m, dim + 2))
    bias = next(torch.from_numpy(v.copy()) for v in w.values() if v.shape == (c, m))
    banks, mask_bias = lifted[..., :dim], torch.where(bias <= PAD / 2, PAD, 0.0)
    head = make_head(cfg.memory, banks, mask_bias, mean, whitener)
    again, again_bias = lift_banks(banks, mask_bias, head.beta, float(lifted[0, 0, dim]))
    if not (torch.allclose(again, lifted) and torch.allclose(again_bias, bias, rtol=1e-5)):
        raise ValueError(f"{path}: the banks do not lift back to the bundle's (another recipe?)")
    model = GatedModel(norm, net, head).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, float(meta.threshold)


def parity(model: GatedModel, path: Path, images: np.ndarray, tau: float) -> float:
    """The largest |score difference| between the rebuilt model and onnxruntime on ``images``,
    after checking that every flag and class agrees; raises if not within the export's gate."""
    got = run_ort(ort_session(path), images)
    with torch.no_grad():
        mine = model.run(torch.from_numpy(images), tau)
    score = mine["score"].numpy()
    diff = np.abs(score - got["score"])
    if (diff > 1e-4 * (1 + np.abs(got["score"]))).any() or (
            mine["is_ood"].numpy().astype(bool) != got["is_ood"].astype(bool)).any() or (
            mine["pred_class"].numpy() != got["pred_class"]).any():
        raise ValueError(f"{path}: the rebuilt model differs from onnxruntime "
                         f"(max |d score| {diff.max():.2e})")
    return float(diff.max())
