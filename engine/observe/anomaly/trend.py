"""A job's convergence model, shared by the stall and regression rules: ``log(loss - floor)`` a line
in the cycle with normal noise, the floor found by profile likelihood."""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize

from engine.observe.anomaly.stats import MAD_TO_SIGMA

_FLOOR_XATOL = 0.005  # decades: how closely the bounded search pins a trend's floor between grid steps


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


def scored_trend(
    points: Sequence[tuple[int, float]],
    *,
    below: float,
    unit: float,
    decades: tuple[float, float],
    trim: float | None = None,
    half_life: float | None = None,
) -> tuple[float, Trend] | None:
    """The convergence under which the losses ``points`` (cycle, loss) are most likely, and its
    log-likelihood.

    A converging search's losses close in on its floor geometrically, ``f + A exp(-r t)``, with a
    log-normal batch noise: ``log(loss - f)`` is a line plus Gaussian noise (a job that levelled
    off is the line with ``r = 0``). The floor is profiled -- the line and the noise fitted by
    least squares for each candidate, the likelihood ``-n/2 log(RSS/n) - sum log(loss - f)``
    counting the Jacobian of the log -- over floors ``unit * 10**g`` under ``below`` (at most the
    lowest loss), ``g`` from ``decades[0]`` to ``decades[1]`` in half decades, refined by
    a bounded scalar search (scipy's Brent) between the best one's neighbours. With ``trim``, losses more than
    that many robust deviations above the line (the odd bad batch) are left out of it. With
    ``half_life``, each loss weighs ``0.5 ** (age / half_life)`` (age from the last point's cycle)
    in the line, its noise and the likelihood: a local fit that follows a bend. None when
    the losses did not move (``unit`` is not positive) or span a single cycle.
    """
    if unit <= 0 or len(points) < 3:
        return None
    ts = np.array([float(t) for t, _ in points])
    losses = np.array([b for _, b in points])
    weights = np.ones(len(ts)) if half_life is None else 0.5 ** ((ts[-1] - ts) / half_life)
    if weighted_line(ts, weights, losses, 0.0) is None:
        return None  # a single cycle
    fits: dict[float, tuple[float, Trend] | None] = {}

    def fit(g: float) -> tuple[float, Trend] | None:
        """(log-likelihood, trend) with the floor ``unit * 10**g`` under ``below``."""
        if g in fits:
            return fits[g]
        floor = below - unit * 10.0**g
        if floor >= below:
            return None  # under the float resolution of the losses
        ys = np.log(losses - floor)
        trend = weighted_line(ts, weights, ys, floor)
        kept_ws = weights
        if trim is not None and trend is not None:
            residuals = ys - (trend.mean + trend.slope * (ts - trend.tbar))
            mad = MAD_TO_SIGMA * float(np.median(np.abs(residuals)))
            if mad > 0 and (residuals >= trim * mad).any():
                kept_ws = np.where(residuals < trim * mad, weights, 0.0)  # weight 0: left out
                trend = None if np.count_nonzero(kept_ws) < 3 else weighted_line(ts, kept_ws, ys, floor)
        result = None
        if trend is not None:
            jacobian = float(kept_ws @ ys)
            result = -0.5 * trend.weight * math.log(trend.rss / trend.weight) - jacobian, trend
        fits[g] = result
        return result

    grid = [decades[0] + k / 2 for k in range(int(2 * (decades[1] - decades[0])) + 1)]
    scored = [(found[0], i) for i, g in enumerate(grid) if (found := fit(g)) is not None]
    if not scored:
        return None
    _, i = max(scored)
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]

    def cost(g: float) -> float:
        found = fit(float(g))
        return math.inf if found is None else -found[0]

    refined = optimize.minimize_scalar(
        cost, bounds=(lo, hi), method="bounded", options={"xatol": _FLOOR_XATOL}
    )
    best = max((found for found in (fit(grid[i]), fit(float(refined.x))) if found is not None), key=_score)
    return best


def fit_trend(
    points: Sequence[tuple[int, float]],
    *,
    below: float,
    unit: float,
    decades: tuple[float, float],
    trim: float | None = None,
    half_life: float | None = None,
) -> Trend | None:
    """The convergence of :func:`scored_trend` (without its likelihood)."""
    scored = scored_trend(points, below=below, unit=unit, decades=decades, trim=trim, half_life=half_life)
    return None if scored is None else scored[1]


def _score(found: tuple[float, Trend]) -> float:
    return found[0]


def weighted_line(ts: np.ndarray, ws: np.ndarray, ys: np.ndarray, floor: float) -> Trend | None:
    """The weighted least-squares line of ``ys`` (log heights above ``floor``) on the cycles ``ts``
    (a weight of 0 leaves a point out); None when the weighted cycles are all one."""
    weight = float(ws.sum())
    tbar = float(ws @ ts) / weight
    dt = ts - tbar
    sxx = float(ws @ (dt * dt))
    if sxx <= 0:
        return None
    mean = float(ws @ ys) / weight
    slope = float((ws * dt) @ ys) / sxx
    residuals = ys - mean - slope * dt
    rss = float(ws @ (residuals * residuals))
    w2 = ws * ws
    return Trend(
        floor=floor,
        mean=mean,
        slope=slope,
        tbar=tbar,
        sxx=sxx,
        rss=max(rss, 1e-12 * weight),
        weight=weight,
        w2=float(w2.sum()),
        w2d=float(w2 @ dt),
        w2dd=float(w2 @ (dt * dt)),
    )


def fit_floor(points: Sequence[tuple[int, float]]) -> float | None:
    """The floor of :func:`fit_trend` over ``points`` (cycle, loss), searched 0.03 to 30,000
    median batch-to-batch steps under the lowest loss, the odd bad batch (3 robust deviations above
    the line) left out; None when the losses did not move."""
    losses = [b for _, b in points]
    low = min(losses)
    unit = statistics.median(abs(b - a) for a, b in itertools.pairwise(losses)) or max(losses) - low
    trend = fit_trend(points, below=low, unit=unit, decades=(-1.5, 4.5), trim=3.0)
    return None if trend is None else trend.floor
