"""The model card written beside every bundle (``<bundle>.md``): what it is, how good, how to
rebuild."""

from __future__ import annotations

import platform
from pathlib import Path

from hopgate.bundle import load_meta

from .config import BuildConfig
from .evaluate import format_quick


def write_card(cfg: BuildConfig, export_report: dict, quick: dict, config_path: str | None,
               seconds: float | None = None) -> Path:
    meta = load_meta(cfg.output)
    path = Path(cfg.output).with_suffix(".md")
    size_mb = Path(cfg.output).stat().st_size / 1e6
    rebuild = f"hopgate-export build -c {config_path}" if config_path else "hopgate-export build"
    lines = [
        f"# Model card: `{Path(cfg.output).name}` ({meta.model_version})",
        "",
        f"Made by hopgate {meta.hopgate_version} on {meta.created} "
        f"({platform.machine()}" + (f", {seconds:.0f} s for the whole build" if seconds else "")
        + ").",
        "",
        "## What it is",
        f"- ID data: `{cfg.data.id}` ({', '.join(meta.class_names)}); training-data fingerprint "
        f"`{meta.data_fingerprint}`; {cfg.data.holdout_fraction:.0%} of the train split held out "
        "for calibration and never trained on.",
        f"- Input: uint8 `[B, {meta.height}, {meta.width}, {meta.channels}]`, "
        f"resize `{meta.resize}`, "
        f"normalised in-graph with mean {meta.mean} / std {meta.std}.",
        f"- Backbone: `{meta.backbone}`, {cfg.backbone.epochs} epochs, seed {cfg.seed}.",
        f"- Memory: {meta.method} ({meta.lagrangian}, {meta.geometry} geometry), "
        f"{meta.bank} banks, {meta.memories_per_class} "
        f"memories per class, beta {meta.beta}, T = {meta.steps} unrolled steps, top-{meta.top_k} "
        "memories reported.",
        f"- Bundle size: {size_mb:.2f} MB.",
        "",
        "## How good",
        f"- Threshold (log-domain, OOD iff score < threshold): **{meta.threshold:.4f}**, "
        f"calibrated at TPR {meta.target_tpr} on {meta.calibration_size} held-out ID images "
        f"(held-out TPR {quick['holdout_tpr']:.4f}).",
        f"- Parity PyTorch vs onnxruntime on {export_report['parity']['images']} real images: "
        f"max |score difference| {export_report['parity']['max_score_abs_diff']:.2e}; "
        "flags, classes and memory indices identical.",
        "",
        format_quick(quick),
        "",
        "FPR95 here is the share of OOD images accepted when 95 % of ID images are kept. "
        "See `benchmarks/ood/` for the full benchmark with baselines.",
        "",
        "## Rebuild",
        "```",
        rebuild,
        "hopgate-export evaluate" + (f" -c {config_path}" if config_path else ""),
        "```",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path
