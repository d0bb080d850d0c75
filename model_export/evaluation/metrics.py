"""OOD metrics with ID as the positive class (higher score = more ID), on scikit-learn.

FPR95 comes in two conventions, named apart:
  * ``fpr95_ood_accepted``: share of OOD accepted when the threshold keeps 95 % of ID
    (the RecLag paper, most OOD papers);
  * ``fpr95_id_rejected``: share of ID rejected when the threshold catches 95 % of OOD
    (OpenOOD, which treats OOD as the positive class).
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve


def _labels(id_scores, ood_scores):
    s = np.concatenate([id_scores, ood_scores]).astype(np.float64)
    y = np.concatenate([np.ones(len(id_scores)), np.zeros(len(ood_scores))])
    return s, y


def fpr_at_tpr(id_scores, ood_scores, tpr: float = 0.95) -> float:
    """OOD accepted at the first ROC point whose TPR reaches ``tpr`` (ID positive)."""
    s, y = _labels(id_scores, ood_scores)
    fpr, tp, _ = roc_curve(y, s)
    return float(fpr[np.searchsorted(tp, tpr, side="left")])


def ood_metrics(id_scores, ood_scores) -> dict[str, float]:
    s, y = _labels(id_scores, ood_scores)
    fpr, tpr, _ = roc_curve(y, s)
    return {
        "auroc": float(roc_auc_score(y, s)),
        "aupr_in": float(average_precision_score(y, s)),
        "aupr_out": float(average_precision_score(1 - y, -s)),
        "fpr95_ood_accepted": fpr_at_tpr(id_scores, ood_scores, 0.95),
        # swap roles: OOD positive with score -s; "FPR" is then the ID rejected
        "fpr95_id_rejected": fpr_at_tpr(-np.asarray(ood_scores), -np.asarray(id_scores), 0.95),
        "detection_error": float(np.min(0.5 * (1 - tpr) + 0.5 * fpr)),
    }


def bootstrap_ci(id_scores, ood_scores, n: int = 200, seed: int = 0,
                 level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of AUROC and FPR95 (paper convention), resampling the ID
    and the OOD scores independently with replacement."""
    rng = np.random.default_rng(seed)
    i, o = np.asarray(id_scores), np.asarray(ood_scores)
    au, fp = [], []
    for _ in range(n):
        a, b = i[rng.integers(0, len(i), len(i))], o[rng.integers(0, len(o), len(o))]
        s, y = _labels(a, b)
        au.append(roc_auc_score(y, s))
        fp.append(fpr_at_tpr(a, b, 0.95))
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    return {"auroc_ci": tuple(float(v) for v in np.percentile(au, q)),
            "fpr95_ood_accepted_ci": tuple(float(v) for v in np.percentile(fp, q))}


LOOKS_LIKE_ID = 0.6  # a built-in OOD set scoring below this AUROC is the user's own domain


def headline(id_scores: np.ndarray, ood: dict[str, np.ndarray], builtin: set[str]
             ) -> tuple[float | None, dict[str, float], list[str]]:
    """(AUROC of ID against the OOD sets pooled, per set, the built-in sets left out): a
    built-in set with AUROC < LOOKS_LIKE_ID scores like the user's own data (handwritten
    digits for a digits classifier) and is left out of the pooled figure; sets the user
    gave (not in ``builtin``) always count. None when no set is left."""
    per = {k: round(ood_metrics(id_scores, s)["auroc"], 4) for k, s in ood.items()}
    out = [k for k, v in per.items() if k in builtin and v < LOOKS_LIKE_ID]
    kept = [s for k, s in ood.items() if k not in out]
    auroc = ood_metrics(id_scores, np.concatenate(kept))["auroc"] if kept else None
    return auroc, per, out
