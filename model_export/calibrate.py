"""Calibration: the log-domain threshold at a target TPR and the ID score table for p-values.

Both come from held-out ID images that neither backbone training nor memory fitting saw.
"""

from __future__ import annotations

import math

import numpy as np


def threshold_at_tpr(id_scores: np.ndarray, target_tpr: float) -> float:
    """tau with share(score >= tau) >= target_tpr on the held-out ID scores.

    tau sits halfway between two neighbouring calibration scores, never on one, so float32
    rounding between PyTorch and onnxruntime cannot flip a calibration image's verdict.
    """
    s = np.sort(np.asarray(id_scores, dtype=np.float64))
    k = min(max(int(math.floor((1.0 - target_tpr) * len(s))), 0), len(s) - 1)
    below = s[k - 1] if k > 0 else s[0] - 1.0
    return float((below + s[k]) / 2.0)


def quantile_table(id_scores: np.ndarray, size: int = 1001) -> list[float]:
    """The sorted ID scores, or ``size`` evenly spaced quantiles of them when there are more."""
    s = np.sort(np.asarray(id_scores, dtype=np.float64))
    if len(s) > size:
        s = np.quantile(s, np.linspace(0.0, 1.0, size))
    return [float(v) for v in s]


def accepted_share(scores: np.ndarray, tau: float) -> float:
    """Share of images the gate lets through (score >= tau): the TPR when they are ID."""
    return float(np.mean(np.asarray(scores) >= tau))
