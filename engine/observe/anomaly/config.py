"""The detector's bounds and sensitivities (:class:`DetectorConfig`), settable per job in its spec's
``anomaly_params``: a frozen pydantic dataclass whose field types carry the allowed ranges."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Annotated, Any, get_args, get_type_hints

from pydantic import Field, Strict, ValidationError
from pydantic.dataclasses import dataclass


class _Rule:
    """What a field must be, said to the user: its type (``kind``) and its range (``bound``)."""

    def __init__(self, kind: str, bound: str | None = None) -> None:
        self.kind, self.bound = kind, bound or kind


_WARMUP = "at least 4 and at most regression_fit_window"
_NUMBER = "a number"
Count = Annotated[int, Strict(), Field(ge=1), _Rule("a whole number", "at least 1")]
NonNegativeCount = Annotated[int, Strict(), Field(ge=0), _Rule("a whole number", "not negative")]
Number = Annotated[float, Strict(), Field(allow_inf_nan=False), _Rule(_NUMBER)]
Positive = Annotated[float, Strict(), Field(gt=0, allow_inf_nan=False), _Rule(_NUMBER, "positive")]
NonNegative = Annotated[float, Strict(), Field(ge=0, allow_inf_nan=False), _Rule(_NUMBER, "not negative")]
Share = Annotated[float, Strict(), Field(ge=0, le=1, allow_inf_nan=False), _Rule(_NUMBER, "between 0 and 1")]
Probability = Annotated[
    float, Strict(), Field(gt=0, lt=1, allow_inf_nan=False), _Rule(_NUMBER, "between 0 and 1")
]
Windows = Annotated[
    tuple[Annotated[int, Strict(), Field(ge=1)], ...],
    Field(min_length=1),
    _Rule("a list of whole numbers >= 1"),
]
RankWindows = Annotated[  # a rank trend needs 3 batches
    tuple[Annotated[int, Strict(), Field(ge=3)], ...],
    Field(min_length=1),
    _Rule("a list of whole numbers >= 3"),
]
PriorCounts = Annotated[tuple[Number, Number], _Rule("[failures, evaluations]")]


@dataclass(frozen=True, config={"extra": "forbid"})
class DetectorConfig:
    """Bounds and sensitivities of the detector; a job sets any of them in its spec's
    ``anomaly_params`` (:meth:`from_params`). The defaults and how they were chosen:
    docs/anomaly-detection.md and bench/README.md."""

    failure_share_bound: Share = 0.25
    """A cycle (or the pooled window) must fail more than this share to be a burst."""
    failure_min_count: Count = 2
    """...and at least this many evaluations."""
    failure_alpha: Probability = 1e-3
    """...and be this improbable under the job's failure rate so far (binomial upper tail)."""
    failure_prior: PriorCounts = (1.0, 20.0)
    """Pseudo-counts (failures, evaluations) of the failure rate before the job has any: 5%."""
    failure_window: Count = 3
    """Cycles pooled (the last 2, 3, ... this many) to catch a burst spread thin over small batches."""
    failure_hold_alpha: Probability = 0.05
    """A cycle short of a burst but this improbable (in any scope) is learned into the usual rate
    only once ``failure_window`` more cycles passed without a burst: a burst's first cycles must not
    raise the rate its later ones are judged by."""

    stall_cycles: Count = 5
    """Cycles without improvement before a stall can be called."""
    stall_window: Count = 30
    """Cycles up to the last improvement from which the job's improvement rate ``p`` is learned."""
    stall_alpha: Probability = 1e-2
    """A stall needs a run of non-improving cycles this improbable at rate ``p``: (1 - p)^k < alpha."""
    stall_collapse_ratio: Share = 0.1
    """...or just ``stall_cycles`` when the batch bests' spread fell below this share of its usual
    (the population collapsed onto a point: no lucky batch is coming)."""
    stall_max_cycles: Count = 25
    """...but never more than this many: a job that far from its goal is stalled whatever its pace."""
    stall_resume: Count = 3
    """Improvements that end a stall episode (a stalled search still draws the odd lucky batch)."""
    stall_slowdown_windows: Windows = (8, 12, 16, 20)
    """Recent windows in which a sharp drop of the improvement rate is a stall."""
    stall_slowdown_alpha: Probability = 1e-3
    """...how improbable the drop must be at the job's rate before the window."""
    stall_slowdown_flat_alpha: Probability = 3e-3
    """...or this, when the batch bests also stopped closing in on the best (``stall_trend_margin``)."""
    stall_trend_margin: Number = 0.0
    """Batch bests "stopped closing in" when the median log height above the best of the later half
    of them is less than this below the earlier half's."""
    stall_rank_windows: RankWindows = (8, 12, 16, 24)
    """Recent windows of batch bests whose ranks are tested for lost trend (see docs/anomaly-detection.md)."""
    stall_rank_z: Positive = 4.0
    """The shortfall of a window's rank trend (in deviations) that is a stall on its own."""
    stall_rank_confirm_z: Number = 1.5
    """The least shortfall (in any window) that confirms a dry spell or slowdown (with a target,
    only once the ranks can be judged)."""
    stall_lost_ground: Positive = 1.5
    """No stall is called while the batch bests since the last improvement sit more than this many
    robust deviations of the batch-to-batch noise above the level before (see ``_lost_ground``):
    a stalled population keeps the level it froze at, one that lost ground regressed."""
    stall_level: Count = 7
    """Batch bests up to the last improvement whose median is that level."""
    stall_quiet_cycles: NonNegativeCount = 10
    """Cycles after a stall episode during which no regression is reported (a population that
    moves again spreads wider than while it was stuck)."""
    stall_far_share: Share = 0.05
    """Still "far" while more than this share of the way remains: to the target, or without one
    (and too few batch bests to fit a floor) to the floor the pace of the best suggests."""
    stall_floor_far_share: Share = 0.1
    """Without a target, "far" while more than this share of the way to the floor fitted to the
    batch bests remains: twice ``stall_far_share``, as the fitted floor is itself uncertain (a job
    levelling off just above it has often reached its real one)."""
    stall_flat_window: Annotated[int, Strict(), Field(ge=3), _Rule("a whole number", "at least 3")] = 32
    """Recent batch bests that must show a downward trend (see ``stall_flat_z``)."""
    stall_flat_z: Number = 1.5
    """A job whose last ``stall_flat_window`` batch bests trend down by less than this (their
    Mann-Kendall sum, in deviations of it under no trend), after ``stall_cycles`` without
    improvement, is stalled when far from its goal, whatever it learned before: a job converging at
    a tenth of its batch noise per cycle shows about 4 over 32 batches."""
    stall_spread_far: Share = 0.3
    """Without a target and too few batch bests to fit a floor, also "far" while their recent
    spread is more than this share of their first (noise scales with the gap to the floor)."""
    stall_spread_window: Annotated[int, Strict(), Field(ge=2), _Rule("a whole number", "at least 2")] = 8
    """Recent batch-to-batch steps whose median is the recent spread; the first half as many make
    the first spread."""

    regression_fit_window: Count = 32
    """Recent normal batch bests the job's trend (its floor and log-linear approach) is fitted on."""
    regression_warmup: Annotated[int, Strict(), Field(ge=4), _Rule("a whole number", _WARMUP)] = 8
    """Normal batch bests needed before the trend is fitted and batches are judged."""
    regression_z: Positive = 3.0
    """A batch is markedly worse when its log height above the fitted floor lies this many
    prediction deviations above the trend at the last normal cycle..."""
    regression_min_excess: NonNegative = 2.0
    """...and it lies this many level-to-best gaps above the level (median of the last
    ``regression_level`` normal batch bests): worse than where the job just was, not only short of
    where its trend was heading (a stall)."""
    regression_level: Count = 3
    """Recent normal batch bests whose median is that level."""
    regression_half_life: Positive | None = 16.0
    """The trend weighs each batch best by ``0.5 ** (age / regression_half_life)`` (age in cycles
    from the last one; None: all alike), so it follows a job whose convergence bends -- one that
    levels off at a floor or stalls -- where one line through all 32 makes the fitted floor hug
    the lowest batch and ordinary batches look far above the trend."""
    regression_hold_z: Positive = 2.5
    """A batch this many deviations above the trend (but not markedly worse) is learned only once
    ``regression_cycles`` more cycles passed without a worse one: the first batches of a regression
    that fell short of the bound do not widen the learned noise. ``regression_cycles`` in a row
    above it and ``regression_min_excess`` above the level, all but one of them markedly worse,
    are a regression too."""
    regression_run_excess: NonNegative = 5.0
    """...as are ``regression_cycles`` in a row above ``regression_hold_z`` (or ``regression_far_z``)
    and each this many level-to-best gaps above the level: a young trend's loose deviation hides a
    large regression (its few batches make the line and the noise uncertain), not its batches'
    distance from the level the job just kept. A batch that far above the level and above the
    trend at all is held, as one over ``regression_hold_z`` is."""
    regression_far_z: NonNegative = 2.0
    """The trend deviations a batch ``regression_run_excess`` gaps above the level must exceed to
    count towards that run."""
    regression_cycles: Count = 3
    """Cycles among the last ``regression_cycles + 1`` that must be markedly worse, this one
    included (one bad batch is noise)."""

    max_cycle_seconds: Positive | None = None
    """An absolute bound on a cycle's duration; ``None``: only the learned normal applies."""
    timing_window: Count = 20
    """Recent normal cycles that make up the learned normal duration and throughput."""
    timing_warmup: Count = 5
    """Normal cycles to learn from before timing is judged."""
    timing_z: Positive = 3.5
    """Robust standard deviations (of log duration or log throughput) that count as abnormal."""
    timing_min_ratio: Positive = 1.8
    """...and at least this factor slower (a very steady job's tiny jitter is not an anomaly)."""
    timing_sigma_floor: Positive = 0.05
    """Least robust deviation of log duration assumed (5%): steady jobs are not over-sensitive."""
    timing_min_seconds: NonNegative = 0.02
    """Cycles shorter than this are never slow: millisecond cycles jitter by multiples, harmlessly."""
    timing_cycles: Count = 2
    """Slow cycles needed among the last ``timing_cycles + 1`` (one busy neighbour is noise)."""
    collapse_cycles: Count = 3
    """Idle-executor cycles needed among the last ``collapse_cycles + 1`` (GC pauses come in pairs)."""
    timing_sustained_z: Positive = 2.0
    """...or a milder excess, this many robust deviations (and ``timing_min_ratio``), in each of..."""
    timing_sustained_cycles: Count = 4
    """...this many cycles in a row: a lasting slow-down hidden in a noisy job's timing (spikes in
    its learned window widen the deviation) shows as a run that GC-like single spikes never make."""

    clear_cycles: Count = 2
    """Clear cycles after which an episode ends and the same kind may be reported again."""

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> DetectorConfig:
        """The defaults with ``params`` (a spec's ``anomaly_params``) laid over them.

        Raises ValueError with one line naming the bad key: an unknown name, a value of the wrong
        type (a whole number where one is counted, a number where one is measured), or one out of
        range.
        """
        fields = [f.name for f in dataclasses.fields(cls)]
        for name in params:
            if name not in fields:
                raise ValueError(f"unknown setting {name!r} (known: {', '.join(sorted(fields))})")
        try:
            return cls(**params)
        except ValidationError as exc:
            raise ValueError(_one_line(exc, params)) from None

    def __post_init__(self) -> None:
        # What one field's type cannot say: bounds between fields.
        failures, evaluations = self.failure_prior
        if failures < 0 or evaluations <= failures:
            raise ValueError(
                f"failure_prior must be (failures, evaluations) with 0 <= f < n, got {self.failure_prior}"
            )
        if self.timing_warmup > self.timing_window:
            raise ValueError("timing_warmup must not exceed timing_window")
        if self.regression_warmup > self.regression_fit_window:
            raise ValueError(f"regression_warmup must be {_WARMUP}")


def _one_line(exc: ValidationError, params: Mapping[str, Any]) -> str:
    """The first error of ``exc`` as one line: ``<name> must be <what>, got <value>``."""
    error = exc.errors()[0]
    if not error["loc"]:  # raised by __post_init__
        return str(error["ctx"]["error"])
    name = str(error["loc"][0])
    rule = _rule_of(get_type_hints(DetectorConfig, include_extras=True)[name])
    value = params.get(name, error.get("input"))
    if rule is None:
        return f"{name}: {error['msg']}, got {value!r}"
    wrong_type = len(error["loc"]) == 1 and error["type"] in _TYPE_ERRORS
    what = rule.kind if wrong_type else rule.bound
    verb = "must not be" if what == "not negative" else "must be"
    return f"{name} {verb} {what.removeprefix('not ')}, got {value!r}"


_TYPE_ERRORS = frozenset(
    {"int_type", "int_from_float", "int_parsing", "float_type", "float_parsing", "finite_number"}
)


def _rule_of(annotation: Any) -> _Rule | None:
    """The :class:`_Rule` in a field's annotation (searched through ``X | None`` and Annotated)."""
    for arg in getattr(annotation, "__metadata__", ()):
        if isinstance(arg, _Rule):
            return arg
    for arg in get_args(annotation):
        rule = _rule_of(arg)
        if rule is not None:
            return rule
    return None
