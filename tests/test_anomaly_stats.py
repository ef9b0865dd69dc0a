"""The detector's statistics on scipy/numpy (engine.observe.anomaly.stats, .trend), each checked
against the hand-written function it replaced (copied here as the reference) on many inputs."""

from __future__ import annotations

import itertools
import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import pytest

from engine.observe.anomaly.stats import (
    beta_binomial_cdf,
    binomial_upper_tail,
    mann_kendall_sum,
)
from engine.observe.anomaly.trend import scored_trend, weighted_line

# -- the replaced implementations (engine/observe/anomaly.py at 2fc729b), verbatim but for names ----


def old_binomial_upper_tail(k: int, n: int, p: float) -> float:
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


def old_beta_binomial_cdf(k: int, n: int, a: float, b: float) -> float:
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


def old_mann_kendall_sum(losses: list[float]) -> int:
    total = 0
    for i, a in enumerate(losses):
        for b in losses[i + 1 :]:
            total += (b < a) - (b > a)
    return total


_MAD_TO_SIGMA = 1.4826
_GOLDEN = (math.sqrt(5) - 1) / 2


@dataclass(frozen=True)
class OldTrend:
    floor: float
    mean: float
    slope: float
    tbar: float
    sxx: float
    rss: float
    weight: float
    w2: float
    w2d: float
    w2dd: float

    def log_height(self, cycle: float) -> float:
        return self.mean + self.slope * (cycle - self.tbar)


def old_weighted_design(ts: list[float], ws: list[float]) -> OldTrend | None:
    weight = sum(ws)
    tbar = sum(w * t for w, t in zip(ws, ts, strict=True)) / weight
    dt = [t - tbar for t in ts]
    sxx = sum(w * d * d for w, d in zip(ws, dt, strict=True))
    if sxx <= 0:
        return None
    w2 = [w * w for w in ws]
    return OldTrend(
        floor=0.0,
        mean=0.0,
        slope=0.0,
        tbar=tbar,
        sxx=sxx,
        rss=0.0,
        weight=weight,
        w2=sum(w2),
        w2d=sum(v * d for v, d in zip(w2, dt, strict=True)),
        w2dd=sum(v * d * d for v, d in zip(w2, dt, strict=True)),
    )


def old_weighted_line(
    design: OldTrend, ts: list[float], ws: list[float], ys: list[float], floor: float
) -> OldTrend:
    dts = [t - design.tbar for t in ts]
    wys = [w * y for w, y in zip(ws, ys, strict=True)]
    mean = sum(wys) / design.weight
    slope = sum(d * v for d, v in zip(dts, wys, strict=True)) / design.sxx
    rss = sum(w * (y - mean - slope * d) ** 2 for w, d, y in zip(ws, dts, ys, strict=True))
    return replace(design, floor=floor, mean=mean, slope=slope, rss=max(rss, 1e-12 * design.weight))


def old_fit_trend(
    points: Sequence[tuple[int, float]],
    *,
    below: float,
    unit: float,
    decades: tuple[float, float],
    trim: float | None = None,
    half_life: float | None = None,
) -> tuple[float, OldTrend] | None:
    """The old profile-likelihood fit (half-decade grid, then 6 golden-section steps); returns
    (log-likelihood, trend) so that the new search can be compared on what it maximises."""
    if unit <= 0 or len(points) < 3:
        return None
    ts = [float(t) for t, _ in points]
    losses = [b for _, b in points]
    weights = [1.0] * len(ts) if half_life is None else [0.5 ** ((ts[-1] - t) / half_life) for t in ts]
    design = old_weighted_design(ts, weights)
    if design is None:
        return None

    def fit(g: float) -> tuple[float, OldTrend] | None:
        floor = below - unit * 10.0**g
        if floor >= below:
            return None
        ys = [math.log(b - floor) for b in losses]
        trend: OldTrend | None = old_weighted_line(design, ts, weights, ys, floor)
        kept_ts, kept_ws, kept_ys = ts, weights, ys
        if trim is not None:
            assert trend is not None
            residuals = [y - trend.log_height(t) for t, y in zip(ts, ys, strict=True)]
            mad = _MAD_TO_SIGMA * statistics.median(abs(r) for r in residuals)
            keep = [i for i, r in enumerate(residuals) if r < trim * mad] if mad > 0 else []
            if mad > 0 and len(keep) < len(ys):
                if len(keep) < 3:
                    return None
                kept_ts, kept_ws = [ts[i] for i in keep], [weights[i] for i in keep]
                kept_ys = [ys[i] for i in keep]
                kept = old_weighted_design(kept_ts, kept_ws)
                trend = None if kept is None else old_weighted_line(kept, kept_ts, kept_ws, kept_ys, floor)
        if trend is None:
            return None
        jacobian = sum(w * y for w, y in zip(kept_ws, kept_ys, strict=True))
        return -0.5 * trend.weight * math.log(trend.rss / trend.weight) - jacobian, trend

    grid = [decades[0] + k / 2 for k in range(int(2 * (decades[1] - decades[0])) + 1)]
    fits = [fit(g) for g in grid]
    scored = [(f[0], i) for i, f in enumerate(fits) if f is not None]
    if not scored:
        return None
    _, i = max(scored)
    chosen = fits[i]
    assert chosen is not None
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    a, b = hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo)
    fa, fb = fit(a), fit(b)
    for _ in range(6):
        if fa is not None and (fb is None or fa[0] >= fb[0]):
            hi, b, fb = b, a, fa
            a = hi - _GOLDEN * (hi - lo)
            fa = fit(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + _GOLDEN * (hi - lo)
            fb = fit(b)
    for candidate in (fa, fb):
        if candidate is not None and candidate[0] > chosen[0]:
            chosen = candidate
    return chosen


# -- the comparisons ---------------------------------------------------------------------------------


def test_binomial_upper_tail_matches_the_old_sum() -> None:
    """Against the old sum where the detector uses it (a failure rate's upper bound: p <= 0.5), and
    against the exact sum everywhere: the old one underflowed to 0 for p near 1 (e.g. k=52, n=258,
    p=0.9997), where the tail is 1."""
    rng = random.Random(1)
    cases = [(0, 5, 0.3), (3, 8, 0.05), (5, 5, 0.5), (9, 32, 0.02), (2, 3, 0.0), (4, 3, 0.2), (1, 1, 1.0)]
    for _ in range(3000):
        n = rng.randint(1, 300)
        cases.append((rng.randint(0, n + 1), n, rng.choice([rng.random(), 10 ** rng.uniform(-6, 0)])))
    for k, n, p in cases:
        new = binomial_upper_tail(k, n, p)
        exact = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(max(k, 0), n + 1))
        if exact > 1e-100:  # the float sum of terms is not exact deep in the tail
            assert new == pytest.approx(min(exact, 1.0), rel=1e-9), (k, n, p)
        if p <= 0.5:
            assert new == pytest.approx(old_binomial_upper_tail(k, n, p), rel=1e-9, abs=1e-300), (k, n, p)


def test_beta_binomial_cdf_matches_the_old_sum() -> None:
    rng = random.Random(2)
    for _ in range(3000):
        n = rng.randint(1, 40)
        k = rng.randint(0, n)
        a, b = rng.uniform(0.5, 40.5), rng.uniform(0.5, 60.5)
        new, old = beta_binomial_cdf(k, n, a, b), old_beta_binomial_cdf(k, n, a, b)
        assert new == pytest.approx(old, rel=1e-9, abs=1e-300), (k, n, a, b)


def test_mann_kendall_sum_matches_the_old_pair_count() -> None:
    rng = random.Random(3)
    for _ in range(500):
        n = rng.randint(2, 40)
        # Rounded values make ties, which count 0 in both.
        values = [round(rng.gauss(-0.05 * i, 1.0), rng.choice([0, 1, 6])) for i in range(n)]
        assert mann_kendall_sum(values) == old_mann_kendall_sum(values)


def _convergence(rng: random.Random, n: int) -> list[tuple[int, float]]:
    """A job's batch bests: ``floor + A exp(-r t)`` with log-normal noise, the odd bad batch."""
    floor, scale, rate, noise = (
        rng.uniform(-50, 50),
        10 ** rng.uniform(-2, 3),
        rng.uniform(0, 0.5),
        rng.uniform(0.05, 0.9),
    )
    start = rng.randint(1, 50)
    points = []
    for t in range(start, start + n):
        bad = rng.uniform(2, 6) if rng.random() < 0.03 else 1.0
        points.append((t, floor + scale * math.exp(-rate * t + rng.gauss(0, noise)) * bad))
    return points


def test_weighted_line_matches_the_old_sums() -> None:
    rng = random.Random(4)
    for _ in range(500):
        points = _convergence(rng, rng.randint(3, 40))
        ts = [float(t) for t, _ in points]
        half_life = rng.choice([None, 16.0, 4.0])
        ws = [1.0] * len(ts) if half_life is None else [0.5 ** ((ts[-1] - t) / half_life) for t in ts]
        floor = min(b for _, b in points) - rng.uniform(0.01, 10)
        ys = [math.log(b - floor) for _, b in points]
        design = old_weighted_design(ts, ws)
        assert design is not None
        old = old_weighted_line(design, ts, ws, ys, floor)
        new = weighted_line(np.array(ts), np.array(ws), np.array(ys), floor)
        assert new is not None
        for name in ("mean", "slope", "tbar", "sxx", "rss", "weight", "w2", "w2d", "w2dd"):
            assert getattr(new, name) == pytest.approx(getattr(old, name), rel=1e-9, abs=1e-9), name
    assert weighted_line(np.array([3.0, 3.0]), np.ones(2), np.zeros(2), 0.0) is None


@pytest.mark.parametrize(
    ("settings"),
    [
        {"decades": (-3.0, 3.0), "half_life": 16.0},  # the regression trend
        {"decades": (-1.5, 4.5), "trim": 3.0},  # a stall's floor
    ],
    ids=["regression-trend", "stall-floor"],
)
def test_fit_trend_finds_the_old_optimum_or_a_better_one(settings: dict) -> None:
    """The floor search (half-decade grid in one numpy pass, then scipy's bounded Brent
    instead of 6 golden-section steps) maximises the same profile likelihood: it reaches the old search's
    maximum within 1e-3 (relative; Brent finds a higher one now and then), and its line
    at its floor is the old least squares' at that floor."""
    rng = random.Random(5)
    compared = 0
    for _ in range(300):
        points = _convergence(rng, rng.randint(8, 60))
        losses = [b for _, b in points]
        low = min(losses)
        if "trim" in settings:
            unit = statistics.median(abs(b - a) for a, b in itertools.pairwise(losses))
        else:
            unit = statistics.median(losses) - low
        old = old_fit_trend(points, below=low, unit=unit, **settings)
        new = scored_trend(points, below=low, unit=unit, **settings)
        assert (old is None) == (new is None)
        if old is None or new is None:
            continue
        compared += 1
        (old_likelihood, _), (new_likelihood, new_trend) = old, new
        assert new_likelihood >= old_likelihood - 1e-3 * max(1.0, abs(old_likelihood))
        if "trim" not in settings:  # the new line at its floor is the old least squares at that floor
            ts = [float(t) for t, _ in points]
            ws = [0.5 ** ((ts[-1] - t) / 16.0) for t in ts]
            design = old_weighted_design(ts, ws)
            assert design is not None
            ys = [math.log(b - new_trend.floor) for b in losses]
            line = old_weighted_line(design, ts, ws, ys, new_trend.floor)
            for name in ("mean", "slope", "rss"):
                assert getattr(new_trend, name) == pytest.approx(getattr(line, name), rel=1e-7, abs=1e-9)
    assert compared > 250
