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
    ``id_scores`` must be the deciding score (``RecLagHead.score``), the one the flag uses.
    """
    s = np.sort(np.asarray(id_scores, dtype=np.float64))
    k = min(max(int(math.floor((1.0 - target_tpr) * len(s))), 0), len(s) - 1)
    below = s[k - 1] if k > 0 else s[0] - 1.0
    # a float32 value, as the graph holds it: score < tau means the same in float32 and 64
    return float(np.float32((below + s[k]) / 2.0))


def quantile_table(id_scores: np.ndarray, size: int = 1001) -> list[float]:
    """The sorted ID scores, or ``size`` evenly spaced quantiles of them when there are more."""
    s = np.sort(np.asarray(id_scores, dtype=np.float64))
    if len(s) > size:
        s = np.quantile(s, np.linspace(0.0, 1.0, size))
    return [float(v) for v in s]


def accepted_share(scores: np.ndarray, tau: float) -> float:
    """Share of images the gate lets through (score >= tau): the TPR when they are ID."""
    return float(np.mean(np.asarray(scores) >= tau))


class VerdictError(RuntimeError):
    """The bundle would give two verdicts: its flag disagrees with score < threshold, or the
    calibrated threshold does not exceed the clamp floor (the clamp would override it)."""


def check_floor(tau: float, floor: float) -> None:
    """Raise unless the calibrated tau exceeds the clamp floor max_c lse(b_c) (+ eps)."""
    if not tau > floor:
        raise VerdictError(
            f"calibrated threshold {tau:.4f} <= clamp floor {floor:.4f} (lse of the bank bias): "
            "the clamp would override the calibration and the origin would not attract at the "
            "target TPR; raise memory.radius (gaussian) or use fewer memories")


def check_one_verdict(is_ood: np.ndarray, scores: np.ndarray, tau: float, where: str) -> int:
    """Raise unless is_ood == (score < tau) on every row; returns the row count checked."""
    is_ood, scores = np.asarray(is_ood, bool), np.asarray(scores, np.float32)
    bad = np.flatnonzero(is_ood != (scores < np.float32(tau)))
    if len(bad):
        i = int(bad[0])
        raise VerdictError(
            f"{where}: the flag disagrees with score < threshold on {len(bad)} of {len(scores)} "
            f"images (first: image {i}, score {float(scores[i]):.4f}, threshold {tau:.4f}, "
            f"is_ood {bool(is_ood[i])})")
    return len(scores)
