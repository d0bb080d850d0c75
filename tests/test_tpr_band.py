"""tpr_band's bounds hold: simulated calibrations land outside at most as often as promised."""

import numpy as np
import pytest
from tpr_band import accepted_band, holdout_accepted

from hopgate.model_export.calibrate import accepted_share, threshold_at_tpr


@pytest.mark.parametrize(("n", "m", "target"), [(54, 150, 0.95), (300, 400, 0.95), (40, 60, 0.9)])
def test_the_band_holds_as_often_as_it_promises(n, m, target):
    rng, runs, promised = np.random.default_rng(0), 4000, 0.05
    lo, hi = accepted_band(n, m, target, false_failure=promised)
    outside = 0
    for _ in range(runs):  # any continuous score distribution: the bound is distribution-free
        tau = threshold_at_tpr(rng.standard_exponential(n), target)
        share = accepted_share(rng.standard_exponential(m), tau)
        outside += not lo <= share <= hi
    # binomial: 4,000 runs at a rate <= 5 % exceed 6.2 % with probability < 1e-4
    assert outside / runs <= 0.062, (outside, lo, hi)
    assert lo < target < hi  # and it is not vacuous
    assert holdout_accepted(n, target) >= target


def test_the_band_narrows_with_the_sample():
    wide, narrow = accepted_band(54, 150, 0.95), accepted_band(6000, 10_000, 0.95)
    assert wide[0] < 0.8 and 0.93 < narrow[0] < 0.95 < narrow[1] < 0.97


def test_the_threshold_is_the_order_statistic_the_band_assumes():
    """Exact, on integers: tau halfway between the k-th and (k+1)-th smallest score."""
    scores = np.random.default_rng(1).permutation(np.arange(1.0, 55.0))  # 54, like test_byo
    tau = threshold_at_tpr(scores, 0.95)  # k = floor(0.05 * 54) = 2
    assert tau == 2.5 and accepted_share(scores, tau) == holdout_accepted(54, 0.95) == 52 / 54
    assert threshold_at_tpr(scores, 0.999) == 0.5  # k = 0: below every score, all accepted
