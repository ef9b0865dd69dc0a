"""A job's convergence model, shared by the stall and regression rules: ``log(loss - floor)`` a line
in the cycle with normal noise, the floor found by profile likelihood."""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace

from engine.observe.anomaly.stats import MAD_TO_SIGMA

_GOLDEN = (math.sqrt(5) - 1) / 2
_FLOOR_REFINE_STEPS = 6  # golden-section steps that refine a trend's floor around the best grid step


@dataclass(frozen=True, slots=True)
class Trend:
    """A job's fitted convergence (:func:`fit_trend`): ``log(loss - floor)`` a line in the cycle,
    through ``mean`` at ``tbar`` with ``slope``, leaving a weighted ``rss``. Each loss has a weight
    (1 unless :func:`fit_trend` is given a half-life); ``weight`` is their sum, ``w2`` that of
    their squares, ``w2d`` and ``w2dd`` that of their squares times the cycle's distance from
    ``tbar`` and its square, ``sxx`` the weighted sum of those squared distances."""

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
        """The line's ``log(loss - floor)`` at ``cycle``."""
        return self.mean + self.slope * (cycle - self.tbar)

    def deviation(self, cycle: float) -> float:
        """The deviation of a new loss's log height at ``cycle`` around the line: the prediction's,
        the noise on ``n - 3`` degrees of freedom (the line and the floor; ``n`` the effective
        number of losses, ``(sum w)^2 / sum w^2``) plus the variance of the line's value there
        (``1/n + d^2/Sxx`` when the weights are all 1)."""
        d = cycle - self.tbar
        dof = max(self.weight**2 / self.w2 - 3, 1.0)
        s = math.sqrt(self.rss / self.weight * (dof + 3) / dof)
        line = self.w2 / self.weight**2 + 2 * d * self.w2d / (self.weight * self.sxx)
        return s * math.sqrt(1 + line + d * d * self.w2dd / self.sxx**2)


def fit_trend(
    points: Sequence[tuple[int, float]],
    *,
    below: float,
    unit: float,
    decades: tuple[float, float],
    trim: float | None = None,
    half_life: float | None = None,
) -> Trend | None:
    """The convergence under which the losses ``points`` (cycle, loss) are most likely.

    A converging search's losses close in on its floor geometrically, ``f + A exp(-r t)``, with a
    log-normal batch noise: ``log(loss - f)`` is a line plus Gaussian noise (a job that levelled
    off is the line with ``r = 0``). The floor is profiled -- the line and the noise fitted by
    least squares for each candidate, the likelihood ``-n/2 log(RSS/n) - sum log(loss - f)``
    counting the Jacobian of the log -- over floors ``unit * 10**g`` under ``below`` (at most the
    lowest loss), ``g`` from ``decades[0]`` to ``decades[1]`` in half decades, refined by
    golden-section search between the best one's neighbours. With ``trim``, losses more than
    that many robust deviations above the line (the odd bad batch) are left out of it. With
    ``half_life``, each loss weighs ``0.5 ** (age / half_life)`` (age from the last point's cycle)
    in the line, its noise and the likelihood: a local fit that follows a bend. None when
    the losses did not move (``unit`` is not positive) or span a single cycle.
    """
    if unit <= 0 or len(points) < 3:
        return None
    ts = [float(t) for t, _ in points]
    losses = [b for _, b in points]
    weights = [1.0] * len(ts) if half_life is None else [0.5 ** ((ts[-1] - t) / half_life) for t in ts]
    design = _weighted_design(ts, weights)
    if design is None:
        return None

    def fit(g: float) -> tuple[float, Trend] | None:
        floor = below - unit * 10.0**g
        if floor >= below:
            return None  # under the float resolution of the losses
        ys = [math.log(b - floor) for b in losses]
        trend: Trend | None = _weighted_line(design, ts, weights, ys, floor)
        kept_ts, kept_ws, kept_ys = ts, weights, ys
        if trim is not None:
            assert trend is not None
            residuals = [y - trend.log_height(t) for t, y in zip(ts, ys, strict=True)]
            mad = MAD_TO_SIGMA * statistics.median(abs(r) for r in residuals)
            keep = [i for i, r in enumerate(residuals) if r < trim * mad] if mad > 0 else []
            if mad > 0 and len(keep) < len(ys):
                if len(keep) < 3:
                    return None
                kept_ts, kept_ws = [ts[i] for i in keep], [weights[i] for i in keep]
                kept_ys = [ys[i] for i in keep]
                kept = _weighted_design(kept_ts, kept_ws)
                trend = None if kept is None else _weighted_line(kept, kept_ts, kept_ws, kept_ys, floor)
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
    for _ in range(_FLOOR_REFINE_STEPS):
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
    return chosen[1]


def _weighted_design(ts: list[float], ws: list[float]) -> Trend | None:
    """What the weighted least-squares line of any losses on the cycles ``ts`` shares (their
    weights' sums, ``tbar``, ``sxx``; the line itself left at 0 for :func:`_weighted_line` to
    fill in); None when ``ts`` are all one cycle."""
    weight = sum(ws)
    tbar = sum(w * t for w, t in zip(ws, ts, strict=True)) / weight
    dt = [t - tbar for t in ts]
    sxx = sum(w * d * d for w, d in zip(ws, dt, strict=True))
    if sxx <= 0:
        return None
    w2 = [w * w for w in ws]
    return Trend(
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


def _weighted_line(design: Trend, ts: list[float], ws: list[float], ys: list[float], floor: float) -> Trend:
    """The weighted least-squares line of ``ys`` (log heights above ``floor``) on the cycles
    ``ts`` of ``design``."""
    dts = [t - design.tbar for t in ts]
    wys = [w * y for w, y in zip(ws, ys, strict=True)]
    mean = sum(wys) / design.weight
    slope = sum(d * v for d, v in zip(dts, wys, strict=True)) / design.sxx
    rss = sum(w * (y - mean - slope * d) ** 2 for w, d, y in zip(ws, dts, ys, strict=True))
    return replace(design, floor=floor, mean=mean, slope=slope, rss=max(rss, 1e-12 * design.weight))


def fit_floor(points: Sequence[tuple[int, float]]) -> float | None:
    """The floor of :func:`fit_trend` over ``points`` (cycle, loss), searched 0.03 to 30,000
    median batch-to-batch steps under the lowest loss, the odd bad batch (3 robust deviations above
    the line) left out; None when the losses did not move."""
    losses = [b for _, b in points]
    low = min(losses)
    unit = statistics.median(abs(b - a) for a, b in itertools.pairwise(losses)) or max(losses) - low
    trend = fit_trend(points, below=low, unit=unit, decades=(-1.5, 4.5), trim=3.0)
    return None if trend is None else trend.floor
