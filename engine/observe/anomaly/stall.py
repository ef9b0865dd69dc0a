"""``stall``: the job stopped improving while far from its goal. Tests: a dry spell improbable at
the job's own improvement rate, a sharp drop of that rate, a lost rank trend of the batch bests
(:mod:`.stall_ranks`), or no downward trend at all; confirmed by the ranks, and only while far
from the target (or, without one, from the floor its convergence is heading for, :mod:`.trend`).
docs/anomaly-detection.md gives the rules and their bounds."""

from __future__ import annotations

import bisect
import itertools
import math
import statistics
from collections import deque
from typing import Any

from engine.core.cycle import CycleRecord
from engine.observe.anomaly.config import DetectorConfig
from engine.observe.anomaly.episodes import Episodes, Evidence, as_loss, reaches
from engine.observe.anomaly.stall_ranks import RankTrend
from engine.observe.anomaly.stats import (
    MAD_TO_SIGMA,
    beta_binomial_cdf,
    count_between,
    mann_kendall_sd,
    mann_kendall_sum,
    wilson_bounds,
)
from engine.observe.anomaly.trend import fit_floor

_FLOOR_POINTS = 200  # the last batch bests a stall's floor is fitted to


class Stalls:
    """The stall rule for one job, and what it learned of the job's progress (losses: lower is
    better, whatever the direction)."""

    def __init__(
        self,
        config: DetectorConfig,
        maximize: bool,
        target: float | None,
        tolerance: float,
        episodes: Episodes,
    ) -> None:
        c = self.config = config
        self.maximize = maximize
        self.target = target
        self.tolerance = tolerance
        self._episodes = episodes
        self._first: tuple[int, float] | None = None  # the first scored cycle and its best
        self._improvements: list[tuple[int, float]] = []  # (cycle, best) of every improvement
        self._resumed = 0  # improvements since a stall was reported
        # (cycle, batch best) of the last scored cycles: the last _FLOOR_POINTS make the floor fit,
        # the last 4 * stall_cycles the collapse test, the last _recent_span the other stall tests
        self._recent_span = 2 * max(c.stall_max_cycles, c.stall_cycles)
        self._history: deque[tuple[int, float]] = deque(
            maxlen=max(_FLOOR_POINTS, self._recent_span, 4 * c.stall_cycles)
        )
        self._spreads: deque[float] = deque(maxlen=c.timing_window)  # their usual relative spread
        # spread of the batch bests (see _spread_share): their first and their recent steps
        self._first_steps: list[float] = []
        self._recent_steps: deque[float] = deque(maxlen=c.stall_spread_window)
        self._ranks = RankTrend(c)
        self._floor_fit: tuple[int, float | None] | None = None  # (up to cycle, floor): _floor_share

    def observe(self, record: CycleRecord) -> Evidence | None:
        """This cycle's stall evidence, or None."""
        c = self.config
        best = as_loss(record.best_score, self.maximize)
        if best is None:
            return None
        batch = as_loss(record.batch_best_score, self.maximize)
        if batch is not None:
            if self._history:
                step = abs(batch - self._history[-1][1])
                if len(self._first_steps) < self.config.stall_spread_window // 2:
                    self._first_steps.append(step)
                self._recent_steps.append(step)
            self._history.append((record.cycle, batch))
            self._ranks.learn(record.cycle, batch)
        if self._first is None:
            self._first = (record.cycle, best)
            self._improvements.append((record.cycle, best))
            return None
        if record.improved:
            self._improvements.append((record.cycle, best))
        # A stalled search still draws the odd lucky batch: a stall is over once the job has
        # improved stall_resume times, not at its first lucky batch.
        if not self._episodes.is_open("stall"):
            self._resumed = 0
        elif record.improved:
            self._resumed += 1
        evidence = None if record.improved else self._stall_evidence(record, best)
        if evidence is None:
            evidence = self._slowdown_evidence(record, best)
        if evidence is not None:
            # The batch bests still close in: an unlucky wait, not a stall. With a target, the
            # dry spell stands alone while the ranks cannot be judged yet (a short history).
            shortfall = self._ranks.shortfall(self._episodes.regression_ended)
            if (shortfall is None and self.target is None) or (
                shortfall is not None and shortfall["z"] < c.stall_rank_confirm_z
            ):
                evidence = None
        else:
            evidence = self._rank_evidence(record, best)
        if evidence is None:
            evidence = self._flat_evidence(record, best)
        if evidence is not None and not self._episodes.is_open("stall") and self._lost_ground():
            evidence = None  # the batch bests got markedly worse: a regression's symptom, not a stall
        if evidence is None and self._episodes.is_open("stall") and self._resumed < c.stall_resume:
            return {"message": ""}
        return evidence

    def _lost_ground(self) -> bool:
        """Whether the batch bests since the last improvement sit markedly above (worse than) the
        level around it: their median more than ``stall_lost_ground`` robust deviations of the
        batch-to-batch noise above the median of the last ``stall_level`` batch bests up to it.
        A stalled population keeps the level it froze at; one that lost ground regressed."""
        c = self.config
        last = self._improvements[-1][0]
        batches = self._last_batches(self._recent_span)
        before = [b for cycle, b in batches if cycle <= last][-c.stall_level :]
        after = [b for cycle, b in batches if cycle > last]
        steps = [abs(b - a) for (_, a), (cycle, b) in itertools.pairwise(batches) if cycle <= last]
        if len(before) < 3 or len(after) < 3 or len(steps) < c.stall_cycles:
            return False
        noise = MAD_TO_SIGMA * statistics.median(steps[-c.stall_window :]) / math.sqrt(2)
        return statistics.median(after) - statistics.median(before) > c.stall_lost_ground * noise

    def _stall_evidence(self, record: CycleRecord, best: float) -> Evidence | None:
        c = self.config
        assert self._first is not None
        last = self._improvements[-1][0]
        since = record.cycle - last
        collapsed = self._collapsed(record, best, since)
        # The improvement rate over the stall_window cycles up to the last improvement, taken at
        # the lower end of its 90% interval (Wilson): a young job's few cycles, or a job whose
        # pace is slowing down, must not make an ordinary dry spell look improbable.
        start = max(last - c.stall_window + 1, self._first[0] + 2)
        count = len(self._improvements) - bisect.bisect_left(self._improvements, (start, -math.inf))
        rate = wilson_bounds(count, max(last - start + 1, c.stall_cycles))[0]
        needed = max(c.stall_cycles, math.ceil(math.log(c.stall_alpha) / math.log1p(-rate)))
        needed = min(needed, max(c.stall_max_cycles, c.stall_cycles))
        if collapsed is not None:
            needed = min(needed, c.stall_cycles)
        # A job that regressed has ground to regain before it can improve: a dry spell is counted
        # from the end of a reported regression it reaches back into.
        ended = self._episodes.regression_ended
        regained = last if ended is None else max(last, ended)
        if record.cycle - regained < needed:
            return None
        message = (
            f"cycle {record.cycle}: no improvement for {since} cycles (best {record.best_score:.6g}), "
            f"where it improved in {rate:.0%} of cycles before"
        )
        return self._if_far(
            record,
            best,
            message,
            {
                "cycles_without_improvement": since,
                "needed_cycles": needed,
                "improvement_rate": rate,
                "spread_vs_usual": collapsed,
            },
        )

    def _slowdown_evidence(self, record: CycleRecord, best: float) -> Evidence | None:
        """A stall that still draws the odd lucky batch: the job improved in far fewer of its last
        ``w`` cycles than its rate in the ``stall_window`` cycles before them predicts (beta-binomial
        lower tail below ``stall_slowdown_alpha``), for some ``w`` in ``stall_slowdown_windows``.
        """
        c = self.config
        assert self._first is not None
        now = record.cycle
        for w in c.stall_slowdown_windows:
            start = now - w + 1  # the recent window: cycles start..now
            if reaches(start, self._episodes.regression_ended):
                break  # the window reaches back into a reported regression (see _stall_evidence)
            early = max(start - c.stall_window, self._first[0] + 1)
            trials = start - early
            if trials < c.stall_cycles:
                break
            recent = count_between(self._improvements, start, now)
            before = count_between(self._improvements, early, start - 1)
            if recent * trials >= before * w:
                continue  # at least its usual pace: nothing to test
            tail = beta_binomial_cdf(recent, w, before + 0.5, trials - before + 0.5)
            flat = tail < c.stall_slowdown_flat_alpha and self._hovering(best, now - w)
            if tail < c.stall_slowdown_alpha or flat:
                message = (
                    f"cycle {now}: improved in {recent} of the last {w} cycles "
                    f"(best {record.best_score:.6g}), where it improved in {before} of the {trials} before"
                )
                evidence = {
                    "cycles_without_improvement": now - self._improvements[-1][0],
                    "window": w,
                    "improvements_in_window": recent,
                    "improvement_rate": before / trials,
                    "probability": tail,
                }
                return self._if_far(record, best, message, evidence, until=start - 1)
        return None

    def _rank_evidence(self, record: CycleRecord, best: float) -> Evidence | None:
        """A stall seen in the batch bests' ranks: a window's trend ``stall_rank_z`` deviations short."""
        shortfall = self._ranks.shortfall(self._episodes.regression_ended)
        if shortfall is None or shortfall["z"] <= self.config.stall_rank_z:
            return None
        start = self._ranks.window_start(shortfall["window"])
        message = (
            f"cycle {record.cycle}: the last {shortfall['window']} batch bests lost the job's trend "
            f"(rank sum {shortfall['rank_sum']:+.0f} where its pace predicts "
            f"{shortfall['expected_rank_sum']:+.0f}, {shortfall['z']:.1f} deviations short; "
            f"best {record.best_score:.6g})"
        )
        evidence = {"cycles_without_improvement": record.cycle - self._improvements[-1][0], **shortfall}
        return self._if_far(record, best, message, evidence, until=start - 1)

    def _flat_evidence(self, record: CycleRecord, best: float) -> Evidence | None:
        """A stall seen as no trend at all: after ``stall_cycles`` without improvement, the last
        ``stall_flat_window`` batch bests trend down by less than ``stall_flat_z`` deviations
        (Mann-Kendall, one-sided: a job without trend falls below 1.5 in 93% of windows, one
        converging at a tenth of its batch noise a cycle in under 1% -- it expects about 4).

        Unlike the rank test, it needs nothing learned before the window: a stall that struck
        early, or one whose trend window already reaches into the stall, still shows. A window
        reaching back into a reported stall or a regression is not judged (their batches lost the
        trend for that: a second report of the same stall says nothing new)."""
        c = self.config
        w = c.stall_flat_window
        last = self._improvements[-1][0]
        if record.cycle - last < c.stall_cycles or len(self._history) < w:
            return None
        window = self._last_batches(w)
        start = window[0][0]
        if reaches(start, self._episodes.regression_ended) or reaches(start, self._episodes.stall_ended):
            return None  # a regression's batches lost the trend for that; a reported stall's, too
        z = mann_kendall_sum([b for _, b in window]) / mann_kendall_sd(w)
        if z >= c.stall_flat_z:
            return None
        message = (
            f"cycle {record.cycle}: the last {w} batch bests show no trend (Mann-Kendall "
            f"{z:.1f} deviations; best {record.best_score:.6g})"
        )
        return self._if_far(
            record, best, message, {"cycles_without_improvement": record.cycle - last, "window": w, "z": z}
        )

    def _last_batches(self, count: int) -> list[tuple[int, float]]:
        """The (cycle, batch best) of the last ``count`` scored cycles, oldest first."""
        return list(itertools.islice(self._history, max(len(self._history) - count, 0), None))

    def _hovering(self, best: float, after: int) -> bool:
        """Whether the batch bests since cycle ``after`` stopped closing in on the best: the median
        log height above it over the later half of them is within ``stall_trend_margin`` of the
        earlier half's (a converging job's batch bests keep closing in, whatever the noise)."""
        batches = self._last_batches(self._recent_span)
        heights = [math.log(b - best) for cycle, b in batches if cycle > after and b > best]
        half = len(heights) // 2
        if half < 3:
            return False
        change = statistics.median(heights[-half:]) - statistics.median(heights[:half])
        return change > -self.config.stall_trend_margin

    def _collapsed(self, record: CycleRecord, best: float, since: int) -> float | None:
        """The population's spread relative to its usual, when it has collapsed (else None).

        The spread is the batch-to-batch change of recent batch bests over their height above
        the best: it stays put while a job converges (both shrink together)
        and drops when the search collapses onto a point that is not getting better.
        """
        c = self.config
        recent = [b for _, b in self._last_batches(4 * c.stall_cycles)]
        # Judged over the whole dry spell (more batches, a steadier median); learned over the
        # last stall_cycles + 1 while the job improves.
        recent = recent[-max(c.stall_cycles + 1, min(since, len(recent))) :]
        if len(recent) < c.stall_cycles:
            return None
        height = statistics.median(recent) - best
        steps = statistics.median(abs(b - a) for a, b in itertools.pairwise(recent))
        if height <= 0:
            return None
        spread = steps / height
        if since < c.stall_cycles:
            self._spreads.append(spread)
            return None
        if len(self._spreads) < c.stall_cycles:
            return None
        relative = spread / max(statistics.median(self._spreads), 1e-12)
        return relative if relative < c.stall_collapse_ratio else None

    def _if_far(
        self,
        record: CycleRecord,
        best: float,
        message: str,
        evidence: dict[str, Any],
        until: int | None = None,
    ) -> Evidence | None:
        """A stall's evidence -- ``message`` with the reason it is far from its goal, ``evidence``,
        the best and the target -- if the job is still far from its goal (:meth:`_far_from_goal`,
        ``until`` the cycle before the window that lost the pace), else None."""
        far, why = self._far_from_goal(best, self._improvements[-1][0], until)
        if not far:
            return None
        return {
            "message": f"{message}; {why}",
            **evidence,
            "best_score": record.best_score,
            "target": self.target,
            "reason": why,
        }

    def _far_from_goal(
        self, best: float, last_improvement: int, until: int | None = None
    ) -> tuple[bool, str]:
        """Whether the job is still far from its goal (see docs/anomaly-detection.md); without a target, the
        floor is fitted to its batch bests up to cycle ``until`` (the last improvement unless
        given: the cycle before the window that lost the pace) and a reason why."""
        c = self.config
        assert self._first is not None
        first_best = self._first[1]
        if self.target is not None:
            goal = -self.target if self.maximize else self.target
            first_gap, gap = first_best - goal, best - goal
            if first_gap <= 0 or gap <= self.tolerance:
                return False, ""
            share = gap / first_gap
            return share > c.stall_far_share, f"{share:.0%} of the way to the target {self.target:g} remains"
        gained = first_best - best
        if gained <= 0:
            return True, "no progress since the first cycle"
        # The floor the batch bests up to the last improvement converged to (see .trend.fit_trend).
        fitted = self._floor_share(best, last_improvement if until is None else until)
        if fitted is not None:
            return (
                fitted > c.stall_floor_far_share,
                f"the convergence fitted to its batch bests leaves {fitted:.0%} of the way to its floor",
            )
        # Too few batch bests to fit: the spread of the batch bests, or the pace of the best.
        spread = self._spread_share()
        if spread is not None and spread > c.stall_spread_far:
            return True, f"its batch bests still spread {spread:.0%} as wide as at its start"
        # No target: split the job's life up to its last improvement in three spans and, if the
        # gains shrank from the second to the third, extrapolate them geometrically (Aitken) to
        # what was left to gain: a job closing in on its floor has converged, not stalled.
        h = max(c.stall_cycles, (last_improvement - self._first[0]) // 3)
        b1, b2 = self._best_at(last_improvement - 2 * h), self._best_at(last_improvement - h)
        d2, d3 = b1 - b2, b2 - best
        if d3 >= d2:
            return True, f"its gains did not slow down over the last {2 * h} cycles before"
        ratio = d3 / d2
        left = d3 * ratio / (1 - ratio)
        share = left / (gained + left)
        return (
            share > c.stall_far_share,
            f"its pace before suggested {share:.0%} of the way to its floor was left",
        )

    def _floor_share(self, best: float, until: int) -> float | None:
        """The share of the way from the first best to the job's floor left at ``best``, the floor
        fitted (:func:`fit_floor`) to the batch bests up to cycle ``until`` -- a stall's own
        batches would pull it up to where the job froze -- or None with fewer than
        ``3 * stall_cycles`` of them (the first few batches of a noisy job can look levelled
        off). Fitted once per last improvement."""
        assert self._first is not None
        if self._floor_fit is None or self._floor_fit[0] != until:
            points = [(cycle, b) for cycle, b in self._last_batches(_FLOOR_POINTS) if cycle <= until]
            enough = len(points) >= 3 * self.config.stall_cycles
            self._floor_fit = (until, fit_floor(points) if enough else None)
        floor = self._floor_fit[1]
        if floor is None or self._first[1] <= floor:
            return None
        return (best - floor) / (self._first[1] - floor)

    def _spread_share(self) -> float | None:
        """The median step between the recent batch bests over that between the first ones (None
        before there are enough, or when the first ones did not move)."""
        recent = self._recent_steps
        if len(recent) < self.config.stall_spread_window or len(self._first_steps) < len(recent) // 2:
            return None
        first = statistics.median(self._first_steps)
        return statistics.median(recent) / first if first > 0 else None

    def _best_at(self, cycle: int) -> float:
        """The job's best after ``cycle`` (the first best before the first cycle)."""
        i = bisect.bisect_right(self._improvements, (cycle, math.inf))
        return self._improvements[i - 1][1] if i else self._improvements[0][1]
