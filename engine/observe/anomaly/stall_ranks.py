"""The rank trend of a job's batch bests, one of the stall tests: a job converging at ``r`` (in log
gap) with batch noise ``s`` draws a batch best better than the one ``k`` cycles before with
probability ``Phi(theta k / sqrt 2)``, ``theta = r / s``, whatever its floor and scale; a stalled one
with probability one half. A recent window's Mann-Kendall sum short of what the learned ``theta``
predicts is a lost trend."""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Any

from engine.observe.anomaly.config import DetectorConfig
from engine.observe.anomaly.episodes import reaches
from engine.observe.anomaly.stats import mann_kendall_sd

_NORMAL = statistics.NormalDist()


class RankTrend:
    """Per position of the recent batch bests, cumulative counts per lag of those better than the
    one that many batches before, so any window's rank sums are differences of two rows."""

    def __init__(self, config: DetectorConfig) -> None:
        c = self.config = config
        self._rank_lags = max(c.stall_rank_windows) - 1
        self._rank_cumulative: deque[list[float]] = deque(
            maxlen=c.stall_window + max(c.stall_rank_windows) + 1
        )
        self._rank_recent: deque[float] = deque(maxlen=self._rank_lags)
        self._rank_cycles: deque[int] = deque(maxlen=self._rank_cumulative.maxlen)  # their cycles

    def window_start(self, window: int) -> int:
        """The cycle of the first of the last ``window`` batch bests."""
        return self._rank_cycles[len(self._rank_cycles) - window]

    def learn(self, cycle: int, loss: float) -> None:
        """Count, per lag k, the batch bests better than the one k batches before (ties: half)."""
        row = self._rank_cumulative[-1].copy() if self._rank_cumulative else [0.0] * (self._rank_lags + 1)
        for k, before in enumerate(reversed(self._rank_recent), start=1):
            row[k] += 1.0 if loss < before else 0.5 if loss == before else 0.0
        self._rank_cumulative.append(row)
        self._rank_cycles.append(cycle)
        self._rank_recent.append(loss)

    def shortfall(self, regression_ended: int | None) -> dict[str, Any] | None:
        """The largest shortfall of a recent window's rank trend below the job's learned one.

        For each window of ``w`` recent batch bests with at least ``2 * stall_cycles`` before it:
        ``theta`` from the share of concordant pairs (a batch best better than an earlier one)
        among the up to ``stall_window`` batches before the window, solved at their mean lag; the
        window's Mann-Kendall sum against the sum that ``theta`` predicts, in deviations of the
        sum under no trend; a window reaching back into a regression that was last open at
        ``regression_ended`` is not judged. None when no window can be judged or the job had no trend to lose.
        """
        c = self.config
        cum = self._rank_cumulative
        n = len(cum)
        worst: dict[str, Any] | None = None
        for w in c.stall_rank_windows:
            history = min(n - w, c.stall_window)
            if history < 2 * c.stall_cycles:
                continue
            if reaches(self._rank_cycles[n - w], regression_ended):
                continue  # the window holds a regression's batches: they lost the trend for that
            hi, lo = n - w - 1, n - w - history  # the history: positions lo..hi
            pairs = concordant = lag_sum = 0.0
            for k in range(1, min(self._rank_lags, history - 1) + 1):
                start = lo + k - 1  # pairs (j - k, j) for j in start + 1..hi
                concordant += cum[hi][k] - cum[start][k]
                pairs += hi - start
                lag_sum += k * (hi - start)
            share = min(concordant / pairs, 1 - 0.5 / pairs)
            if share <= 0.5:
                continue  # no trend to lose
            theta = math.sqrt(2) * _NORMAL.inv_cdf(share) / (lag_sum / pairs)
            observed = expected = 0.0
            for k in range(1, w):
                observed += 2 * (cum[n - 1][k] - cum[n - w + k - 1][k]) - (w - k)
                expected += (w - k) * math.erf(theta * k / 2)  # 2 Phi(theta k / sqrt 2) - 1
            z = (expected - observed) / mann_kendall_sd(w)
            if worst is None or z > worst["z"]:
                worst = {"window": w, "rank_sum": observed, "expected_rank_sum": expected, "z": z}
        return worst
