"""The build steps, each reading the previous step's artifact from the work dir:

    train      -> backbone.pt        classifier trained on the ID train split (minus hold-out)
    fit        -> memory.pt          RecLag banks on correctly classified training features
    calibrate  -> calibration.json   threshold at the target TPR on the hold-out split
    export     -> <output>.onnx      traced graph + metadata, parity-checked against PyTorch

``build`` runs all four. Every step is seeded; the same config gives the same bundle. A step
takes the command's ``Sets`` (the data, loaded once per command; a fresh one when not given);
the config's objects come from ``recipe``.
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch

from .calibrate import (
    accepted_share,
    check_floor,
    check_one_verdict,
    quantile_table,
    threshold_at_tpr,
)
from .config import BuildConfig
from .data.clientpath import calibration_images, simulate
from .data.sources import ood_noise, resize_all
from .data.splits import Sets
from .exemplars import step_exemplars
from .export import check_parity, export_onnx
from .fit import fit_memory
from .recipe import bundle_meta, fit_settings, load_backbone, load_model, make_backbone
from .reclag import prepare_features
from .train import extract, plan, train_classifier


def log(msg: str) -> None:
    print(f"[hopgate-export] {msg}", flush=True)


def warn(msg: str) -> None:
    print(f"[hopgate-export] warning: {msg}", flush=True)


class BuildError(RuntimeError):
    """A step cannot go on with what the previous one made; the message says what to change."""


# below these, a split is too small for what it feeds (issue 16): say so, with the fix
MIN_CALIBRATION = 200


# --- steps -------------------------------------------------------------------------------

def step_train(cfg: BuildConfig, progress: bool = True, sets: Sets | None = None) -> dict:
    sets = sets or Sets(cfg)
    train, test = sets.train, sets.test  # the test set is checked (same classes) before training
    torch.manual_seed(cfg.seed)  # the backbone's init: the same config gives the same bundle
    net, norm = make_backbone(cfg, len(train.class_names))
    b = cfg.backbone
    t0 = time.time()
    batch, epochs, notes = plan(len(train), b.batch_size, b.epochs)
    if b.method == "plain":
        for note in notes:
            log(note)
        log(f"train {b.name} on {len(train)} images, {epochs} epochs, batch {batch}")
        history = train_classifier(net, norm, train, epochs=epochs, batch_size=batch,
                                   lr=b.lr, seed=cfg.seed, augment_images=b.augment,
                                   client_path=b.client_path, progress=progress)
    else:  # GReg / GReg+ : energy-regularised OOD training (model_export.greg)
        from .greg import train_greg

        g = cfg.greg
        log(f"{b.method} on {b.name} ({'from ' + str(g.init) if g.init else 'from scratch'}), "
            f"{g.epochs} epochs")
        history = train_greg(net, norm, train, cfg, progress=progress)
    report = {"train_loss": history, "epochs": epochs if b.method == "plain" else cfg.greg.epochs,
              "seconds": round(time.time() - t0, 1)}
    if test is not None:
        _, logits = extract(net, norm, test.images, progress=progress, desc="test accuracy")
        report["test_accuracy"] = float((logits.argmax(1).numpy() == test.labels).mean())
        log(f"test accuracy {report['test_accuracy']:.4f}")
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": net.state_dict(), "class_names": train.class_names,
                "fingerprint": train.fingerprint(), "report": report}, cfg.workdir / "backbone.pt")
    return report


def step_fit(cfg: BuildConfig, progress: bool = True, sets: Sets | None = None) -> dict:
    sets = sets or Sets(cfg)
    train = sets.train
    net, norm, _ = load_backbone(cfg)
    phi, logits = extract(net, norm, train.images, progress=progress, desc="train features")
    labels = torch.from_numpy(train.labels)
    right = logits.argmax(1) == labels  # official: correctly classified samples only
    empty = [n for c, n in enumerate(train.class_names) if not bool(right[labels == c].any())]
    if empty:
        raise BuildError(f"the classifier gets no training image of class {empty[0]!r} right "
                         f"({len(empty)} such classes), so there is nothing to fit its memories "
                         "on: train longer (backbone.epochs) or check that class's images")
    m = cfg.memory
    log(f"fit {m.bank} {m.geometry} banks: {m.memories} memories/class, beta {m.beta}, "
        f"{m.epochs} epochs, {int(right.sum())} features")
    t0 = time.time()
    mem = fit_memory(prepare_features(phi[right], m.feature_norm), labels[right],
                     len(train.class_names), fit_settings(m), cfg.seed,
                     shared=m.bank == "shared", progress=progress)
    torch.save(mem, cfg.workdir / "memory.pt")
    return {"memories": int((mem["mask_bias"] == 0).sum()), "seconds": round(time.time() - t0, 1)}


def step_calibrate(cfg: BuildConfig, progress: bool = True, sets: Sets | None = None) -> dict:
    sets = sets or Sets(cfg)
    holdout = sets.holdout
    model, _ = load_model(cfg)
    images = calibration_images(holdout.images, cfg.calibrate.client_path, cfg.seed,
                                cfg.data.resize)  # what clients send (data/clientpath.py)
    with torch.no_grad():
        phi, logits = extract(model.backbone, model.normalize, images, progress=progress,
                              desc="calibration scores")
        scores = model.head.score(phi, logits).numpy()  # the deciding score
    c = cfg.calibrate
    if len(scores) < MIN_CALIBRATION:
        warn(f"calibration on {len(scores)} held-out images (under {MIN_CALIBRATION}): "
             f"p-values cannot go below 1/(n+1) = {1 / (len(scores) + 1):.3f} and the threshold "
             "is coarse; add images or raise data.holdout_fraction")
    tau = threshold_at_tpr(scores, c.target_tpr)
    check_floor(tau, model.head.floor())  # else the clamp, not tau, would decide
    with torch.no_grad():  # one verdict: the graph's flag is score < tau on every image
        out = model.head(phi, logits, torch.tensor(tau))
    check_one_verdict(out["is_ood"].numpy(), out["score"].numpy(), tau, "held-out images")
    record = {"threshold": tau, "target_tpr": c.target_tpr,
              "holdout_tpr": accepted_share(scores, tau), "calibration_size": len(scores),
              "client_path": c.client_path,
              "score_quantiles": quantile_table(scores, c.quantiles)}
    (cfg.workdir / "calibration.json").write_text(json.dumps(record))
    log(f"threshold {tau:.4f} (log-domain) at TPR {c.target_tpr} on {len(scores)} held-out images")
    return {k: v for k, v in record.items() if k != "score_quantiles"}


def step_export(cfg: BuildConfig, progress: bool = True, sets: Sets | None = None) -> dict:
    sets = sets or Sets(cfg)
    model, calib = load_model(cfg, calibrated=True)
    meta = bundle_meta(cfg, model, calib)
    t0 = time.time()
    path = export_onnx(model, meta, cfg.output, cfg.export.opset)
    log(f"exported {path} ({path.stat().st_size / 1e6:.2f} MB) in {time.time() - t0:.1f}s")
    images = parity_images(cfg, sets)
    if len(images) < cfg.export.parity_images:
        warn(f"parity check on {len(images)} images, fewer than export.parity_images "
             f"{cfg.export.parity_images}")
    report = check_parity(model, path, images, meta.threshold, progress=progress)
    log(f"parity ok on {report['images']} images "
        f"(max |d score| {report['max_score_abs_diff']:.2e})")
    return {"path": str(path), "bytes": path.stat().st_size, "parity": report}


def parity_images(cfg: BuildConfig, sets: Sets) -> np.ndarray:
    """Real images for the parity gate: held-out ID plus far-OOD, so both verdicts occur;
    ``export.parity_images`` of them. A small hold-out is topped up with client-path copies of
    its images (``clientpath.simulate``: ID-like, not identical), so the count is met."""
    holdout = sets.holdout
    n = cfg.export.parity_images
    d = cfg.data  # no OOD set chosen for the report: noise still makes OOD verdicts here
    ood = sets.far_ood or {"noise": resize_all(ood_noise(n, seed=cfg.seed), d.size, d.channels)}
    ood_imgs = np.concatenate([v[: max(n // 10, 1)] for v in ood.values()])
    ids = holdout.images[: max(n - len(ood_imgs), n // 2)]
    missing = n - len(ids) - len(ood_imgs)
    if missing > 0 and len(ids):
        rng = np.random.default_rng([cfg.seed, 16])
        ids = np.concatenate([ids, simulate(ids[rng.integers(0, len(ids), missing)], rng,
                                            cfg.data.resize)])
    return np.concatenate([ids, ood_imgs])


STEPS = {"train": step_train, "fit": step_fit, "calibrate": step_calibrate, "export": step_export}
STEPS["exemplars"] = step_exemplars  # each memory's class and training images (exemplars.py)


def build(cfg: BuildConfig, progress: bool = True, sets: Sets | None = None) -> dict:
    sets = sets or Sets(cfg)
    t0 = time.time()
    report = {name: fn(cfg, progress, sets) for name, fn in STEPS.items()}
    report["seconds"] = round(time.time() - t0, 1)
    (cfg.workdir / "build.json").write_text(json.dumps(report, indent=2, default=str))
    log(f"build done in {report['seconds']}s")
    return report
