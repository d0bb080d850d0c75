"""A per-request threshold: the bundle's calibrated log lambda, overridden for one request by a
target TPR or a log lambda, and fed to the graph's ``log_lambda`` input (hopgate/bundle.py).

Where it comes from: /score takes ``?target_tpr=`` or ``?log_lambda=`` (or the headers
``X-Hopgate-Target-TPR`` / ``X-Hopgate-Log-Lambda``), V2 infer the request ``parameters``
of the same names. One of the two at most; the answer's ``threshold`` is the one applied.

Bounds, from the bundle's calibration table (``score_quantiles``: evenly spaced quantiles of
the held-out ID scores, ``calibration_size`` of them): log lambda within [lowest, highest
calibration score], target TPR within [1/m, 1 - 1/m] (m = calibration_size; a finer TPR is
not measured by the table). A target TPR is turned into log lambda by interpolating the
table at 1 - TPR: the share of calibration scores at or above it is the TPR. Anything
outside is a 400 naming the range.

Why through the graph and not ``score < tau`` outside it: the graph puts a flagged state at
the origin (no memories, energy -tau/beta) before the service sees it, so a lower tau applied
outside would answer "ID" with no memories. The batcher therefore never mixes thresholds in
one batch (batcher.py: a batch takes the items of its first item's threshold).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from hopgate.bundle import INPUT_LOG_LAMBDA, BundleMeta

from .errors import ClientError

TARGET_TPR, LOG_LAMBDA = "target_tpr", INPUT_LOG_LAMBDA
HEADERS = {TARGET_TPR: "x-hopgate-target-tpr", LOG_LAMBDA: "x-hopgate-log-lambda"}


def tau_at_tpr(meta: BundleMeta, tpr: float) -> float:
    """log lambda that keeps ``tpr`` of the calibration scores (the table at 1 - tpr)."""
    q = meta.score_quantiles
    return float(np.interp(1.0 - tpr, np.linspace(0.0, 1.0, len(q)), q))


def tpr_range(meta: BundleMeta) -> tuple[float, float]:
    step = 1.0 / meta.calibration_size
    return step, 1.0 - step


def log_lambda_range(meta: BundleMeta) -> tuple[float, float]:
    q = meta.score_quantiles
    return q[0], q[-1]


def _number(name: str, raw: object) -> float:
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise ClientError(400, f"{name} must be a number")
    try:
        value = float(raw)
    except ValueError:
        raise ClientError(400, f"{name} must be a number, got {str(raw)[:32]!r}") from None
    if not math.isfinite(value):
        raise ClientError(400, f"{name} must be a finite number")
    return value


def resolve(meta: BundleMeta, overridable: bool, target_tpr: object = None,
            log_lambda: object = None) -> float | None:
    """The request's log lambda (float32-exact, as the graph holds it), or None for the
    bundle's own threshold."""
    if target_tpr is None and log_lambda is None:
        return None
    if target_tpr is not None and log_lambda is not None:
        raise ClientError(400, f"give {TARGET_TPR} or {LOG_LAMBDA}, not both")
    if not overridable:
        raise ClientError(400, f"bundle {meta.model_version} has no '{INPUT_LOG_LAMBDA}' "
                               "input: its threshold cannot be overridden")
    if target_tpr is not None:
        tpr = _number(TARGET_TPR, target_tpr)
        lo, hi = tpr_range(meta)
        if not lo <= tpr <= hi:
            raise ClientError(400, f"{TARGET_TPR} {tpr:g} is outside [{lo:.6g}, {hi:.6g}], "
                                   f"what the calibration table of {meta.calibration_size} "
                                   "images supports")
        tau = tau_at_tpr(meta, tpr)
    else:
        tau = _number(LOG_LAMBDA, log_lambda)
        lo, hi = log_lambda_range(meta)
        if not lo <= tau <= hi:
            raise ClientError(400, f"{LOG_LAMBDA} {tau:g} is outside [{lo:.6g}, {hi:.6g}], "
                                   "the calibration scores' range")
    return float(np.float32(tau))


def from_query(meta: BundleMeta, overridable: bool, query: Mapping[str, str],
               headers: Mapping[str, str]) -> float | None:
    """/score: the query parameter, else the header, of each name."""
    given = {k: query.get(k, headers.get(h)) for k, h in HEADERS.items()}
    return resolve(meta, overridable, given[TARGET_TPR], given[LOG_LAMBDA])
