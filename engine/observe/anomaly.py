"""Anomaly detection on a job's per-cycle series: rules plus a robust statistical detector.

Pure logic, fed one :class:`~engine.core.CycleRecord` at a time by :meth:`AnomalyDetector.observe`
(the flow's observer does that after every cycle, and replays the stored cycles on resume). It
returns :class:`Finding` s, at most one per *episode*: an anomaly that lasts ten cycles is reported
once, when it starts, and may be reported again only after it has been clear for
``DetectorConfig.clear_cycles`` cycles.

The kinds (stable names; events are ``refinement.anomaly.<kind>``):

``failure_burst``
    The share of failed evaluations in a cycle (or pooled over its last 2 to ``failure_window``) is
    above ``failure_share_bound`` *and* improbable under the job's own failure rate so far
    (binomial tail below ``failure_alpha``): a job that always fails 8% of its candidates is not
    bursting when a batch of 8 loses 3, a job that never fails is. A cycle short of that but
    improbable all the same (below ``failure_hold_alpha``) is learned into the rate only if no
    burst follows soon, so a burst's first cycles do not raise the rate its later ones are judged by.
``stall``
    The job stopped improving while far from its goal, by either of two tests. A dry spell: no
    improvement (as the spec's ``tolerance`` counts it) for as many cycles as make it improbable
    (below ``stall_alpha``) at the job's own improvement rate -- the lower end of its 90% interval
    over the ``stall_window`` cycles before -- at least ``stall_cycles`` and at most
    ``stall_max_cycles``; or ``stall_cycles`` once the batch bests collapsed onto a point (their
    spread below ``stall_collapse_ratio`` of its usual). Or a slowdown, for a stalled search that
    still draws the odd lucky batch: in one of the last ``stall_slowdown_windows`` cycles it
    improved far less often than at its rate before (beta-binomial tail below
    ``stall_slowdown_alpha``, or below ``stall_slowdown_flat_alpha`` when its batch bests also
    stopped closing in on the best: a converging job's keep closing in between improvements,
    whatever the noise). Or a loss of trend in the batch bests' ranks: a job
    converging at ``r`` (in log gap) with batch noise ``s`` draws a batch best better than the one
    ``k`` cycles before with probability ``Phi(theta k / sqrt 2)``, ``theta = r / s``, whatever its
    floor and scale, and a stalled one with probability one half; ``theta`` is learned from the
    ``stall_window`` batches before a recent window (one of ``stall_rank_windows``), and the
    window's Mann-Kendall sum must fall ``stall_rank_z`` deviations (of the sum under no trend)
    short of what it predicts. Or, whatever was learned before, no trend at all: after
    ``stall_cycles`` without improvement the last ``stall_flat_window`` batch bests trend down by
    less than ``stall_flat_z`` deviations of their Mann-Kendall sum (a stall that struck early,
    before there was a trend to learn, or that the rank test's history already reaches into).
    The ranks also confirm: a dry spell or a slowdown is a stall only if the shortfall is at
    least ``stall_rank_confirm_z`` (a job that waits for a lucky record to be matched is still
    closing in, batch by batch); with a target, it stands alone while the ranks cannot be judged
    yet (too short a history). Far from the goal: with a target, more than
    ``stall_far_share`` of the way from the first best to it is left; without one, more than
    ``stall_floor_far_share`` of the way to the job's floor, fitted to its batch bests before the
    window that lost the pace (the last improvement for a dry spell): a converging search's
    losses close in on their floor geometrically with a log-normal noise, so
    ``log(batch best - floor)`` is a line in the cycle, and the floor under which it is most
    likely one is profiled (``_fit_trend``) -- a job that levels off at its floor has reached
    it, a stalled one froze far above it. With fewer than ``3 * stall_cycles`` batch bests to
    fit: either the job's gains, extrapolated geometrically from the last two thirds of its
    life, leave more than that share to its floor, or its batch bests still spread more than
    ``stall_spread_far`` as wide as at its start (the median step between the last
    ``stall_spread_window`` of them against that of its first half as many: a search's batch
    noise scales with its gap to the floor). A rank shortfall while a window holds batches of a
    regression episode is not counted (they lost the trend for that), nor a dry spell or a rate
    drop reaching back into one (the job had ground to regain: a dry spell is counted from the
    regression's end), and no stall is called while the batch bests since the last improvement
    sit more than ``stall_lost_ground`` noise deviations above the level before it (a stalled
    population keeps its level; one that lost ground regressed, whether or not that was
    recognised). The episode ends after
    ``stall_resume`` improvements.
``regression``
    The best score so far can never get worse (it is a running best), so a "regression of the
    best" means the *batch best*: the best of each new cycle is markedly worse than the job's
    trend, in ``regression_cycles`` of the last ``regression_cycles + 1`` cycles, or each of the
    last ``regression_cycles`` above ``regression_hold_z`` deviations and all but one of them
    markedly worse (a noisy job's regression of 4-5 deviations drops one batch under the bound now
    and then) or all ``regression_run_excess`` level-to-best gaps above the recent level (a young
    trend's few batches leave its line and noise loose) -- the search lost ground (a diverging
    step size, a bad restart, a changed problem). The trend: a floor
    ``f`` approached geometrically, ``log(batch best - f)`` linear in the cycle with normal noise,
    fitted (``f`` by profile likelihood) on the last ``regression_fit_window`` normal batch bests,
    the older ones weighing less (half as much ``regression_half_life`` cycles back): it follows a
    job that shrinks its gap tenfold in a few cycles, where a median of raw batch bests lags far
    behind, and one that levels off or stalls (a bend one line through all of them misses, its
    floor then hugging the lowest batch so that ordinary ones look far above). Markedly: the batch best's
    log height above ``f`` lies ``regression_z`` prediction deviations above the line at the last
    normal cycle (not extrapolated to this one: a regression loses ground against where the job
    was, a stall only stops gaining), *and* ``regression_min_excess`` level-to-best gaps above the
    median of the last ``regression_level`` normal batch bests (worse than the job just was). A
    batch above the trend but short of the bound is learned (into the trend and that level) only
    if no worse one follows soon, so a regression's first batches do not widen the noise its later
    ones are judged by, nor raise the level they are compared with.

A stall and a regression share symptoms (a search that lost ground makes no progress; a stalled
population's batch bests wander, and spread wider when it moves again), so one is not reported
while the other's episode is open, nor a regression within ``stall_quiet_cycles`` after a stall,
nor a stall on a cycle whose batch best is a regression suspect (``regression_hold_z`` deviations
above the trend: a regression's first batches are what end the trend the stall tests look for).
``slow_cycle``
    The cycle took longer than ``max_cycle_seconds`` (if set), or, in ``timing_cycles`` of the
    last ``timing_cycles + 1`` cycles, its duration is more than ``timing_z`` robust deviations
    and ``timing_min_ratio`` times above the job's learned normal (median of its last
    ``timing_window`` normal cycles, in log) -- or its evaluation cost per candidate is, with a
    slower cycle -- *and* costlier evaluations explain at least half of the slow-down. A milder
    excess (``timing_sustained_z`` deviations, still ``timing_min_ratio`` times) counts too when it
    holds in ``timing_sustained_cycles`` cycles in a row: a noisy job hides a lasting x2-3 inside
    its spread, but single GC-like spikes do not line up.
``throughput_collapse``
    The cycle is ``timing_min_ratio`` times slower than usual and its duration or its computed
    evaluations per second are ``timing_z`` robust deviations out (``collapse_cycles`` of the
    last ``collapse_cycles + 1``) while each evaluation costs what it used to: the executor sat
    idle (lost workers, a stalled scheduler, store or cache); or by the milder excess, lasting.
    Slow evaluations are ``slow_cycle``; an idle executor is this. Cache hits make the evaluations
    computed per cycle, and with them the throughput, vary: a cycle that computed few in its usual
    time was not idle, and an idle one among such cycles shows in its time.

The statistical detectors learn each job as it runs: timing is not judged before
``timing_warmup`` normal cycles, nor on the first cycle of a run (imports, worker start), nor on
cycles under ``timing_min_seconds``; cycles judged anomalous (and a stalled search) do not move
what is learned as normal.
"""

from __future__ import annotations

import bisect
import itertools
import math
import statistics
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Final

from engine.core.cycle import CycleRecord

__all__ = ["ANOMALY_KINDS", "AnomalyDetector", "DetectorConfig", "Finding"]

ANOMALY_KINDS: Final = ("failure_burst", "stall", "regression", "slow_cycle", "throughput_collapse")
"""Every kind a finding can have, in the order a cycle is checked."""

_MAD_TO_SIGMA = 1.4826
_GOLDEN = (math.sqrt(5) - 1) / 2
_FLOOR_POINTS = 200  # the last batch bests a stall's floor is fitted to
_FLOOR_REFINE_STEPS = 6  # golden-section steps that refine a trend's floor around the best grid step
_NORMAL = statistics.NormalDist()


@dataclass(frozen=True, slots=True)
class Finding:
    """One anomaly episode, reported at the cycle it was recognised."""

    kind: str
    cycle: int
    message: str
    evidence: dict[str, Any]

    @property
    def event(self) -> str:
        """The Prefect event name: ``refinement.anomaly.<kind>``."""
        return f"refinement.anomaly.{self.kind}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class DetectorConfig:
    """Bounds and sensitivities of the detector; a job sets any of them in its spec's
    ``anomaly_params`` (:meth:`from_params`). The defaults were chosen on ``bench/anomaly.py``
    with its default seed and seeds 1-3 (precision 0.948-0.973, recall 0.948-0.972) and two seeds
    of 2,400 runs, and checked on seeds 7, 11, 12345 (precision 0.95-0.98, recall 0.92-0.96),
    ``--plateau 0.5`` and 14,400 fresh runs (precision 0.957, recall 0.950); at most 0.03 false
    alarms per 100 normal cycles, delay p50 2 cycles. Stalls are the weak kind: bench/README.md."""

    failure_share_bound: float = 0.25
    """A cycle (or the pooled window) must fail more than this share to be a burst."""
    failure_min_count: int = 2
    """...and at least this many evaluations."""
    failure_alpha: float = 1e-3
    """...and be this improbable under the job's failure rate so far (binomial upper tail)."""
    failure_prior: tuple[float, float] = (1.0, 20.0)
    """Pseudo-counts (failures, evaluations) of the failure rate before the job has any: 5%."""
    failure_window: int = 3
    """Cycles pooled (the last 2, 3, ... this many) to catch a burst spread thin over small batches."""
    failure_hold_alpha: float = 0.05
    """A cycle short of a burst but this improbable (in any scope) is learned into the usual rate
    only once ``failure_window`` more cycles passed without a burst: a burst's first cycles must not
    raise the rate its later ones are judged by."""

    stall_cycles: int = 5
    """Cycles without improvement before a stall can be called."""
    stall_window: int = 30
    """Cycles up to the last improvement from which the job's improvement rate ``p`` is learned."""
    stall_alpha: float = 1e-2
    """A stall needs a run of non-improving cycles this improbable at rate ``p``: (1 - p)^k < alpha."""
    stall_collapse_ratio: float = 0.1
    """...or just ``stall_cycles`` when the batch bests' spread fell below this share of its usual
    (the population collapsed onto a point: no lucky batch is coming)."""
    stall_max_cycles: int = 25
    """...but never more than this many: a job that far from its goal is stalled whatever its pace."""
    stall_resume: int = 3
    """Improvements that end a stall episode (a stalled search still draws the odd lucky batch)."""
    stall_slowdown_windows: tuple[int, ...] = (8, 12, 16, 20)
    """Recent windows in which a sharp drop of the improvement rate is a stall (see the module doc)."""
    stall_slowdown_alpha: float = 1e-3
    """...how improbable the drop must be at the job's rate before the window."""
    stall_slowdown_flat_alpha: float = 3e-3
    """...or this, when the batch bests also stopped closing in on the best (``stall_trend_margin``)."""
    stall_trend_margin: float = 0.0
    """Batch bests "stopped closing in" when the median log height above the best of the later half
    of them is less than this below the earlier half's."""
    stall_rank_windows: tuple[int, ...] = (8, 12, 16, 24)
    """Recent windows of batch bests whose ranks are tested for lost trend (see the module doc)."""
    stall_rank_z: float = 4.0
    """The shortfall of a window's rank trend (in deviations) that is a stall on its own."""
    stall_rank_confirm_z: float = 1.5
    """The least shortfall (in any window) that confirms a dry spell or slowdown (with a target,
    only once the ranks can be judged)."""
    stall_lost_ground: float = 1.5
    """No stall is called while the batch bests since the last improvement sit more than this many
    robust deviations of the batch-to-batch noise above the level before (see ``_lost_ground``):
    a stalled population keeps the level it froze at, one that lost ground regressed."""
    stall_level: int = 7
    """Batch bests up to the last improvement whose median is that level."""
    stall_quiet_cycles: int = 10
    """Cycles after a stall episode during which no regression is reported (a population that
    moves again spreads wider than while it was stuck)."""
    stall_far_share: float = 0.05
    """Still "far" while more than this share of the way remains: to the target, or without one
    (and too few batch bests to fit a floor) to the floor the pace of the best suggests."""
    stall_floor_far_share: float = 0.1
    """Without a target, "far" while more than this share of the way to the floor fitted to the
    batch bests remains: twice ``stall_far_share``, as the fitted floor is itself uncertain (a job
    levelling off just above it has often reached its real one)."""
    stall_flat_window: int = 32
    """Recent batch bests that must show a downward trend (see ``stall_flat_z``)."""
    stall_flat_z: float = 1.5
    """A job whose last ``stall_flat_window`` batch bests trend down by less than this (their
    Mann-Kendall sum, in deviations of it under no trend), after ``stall_cycles`` without
    improvement, is stalled when far from its goal, whatever it learned before: a job converging at
    a tenth of its batch noise per cycle shows about 4 over 32 batches."""
    stall_spread_far: float = 0.3
    """Without a target and too few batch bests to fit a floor, also "far" while their recent
    spread is more than this share of their first (noise scales with the gap to the floor)."""
    stall_spread_window: int = 8
    """Recent batch-to-batch steps whose median is the recent spread; the first half as many make
    the first spread."""

    regression_fit_window: int = 32
    """Recent normal batch bests the job's trend (its floor and log-linear approach) is fitted on."""
    regression_warmup: int = 8
    """Normal batch bests needed before the trend is fitted and batches are judged."""
    regression_z: float = 3.0
    """A batch is markedly worse when its log height above the fitted floor lies this many
    prediction deviations above the trend at the last normal cycle..."""
    regression_min_excess: float = 2.0
    """...and it lies this many level-to-best gaps above the level (median of the last
    ``regression_level`` normal batch bests): worse than where the job just was, not only short of
    where its trend was heading (a stall)."""
    regression_level: int = 3
    """Recent normal batch bests whose median is that level."""
    regression_half_life: float | None = 16.0
    """The trend weighs each batch best by ``0.5 ** (age / regression_half_life)`` (age in cycles
    from the last one; None: all alike), so it follows a job whose convergence bends -- one that
    levels off at a floor or stalls -- where one line through all 32 makes the fitted floor hug
    the lowest batch and ordinary batches look far above the trend."""
    regression_hold_z: float = 2.5
    """A batch this many deviations above the trend (but not markedly worse) is learned only once
    ``regression_cycles`` more cycles passed without a worse one: the first batches of a regression
    that fell short of the bound do not widen the learned noise. ``regression_cycles`` in a row
    above it and ``regression_min_excess`` above the level, all but one of them markedly worse,
    are a regression too."""
    regression_run_excess: float = 5.0
    """...as are ``regression_cycles`` in a row above ``regression_hold_z`` (or ``regression_far_z``)
    and each this many level-to-best gaps above the level: a young trend's loose deviation hides a
    large regression (its few batches make the line and the noise uncertain), not its batches'
    distance from the level the job just kept. A batch that far above the level and above the
    trend at all is held, as one over ``regression_hold_z`` is."""
    regression_far_z: float = 2.0
    """The trend deviations a batch ``regression_run_excess`` gaps above the level must exceed to
    count towards that run."""
    regression_cycles: int = 3
    """Cycles among the last ``regression_cycles + 1`` that must be markedly worse, this one
    included (one bad batch is noise)."""

    max_cycle_seconds: float | None = None
    """An absolute bound on a cycle's duration; ``None``: only the learned normal applies."""
    timing_window: int = 20
    """Recent normal cycles that make up the learned normal duration and throughput."""
    timing_warmup: int = 5
    """Normal cycles to learn from before timing is judged."""
    timing_z: float = 3.5
    """Robust standard deviations (of log duration or log throughput) that count as abnormal."""
    timing_min_ratio: float = 1.8
    """...and at least this factor slower (a very steady job's tiny jitter is not an anomaly)."""
    timing_sigma_floor: float = 0.05
    """Least robust deviation of log duration assumed (5%): steady jobs are not over-sensitive."""
    timing_min_seconds: float = 0.02
    """Cycles shorter than this are never slow: millisecond cycles jitter by multiples, harmlessly."""
    timing_cycles: int = 2
    """Slow cycles needed among the last ``timing_cycles + 1`` (one busy neighbour is noise)."""
    collapse_cycles: int = 3
    """Idle-executor cycles needed among the last ``collapse_cycles + 1`` (GC pauses come in pairs)."""
    timing_sustained_z: float = 2.0
    """...or a milder excess, this many robust deviations (and ``timing_min_ratio``), in each of..."""
    timing_sustained_cycles: int = 4
    """...this many cycles in a row: a lasting slow-down hidden in a noisy job's timing (spikes in
    its learned window widen the deviation) shows as a run that GC-like single spikes never make."""

    clear_cycles: int = 2
    """Clear cycles after which an episode ends and the same kind may be reported again."""

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> DetectorConfig:
        """The defaults with ``params`` (a spec's ``anomaly_params``) laid over them.

        Raises ValueError with one line naming the bad key: an unknown name, a value of the wrong
        type (a whole number where one is counted, a number where one is measured), or one out of
        range.
        """
        defaults = cls()
        values: dict[str, Any] = {}
        for name, value in params.items():
            if name not in cls.__dataclass_fields__:
                known = ", ".join(sorted(cls.__dataclass_fields__))
                raise ValueError(f"unknown setting {name!r} (known: {known})")
            default = getattr(defaults, name)
            if name in ("stall_slowdown_windows", "stall_rank_windows"):
                least = 3 if name == "stall_rank_windows" else 1  # a rank trend needs 3 batches
                ok = isinstance(value, list | tuple) and all(isinstance(w, int) and w >= least for w in value)
                if not ok or not value:
                    raise ValueError(f"{name} must be a list of whole numbers >= {least}, got {value!r}")
                value = tuple(value)
            elif name == "failure_prior":
                ok = isinstance(value, list | tuple) and len(value) == 2 and all(map(_is_number, value))
                if not ok:
                    raise ValueError(f"{name} must be [failures, evaluations], got {value!r}")
                value = (float(value[0]), float(value[1]))
            elif isinstance(default, int) and not isinstance(default, bool):
                if not isinstance(value, int) or isinstance(value, bool):
                    raise ValueError(f"{name} must be a whole number, got {value!r}")
            elif value is not None or name not in ("max_cycle_seconds", "regression_half_life"):
                if not _is_number(value):
                    raise ValueError(f"{name} must be a number, got {value!r}")
                value = float(value)
            values[name] = value
        return cls(**values)

    def __post_init__(self) -> None:
        positive = {
            "failure_min_count": self.failure_min_count,
            "failure_window": self.failure_window,
            "stall_cycles": self.stall_cycles,
            "stall_window": self.stall_window,
            "stall_resume": self.stall_resume,
            "stall_max_cycles": self.stall_max_cycles,
            "stall_level": self.stall_level,
            "regression_level": self.regression_level,
            "regression_fit_window": self.regression_fit_window,
            "regression_cycles": self.regression_cycles,
            "timing_window": self.timing_window,
            "timing_warmup": self.timing_warmup,
            "timing_cycles": self.timing_cycles,
            "collapse_cycles": self.collapse_cycles,
            "timing_sustained_cycles": self.timing_sustained_cycles,
            "clear_cycles": self.clear_cycles,
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.stall_flat_window < 3:
            raise ValueError(f"stall_flat_window must be at least 3, got {self.stall_flat_window}")
        for name, share in (
            ("failure_share_bound", self.failure_share_bound),
            ("stall_far_share", self.stall_far_share),
            ("stall_floor_far_share", self.stall_floor_far_share),
            ("stall_collapse_ratio", self.stall_collapse_ratio),
            ("stall_spread_far", self.stall_spread_far),
        ):
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {share}")
        if not self.stall_slowdown_windows or min(self.stall_slowdown_windows) < 1:
            raise ValueError(
                f"stall_slowdown_windows must be whole numbers >= 1, got {self.stall_slowdown_windows}"
            )
        if not self.stall_rank_windows or min(self.stall_rank_windows) < 3:
            raise ValueError(f"stall_rank_windows must be whole numbers >= 3, got {self.stall_rank_windows}")
        if self.stall_spread_window < 2:
            raise ValueError(f"stall_spread_window must be at least 2, got {self.stall_spread_window}")
        if self.stall_quiet_cycles < 0:
            raise ValueError(f"stall_quiet_cycles must not be negative, got {self.stall_quiet_cycles}")
        for name, alpha in (
            ("failure_alpha", self.failure_alpha),
            ("failure_hold_alpha", self.failure_hold_alpha),
            ("stall_alpha", self.stall_alpha),
            ("stall_slowdown_alpha", self.stall_slowdown_alpha),
            ("stall_slowdown_flat_alpha", self.stall_slowdown_flat_alpha),
        ):
            if not 0.0 < alpha < 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {alpha}")
        if self.failure_prior[0] < 0 or self.failure_prior[1] <= self.failure_prior[0]:
            raise ValueError(
                f"failure_prior must be (failures, evaluations) with 0 <= f < n, got {self.failure_prior}"
            )
        if self.timing_warmup > self.timing_window:
            raise ValueError("timing_warmup must not exceed timing_window")
        if self.max_cycle_seconds is not None and self.max_cycle_seconds <= 0:
            raise ValueError(f"max_cycle_seconds must be positive, got {self.max_cycle_seconds}")
        if min(self.regression_z, self.regression_hold_z, self.timing_z, self.timing_min_ratio) <= 0:
            raise ValueError(
                "regression_z, regression_hold_z, timing_z and timing_min_ratio must be positive"
            )
        if self.regression_far_z < 0:
            raise ValueError(f"regression_far_z must not be negative, got {self.regression_far_z}")
        if self.regression_half_life is not None and self.regression_half_life <= 0:
            raise ValueError(f"regression_half_life must be positive, got {self.regression_half_life}")
        if self.regression_min_excess < 0:
            raise ValueError(f"regression_min_excess must not be negative, got {self.regression_min_excess}")
        if self.regression_run_excess < 0:
            raise ValueError(f"regression_run_excess must not be negative, got {self.regression_run_excess}")
        if not 4 <= self.regression_warmup <= self.regression_fit_window:
            raise ValueError("regression_warmup must be at least 4 and at most regression_fit_window")
        if self.timing_sustained_z <= 0:
            raise ValueError(f"timing_sustained_z must be positive, got {self.timing_sustained_z}")
        if self.stall_lost_ground <= 0:
            raise ValueError(f"stall_lost_ground must be positive, got {self.stall_lost_ground}")
        if self.stall_rank_z <= 0:
            raise ValueError(f"stall_rank_z must be positive, got {self.stall_rank_z}")
        if self.timing_min_seconds < 0:
            raise ValueError(f"timing_min_seconds must not be negative, got {self.timing_min_seconds}")
        if self.timing_sigma_floor <= 0:
            raise ValueError(f"timing_sigma_floor must be positive, got {self.timing_sigma_floor}")


@dataclass
class _Episode:
    """Whether a kind's anomaly is going on, and for how many cycles it has been clear."""

    open: bool = False
    clear: int = 0
    run: int = 0  # consecutive cycles the raw condition held


@dataclass
class _Timing:
    """The learned normal of cycle timing: recent log durations, log throughputs, log costs."""

    duration: deque[float]
    throughput: deque[float]
    cost: deque[float]


@dataclass
class AnomalyDetector:
    """Stateful detector for one job; call :meth:`observe` with each cycle in order.

    ``maximize``: the job's direction (scores in records are the problem's own; higher is better
    when maximising). ``target`` and ``tolerance`` are the spec's. Not thread-safe. Its state is a
    function of the cycles seen, so :meth:`rebuild` from the stored cycles restores it on resume.
    """

    maximize: bool
    target: float | None = None
    tolerance: float = 0.0
    config: DetectorConfig = field(default_factory=DetectorConfig)

    def __post_init__(self) -> None:
        c = self.config
        self._episodes = {kind: _Episode() for kind in ANOMALY_KINDS}
        self._last_cycle = 0
        self._stall_ended: int | None = None  # the last cycle a stall episode was open
        self._regression_ended: int | None = None  # the last cycle a regression episode was open
        # failures
        self._fail_clean = [c.failure_prior[0], c.failure_prior[1]]  # failures, evaluations
        self._fail_recent: deque[tuple[int, int]] = deque(maxlen=c.failure_window)
        self._fail_held: deque[tuple[int, int, int]] = deque()  # suspect (cycle, failed, evaluations)
        # progress (losses: lower is better, whatever the direction)
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
        self._trend: list[tuple[int, float]] = []  # (cycle, loss): the normal batch bests of the trend
        self._held: deque[tuple[int, float]] = deque()  # suspect ones, learned if no regression follows
        self._best_before: float | None = None
        # spread of the batch bests (see _spread_share): their first and their recent steps
        self._first_steps: list[float] = []
        self._recent_steps: deque[float] = deque(maxlen=c.stall_spread_window)
        # rank trend of the batch bests (see _rank_shortfall): per position, cumulative counts per lag
        self._rank_lags = max(c.stall_rank_windows) - 1
        self._rank_cumulative: deque[list[float]] = deque(
            maxlen=c.stall_window + max(c.stall_rank_windows) + 1
        )
        self._rank_recent: deque[float] = deque(maxlen=self._rank_lags)
        self._rank_cycles: deque[int] = deque(maxlen=self._rank_cumulative.maxlen)  # their cycles
        self._floor_fit: tuple[int, float | None] | None = None  # (up to cycle, floor): _floor_share
        self._worse: deque[bool] = deque(maxlen=c.regression_cycles + 1)  # recent cycles' verdicts
        self._suspect: deque[bool] = deque(maxlen=c.regression_cycles)  # ...over regression_hold_z
        self._far: deque[bool] = deque(maxlen=c.regression_cycles)  # ...regression_run_excess above the level
        self._suspect_now = False  # this cycle's batch best is a regression suspect
        # timing
        self._timing = _Timing(
            deque(maxlen=c.timing_window), deque(maxlen=c.timing_window), deque(maxlen=c.timing_window)
        )
        self._skip_timing = 1  # the first cycle of a run pays for imports and worker start
        self._timing_verdicts: dict[str, deque[bool]] = {
            "slow_cycle": deque(),
            "throughput_collapse": deque(),
        }
        self._timing_sustained: dict[str, deque[bool]] = {
            kind: deque(maxlen=c.timing_sustained_cycles) for kind in ("slow_cycle", "throughput_collapse")
        }

    # -- public -----------------------------------------------------------------------------------

    @classmethod
    def rebuild(
        cls,
        cycles: Iterable[CycleRecord],
        *,
        maximize: bool,
        target: float | None = None,
        tolerance: float = 0.0,
        config: DetectorConfig | None = None,
    ) -> AnomalyDetector:
        """A detector in the state it had after ``cycles`` (the stored ones, on resume).

        Their findings were reported when they happened and are dropped; an episode still open at
        the end stays open, so it is not reported twice. The next cycle starts a new process, so
        its timing is not judged.
        """
        detector = cls(maximize, target, tolerance, config or DetectorConfig())
        for record in cycles:
            detector.observe(record)
        detector._skip_timing = 1
        return detector

    @property
    def open_episodes(self) -> list[str]:
        """The kinds whose anomaly is going on now."""
        return [kind for kind, episode in self._episodes.items() if episode.open]

    def observe(self, record: CycleRecord) -> list[Finding]:
        """Take one cycle into account; return the anomalies that start with it."""
        if record.cycle <= self._last_cycle:
            raise ValueError(
                f"cycle {record.cycle} observed after cycle {self._last_cycle}: feed cycles in order"
            )
        self._last_cycle = record.cycle
        found: dict[str, dict[str, Any] | None] = {
            "failure_burst": self._failure_burst(record),
            "stall": self._stall(record),
            "regression": self._regression(record),
        }
        found.update(self._timing_anomalies(record))
        self._one_name_per_cause(record.cycle, found)
        findings = []
        for kind in ANOMALY_KINDS:
            evidence = found[kind]
            finding = self._episode(kind, record.cycle, evidence)
            if finding is not None:
                findings.append(finding)
        return findings

    # -- episodes ---------------------------------------------------------------------------------

    def _episode(self, kind: str, cycle: int, evidence: dict[str, Any] | None) -> Finding | None:
        episode = self._episodes[kind]
        if evidence is None:
            episode.clear += 1
            if episode.clear >= self.config.clear_cycles:
                episode.open = False
            return None
        episode.clear = 0
        if episode.open:
            return None
        episode.open = True
        message = str(evidence.pop("message"))
        return Finding(kind, cycle, message, evidence)

    def _one_name_per_cause(self, cycle: int, found: dict[str, dict[str, Any] | None]) -> None:
        """Drop a new stall or regression that the other kind's open episode explains.

        A search that lost ground makes no progress either, and a stalled population's batch
        bests wander and, when it moves again, spread wider than they did while it was stuck:
        each episode's symptoms look like the other kind for a while. The first one named
        is the cause; the other is not reported while it is open, nor (a regression) for
        ``stall_quiet_cycles`` after a stall ended. Nor is a stall named on a cycle whose batch
        best is a regression suspect (see :meth:`_regression`): a regression may be starting, and
        its first batches are what made the stall tests see the trend lost.
        """
        stall, regression = self._episodes["stall"], self._episodes["regression"]
        if stall.open:
            self._stall_ended = cycle
        if regression.open:
            self._regression_ended = cycle
        if (
            not stall.open
            and found["stall"] is not None
            and (regression.open or found["regression"] or self._suspect_now)
        ):
            found["stall"] = None
        quiet = self._stall_ended is not None and cycle - self._stall_ended <= self.config.stall_quiet_cycles
        if not regression.open and found["regression"] is not None and (stall.open or quiet):
            found["regression"] = None

    # -- failure bursts ---------------------------------------------------------------------------

    def _failure_burst(self, record: CycleRecord) -> dict[str, Any] | None:
        c = self.config
        failures, evaluations = self._fail_clean
        # The upper end of the usual rate's 90% interval: a job seen for a few cycles may fail
        # more often than it has so far, and a handful of failures must not look like a burst.
        usual = failures / evaluations
        rate = _wilson_bounds(failures, evaluations)[1]
        self._fail_recent.append((record.failed, record.evaluations))
        evidence = None
        suspect = False  # improbable in some scope (failure_hold_alpha), if short of a burst
        scopes = [(record.failed, record.evaluations, "cycle")]
        pooled_failed = pooled_n = 0
        for cycles, (failed, n) in enumerate(reversed(self._fail_recent), start=1):
            pooled_failed += failed
            pooled_n += n
            if cycles > 1:
                scopes.append((pooled_failed, pooled_n, f"last {cycles} cycles"))
        for failed, n, scope in scopes:
            if n == 0 or failed < c.failure_min_count or failed / n <= c.failure_share_bound:
                continue
            if scope != "cycle" and record.failed / max(record.evaluations, 1) <= rate:
                continue  # the pooled window may only extend a burst this cycle takes part in
            tail = binomial_upper_tail(failed, n, rate)
            suspect = suspect or tail < c.failure_hold_alpha
            if tail < c.failure_alpha:
                evidence = {
                    "message": (
                        f"cycle {record.cycle}: {failed} of {n} evaluations failed ({failed / n:.0%}) "
                        f"over the {scope}, against a usual {usual:.1%}"
                    ),
                    "failed": failed,
                    "evaluations": n,
                    "failure_share": failed / n,
                    "usual_failure_share": usual,
                    "tested_share": rate,
                    "scope": scope,
                    "probability": tail,
                    "bound": c.failure_share_bound,
                }
                break
        # What is learned as the usual rate: not a burst's cycles; a suspect one (short of a burst,
        # improbable all the same) once failure_window more cycles passed without a burst.
        if evidence is not None:
            self._fail_held.clear()  # a burst's first cycles after all
        while self._fail_held and self._fail_held[0][0] <= record.cycle - c.failure_window:
            self._learn_failures(*self._fail_held.popleft()[1:])
        if evidence is None and not self._episodes["failure_burst"].open:
            if suspect:
                self._fail_held.append((record.cycle, record.failed, record.evaluations))
            else:
                self._learn_failures(record.failed, record.evaluations)
        return evidence

    def _learn_failures(self, failed: int, evaluations: int) -> None:
        self._fail_clean[0] += failed
        self._fail_clean[1] += evaluations

    # -- stalls -----------------------------------------------------------------------------------

    def _loss(self, score: float | None) -> float | None:
        return None if score is None else (-score if self.maximize else score)

    def _stall(self, record: CycleRecord) -> dict[str, Any] | None:
        c = self.config
        best = self._loss(record.best_score)
        if best is None:
            return None
        batch = self._loss(record.batch_best_score)
        if batch is not None:
            if self._history:
                step = abs(batch - self._history[-1][1])
                if len(self._first_steps) < self.config.stall_spread_window // 2:
                    self._first_steps.append(step)
                self._recent_steps.append(step)
            self._history.append((record.cycle, batch))
            self._learn_ranks(record.cycle, batch)
        if self._first is None:
            self._first = (record.cycle, best)
            self._improvements.append((record.cycle, best))
            return None
        if record.improved:
            self._improvements.append((record.cycle, best))
        # A stalled search still draws the odd lucky batch: a stall is over once the job has
        # improved stall_resume times, not at its first lucky batch.
        if not self._episodes["stall"].open:
            self._resumed = 0
        elif record.improved:
            self._resumed += 1
        evidence = None if record.improved else self._stall_evidence(record, best)
        if evidence is None:
            evidence = self._slowdown_evidence(record, best)
        if evidence is not None:
            # The batch bests still close in: an unlucky wait, not a stall. With a target, the
            # dry spell stands alone while the ranks cannot be judged yet (a short history).
            shortfall = self._rank_shortfall()
            if (shortfall is None and self.target is None) or (
                shortfall is not None and shortfall["z"] < c.stall_rank_confirm_z
            ):
                evidence = None
        else:
            evidence = self._rank_evidence(record, best)
        if evidence is None:
            evidence = self._flat_evidence(record, best)
        if evidence is not None and not self._episodes["stall"].open and self._lost_ground():
            evidence = None  # the batch bests got markedly worse: a regression's symptom, not a stall
        if evidence is None and self._episodes["stall"].open and self._resumed < c.stall_resume:
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
        noise = _MAD_TO_SIGMA * statistics.median(steps[-c.stall_window :]) / math.sqrt(2)
        return statistics.median(after) - statistics.median(before) > c.stall_lost_ground * noise

    def _stall_evidence(self, record: CycleRecord, best: float) -> dict[str, Any] | None:
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
        rate = _wilson_bounds(count, max(last - start + 1, c.stall_cycles))[0]
        needed = max(c.stall_cycles, math.ceil(math.log(c.stall_alpha) / math.log1p(-rate)))
        needed = min(needed, max(c.stall_max_cycles, c.stall_cycles))
        if collapsed is not None:
            needed = min(needed, c.stall_cycles)
        # A job that regressed has ground to regain before it can improve: a dry spell is counted
        # from the end of a reported regression it reaches back into.
        regained = last if self._regression_ended is None else max(last, self._regression_ended)
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

    def _slowdown_evidence(self, record: CycleRecord, best: float) -> dict[str, Any] | None:
        """A stall that still draws the odd lucky batch: the job improved in far fewer of its last
        ``w`` cycles than its rate in the ``stall_window`` cycles before them predicts (beta-binomial
        lower tail below ``stall_slowdown_alpha``), for some ``w`` in ``stall_slowdown_windows``.
        """
        c = self.config
        assert self._first is not None
        now = record.cycle
        for w in c.stall_slowdown_windows:
            start = now - w + 1  # the recent window: cycles start..now
            if _reaches(start, self._regression_ended):
                break  # the window reaches back into a reported regression (see _stall_evidence)
            early = max(start - c.stall_window, self._first[0] + 1)
            trials = start - early
            if trials < c.stall_cycles:
                break
            recent = _count_between(self._improvements, start, now)
            before = _count_between(self._improvements, early, start - 1)
            if recent * trials >= before * w:
                continue  # at least its usual pace: nothing to test
            tail = _beta_binomial_cdf(recent, w, before + 0.5, trials - before + 0.5)
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

    def _learn_ranks(self, cycle: int, loss: float) -> None:
        """Count, per lag k, the batch bests better than the one k batches before (ties: half)."""
        row = self._rank_cumulative[-1].copy() if self._rank_cumulative else [0.0] * (self._rank_lags + 1)
        for k, before in enumerate(reversed(self._rank_recent), start=1):
            row[k] += 1.0 if loss < before else 0.5 if loss == before else 0.0
        self._rank_cumulative.append(row)
        self._rank_cycles.append(cycle)
        self._rank_recent.append(loss)

    def _rank_shortfall(self) -> dict[str, Any] | None:
        """The largest shortfall of a recent window's rank trend below the job's learned one.

        For each window of ``w`` recent batch bests with at least ``2 * stall_cycles`` before it:
        ``theta`` from the share of concordant pairs (a batch best better than an earlier one)
        among the up to ``stall_window`` batches before the window, solved at their mean lag; the
        window's Mann-Kendall sum against the sum that ``theta`` predicts, in deviations of the
        sum under no trend. None when no window can be judged or the job had no trend to lose.
        """
        c = self.config
        cum = self._rank_cumulative
        n = len(cum)
        worst: dict[str, Any] | None = None
        for w in c.stall_rank_windows:
            history = min(n - w, c.stall_window)
            if history < 2 * c.stall_cycles:
                continue
            if _reaches(self._rank_cycles[n - w], self._regression_ended):
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
            z = (expected - observed) / _mann_kendall_sd(w)
            if worst is None or z > worst["z"]:
                worst = {"window": w, "rank_sum": observed, "expected_rank_sum": expected, "z": z}
        return worst

    def _rank_evidence(self, record: CycleRecord, best: float) -> dict[str, Any] | None:
        """A stall seen in the batch bests' ranks: a window's trend ``stall_rank_z`` deviations short."""
        shortfall = self._rank_shortfall()
        if shortfall is None or shortfall["z"] <= self.config.stall_rank_z:
            return None
        start = self._rank_cycles[len(self._rank_cycles) - shortfall["window"]]
        message = (
            f"cycle {record.cycle}: the last {shortfall['window']} batch bests lost the job's trend "
            f"(rank sum {shortfall['rank_sum']:+.0f} where its pace predicts "
            f"{shortfall['expected_rank_sum']:+.0f}, {shortfall['z']:.1f} deviations short; "
            f"best {record.best_score:.6g})"
        )
        evidence = {"cycles_without_improvement": record.cycle - self._improvements[-1][0], **shortfall}
        return self._if_far(record, best, message, evidence, until=start - 1)

    def _flat_evidence(self, record: CycleRecord, best: float) -> dict[str, Any] | None:
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
        if _reaches(start, self._regression_ended) or _reaches(start, self._stall_ended):
            return None  # a regression's batches lost the trend for that; a reported stall's, too
        losses = [b for _, b in window]
        total = 0
        for i, a in enumerate(losses):
            for b in losses[i + 1 :]:
                total += (b < a) - (b > a)
        z = total / _mann_kendall_sd(w)
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
    ) -> dict[str, Any] | None:
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
        """Whether the job is still far from its goal (see the module doc); without a target, the
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
        # The floor the batch bests up to the last improvement converged to (see _fit_trend).
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
        fitted (:func:`_fit_floor`) to the batch bests up to cycle ``until`` -- a stall's own
        batches would pull it up to where the job froze -- or None with fewer than
        ``3 * stall_cycles`` of them (the first few batches of a noisy job can look levelled
        off). Fitted once per last improvement."""
        assert self._first is not None
        if self._floor_fit is None or self._floor_fit[0] != until:
            points = [(cycle, b) for cycle, b in self._last_batches(_FLOOR_POINTS) if cycle <= until]
            enough = len(points) >= 3 * self.config.stall_cycles
            self._floor_fit = (until, _fit_floor(points) if enough else None)
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

    # -- regressions ------------------------------------------------------------------------------

    def _regression(self, record: CycleRecord) -> dict[str, Any] | None:
        c = self.config
        loss = self._loss(record.batch_best_score)
        best, self._best_before = self._best_before, self._loss(record.best_score)
        self._suspect_now = False
        if loss is None or best is None or len(self._trend) < 3:
            if loss is not None:
                self._learn_trend((record.cycle, loss))
            return None
        episode = self._episodes["regression"]
        # Where the job just was: the median of its last few normal batch bests, and this batch
        # best's excess over it in units of that level's height above the best (or of the recent
        # batch-to-batch noise, if larger: recent, as a fast job's first steps are thousands of
        # times its last). A new best, or a batch under that level, is not worse (and spares the fit).
        recent = [b for _, b in self._trend[-c.regression_level - 2 :]]
        level = statistics.median(recent[-c.regression_level :])
        steps = [abs(b - a) for a, b in itertools.pairwise(recent)]
        scale = max(level - best, _MAD_TO_SIGMA * statistics.median(steps) / math.sqrt(2))
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
        self._suspect_now = suspect
        # What is learned as normal: not a worse batch, nor one of a stalled search; a suspect one
        # (above the trend, short of the bound) once regression_cycles more passed without a
        # regression starting -- its first batches must not widen the noise its later ones are
        # judged by, but dropping every high batch near a lone bad one would bias the trend low.
        if worse and sum(self._worse) >= min(2, c.regression_cycles):
            self._held.clear()  # a regression starting (a lone bad batch does not clear them)
        while self._held and self._held[0][0] < record.cycle - c.regression_cycles:
            self._learn_trend(self._held.popleft())
        if not worse and not self._episodes["stall"].open:
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
        :func:`_fit_trend` with the batch bests weighted by age (``regression_half_life``: one line
        cannot follow a job that bends over into its floor), the floor searched 0.001 to 1,000
        median heights under the lowest batch best. ``loss`` is judged against the line at the
        *last normal cycle*, not extrapolated to this one: a regression loses ground against where
        the job was; a stall only stops gaining (and a trend that batches stopped feeding does not
        drift). The deviation is the prediction's (:meth:`_Trend.deviation`).
        """
        if len(self._trend) < self.config.regression_warmup:
            return None
        bs = [b for _, b in self._trend]
        low = min(min(bs), best)
        trend = _fit_trend(
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

    # -- timing -----------------------------------------------------------------------------------

    def _timing_anomalies(self, record: CycleRecord) -> dict[str, dict[str, Any] | None]:
        c = self.config
        out: dict[str, dict[str, Any] | None] = {"slow_cycle": None, "throughput_collapse": None}
        absolute = c.max_cycle_seconds is not None and record.duration > c.max_cycle_seconds
        computed = record.evaluations - record.cached
        if record.duration <= 0:
            return out
        log_d = math.log(record.duration)
        log_tp = math.log(computed / record.duration) if computed > 0 else None
        log_cost = (
            math.log(record.eval_seconds / computed) if computed > 0 and record.eval_seconds > 0 else None
        )
        slow = collapse = mild_slow = mild_collapse = None
        t = self._timing
        if self._skip_timing:
            self._skip_timing -= 1
        elif len(t.duration) >= c.timing_warmup and record.duration >= c.timing_min_seconds:
            slow, collapse = self._judge_timing(log_d, log_tp, log_cost, c.timing_z)
            mild_slow, mild_collapse = slow, collapse
            if slow is None or collapse is None:
                mild_slow, mild_collapse = self._judge_timing(log_d, log_tp, log_cost, c.timing_sustained_z)
                mild_slow, mild_collapse = slow or mild_slow, collapse or mild_collapse
            if slow is None and collapse is None:
                self._learn_timing(log_d, log_tp, log_cost)
        else:
            self._learn_timing(log_d, log_tp, log_cost)
        for kind, evidence, mild, needed in (
            ("slow_cycle", slow, mild_slow, c.timing_cycles),
            ("throughput_collapse", collapse, mild_collapse, c.collapse_cycles),
        ):
            # m of the last m + 1 cycles: a slowed job still has the odd normal-looking cycle.
            recent = self._timing_verdicts[kind]
            recent.append(evidence is not None)
            while len(recent) > needed + 1:
                recent.popleft()
            # ...or a milder excess in timing_sustained_cycles cycles in a row: a job whose timing
            # is noisy (or had spikes in its learned window) hides a lasting x2-3 within 3.5
            # deviations, but not cycle after cycle; a milder one also keeps an episode open.
            sustained = self._timing_sustained[kind]
            sustained.append(mild is not None)
            lasting = len(sustained) == sustained.maxlen and all(sustained)
            episode = self._episodes[kind]
            episode.run = sum(recent)
            if evidence and episode.run >= needed:
                out[kind] = {
                    "message": _timing_message(kind, record.cycle, episode.run, evidence),
                    **evidence,
                }
            elif mild and lasting:
                out[kind] = {
                    "message": _timing_message(kind, record.cycle, len(sustained), mild),
                    **mild,
                }
            elif mild and episode.open:
                out[kind] = {"message": ""}  # still going on: keep the episode open
        if absolute and out["slow_cycle"] is None:
            out["slow_cycle"] = {
                "message": (
                    f"cycle {record.cycle} took {record.duration:.3g} s, "
                    f"over the bound of {c.max_cycle_seconds:g} s"
                ),
                "duration": record.duration,
                "bound": c.max_cycle_seconds,
            }
        return out

    def _learn_timing(self, log_d: float, log_tp: float | None, log_cost: float | None) -> None:
        t = self._timing
        t.duration.append(log_d)
        if log_tp is not None:
            t.throughput.append(log_tp)
        if log_cost is not None:
            t.cost.append(log_cost)

    def _judge_timing(
        self, log_d: float, log_tp: float | None, log_cost: float | None, z_bound: float
    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """(slow_cycle evidence, throughput_collapse evidence) for this cycle at ``z_bound`` robust
        deviations, either or both None."""
        c = self.config
        t = self._timing
        min_excess = math.log(c.timing_min_ratio)
        normal_d, z_d = _robust_z(log_d, t.duration, c.timing_sigma_floor)
        slowed = log_d - normal_d
        cost_up = None
        if log_cost is not None and len(t.cost) >= c.timing_warmup:
            cost_up = log_cost - statistics.median(t.cost)
        tp_drop = z_tp = None
        normal_tp = 0.0
        if log_tp is not None and len(t.throughput) >= c.timing_warmup:
            normal_tp, z_tp = _robust_z(log_tp, t.throughput, c.timing_sigma_floor)
            tp_drop, z_tp = normal_tp - log_tp, -z_tp
        slow_stat = z_d > z_bound and slowed > min_excess
        # An idle executor makes the cycle markedly slower, and shows in its time or in its
        # evaluations per second. Cache hits make the evaluations computed per cycle vary, and
        # with them the throughput: a cycle that computed few in the usual time was not idle.
        by_throughput = tp_drop is not None and z_tp is not None and z_tp > z_bound and tp_drop > min_excess
        collapse_stat = log_tp is not None and slowed > min_excess and (by_throughput or z_d > z_bound)
        # Evaluation seconds per candidate are far steadier than wall time: a marked rise there
        # with a slower cycle is a slow cycle even when wall-time noise hides it.
        if cost_up is not None and not slow_stat:
            _, z_cost = _robust_z(cost_up + statistics.median(t.cost), t.cost, c.timing_sigma_floor)
            slow_stat = z_cost > z_bound and cost_up > min_excess and slowed > 0.5 * cost_up
        # Who is to blame: evaluations that cost more (slow), or an executor that sat idle (collapse).
        costlier = cost_up is None or cost_up >= 0.5 * max(slowed, tp_drop or 0.0)
        slow = collapse = None
        if slow_stat and costlier:
            slow = {
                "duration": math.exp(log_d),
                "usual_duration": math.exp(normal_d),
                "ratio": math.exp(slowed),
                "robust_z": z_d,
                "evaluation_cost_ratio": None if cost_up is None else math.exp(cost_up),
            }
        if collapse_stat and not costlier:
            assert log_tp is not None
            if z_d > z_bound:  # this cycle's evaluations at the usual cycle time, against its time
                normal_tp, drop, z = log_tp + slowed, slowed, z_d
            else:  # by_throughput
                assert tp_drop is not None and z_tp is not None
                drop, z = tp_drop, z_tp
            collapse = {
                "evaluations_per_second": math.exp(normal_tp - drop),
                "usual_evaluations_per_second": math.exp(normal_tp),
                "ratio": math.exp(-drop),
                "robust_z": z,
                "evaluation_cost_ratio": None if cost_up is None else math.exp(cost_up),
            }
        return slow, collapse


def _timing_message(kind: str, cycle: int, cycles: int, e: dict[str, Any]) -> str:
    cost = e["evaluation_cost_ratio"]
    if kind == "slow_cycle":
        because = f"; each evaluation costs {cost:.1f}x as much" if cost is not None else ""
        return (
            f"cycle {cycle}: cycles take {e['ratio']:.1f}x their usual {e['usual_duration']:.3g} s "
            f"({e['robust_z']:.1f} robust deviations) for {cycles} cycles{because}"
        )
    return (
        f"cycle {cycle}: evaluations/s fell to {e['ratio']:.0%} of the usual "
        f"{e['usual_evaluations_per_second']:.3g} for {cycles} cycles while each evaluation costs as "
        "usual: the executor sat idle (lost workers, a stalled scheduler, store or cache?)"
    )


@dataclass(frozen=True, slots=True)
class _Trend:
    """A job's fitted convergence (:func:`_fit_trend`): ``log(loss - floor)`` a line in the cycle,
    through ``mean`` at ``tbar`` with ``slope``, leaving a weighted ``rss``. Each loss has a weight
    (1 unless :func:`_fit_trend` is given a half-life); ``weight`` is their sum, ``w2`` that of
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


def _fit_trend(
    points: Sequence[tuple[int, float]],
    *,
    below: float,
    unit: float,
    decades: tuple[float, float],
    trim: float | None = None,
    half_life: float | None = None,
) -> _Trend | None:
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

    def fit(g: float) -> tuple[float, _Trend] | None:
        floor = below - unit * 10.0**g
        if floor >= below:
            return None  # under the float resolution of the losses
        ys = [math.log(b - floor) for b in losses]
        trend: _Trend | None = _weighted_line(design, ts, weights, ys, floor)
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


def _weighted_design(ts: list[float], ws: list[float]) -> _Trend | None:
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
    return _Trend(
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


def _weighted_line(design: _Trend, ts: list[float], ws: list[float], ys: list[float], floor: float) -> _Trend:
    """The weighted least-squares line of ``ys`` (log heights above ``floor``) on the cycles
    ``ts`` of ``design``."""
    dts = [t - design.tbar for t in ts]
    wys = [w * y for w, y in zip(ws, ys, strict=True)]
    mean = sum(wys) / design.weight
    slope = sum(d * v for d, v in zip(dts, wys, strict=True)) / design.sxx
    rss = sum(w * (y - mean - slope * d) ** 2 for w, d, y in zip(ws, dts, ys, strict=True))
    return replace(design, floor=floor, mean=mean, slope=slope, rss=max(rss, 1e-12 * design.weight))


def _fit_floor(points: Sequence[tuple[int, float]]) -> float | None:
    """The floor of :func:`_fit_trend` over ``points`` (cycle, loss), searched 0.03 to 30,000
    median batch-to-batch steps under the lowest loss, the odd bad batch (3 robust deviations above
    the line) left out; None when the losses did not move."""
    losses = [b for _, b in points]
    low = min(losses)
    unit = statistics.median(abs(b - a) for a, b in itertools.pairwise(losses)) or max(losses) - low
    trend = _fit_trend(points, below=low, unit=unit, decades=(-1.5, 4.5), trim=3.0)
    return None if trend is None else trend.floor


def _reaches(start: int, ended: int | None) -> bool:
    """Whether a window from cycle ``start`` on reaches back into an episode that was last open at
    cycle ``ended`` (None: none was)."""
    return ended is not None and start <= ended


def _mann_kendall_sd(n: int) -> float:
    """The standard deviation of the Mann-Kendall sum of ``n`` values without trend (or ties)."""
    return math.sqrt(n * (n - 1) * (2 * n + 5) / 18)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _count_between(events: list[tuple[int, float]], first: int, last: int) -> int:
    """How many of ``events`` (sorted by cycle) fall in cycles ``first``..``last``."""
    lo = bisect.bisect_left(events, (first, -math.inf))
    return bisect.bisect_right(events, (last, math.inf)) - lo


def _beta_binomial_cdf(k: int, n: int, a: float, b: float) -> float:
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


def _wilson_bounds(successes: float, trials: float, z: float = 1.645) -> tuple[float, float]:
    """The Wilson score interval of a success rate (90% by default), kept inside [1e-6, 1]."""
    p = successes / trials
    centre = p + z * z / (2 * trials)
    margin = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    scale = 1 + z * z / trials
    return max((centre - margin) / scale, 1e-6), min((centre + margin) / scale, 1.0)


def _robust_z(value: float, sample: Iterable[float], sigma_floor: float) -> tuple[float, float]:
    """(median of ``sample``, robust z-score of ``value`` against it, deviation at least ``sigma_floor``)."""
    values = list(sample)
    median = statistics.median(values)
    sigma = max(_MAD_TO_SIGMA * statistics.median(abs(x - median) for x in values), sigma_floor)
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
