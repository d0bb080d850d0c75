"""The model card written beside every bundle (``<bundle>.md``): what it is, how good, how to
rebuild."""

from __future__ import annotations

import platform
import shlex
from pathlib import Path

from hopgate.bundle import load_meta

from ..config import BuildConfig
from .evaluate import format_quick


def changed_settings(cfg: BuildConfig) -> list[str]:
    """``key=value`` for every setting that differs from the library default (config file and
    ``--set`` together), so the card says what this bundle chose."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
        return out

    base = BuildConfig.model_validate({"data": {"id": cfg.data.id}})  # data.test's default
    mine, default = flat(cfg.model_dump(mode="json")), flat(base.model_dump(mode="json"))
    return [f"{k}={v}" for k, v in mine.items() if default.get(k) != v]


def rebuild_args(config_path: str | None, overrides: list[str]) -> str:
    """The arguments that rebuild this bundle: the config and every ``--set``, shell-quoted."""
    args = (["-c", config_path] if config_path else []) + [
        a for kv in overrides for a in ("--set", kv)]
    return " ".join(shlex.quote(a) for a in args)


def write_card(cfg: BuildConfig, export_report: dict, quick: dict, config_path: str | None,
               seconds: float | None = None, overrides: list[str] | None = None) -> Path:
    meta = load_meta(cfg.output)
    path = Path(cfg.output).with_suffix(".md")
    size_mb = Path(cfg.output).stat().st_size / 1e6
    args = rebuild_args(config_path, overrides or [])
    id_set = quick.get("id_set", "test")
    lines = [
        f"# Model card: `{Path(cfg.output).name}` ({meta.model_version})",
        "",
        f"Made by hopgate {meta.hopgate_version} on {meta.created} "
        f"({platform.machine()}" + (f", {seconds:.0f} s for the whole build" if seconds else "")
        + ").",
        "",
        "## What it is",
        f"- ID data: `{cfg.data.id}` ({', '.join(meta.class_names)}); training-data fingerprint "
        f"`{meta.data_fingerprint}`; {meta.calibration_size} images of the train split held "
        "out for calibration and never trained on.",
        f"- Input: uint8 `[B, {meta.height}, {meta.width}, {meta.channels}]`, "
        f"resize `{meta.resize}`, "
        f"normalised in-graph with mean {meta.mean} / std {meta.std}.",
        f"- Backbone: `{meta.backbone}`, {_epochs(cfg)} epochs, seed {cfg.seed}.",
        f"- Memory: {meta.method} ({meta.lagrangian}, {meta.geometry} geometry), "
        f"{meta.bank} banks, {meta.memories_per_class} "
        f"memories per class, beta {meta.beta}, T = {meta.steps} unrolled steps, top-{meta.top_k} "
        "memories reported.",
        f"- Bundle size: {size_mb:.2f} MB.",
        "- Settings other than the library defaults: "
        + (", ".join(f"`{s}`" for s in changed_settings(cfg)) or "none") + ".",
        "- Overrides on the command line: "
        + (", ".join(f"`--set {kv}`" for kv in overrides or []) or "none") + ".",
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
        *([] if id_set == "test" else [
            "No ID test set (`data.test`): the ID figures are on the calibration hold-out, "
            "which set the threshold; give `data.test` for figures on unseen images.", ""]),
        "FPR95 here is the share of OOD images accepted when 95 % of ID images are kept. "
        "See `benchmarks/ood/` for the full benchmark with baselines.",
        "",
        "## Rebuild",
        "```",
        f"hopgate-export build {args}".rstrip(),
        f"hopgate-export evaluate {args}".rstrip(),
        "```",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _epochs(cfg: BuildConfig) -> str:
    """The epochs the backbone trained (auto epochs are resolved at train time)."""
    import torch

    ckpt = cfg.workdir / "backbone.pt"
    if ckpt.is_file():
        done = torch.load(ckpt, map_location="cpu", weights_only=False).get("report", {})
        if "epochs" in done:
            return str(done["epochs"])
    return str(cfg.backbone.epochs)
