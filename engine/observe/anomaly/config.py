"""The detector's bounds and sensitivities (:class:`DetectorConfig`), settable per job."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


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
