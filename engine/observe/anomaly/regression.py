"""``regression``: the batch bests lose ground -- each new cycle's best markedly worse than the job's
fitted convergence (:mod:`.trend`) and than where the job just was -- in most of the last few cycles.
(The best so far is a running best and cannot get worse.)"""

from __future__ import annotations

import bisect
import itertools
import math
import statistics
from collections import deque

from engine.core.cycle import CycleRecord
from engine.observe.anomaly.config import DetectorConfig
from engine.observe.anomaly.episodes import Episodes, Evidence, as_loss
from engine.observe.anomaly.stats import MAD_TO_SIGMA
from engine.observe.anomaly.trend import fit_trend


class Regressions:
    """The regression rule for one job, and the trend of its normal batch bests."""

    def __init__(self, config: DetectorConfig, maximize: bool, episodes: Episodes) -> None:
        c = self.config = config
        self.maximize = maximize
        self._episodes = episodes
        self._trend: list[tuple[int, float]] = []  # (cycle, loss): the normal batch bests of the trend
        self._held: deque[tuple[int, float]] = deque()  # suspect ones, learned if no regression follows
        self._best_before: float | None = None
        self._worse: deque[bool] = deque(maxlen=c.regression_cycles + 1)  # recent cycles' verdicts
        self._suspect: deque[bool] = deque(maxlen=c.regression_cycles)  # ...over regression_hold_z
        self._far: deque[bool] = deque(maxlen=c.regression_cycles)  # ...regression_run_excess above the level
        self.suspect_now = False
        """This cycle's batch best is a regression suspect (``regression_hold_z`` above the trend):
        no stall is named on it."""

    def observe(self, record: CycleRecord) -> Evidence | None:
        """This cycle's regression evidence, or None."""
        c = self.config
        loss = as_loss(record.batch_best_score, self.maximize)
        best, self._best_before = self._best_before, as_loss(record.best_score, self.maximize)
        self.suspect_now = False
        if loss is None or best is None or len(self._trend) < 3:
            if loss is not None:
                self._learn_trend((record.cycle, loss))
            return None
        episode = self._episodes.by_kind["regression"]
        # Where the job just was: the median of its last few normal batch bests, and this batch
        # best's excess over it in units of that level's height above the best (or of the recent
        # batch-to-batch noise, if larger: recent, as a fast job's first steps are thousands of
        # times its last). A new best, or a batch under that level, is not worse (and spares the fit).
        recent = [b for _, b in self._trend[-c.regression_level - 2 :]]
        level = statistics.median(recent[-c.regression_level :])
        steps = [abs(b - a) for a, b in itertools.pairwise(recent)]
        scale = max(level - best, MAD_TO_SIGMA * statistics.median(steps) / math.sqrt(2))
        excess = (loss - level) / scale if scale > 1e-12 * max(abs(level), 1.0) else 0.0
        trend = None if loss <= best or excess <= 0 else self._trend_excess(record.cycle, loss, best)
        z = -math.inf if trend is None else trend["z"]
        above_level = excess > c.regression_min_excess
        worse = above_level and z > c.regression_z
        # Far above the level, a batch is suspect at a lower z: a young trend's deviation is loose.
        far = excess > c.regression_run_excess
        suspect = above_level and (z > c.regression_hold_z or (far and z > c.regression_far_z))
        self._worse.append(worse)
        self._suspect.append(suspect)
        self._far.append(far)
        self.suspect_now = suspect
        # What is learned as normal: not a worse batch, nor one of a stalled search; a suspect one
        # (above the trend, short of the bound) once regression_cycles more passed without a
        # regression starting -- its first batches must not widen the noise its later ones are
        # judged by, but dropping every high batch near a lone bad one would bias the trend low.
        if worse and sum(self._worse) >= min(2, c.regression_cycles):
            self._held.clear()  # a regression starting (a lone bad batch does not clear them)
        while self._held and self._held[0][0] < record.cycle - c.regression_cycles:
            self._learn_trend(self._held.popleft())
        if not worse and not self._episodes.is_open("stall"):
            if z > c.regression_hold_z or (far and z > 0):
                self._held.append((record.cycle, loss))
            else:
                self._learn_trend((record.cycle, loss))
        # A regressed population still draws the odd normal-looking batch: count the worse
        # cycles among the last regression_cycles + 1, not a strict run.
        episode.run = sum(self._worse)
        # ...or every one of the last regression_cycles over regression_hold_z, all but one worse
        # (a noisy job's regression of 4-5 deviations drops one batch under the bound now and
        # then) or all far above the level (a young trend's deviation is loose).
        last_worse = sum(itertools.islice(reversed(self._worse), c.regression_cycles))
        run_of_suspects = len(self._suspect) == self._suspect.maxlen and all(self._suspect)
        if run_of_suspects and (last_worse >= c.regression_cycles - 1 or all(self._far)):
            worse, episode.run = True, max(episode.run, c.regression_cycles)
            if self._held and self._held[-1][0] == record.cycle:
                self._held.pop()  # a regressed batch after all: never learned
        if not worse or episode.run < c.regression_cycles:
            return None if not (worse and episode.open) else {"message": ""}
        assert trend is not None
        sign = -1.0 if self.maximize else 1.0
        return {
            "message": (
                f"cycle {record.cycle}: the batch best {record.batch_best_score:.6g} is markedly worse than "
                f"the job's trend ({sign * trend['expected']:.6g} at its last normal cycle, "
                f"{trend['z']:.1f} deviations; floor {sign * trend['floor']:.6g}) and than its recent "
                f"batches ({sign * level:.6g}; best {sign * best:.6g}), as were {episode.run} of the "
                f"last {len(self._worse)} cycles"
            ),
            "batch_best_score": record.batch_best_score,
            "recent_level": sign * level,
            "best_score": sign * best,
            "excess": excess,
            "trend_floor": sign * trend["floor"],
            "trend_expected": sign * trend["expected"],
            "log_excess": trend["log_excess"],
            "z": trend["z"],
            "bound": c.regression_z,
            "cycles": episode.run,
        }

    def _learn_trend(self, item: tuple[int, float]) -> None:
        """Add a normal (cycle, loss) to the batch bests the trend is fitted on (kept in order)."""
        bisect.insort(self._trend, item)
        if len(self._trend) > self.config.regression_fit_window:
            del self._trend[0]

    def _trend_excess(self, cycle: int, loss: float, best: float) -> dict[str, float] | None:
        """How far ``loss`` lies above the job's trend, or None before there is one to judge by.

        The model: a normal batch best is ``f + exp(a - r t + e)``, ``e`` normal with sd ``s`` --
        a floor ``f`` approached geometrically, with a noise proportional to the gap (what the
        batch bests of a converging search do, and a levelled-off one with ``r = 0``), fitted by
        :func:`fit_trend` with the batch bests weighted by age (``regression_half_life``: one line
        cannot follow a job that bends over into its floor), the floor searched 0.001 to 1,000
        median heights under the lowest batch best. ``loss`` is judged against the line at the
        *last normal cycle*, not extrapolated to this one: a regression loses ground against where
        the job was; a stall only stops gaining (and a trend that batches stopped feeding does not
        drift). The deviation is the prediction's (:meth:`.Trend.deviation`).
        """
        if len(self._trend) < self.config.regression_warmup:
            return None
        bs = [b for _, b in self._trend]
        low = min(min(bs), best)
        trend = fit_trend(
            self._trend,
            below=low,
            unit=statistics.median(bs) - low,
            decades=(-3.0, 3.0),
            half_life=self.config.regression_half_life,
        )
        if trend is None or loss <= trend.floor:
            return None
        last = self._trend[-1][0]
        expected = trend.log_height(last)
        log_excess = math.log(loss - trend.floor) - expected
        return {
            "floor": trend.floor,
            "expected": trend.floor + math.exp(expected),
            "log_excess": log_excess,
            "z": log_excess / trend.deviation(last),
        }
