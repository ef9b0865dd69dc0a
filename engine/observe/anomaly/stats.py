"""The statistics the rules share: tail probabilities, intervals, robust deviations, rank trends."""

from __future__ import annotations

import bisect
import math
import statistics
from collections.abc import Iterable

MAD_TO_SIGMA = 1.4826
"""The median absolute deviation of a normal sample times this is its standard deviation."""


def mann_kendall_sd(n: int) -> float:
    """The standard deviation of the Mann-Kendall sum of ``n`` values without trend (or ties)."""
    return math.sqrt(n * (n - 1) * (2 * n + 5) / 18)


def count_between(events: list[tuple[int, float]], first: int, last: int) -> int:
    """How many of ``events`` (sorted by cycle) fall in cycles ``first``..``last``."""
    lo = bisect.bisect_left(events, (first, -math.inf))
    return bisect.bisect_right(events, (last, math.inf)) - lo


def beta_binomial_cdf(k: int, n: int, a: float, b: float) -> float:
    """P(X <= k) for X ~ BetaBinomial(n, a, b): successes in ``n`` trials at a rate known as Beta(a, b)."""
    log_norm = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) - math.lgamma(a + b + n)
    total = 0.0
    for i in range(k + 1):
        total += math.exp(
            math.lgamma(n + 1)
            - math.lgamma(i + 1)
            - math.lgamma(n - i + 1)
            + math.lgamma(a + i)
            + math.lgamma(b + n - i)
            + log_norm
        )
    return min(total, 1.0)


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
    """P(X >= k) for X ~ Binomial(n, p), exact by summing terms until they stop counting."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    log_p, log_q = math.log(p), math.log1p(-p)
    log_term = math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * log_p + (n - k) * log_q
    total = 0.0
    term = math.exp(log_term)
    i = k
    while i <= n:
        total += term
        if term < 1e-15 * total and i > n * p:
            break
        term *= (n - i) / (i + 1) * p / (1 - p)
        i += 1
    return min(total, 1.0)
