"""Config -> objects, written once: backbone, RecLag head, fit settings, bundle metadata.

The pipeline, the benchmark report and the robustness benchmark all build their pieces here,
so a memory setting (``top_k``, ``lagrangian``, ``power_n``, ``rectified``, ...) reaches every
path the same way. ``load_backbone``/``load_model`` read a work dir's artifacts
(``backbone.pt``, ``memory.pt``, ``calibration.json``) back into those objects.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timezone
from pathlib import Path

import torch

from hopgate import __version__
from hopgate.bundle import BundleMeta

from . import backbones
from .attach.config import AttachConfig
from .config import BuildConfig, MemoryConfig
from .fit import FitConfig
from .model import GatedModel, Normalize
from .reclag import RecLagHead

_FIT_FIELDS = [f.name for f in dataclasses.fields(FitConfig) if f.name in MemoryConfig.model_fields]


def make_backbone(cfg: BuildConfig, num_classes: int) -> tuple[torch.nn.Module, Normalize]:
    """A fresh backbone for ``num_classes`` and its in-graph normalisation."""
    net = backbones.build(cfg.backbone.name, num_classes, cfg.data.channels)
    mean = cfg.backbone.mean or list(getattr(net, "mean", (0.5,) * cfg.data.channels))
    std = cfg.backbone.std or list(getattr(net, "std", (0.5,) * cfg.data.channels))
    mean, std = list(mean)[:cfg.data.channels], list(std)[:cfg.data.channels]
    return net, Normalize(mean, std)


def fit_settings(memory: MemoryConfig) -> FitConfig:
    """The memory config's fitting settings (every FitConfig field MemoryConfig has)."""
    return FitConfig(**{name: getattr(memory, name) for name in _FIT_FIELDS})


def make_head(memory: MemoryConfig, banks: torch.Tensor, mask_bias: torch.Tensor,
              mean: torch.Tensor | None = None, whitener: torch.Tensor | None = None
              ) -> RecLagHead:
    """The RecLag head of fitted ``banks`` (and, for the gaussian geometry, the whitening
    ``mean``/``whitener``) with every head setting of ``memory``."""
    m = memory
    return RecLagHead(banks, mask_bias, beta=m.beta, steps=m.steps, top_k=m.top_k,
                      shared=m.bank == "shared", feature_norm=m.feature_norm,
                      lagrangian=m.lagrangian, power_n=m.power_n, rectified=m.rectified,
                      geometry=m.geometry, mean=mean, whitener=whitener, radius=m.radius)


def head_from_memory(memory: MemoryConfig, mem: dict) -> RecLagHead:
    """The head of a ``fit.fit_memory`` result (what memory.pt stores)."""
    return make_head(memory, mem["banks"], mem["mask_bias"], mem.get("mean"), mem.get("whitener"))


def method_of(memory: MemoryConfig) -> str:
    """The bundle's ``method``: "dam" for DAM's rep_n Lagrangian, else "reclag"."""
    return "dam" if memory.lagrangian == "rep_n" else "reclag"


def backbone_label(cfg: BuildConfig) -> str:
    """The backbone's name, with its OOD training method when it has one (``+greg``)."""
    b = cfg.backbone
    return b.name + ("" if b.method == "plain" else f"+{b.method}")


class ArtifactError(FileNotFoundError):
    """A step's input artifact is missing from the work dir; the message names the step."""


# each work-dir artifact and the step that writes it
MADE_BY = {"backbone.pt": "train", "memory.pt": "fit", "calibration.json": "calibrate"}


def artifact(cfg: BuildConfig, name: str) -> Path:
    """``workdir/name``, or ArtifactError saying which step to run first."""
    path = cfg.workdir / name
    if not path.is_file():
        raise ArtifactError(f"{path} not found: run `hopgate-export {MADE_BY[name]}` with this "
                            "config first (or `hopgate-export build`, which runs every step)")
    return path


def load_backbone(cfg: BuildConfig):
    """(backbone in eval mode, Normalize, checkpoint dict) from ``workdir/backbone.pt``."""
    ckpt = torch.load(artifact(cfg, "backbone.pt"), map_location="cpu", weights_only=False)
    net, norm = make_backbone(cfg, len(ckpt["class_names"]))
    net.load_state_dict(ckpt["state_dict"])
    return net.eval(), norm, ckpt


def load_model(cfg: BuildConfig, calibrated: bool = False) -> tuple[GatedModel, dict]:
    """The full GatedModel from the work dir, plus the calibration record (if any; required
    when ``calibrated``)."""
    net, norm, ckpt = load_backbone(cfg)
    mem = torch.load(artifact(cfg, "memory.pt"), map_location="cpu", weights_only=True)
    head = head_from_memory(cfg.memory, mem)
    calib_path = cfg.workdir / "calibration.json"
    if calibrated:
        artifact(cfg, "calibration.json")
    calib = json.loads(calib_path.read_text()) if calib_path.exists() else {}
    return GatedModel(norm, net, head).eval(), {**calib, "ckpt": ckpt}


def _memory_meta(m: MemoryConfig, head: RecLagHead) -> dict:
    """The bundle's memory settings, the same for a built and an attached bundle (top_k as
    the head clamps it to the bank)."""
    return dict(method=method_of(m), lagrangian=m.lagrangian,
                power_n=m.power_n if m.lagrangian == "rep_n" else None, beta=m.beta,
                bank=m.bank, memories_per_class=m.memories, steps=m.steps, top_k=head.top_k,
                geometry=m.geometry, radius=head.radius, rectified=m.rectified,
                feature_norm=m.feature_norm,
                created=datetime.now(timezone.utc).isoformat(timespec="seconds"))


def bundle_meta(cfg: BuildConfig, model: GatedModel, calib: dict) -> BundleMeta:
    ckpt = calib["ckpt"]
    return BundleMeta(
        hopgate_version=__version__, name=cfg.name,
        model_version=f"{cfg.name}-{ckpt['fingerprint'][:8]}-s{cfg.seed}",
        height=cfg.data.size[0], width=cfg.data.size[1], channels=cfg.data.channels,
        resize=cfg.data.resize, mean=model.normalize.mean.flatten().tolist(),
        std=model.normalize.std.flatten().tolist(), class_names=ckpt["class_names"],
        backbone=backbone_label(cfg), **_memory_meta(cfg.memory, model.head),
        threshold=calib["threshold"], target_tpr=calib["target_tpr"],
        score_quantiles=calib["score_quantiles"], calibration_size=calib["calibration_size"],
        data_fingerprint=ckpt["fingerprint"],
    )


def attached_meta(cfg: AttachConfig, classifier: str, class_names: list[str], head: RecLagHead,
                  threshold: float, quantiles: list[float], calibration_size: int,
                  fingerprint: str) -> BundleMeta:
    """The metadata of a bundle composed on a user's classifier (attach.py)."""
    pre = cfg.preprocess
    return BundleMeta(
        hopgate_version=__version__, name=cfg.name,
        model_version=f"{cfg.name}-{fingerprint[:8]}-s{cfg.seed}",
        height=pre.size[0], width=pre.size[1], channels=pre.channels, resize=pre.resize,
        resize_filter=pre.resize_filter, crop=pre.crop, mean=pre.mean, std=pre.std,
        class_names=class_names, backbone=f"attached:{classifier}",
        **_memory_meta(cfg.memory, head),
        threshold=threshold, target_tpr=cfg.calibrate.target_tpr, score_quantiles=quantiles,
        calibration_size=calibration_size, data_fingerprint=fingerprint,
    )
