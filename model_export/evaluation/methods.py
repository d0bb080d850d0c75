"""The benchmark's methods: fit the registry's detectors on the cached training features, score
every cached set, and tabulate the metrics (with bootstrap intervals) per method and OOD set."""

from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from ..data.feature_cache import correct_train, features, linear
from .detector import Detector
from .detectors import BundleHead, Options, fit_detectors
from .metrics import bootstrap_ci, ood_metrics

METRICS = ["auroc", "aupr_in", "aupr_out", "fpr95_ood_accepted", "fpr95_id_rejected",
           "detection_error"]


def set_scores(det: Detector, cache: dict, holdout: bool = False) -> dict:
    """{"test": scores, "ood": {set: scores}} (and "holdout" when asked) of one detector."""
    s = lambda d: det.score(features(d))  # noqa: E731
    out = {"test": s(cache["test"]), "ood": {k: s(v) for k, v in cache["ood"].items()}}
    if holdout:
        out = {"holdout": s(cache["holdout"]), **out}
    return out


def score_methods(names: list[str], opts: Options, cache: dict,
                  progress: bool = True) -> dict[str, dict]:
    """label -> set scores for each registry name, fitted on the correctly classified train
    features. RecLag heads also score the hold-out (calibration is checked on it)."""
    train, labels = correct_train(cache)
    dets = fit_detectors(names, opts, train, labels, linear(cache))
    return {label: set_scores(det, cache, holdout=isinstance(det, BundleHead))
            for label, det in tqdm(dets.items(), desc="methods", leave=False,
                                   disable=not progress)}


def table(scores: dict, n_boot: int, seed: int) -> dict:
    """method -> set -> metrics (+ bootstrap CIs); and per method the mean over the sets."""
    out = {}
    for method, s in tqdm(scores.items(), desc="metrics + bootstrap", leave=False):
        rows = {}
        for k, o in s["ood"].items():
            rows[k] = {**ood_metrics(s["test"], o), "n": len(o),
                       **(bootstrap_ci(s["test"], o, n_boot, seed) if n_boot else {})}
        far = [k for k in rows if not k.startswith("near")]
        rows["mean far-OOD"] = {m: float(np.mean([rows[k][m] for k in far])) for m in METRICS}
        out[method] = rows
    return out


def far_summary(s: dict) -> dict:
    """Mean AUROC / FPR95 over the far-OOD sets, and AUROC per set, of one method's scores."""
    ms = {k: ood_metrics(s["test"], o) for k, o in s["ood"].items() if not k.startswith("near")}
    return {"mean_auroc": float(np.mean([v["auroc"] for v in ms.values()])),
            "mean_fpr95": float(np.mean([v["fpr95_ood_accepted"] for v in ms.values()])),
            "auroc": {k: v["auroc"] for k, v in ms.items()}}
