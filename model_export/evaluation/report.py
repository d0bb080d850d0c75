"""The full OOD benchmark: RecLag against post-hoc baselines, with ablations, as JSON/Markdown/HTML.

``hopgate-export evaluate -c CONFIG --report DIR [--with CONFIG ...]`` runs, per config:

1. ``feature_cache``: features and logits of every image set (correctly classified train
   features, the calibration hold-out, the ID test split, every OOD set), extracted ONCE with
   the built backbone and cached under ``<workdir>/eval/cache.pt``; everything below reads it.
2. ``methods``: every detector of ``detectors.REGISTRY`` fitted on the cached training features
   and scoring the same test features. RecLag's scores come from the built bundle's own head
   (the served score; ``tests/test_evaluate.py`` checks the ONNX file against it).
3. Metrics per method and OOD set with bootstrap CIs; the calibrated threshold is checked on
   the ID test split, which calibration never saw.
4. ``ablations`` (main config only): banks refitted from the cached features.
5. ``plots`` (PNG) and ``render``: report.json, README.md, report.html; ``provenance`` records
   the machine and commit.

Secondary benchmarks (``--with CONFIG``: the open-set split, the EfficientNet-Lite0 path) get
the same main table without ablations and without the tuned RecLag row. Each config must be
built first (``hopgate-export build``; the open-set one with ``hopgate-export openset``).
"""

from __future__ import annotations

import time
from pathlib import Path

from hopgate import __version__

from ..calibrate import accepted_share
from ..config import BuildConfig
from ..data.feature_cache import build_cache, cache_path, correct_train
from ..data.splits import Sets
from ..pipeline import log
from ..recipe import load_model
from .ablations import ablations
from .detectors import BASELINES, RECLAG, Options
from .evaluate import served_table
from .methods import score_methods, table
from .plots import Images, plots
from .provenance import commit, machine
from .render import write

MAIN_METHODS = ("reclag", "reclag-kmeans", "reclag-dot", "reclag-gaussian", *BASELINES)
SECONDARY_METHODS = ("reclag", *BASELINES)


def benchmark(cfg: BuildConfig, out: Path, *, methods: tuple[str, ...] = MAIN_METHODS,
              do_ablations: bool, ablation_epochs: int = 3, n_boot: int = 200,
              ood_limit: int | None = None, knn_subset: int | None = 20000,
              progress: bool = True) -> dict:
    """One config's benchmark (its plots written to ``out``) as a dict for report.json."""
    tag = cfg.name
    if not (cfg.workdir / "calibration.json").exists():
        raise RuntimeError(f"{cfg.workdir} holds no calibrated model: build it first "
                           "(hopgate-export build, or hopgate-export openset for an open-set "
                           "config)")
    sets = Sets(cfg)
    log(f"[{tag}] features (cached under {cache_path(cfg).parent})")
    cache = build_cache(cfg, sets, ood_limit, progress)
    model, calib = load_model(cfg)
    d = cache["train"]["phi"].shape[1]
    opts = {"he_beta": 0.2 if d <= 256 else 0.01, "knn_k": 50, "knn_subset": knn_subset,
            "vim_dim": d // 2, "react_percentile": 90.0, "seed": cfg.seed}
    log(f"[{tag}] {len(methods)} methods on the correctly classified train features (D={d})")
    scores = score_methods(list(methods), Options(memory=cfg.memory, head=model.head, **opts),
                           cache, progress)
    tbl = table({k: {"test": v["test"], "ood": v["ood"]} for k, v in scores.items()}, n_boot,
                cfg.seed)
    tau = calib["threshold"]
    rl = scores[RECLAG]
    result = {
        "config": cfg.name, "backbone": cfg.backbone.name, "feature_dim": d,
        "memory": cfg.memory.model_dump(), "baseline_options": opts,
        "sizes": {"train_correct": len(correct_train(cache)[1]), "holdout": len(rl["holdout"]),
                  "test": len(rl["test"]), **{k: len(v) for k, v in rl["ood"].items()}},
        "test_accuracy": float((cache["test"]["logits"].argmax(1).numpy()
                                == cache["test_labels"]).mean()),
        "calibration": _calibration(rl, tau, calib["target_tpr"]),
        "table": tbl, "extract_seconds": cache.get("extract_seconds"),
        "encodings": served_table(cfg, model, calib, sets.test),  # as clients send them
    }
    if do_ablations:
        log(f"[{tag}] ablations ({ablation_epochs} fitting epochs each, from cached features)")
        result["ablation_epochs"] = ablation_epochs
        result["ablations"] = ablations(cfg.memory, cache, ablation_epochs, cfg.seed, progress)
    images = Images(sets.train.images, sets.test.images, sets.ood(ood_limit))
    result["plots"] = plots(out, tag, scores, tau, model.head, cache, images)
    return result


def _calibration(rl: dict, tau: float, target_tpr: float) -> dict:
    test_tpr = accepted_share(rl["test"], tau)
    return {"threshold": tau, "target_tpr": target_tpr,
            "holdout_tpr": accepted_share(rl["holdout"], tau), "test_tpr": test_tpr,
            "gap_points": 100 * abs(test_tpr - target_tpr),
            "ood_flagged": {k: 1 - accepted_share(v, tau) for k, v in rl["ood"].items()}}


def run_report(cfg: BuildConfig, out: str | Path, extra: list[BuildConfig] = (), *,
               command: str = "", n_boot: int = 200, ablation_epochs: int = 3,
               progress: bool = True) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    report = {"hopgate_version": __version__, "commit": commit(), "machine": machine(),
              "command": command, "benchmarks": {}}
    report["benchmarks"][cfg.name] = benchmark(
        cfg, out, do_ablations=True, n_boot=n_boot, ablation_epochs=ablation_epochs,
        progress=progress)
    _write(report, out, t0)
    for c in extra:  # written after each, so a slow secondary benchmark never loses the rest
        small = c.backbone.name != "small_resnet"
        report["benchmarks"][c.name] = benchmark(c, out, methods=SECONDARY_METHODS,
                                                 do_ablations=False, n_boot=n_boot,
                                                 ood_limit=500 if small else None,
                                                 progress=progress)
        _write(report, out, t0)
    return report


def _write(report: dict, out: Path, t0: float) -> None:
    write(report, out, t0)
    log(f"report written to {out} in {report['seconds']}s")
