"""The build steps, each reading the previous step's artifact from the work dir:

    train      -> backbone.pt        classifier trained on the ID train split (minus hold-out)
    fit        -> memory.pt          RecLag banks on correctly classified training features
    calibrate  -> calibration.json   threshold at the target TPR on the hold-out split
    export     -> <output>.onnx      traced graph + metadata, parity-checked against PyTorch

``build`` runs all four. Every step is seeded; the same config gives the same bundle.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from service.bundle import BundleMeta

from . import __version__, backbones, data
from .calibrate import accepted_share, quantile_table, threshold_at_tpr
from .config import BuildConfig
from .export import check_parity, export_onnx
from .fit import FitConfig, fit_banks
from .model import GatedModel, Normalize
from .reclag import RecLagHead, prepare_features
from .train import extract, train_classifier


def log(msg: str) -> None:
    print(f"[hopgate-export] {msg}", flush=True)


# --- data ------------------------------------------------------------------------------

def _load(spec: str, split: str, cfg: BuildConfig) -> data.Split:
    d = cfg.data
    if spec == "fashion_mnist":
        s = data.fashion_mnist(split)
    elif spec.startswith("folder:"):
        s = data.image_folder(spec[len("folder:"):], d.size, d.channels, d.resize)
    elif spec.startswith("npz:"):
        s = data.npz_arrays(spec[len("npz:"):])
    else:
        raise ValueError(f"data source {spec!r}: use fashion_mnist, folder:PATH or npz:PATH")
    return data.Split(data.resize_all(s.images, d.size, d.channels, d.resize), s.labels,
                      s.class_names)


def id_splits(cfg: BuildConfig) -> tuple[data.Split, data.Split]:
    """(train, holdout): the ID training split and the calibration hold-out, disjoint."""
    full = _load(cfg.data.id, "train", cfg)
    if cfg.data.train_subset and cfg.data.train_subset < len(full):
        idx = np.random.default_rng(cfg.seed).permutation(len(full))[:cfg.data.train_subset]
        full = full.subset(np.sort(idx))
    return data.split_holdout(full, cfg.data.holdout_fraction, cfg.seed)


def id_test(cfg: BuildConfig) -> data.Split | None:
    if cfg.data.test is None:
        return None
    s = _load(cfg.data.test, "test", cfg)
    if cfg.data.test_subset and cfg.data.test_subset < len(s):
        s = s.subset(np.arange(cfg.data.test_subset))
    return s


# --- model pieces ------------------------------------------------------------------------

def make_backbone(cfg: BuildConfig, num_classes: int):
    net = backbones.build(cfg.backbone.name, num_classes, cfg.data.channels)
    mean = cfg.backbone.mean or list(getattr(net, "mean", (0.5,) * cfg.data.channels))
    std = cfg.backbone.std or list(getattr(net, "std", (0.5,) * cfg.data.channels))
    mean, std = list(mean)[:cfg.data.channels], list(std)[:cfg.data.channels]
    return net, Normalize(mean, std)


def load_backbone(cfg: BuildConfig):
    ckpt = torch.load(cfg.workdir / "backbone.pt", map_location="cpu", weights_only=False)
    net, norm = make_backbone(cfg, len(ckpt["class_names"]))
    net.load_state_dict(ckpt["state_dict"])
    return net.eval(), norm, ckpt


def load_model(cfg: BuildConfig) -> tuple[GatedModel, dict]:
    """The full GatedModel from the work dir, plus the calibration record (if any)."""
    net, norm, ckpt = load_backbone(cfg)
    mem = torch.load(cfg.workdir / "memory.pt", map_location="cpu", weights_only=True)
    m = cfg.memory
    head = RecLagHead(mem["banks"], mem["mask_bias"], beta=m.beta, steps=m.steps, top_k=m.top_k,
                      shared=m.bank == "shared", feature_norm=m.feature_norm,
                      lagrangian=m.lagrangian, power_n=m.power_n, rectified=m.rectified)
    calib_path = cfg.workdir / "calibration.json"
    calib = json.loads(calib_path.read_text()) if calib_path.exists() else {}
    return GatedModel(norm, net, head).eval(), {**calib, "ckpt": ckpt}


# --- steps -------------------------------------------------------------------------------

def step_train(cfg: BuildConfig, progress: bool = True) -> dict:
    train, _ = id_splits(cfg)
    net, norm = make_backbone(cfg, len(train.class_names))
    b = cfg.backbone
    t0 = time.time()
    if b.method == "plain":
        log(f"train {b.name} on {len(train)} images, {b.epochs} epochs")
        history = train_classifier(net, norm, train, epochs=b.epochs, batch_size=b.batch_size,
                                   lr=b.lr, seed=cfg.seed, augment_images=b.augment,
                                   progress=progress)
    else:  # GReg / GReg+ : energy-regularised OOD training (model_export.greg)
        from .greg import train_greg

        g = cfg.greg
        log(f"{b.method} on {b.name} ({'from ' + str(g.init) if g.init else 'from scratch'}), "
            f"{g.epochs} epochs")
        history = train_greg(net, norm, train, cfg, progress=progress)
    report = {"train_loss": history, "seconds": round(time.time() - t0, 1)}
    test = id_test(cfg)
    if test is not None:
        _, logits = extract(net, norm, test.images, progress=progress, desc="test accuracy")
        report["test_accuracy"] = float((logits.argmax(1).numpy() == test.labels).mean())
        log(f"test accuracy {report['test_accuracy']:.4f}")
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": net.state_dict(), "class_names": train.class_names,
                "fingerprint": train.fingerprint(), "report": report}, cfg.workdir / "backbone.pt")
    return report


def step_fit(cfg: BuildConfig, progress: bool = True) -> dict:
    train, _ = id_splits(cfg)
    net, norm, ckpt = load_backbone(cfg)
    phi, logits = extract(net, norm, train.images, progress=progress, desc="train features")
    labels = torch.from_numpy(train.labels)
    right = logits.argmax(1) == labels  # official: correctly classified samples only
    m = cfg.memory
    fcfg = FitConfig(memories=m.memories, beta=m.beta, init_norm=m.init_norm, epochs=m.epochs,
                     batch_size=m.batch_size, lr=m.lr, sampler=m.sampler, weights=m.weights,
                     init=m.init, lagrangian=m.lagrangian, power_n=m.power_n)
    log(f"fit {m.bank} banks: {m.memories} memories/class, beta {m.beta}, {m.epochs} epochs, "
        f"{int(right.sum())} features")
    t0 = time.time()
    banks, bias = fit_banks(prepare_features(phi[right], m.feature_norm), labels[right],
                            len(train.class_names), fcfg, cfg.seed, shared=m.bank == "shared",
                            progress=progress)
    torch.save({"banks": banks, "mask_bias": bias}, cfg.workdir / "memory.pt")
    return {"memories": int((bias == 0).sum()), "seconds": round(time.time() - t0, 1)}


def step_calibrate(cfg: BuildConfig, progress: bool = True) -> dict:
    _, holdout = id_splits(cfg)
    model, _ = load_model(cfg)
    with torch.no_grad():
        phi, logits = extract(model.backbone, model.normalize, holdout.images, progress=progress,
                              desc="calibration scores")
        scores = model.head.score(phi, logits).numpy()
    c = cfg.calibrate
    tau = threshold_at_tpr(scores, c.target_tpr)
    record = {"threshold": tau, "target_tpr": c.target_tpr,
              "holdout_tpr": accepted_share(scores, tau), "calibration_size": len(scores),
              "score_quantiles": quantile_table(scores, c.quantiles)}
    (cfg.workdir / "calibration.json").write_text(json.dumps(record))
    log(f"threshold {tau:.4f} (log-domain) at TPR {c.target_tpr} on {len(scores)} held-out images")
    return {k: v for k, v in record.items() if k != "score_quantiles"}


def bundle_meta(cfg: BuildConfig, model: GatedModel, calib: dict) -> BundleMeta:
    m, ckpt = cfg.memory, calib["ckpt"]
    return BundleMeta(
        hopgate_version=__version__, name=cfg.name,
        model_version=f"{cfg.name}-{ckpt['fingerprint'][:8]}-s{cfg.seed}",
        height=cfg.data.size[0], width=cfg.data.size[1], channels=cfg.data.channels,
        resize=cfg.data.resize, mean=model.normalize.mean.flatten().tolist(),
        std=model.normalize.std.flatten().tolist(), class_names=ckpt["class_names"],
        backbone=cfg.backbone.name + ("" if cfg.backbone.method == "plain" else f"+{cfg.backbone.method}"),
        method="dam" if m.lagrangian == "rep_n" else "reclag", lagrangian=m.lagrangian,
        power_n=m.power_n if m.lagrangian == "rep_n" else None,
        beta=m.beta, bank=m.bank, memories_per_class=m.memories, steps=m.steps, top_k=m.top_k,
        threshold=calib["threshold"], target_tpr=calib["target_tpr"],
        score_quantiles=calib["score_quantiles"], calibration_size=calib["calibration_size"],
        data_fingerprint=ckpt["fingerprint"],
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def step_export(cfg: BuildConfig, progress: bool = True) -> dict:
    model, calib = load_model(cfg)
    if "threshold" not in calib:
        raise RuntimeError(f"{cfg.workdir}/calibration.json missing: run `calibrate` first")
    meta = bundle_meta(cfg, model, calib)
    t0 = time.time()
    path = export_onnx(model, meta, cfg.output, cfg.export.opset)
    log(f"exported {path} ({path.stat().st_size / 1e6:.2f} MB) in {time.time() - t0:.1f}s")
    images = parity_images(cfg)
    report = check_parity(model, path, images, meta.threshold)
    log(f"parity ok on {report['images']} images (max |d score| {report['max_score_abs_diff']:.2e})")
    return {"path": str(path), "bytes": path.stat().st_size, "parity": report}


def parity_images(cfg: BuildConfig) -> np.ndarray:
    """Real images for the parity gate: held-out ID plus far-OOD, so both verdicts occur."""
    _, holdout = id_splits(cfg)
    n = cfg.export.parity_images
    ood = data.far_ood_sets(cfg.data.size, cfg.data.channels, seed=cfg.seed)
    ood_imgs = np.concatenate([v[: max(n // 10, 1)] for v in ood.values()])
    return np.concatenate([holdout.images[: max(n - len(ood_imgs), n // 2)], ood_imgs])


STEPS = {"train": step_train, "fit": step_fit, "calibrate": step_calibrate, "export": step_export}


def build(cfg: BuildConfig, progress: bool = True) -> dict:
    t0 = time.time()
    report = {name: fn(cfg, progress) for name, fn in STEPS.items()}
    report["seconds"] = round(time.time() - t0, 1)
    (cfg.workdir / "build.json").write_text(json.dumps(report, indent=2, default=str))
    log(f"build done in {report['seconds']}s")
    return report
