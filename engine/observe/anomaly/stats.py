"""The statistics the rules share: tail probabilities, intervals, robust deviations, rank trends."""

from __future__ import annotations

import bisect
import math
import statistics
from collections.abc import Iterable, Sequence

import numpy as np

MAD_TO_SIGMA = 1.4826
"""The median absolute deviation of a normal sample times this is its standard deviation."""


def mann_kendall_sum(values: Sequence[float]) -> int:
    """Kendall's S of ``values`` against their order, counted so that a downward trend is positive:
    pairs that fall minus pairs that rise."""
    x = np.asarray(values, dtype=float)
    upper = np.triu_indices(len(x), 1)
    return int(np.sign(np.subtract.outer(x, x))[upper].sum())


def mann_kendall_sd(n: int) -> float:
    """The standard deviation of the Mann-Kendall sum of ``n`` values without trend (or ties).

    Kendall's variance of S; scipy computes it inside ``kendalltau`` but does not expose it."""
    return math.sqrt(n * (n - 1) * (2 * n + 5) / 18)


def count_between(events: list[tuple[int, float]], first: int, last: int) -> int:
    """How many of ``events`` (sorted by cycle) fall in cycles ``first``..``last``."""
    lo = bisect.bisect_left(events, (first, -math.inf))
    return bisect.bisect_right(events, (last, math.inf)) - lo


def beta_binomial_cdf(k: int, n: int, a: float, b: float) -> float:
    """P(X <= k) for X ~ BetaBinomial(n, a, b): successes in ``n`` trials at a rate known as Beta(a, b).

    The pmf, ``C(n, i) B(i + a, n - i + b) / B(a, b)`` with ``C(n, i) = 1 / ((n + 1) B(n - i + 1, i + 1))``,
    summed with scipy.special (``scipy.stats.betabinom.cdf`` is the same sum at ~100x the cost a
    call, and this runs every cycle)."""
    i = np.arange(k + 1)
    from scipy import special  # here, not at the top: scipy costs the CLI's start-up ~0.5 s

    log_pmf = special.betaln(i + a, n - i + b) - special.betaln(n - i + 1, i + 1) - special.betaln(a, b)
    return min(float(np.exp(log_pmf).sum()) / (n + 1), 1.0)


def wilson_bounds(successes: float, trials: float, z: float = 1.645) -> tuple[float, float]:
    """The Wilson score interval of a success rate (90% by default), kept inside [1e-6, 1]."""
    p = successes / trials
    centre = p + z * z / (2 * trials)
    margin = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    scale = 1 + z * z / trials
    return max((centre - margin) / scale, 1e-6), min((centre + margin) / scale, 1.0)


def robust_z(value: float, sample: Iterable[float], sigma_floor: float) -> tuple[float, float]:
    """(median of ``sample``, robust z-score of ``value`` against it, deviation at least ``sigma_floor``)."""
    values = list(sample)
    median = statistics.median(values)
    sigma = max(MAD_TO_SIGMA * statistics.median(abs(x - median) for x in values), sigma_floor)
    return median, (value - median) / sigma


def binomial_upper_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    from scipy import special

    return 1.0 if k <= 0 else float(special.bdtrc(k - 1, n, p))
