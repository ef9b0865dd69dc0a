"""A job's convergence model, shared by the stall and regression rules: ``log(loss - floor)`` a line
in the cycle with normal noise, the floor found by profile likelihood."""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from engine.observe.anomaly.stats import MAD_TO_SIGMA

_REFINE_OPTIONS = {"xatol": 0.005}  # decades: how closely the search pins the floor between grid steps


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
    lowest loss), ``g`` from ``decades[0]`` to ``decades[1]`` in half decades (all in one numpy
    pass), refined by scipy's bounded Brent search between the best one's neighbours. With
    ``trim``, losses more than
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

    def most_likely(gs: np.ndarray) -> tuple[float, int, _Lines]:
        lines = _fit_floors(ts, weights, losses, below - unit * 10.0**gs, below, trim)
        k = int(np.argmax(lines.likelihood))
        return float(lines.likelihood[k]), k, lines

    grid = decades[0] + 0.5 * np.arange(int(2 * (decades[1] - decades[0])) + 1)
    likelihood, i, lines = most_likely(grid)
    if likelihood == -math.inf:
        return None
    # Refined between the best step's neighbours by scipy's bounded Brent search.
    best = (likelihood, lines.trend(i))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    cost = _likelihood_of_one(ts, weights, losses, below, unit) if trim is None else None

    def negative_likelihood(g: float) -> float:
        return cost(g) if cost is not None else -most_likely(np.array([g]))[0]

    from scipy import optimize  # here, not at the top: scipy costs the CLI's start-up ~0.5 s

    refined = optimize.minimize_scalar(
        negative_likelihood, bounds=(lo, hi), method="bounded", options=_REFINE_OPTIONS
    )
    likelihood, _, lines = most_likely(np.array([refined.x]))
    if likelihood > best[0]:
        best = (likelihood, lines.trend(0))
    return best


def _likelihood_of_one(
    ts: np.ndarray, w: np.ndarray, losses: np.ndarray, below: float, unit: float
) -> Callable[[float], float]:
    """The negative profile log-likelihood of one floor ``below - unit * 10**g`` as a function of
    ``g``, untrimmed: the cycles' sums computed once (the search calls it a dozen times)."""
    weight = float(w.sum())
    dt = ts - float(w @ ts) / weight
    wdt = w * dt / float(w @ (dt * dt))

    def negative_likelihood(g: float) -> float:
        floor = below - unit * 10.0**g
        if floor >= below:
            return math.inf
        ys = np.log(losses - floor)
        weighted_sum = float(ys @ w)
        residuals = ys - weighted_sum / weight - float(ys @ wdt) * dt
        rss = max(float((residuals * residuals) @ w), 1e-12 * weight)
        return 0.5 * weight * math.log(rss / weight) + weighted_sum

    return negative_likelihood


@dataclass(frozen=True)
class _Lines:
    """Weighted least-squares lines of several rows of log heights (one row per candidate floor);
    a row that cannot be fitted has likelihood ``-inf``."""

    floor: np.ndarray
    mean: np.ndarray
    slope: np.ndarray
    tbar: np.ndarray
    sxx: np.ndarray
    rss: np.ndarray
    weight: np.ndarray
    w2: np.ndarray
    w2d: np.ndarray
    w2dd: np.ndarray
    likelihood: np.ndarray

    def trend(self, row: int) -> Trend:
        return Trend(
            *(float(getattr(self, name)[row]) for name in ("floor", "mean", "slope", "tbar", "sxx", "rss")),
            *(float(getattr(self, name)[row]) for name in ("weight", "w2", "w2d", "w2dd")),
        )


def _weighted_lines(ts: np.ndarray, ws: np.ndarray, ys: np.ndarray, floors: np.ndarray) -> _Lines:
    """Row by row, the weighted least-squares line of ``ys`` on ``ts`` with weights ``ws`` (2-D,
    a weight of 0 leaves a point out), and the profile log-likelihood of its floor (the noise's,
    with the Jacobian of the log)."""
    weight = ws.sum(axis=1)
    tbar = (ws @ ts) / weight
    dt = ts[None, :] - tbar[:, None]
    sxx = (ws * dt * dt).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = (ws * ys).sum(axis=1) / weight
        slope = (ws * dt * ys).sum(axis=1) / sxx
        residuals = ys - mean[:, None] - slope[:, None] * dt
        rss = np.maximum((ws * residuals * residuals).sum(axis=1), 1e-12 * weight)
        likelihood = -0.5 * weight * np.log(rss / weight) - (ws * ys).sum(axis=1)
    w2 = ws * ws
    likelihood = np.where(sxx > 0, likelihood, -math.inf)
    return _Lines(
        floors,
        mean,
        slope,
        tbar,
        sxx,
        rss,
        weight,
        w2.sum(axis=1),
        (w2 * dt).sum(axis=1),
        (w2 * dt * dt).sum(axis=1),
        likelihood,
    )


def _lines_with_shared_weights(ts: np.ndarray, w: np.ndarray, ys: np.ndarray, floors: np.ndarray) -> _Lines:
    """:func:`_weighted_lines` when every row has the weights ``w`` (1-D): the cycles' sums are
    shared, and the rows' are matrix-vector products (the common case, and the hot one)."""
    k = len(floors)
    weight = float(w.sum())
    tbar = float(w @ ts) / weight
    dt = ts - tbar
    sxx = float(w @ (dt * dt))
    if sxx <= 0:
        return _weighted_lines(ts, np.broadcast_to(w, ys.shape), ys, floors)
    w2 = w * w
    weighted_sum = ys @ w
    mean = weighted_sum / weight
    slope = ys @ (w * dt) / sxx
    residuals = ys - mean[:, None] - slope[:, None] * dt
    rss = np.maximum((residuals * residuals) @ w, 1e-12 * weight)
    likelihood = -0.5 * weight * np.log(rss / weight) - weighted_sum
    return _Lines(
        floors,
        mean,
        slope,
        np.full(k, tbar),
        np.full(k, sxx),
        rss,
        np.full(k, weight),
        np.full(k, float(w2.sum())),
        np.full(k, float(w2 @ dt)),
        np.full(k, float(w2 @ (dt * dt))),
        likelihood,
    )


def _fit_floors(
    ts: np.ndarray,
    weights: np.ndarray,
    losses: np.ndarray,
    floors: np.ndarray,
    below: float,
    trim: float | None,
) -> _Lines:
    """The lines of ``log(losses - floor)`` for each of ``floors`` (see :func:`scored_trend`)."""
    valid = floors < below  # else under the float resolution of the losses
    heights = np.where(valid[:, None], losses[None, :] - floors[:, None], 1.0)
    ys = np.log(heights)
    lines = _lines_with_shared_weights(ts, weights, ys, floors)
    if trim is not None:
        dt = ts[None, :] - lines.tbar[:, None]
        residuals = ys - lines.mean[:, None] - lines.slope[:, None] * dt
        mad = MAD_TO_SIGMA * np.median(np.abs(residuals), axis=1)
        drop = (mad > 0)[:, None] & (residuals >= trim * mad[:, None])
        if drop.any():
            ws = np.where(drop, 0.0, weights[None, :])
            valid &= np.count_nonzero(ws, axis=1) >= 3
            lines = _weighted_lines(ts, ws, ys, floors)
    return replace(lines, likelihood=np.where(valid, lines.likelihood, -math.inf))


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


def weighted_line(ts: np.ndarray, ws: np.ndarray, ys: np.ndarray, floor: float) -> Trend | None:
    """The weighted least-squares line of ``ys`` (log heights above ``floor``) on the cycles ``ts``
    (a weight of 0 leaves a point out); None when the weighted cycles are all one."""
    lines = _weighted_lines(ts, ws[None, :], ys[None, :], np.array([floor]))
    return lines.trend(0) if lines.likelihood[0] > -math.inf else None


def fit_floor(points: Sequence[tuple[int, float]]) -> float | None:
    """The floor of :func:`fit_trend` over ``points`` (cycle, loss), searched 0.03 to 30,000
    median batch-to-batch steps under the lowest loss, the odd bad batch (3 robust deviations above
    the line) left out; None when the losses did not move."""
    losses = [b for _, b in points]
    low = min(losses)
    unit = statistics.median(abs(b - a) for a, b in itertools.pairwise(losses)) or max(losses) - low
    trend = fit_trend(points, below=low, unit=unit, decades=(-1.5, 4.5), trim=3.0)
    return None if trend is None else trend.floor
