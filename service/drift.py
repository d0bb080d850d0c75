"""Drift of the served scores against the bundle's calibration table.

The bundle carries ``score_quantiles``: an evenly spaced quantile table of its ID calibration
scores, i.e. the score distribution the gate was calibrated on. ``Drift`` keeps the last
``window`` served scores and, every ``every`` new scores (not per image: a sort of the window
costs ~50 us), compares them with that table:

  * PSI (population stability index) over the table's deciles: ten bins that each hold 10 %
    of the calibration scores, plus the mass below its minimum and above its maximum (where
    OOD scores land). PSI = sum over bins of (served - expected) * ln(served / expected),
    empty bins floored at 0.5 / window. Rule of thumb: < 0.1 stable, > 0.25 a real shift.
  * KS: the one-sample Kolmogorov-Smirnov statistic, the largest gap between the window's
    empirical CDF and the table's CDF (interpolated between quantiles). Its noise on an
    unchanged distribution is about 0.87 / sqrt(window) (0.028 at 1,000).

Both are NaN until ``min_count`` scores have been seen (an alert on NaN never fires).
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

BINS = 10


class Drift:
    def __init__(self, reference: list[float], window: int = 1000, every: int = 50,
                 min_count: int = 100):
        self.scores: deque[float] = deque(maxlen=window)
        self.every, self.min_count = every, max(1, min(min_count, window))
        self.load(reference)

    def load(self, reference: list[float]) -> None:
        """Compare with this calibration table from now on (a new bundle): the window and the
        statistics start afresh."""
        ref = np.sort(np.asarray(reference, np.float64))
        if ref.size < 2:
            raise ValueError("the calibration table needs at least two quantiles")
        self.ref = ref
        self.levels = np.linspace(0.0, 1.0, ref.size)  # the table's CDF at its entries
        inner = ref[np.round(np.linspace(0, ref.size - 1, BINS + 1)).astype(int)]
        # bins: below the table, its deciles, above it; expected mass from the table's CDF
        self.edges = np.unique(inner)
        cdf = self.cdf(self.edges)
        self.expected = np.diff(np.concatenate([[0.0], cdf, [1.0]]))
        self.scores.clear()
        self.pending = 0
        self.psi, self.ks = math.nan, math.nan

    def cdf(self, x: np.ndarray) -> np.ndarray:
        """The calibration CDF: 0 below the table, 1 above, interpolated within it."""
        return np.interp(x, self.ref, self.levels, left=0.0, right=1.0)

    def observe(self, score: float) -> bool:
        """Add one served score; True when the statistics were recomputed."""
        self.scores.append(score)
        self.pending += 1
        if self.pending < self.every or len(self.scores) < self.min_count:
            return False
        self.pending = 0
        self.update()
        return True

    def update(self) -> None:
        x = np.sort(np.fromiter(self.scores, np.float64, len(self.scores)))
        n = x.size
        if n == 0:
            return
        # served mass per bin: (-inf, e0), [e0, e1), ..., [e_last, inf) with the table's edges
        counts = np.diff(np.concatenate([[0], np.searchsorted(x, self.edges, "left"), [n]]))
        served = np.maximum(counts / n, 0.5 / n)
        expected = np.maximum(self.expected, 0.5 / n)  # the two outer bins expect ~0
        self.psi = float(np.sum((served - expected) * np.log(served / expected)))
        f = self.cdf(x)
        above = np.arange(1, n + 1) / n - f  # the empirical CDF just after each point
        below = f - np.arange(0, n) / n  # ... and just before it
        self.ks = float(max(above.max(), below.max()))
