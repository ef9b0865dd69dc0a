"""The convergence plot of a job: its best score against evaluations, as PNG or SVG.

One picture, two renderers over the same :class:`ConvergenceSeries`: a PNG drawn with matplotlib
for the terminal (``irefine status JOB --plot FILE.png``), and an SVG written as text for the
Prefect UI's summary artifact. The SVG exists because the summary is built as a flow run ends,
where the overhead benchmark counts every millisecond: importing matplotlib and drawing costs
~1.6 s cold and ~0.35 s warm on this machine, the SVG a few milliseconds, and a browser draws it
as sharply.

matplotlib is imported when a PNG is drawn, never at import time, so the CLI starts without it;
it draws on a bare :class:`~matplotlib.figure.Figure` with the Agg canvas rather than ``pyplot``,
whose global figure registry is not thread-safe.
"""

from __future__ import annotations

import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

from engine.core.cycle import CycleRecord

__all__ = ["ConvergenceSeries", "convergence_png", "convergence_series", "convergence_svg", "uses_log_scale"]

# Log y when the positive scores span at least this ratio (two decades): below that a linear
# axis reads better, above it the late, small improvements vanish into the bottom of a linear one.
_LOG_SPAN = 100.0
# Cycle-best points kept; past this each bucket of cycles keeps its lowest and highest point, so
# a long job's plot (and the artifact that embeds it) stays small and its envelope stays true.
_MAX_POINTS = 1000
_BEST_COLOUR = "#ff7f0e"
_BATCH_COLOUR = "#1f77b4"


@dataclass(frozen=True, slots=True)
class ConvergenceSeries:
    """What the plot shows: ``(evaluations so far, score)`` pairs and how to scale them."""

    title: str
    best: tuple[tuple[int, float], ...]
    """The job's best after each cycle that changed it, and after the last scored cycle."""
    batch: tuple[tuple[int, float], ...]
    """Each cycle's own best (thinned to about a thousand points for long jobs)."""
    log_y: bool


def uses_log_scale(scores: Sequence[float]) -> bool:
    """Whether a y axis for ``scores`` should be logarithmic: all positive and spanning decades."""
    finite = [s for s in scores if math.isfinite(s)]
    if not finite or min(finite) <= 0:
        return False
    return max(finite) / min(finite) >= _LOG_SPAN


def convergence_series(
    cycles: Sequence[CycleRecord], *, job_id: str, problem: str, strategy: str
) -> ConvergenceSeries:
    """The series of a job's committed cycles, in order (``JobStore.cycles``)."""
    done = 0
    best: list[tuple[int, float]] = []
    batch: list[tuple[int, float]] = []
    last_best: tuple[int, float] | None = None
    for cycle in cycles:
        done += cycle.evaluations
        if cycle.batch_best_score is not None and math.isfinite(cycle.batch_best_score):
            batch.append((done, cycle.batch_best_score))
        if cycle.best_score is not None and math.isfinite(cycle.best_score):
            last_best = (done, cycle.best_score)
            if not best or best[-1][1] != cycle.best_score:
                best.append(last_best)
    if last_best is not None and best[-1] != last_best:
        best.append(last_best)  # the last step runs on to the last scored cycle
    return ConvergenceSeries(
        title=f"{job_id} — {problem} with {strategy}",
        best=tuple(best),
        batch=tuple(_thin(batch)),
        log_y=uses_log_scale([y for _, y in batch] + [y for _, y in best]),
    )


def _thin(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    if len(points) <= _MAX_POINTS:
        return points
    buckets = _MAX_POINTS // 2
    size = len(points) / buckets
    kept: list[tuple[int, float]] = []
    for b in range(buckets):
        bucket = points[int(b * size) : int((b + 1) * size)]
        if bucket:
            low, high = min(bucket, key=lambda p: p[1]), max(bucket, key=lambda p: p[1])
            kept.extend(sorted({low, high}))
    return kept


def convergence_png(series: ConvergenceSeries, *, width_px: int = 800, height_px: int = 400) -> bytes:
    """The plot as PNG bytes (matplotlib, Agg). A series with no score yet gives a plot saying so."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dpi = 100
    figure = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.set_title(series.title, fontsize=11)
    axes.set_xlabel("evaluations")
    axes.set_ylabel("score")
    axes.grid(True, alpha=0.3)
    if series.best:
        if series.batch:
            bx, by = zip(*series.batch, strict=True)
            axes.scatter(bx, by, s=12, color=_BATCH_COLOUR, alpha=0.3, label="cycle best", zorder=2)
        x, y = zip(*series.best, strict=True)
        axes.step(x, y, where="post", color=_BEST_COLOUR, linewidth=2, label="best so far", zorder=3)
        axes.annotate(f"{y[-1]:.6g}", (x[-1], y[-1]), textcoords="offset points", xytext=(4, 6), fontsize=9)
        if series.log_y:
            axes.set_yscale("log")
        axes.legend(loc="best", fontsize=9)
    else:
        axes.text(0.5, 0.5, "no scored cycle yet", ha="center", va="center", transform=axes.transAxes)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def convergence_svg(series: ConvergenceSeries, *, width_px: int = 800, height_px: int = 400) -> str:
    """The same plot as a self-contained SVG document (no fonts, scripts or links)."""
    left, right, top, bottom = 70.0, 20.0, 36.0, 48.0
    plot_w, plot_h = width_px - left - right, height_px - top - bottom
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width_px}" height="{height_px}" '
        f'viewBox="0 0 {width_px} {height_px}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width_px}" height="{height_px}" fill="white"/>',
        f'<text x="{width_px / 2:.0f}" y="22" text-anchor="middle" font-size="14">'
        f"{html.escape(series.title)}</text>",
        f'<text x="{left + plot_w / 2:.0f}" y="{height_px - 10}" text-anchor="middle">evaluations</text>',
        f'<text transform="translate(16 {top + plot_h / 2:.0f}) rotate(-90)" '
        'text-anchor="middle">score</text>',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#444"/>',
    ]
    if not series.best:
        out.append(
            f'<text x="{left + plot_w / 2:.0f}" y="{top + plot_h / 2:.0f}" text-anchor="middle">'
            "no scored cycle yet</text></svg>"
        )
        return "".join(out)

    points = series.best + series.batch
    x_hi = max(x for x, _ in points)
    x_ticks = _linear_ticks(0.0, float(x_hi), integer=True)
    x_lo, x_hi_axis = 0.0, max(x_ticks[-1], x_hi * 1.04, 1.0)  # room for the last step
    ys = [y for _, y in points]
    if series.log_y:
        y_lo, y_hi = math.log10(min(ys)), math.log10(max(ys))
        y_ticks = [float(k) for k in _decades(y_lo, y_hi)]
        y_lo, y_hi = min(y_lo, y_ticks[0]) - 0.05, max(y_hi, y_ticks[-1]) + 0.05
        y_labels = [f"{10**k:g}" for k in y_ticks]
    else:
        y_lo, y_hi = min(ys), max(ys)
        pad = (y_hi - y_lo) * 0.05 or abs(y_hi) * 0.1 or 1.0
        y_lo, y_hi = y_lo - pad, y_hi + pad
        y_ticks = [t for t in _linear_ticks(y_lo, y_hi) if y_lo <= t <= y_hi]
        y_labels = [f"{t:g}" for t in y_ticks]

    def px(x: float) -> float:
        return left + (x - x_lo) / (x_hi_axis - x_lo) * plot_w

    def py(y: float) -> float:
        v = math.log10(y) if series.log_y else y
        return top + (1 - (v - y_lo) / (y_hi - y_lo)) * plot_h

    grid = 'stroke="#ddd" stroke-width="1"'
    for t in x_ticks:
        if t <= x_hi_axis:
            x = px(t)
            out.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + plot_h}" {grid}/>')
            out.append(f'<text x="{x:.1f}" y="{top + plot_h + 16}" text-anchor="middle">{t:,.0f}</text>')
    for t, label in zip(y_ticks, y_labels, strict=True):
        y = top + (1 - (t - y_lo) / (y_hi - y_lo)) * plot_h
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" {grid}/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{label}</text>')
    for x, y in series.batch:
        out.append(
            f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{_BATCH_COLOUR}" fill-opacity="0.3"/>'
        )
    steps: list[str] = []
    for i, (x, y) in enumerate(series.best):
        if i:
            steps.append(f"{px(x):.1f},{py(series.best[i - 1][1]):.1f}")
        steps.append(f"{px(x):.1f},{py(y):.1f}")
    out.append(f'<polyline points="{" ".join(steps)}" fill="none" stroke="{_BEST_COLOUR}" stroke-width="2"/>')
    last_x, last_y = series.best[-1]
    out.append(
        f'<text x="{px(last_x) - 4:.1f}" y="{py(last_y) - 6:.1f}" text-anchor="end">{last_y:.6g}</text>'
    )
    legend_x = left + plot_w - 130
    out.append(
        f'<rect x="{legend_x}" y="{top + 8}" width="122" height="40" fill="white" stroke="#ccc"/>'
        f'<circle cx="{legend_x + 14}" cy="{top + 21}" r="3" fill="{_BATCH_COLOUR}" fill-opacity="0.4"/>'
        f'<text x="{legend_x + 26}" y="{top + 25}">cycle best</text>'
        f'<line x1="{legend_x + 6}" y1="{top + 38}" x2="{legend_x + 22}" y2="{top + 38}" '
        f'stroke="{_BEST_COLOUR}" stroke-width="2"/>'
        f'<text x="{legend_x + 26}" y="{top + 42}">best so far</text></svg>'
    )
    return "".join(out)


def _linear_ticks(lo: float, hi: float, *, integer: bool = False, count: int = 6) -> list[float]:
    """About ``count`` round tick values (steps of 1, 2 or 5 times a power of ten) over [lo, hi]."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    if integer:
        step = max(step, 1.0)
    first = math.ceil(lo / step)
    n = math.floor(hi / step) - first + 1
    return [(first + i) * step for i in range(max(n, 1))]


def _decades(lo: float, hi: float) -> list[int]:
    """Whole powers of ten over [lo, hi] (log10 values), at most about eight of them."""
    first, last = math.floor(lo), math.ceil(hi)
    stride = max(1, math.ceil((last - first) / 8))
    return list(range(first, last + 1, stride))
