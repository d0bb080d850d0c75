"""How far a calibrated gate's acceptance rate on unseen ID images may honestly stray from target.

calibrate.threshold_at_tpr puts tau between the k-th and (k+1)-th smallest of n held-out ID
scores, k = floor((1 - target) n). Whatever the score distribution F (continuous, and the unseen
images drawn like the calibration ones), F(order statistic j) ~ Beta(j, n + 1 - j), so the gate's
true acceptance p = 1 - F(tau) lies between a Beta(n - k, k + 1) and a Beta(n - k + 1, k)
variable, and the count accepted among m unseen images is Binomial(m, p): a beta-binomial.
``accepted_band`` returns the share interval this count lands in with probability at least
1 - ``false_failure`` (half in each tail), on any machine: no float rounding, training result
or seed enters it. So a test using it fails by chance at most once in 1/false_failure runs, and
fails for certain when the threshold is not calibrated (skipped, flipped, another target).

Small flows give wide bands (54 calibration images: about 0.73 .. 1.0 on 150 unseen images);
such tests say so and check exactly what the calibration does on its own hold-out instead.
"""

from __future__ import annotations

import math

from scipy.stats import betabinom

FALSE_FAILURE = 1e-4  # chance that a correct gate fails one such check


# Calibration scores images through the client path (JPEG, resizes: data/clientpath.py), the
# tests measure raw pixels, which score a little higher: not the same distribution, so the band
# widens by this much. Measured on the quick build: raw pixels accepted 0.951-0.954 with the
# client path, 0.960-0.963 without it (tests/test_clientpath.py), so 0.01 covers the whole gap.
CLIENT_PATH_SHIFT = 0.01


def accepted_band(n_calib: int, m: int, target_tpr: float, false_failure: float = FALSE_FAILURE,
                  shift: float = 0.0) -> tuple[float, float]:
    """(lo, hi) for the share of m unseen ID images accepted by a tau calibrated on n_calib;
    ``shift``: a stated allowance for unseen images drawn unlike the calibration ones."""
    k = min(max(math.floor((1.0 - target_tpr) * n_calib), 0), n_calib - 1)
    tail = false_failure / 2
    lo = betabinom(m, n_calib - k, k + 1).ppf(tail)
    # k = 0: tau sits below every calibration score, p can reach 1
    hi = m if k == 0 else betabinom(m, n_calib - k + 1, k).isf(tail)
    return max(float(lo) / m - shift, 0.0), min(float(hi) / m + shift, 1.0)


def holdout_accepted(n_calib: int, target_tpr: float) -> float:
    """The share of its own n_calib hold-out images a calibrated tau accepts: exactly (n-k)/n."""
    k = min(max(math.floor((1.0 - target_tpr) * n_calib), 0), n_calib - 1)
    return (n_calib - k) / n_calib
