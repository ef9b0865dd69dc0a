"""The anomaly detector (engine.observe.anomaly): each rule on its pattern, silence on noisy normal
series, one finding per episode, state rebuilt from stored cycles; and the store's anomalies."""

from __future__ import annotations

import logging
import math
import random
from dataclasses import replace

import pytest

from engine.core import CycleRecord
from engine.observe import ANOMALY_KINDS, AnomalyDetector, DetectorConfig, Finding
from engine.observe.anomaly import _fit_floor, binomial_upper_tail


def normal_series(
    cycles: int = 80, *, seed: int = 0, rate: float = 0.08, **changes: object
) -> list[CycleRecord]:
    """A healthy job: steady convergence with noisy batch bests, cycle times with 10% noise and a
    GC-like spike, 2% failures. ``changes`` maps a field to ``{cycle: value}`` overrides."""
    rng = random.Random(seed)
    best = math.inf
    out = []
    for cycle in range(1, cycles + 1):
        batch = 100 * math.exp(-rate * cycle + rng.gauss(0, 0.3))
        failed = sum(1 for _ in range(32) if rng.random() < 0.02)
        duration = 2.0 * math.exp(rng.gauss(0, 0.1)) * (2.5 if cycle == 30 else 1.0)
        values = {
            "cycle": cycle,
            "evaluations": 32,
            "failed": failed,
            "cached": 0,
            "batch_best_score": batch,
            "duration": duration,
            "eval_seconds": 32 * 0.25 * math.exp(rng.gauss(0, 0.03)),
        }
        for name, overrides in changes.items():
            if cycle in overrides:  # type: ignore[operator]
                values[name] = overrides[cycle]  # type: ignore[index]
        batch = values["batch_best_score"]  # type: ignore[assignment]
        improved = batch < best
        best = min(best, batch)
        out.append(CycleRecord(improved=improved, best_score=best, **values))  # type: ignore[arg-type]
    return out


def run(records: list[CycleRecord], **kwargs: object) -> list[Finding]:
    detector = AnomalyDetector(kwargs.pop("maximize", False), **kwargs)  # type: ignore[arg-type]
    return [f for r in records for f in detector.observe(r)]


def span(start: int, end: int, value: object) -> dict[int, object]:
    return dict.fromkeys(range(start, end + 1), value)


def test_rarely_fires_on_noisy_normal_series() -> None:
    """Healthy but noisy jobs: at most 0.5 findings per 100 cycles (the bench's bound), and none of
    the noise patterns (GC-like spike, 2% failures, noisy batch bests) in most of them."""
    findings = [run(normal_series(seed=seed)) for seed in range(20)]
    assert sum(map(len, findings)) <= 0.5 * 20 * 80 / 100, findings
    assert sum(1 for f in findings if not f) >= 17


def _frozen_after(cycle: int) -> dict[int, object]:
    """Batch bests that stop getting better at ``cycle`` (the population collapsed)."""
    level = 100 * math.exp(-0.08 * cycle)
    return {c: level * (1.02 + 0.001 * (c % 3)) for c in range(cycle, 81)}


CASES = [
    # (kind, overrides, first cycle it may be found, last)
    ("failure_burst", {"failed": span(40, 42, 20)}, 40, 41),
    ("slow_cycle", {"duration": span(40, 45, 7.0), "eval_seconds": span(40, 45, 28.0)}, 41, 42),
    ("throughput_collapse", {"duration": span(40, 46, 7.0)}, 42, 43),
    ("regression", {"batch_best_score": span(40, 45, 60.0)}, 42, 43),
    ("stall", {"batch_best_score": _frozen_after(12)}, 13, 30),
]


@pytest.mark.parametrize(("kind", "changes", "first", "last"), CASES, ids=[c[0] for c in CASES])
def test_each_rule_fires_once_on_its_pattern(kind: str, changes: dict, first: int, last: int) -> None:
    findings = run(normal_series(**changes))
    assert [f.kind for f in findings] == [kind], findings
    finding = findings[0]
    assert first <= finding.cycle <= last
    assert finding.event == f"refinement.anomaly.{kind}"
    assert finding.message.startswith(f"cycle {finding.cycle}")
    assert finding.evidence and "message" not in finding.evidence


@pytest.mark.parametrize(("kind", "changes", "first", "last"), CASES, ids=[c[0] for c in CASES])
def test_direction_is_folded_in(kind: str, changes: dict, first: int, last: int) -> None:
    """The same job maximising (scores negated) has the same anomalies."""
    minimised = run(normal_series(**changes))
    flipped = [
        replace(
            r,
            best_score=-r.best_score if r.best_score is not None else None,
            batch_best_score=-r.batch_best_score if r.batch_best_score is not None else None,
        )
        for r in normal_series(**changes)
    ]
    maximised = run(flipped, maximize=True)
    assert [(f.kind, f.cycle) for f in maximised] == [(f.kind, f.cycle) for f in minimised]


def test_one_finding_per_episode_and_a_new_one_after_it_clears() -> None:
    failed = {**span(20, 30, 20), **span(50, 52, 20)}
    findings = run(normal_series(failed=failed))
    assert [(f.kind, f.cycle) for f in findings] == [("failure_burst", 20), ("failure_burst", 50)]


def test_a_failure_burst_is_judged_against_the_jobs_usual_failure_rate() -> None:
    """A job that always fails ~20% is not bursting at 9 of 32; one that never fails is."""
    rng = random.Random(3)
    flaky = {c: sum(1 for _ in range(32) if rng.random() < 0.2) for c in range(1, 81)}
    assert run(normal_series(failed={**flaky, 50: 9})) == []
    assert [f.kind for f in run(normal_series(failed=span(1, 80, 0) | {50: 9}))] == ["failure_burst"]


@pytest.mark.parametrize("burst", [(4, 2, 3, 3), (3, 3, 3)])
def test_a_burst_spread_thin_is_judged_against_the_rate_before_it(burst: tuple[int, ...]) -> None:
    """Batches of 8 that usually fail ~9%, then a third of them for a few cycles: no single cycle
    is improbable enough, and the pooled ones are only if the burst's first cycles, suspect but
    short of a burst, were not learned into the usual rate (``failure_hold_alpha``)."""
    rng = random.Random(5)
    usual = {c: sum(1 for _ in range(8) if rng.random() < 0.07) for c in range(1, 81)}
    records = normal_series(
        evaluations=span(1, 80, 8), failed=usual | {50 + i: n for i, n in enumerate(burst)}
    )
    findings = run(records)
    assert [(f.kind, f.cycle) for f in findings] == [("failure_burst", 52)]
    assert findings[0].evidence["scope"] == "last 3 cycles"
    assert run(records, config=DetectorConfig(failure_hold_alpha=1e-12)) == []


def test_stall_needs_a_target_far_away() -> None:
    """Frozen far from the target is a stall; frozen at 2% of the way from it is not."""
    changes = {"batch_best_score": _frozen_after(12)}
    records = normal_series(**changes)
    frozen_best = records[-1].best_score
    first_best = records[0].best_score
    assert frozen_best is not None and first_best is not None
    far = frozen_best - 0.5 * (first_best - frozen_best)
    near = frozen_best - 0.02 * (first_best - frozen_best)
    assert [f.kind for f in run(records, target=far)] == ["stall"]
    assert run(records, target=near) == []


def _slowed_down(every: int, start: int = 31, cycles: int = 80) -> dict[int, object]:
    """Batch bests that improve nearly every cycle until ``start``, then only every ``every``-th
    cycle (a lucky batch) while the others stay just above the best: dry spells never reach
    ``stall_cycles``, but the job has all but stopped."""
    rng = random.Random(1)
    values: dict[int, object] = {}
    best = math.inf
    for cycle in range(1, cycles + 1):
        if cycle < start:
            batch = 100 * 0.97**cycle * math.exp(rng.gauss(0, 0.02))
        elif cycle % every == 0:
            batch = best * 0.995
        else:
            batch = best * math.exp(rng.uniform(0.005, 0.03))
        values[cycle] = batch
        best = min(best, batch)
    return values


def test_a_stall_with_lucky_batches_is_found_by_the_drop_of_the_improvement_rate() -> None:
    """Improving in 1 of 3 cycles after 25 of 28: a stall, though no dry spell is long enough for
    the dry-spell test (which alone finds nothing); not when the target is a few % of the way off."""
    records = normal_series(batch_best_score=_slowed_down(3))
    findings = run(records, target=0.0)
    assert [f.kind for f in findings] == ["stall"], findings
    assert 34 <= findings[0].cycle <= 40 and findings[0].evidence["window"] in (8, 12, 16, 20)
    assert "improved in" in findings[0].message  # confirmed by the ranks from cycle 40 on
    dry_spell_only = DetectorConfig(stall_slowdown_alpha=1e-300, stall_slowdown_flat_alpha=1e-300)
    assert run(records, target=0.0, config=dry_spell_only) == []
    best = records[-1].best_score
    assert best is not None
    assert run(records, target=0.999 * best) == []  # 3% of the way off when it slowed down


RANKS_ONLY = DetectorConfig(
    stall_alpha=1e-300,
    stall_max_cycles=10_000,
    stall_collapse_ratio=0.0,
    stall_slowdown_alpha=1e-300,
    stall_slowdown_flat_alpha=1e-300,
    stall_flat_window=10_000,
)
"""The stall tests other than the rank trend switched off."""


def _wandering_after(cycle: int, seed: int) -> dict[int, object]:
    """Batch bests that stop converging at ``cycle`` and wander with the same noise as before."""
    rng = random.Random(seed)
    level = 100 * math.exp(-0.08 * cycle)
    return {c: level * math.exp(rng.gauss(0, 0.3)) for c in range(cycle, 81)}


def test_a_stall_is_found_by_the_lost_trend_of_the_batch_bests_ranks() -> None:
    """With a target: batch bests that keep their noise but lost their trend (each lucky one is
    still a new best now and then) are a stall by their ranks alone; a job converging with that
    noise never is, nor one that stalls only 2% of the way from its target."""
    stalls = [normal_series(seed=s, batch_best_score=_wandering_after(20, s)) for s in range(10)]
    findings = [run(records, target=-20.0, config=RANKS_ONLY) for records in stalls]
    first = [per_run[0] for per_run in findings if per_run]
    assert len(first) >= 9 and all(f.kind == "stall" for per_run in findings for f in per_run), findings
    assert all(28 <= f.cycle <= 52 and "lost the job's trend" in f.message for f in first), first
    assert all(f.evidence["z"] > 4.0 and f.evidence["window"] in (8, 12, 16, 24) for f in first)
    normal = [run(normal_series(seed=s), target=-20.0, config=RANKS_ONLY) for s in range(20)]
    assert sum(map(len, normal)) == 0, normal
    records = normal_series(seed=0, batch_best_score=_wandering_after(20, 0))
    best = records[-1].best_score
    assert best is not None
    assert run(records, target=0.99 * best, config=RANKS_ONLY) == []


def test_a_stall_that_struck_before_the_job_showed_a_trend_is_found_by_no_trend_at_all() -> None:
    """Batch bests that wander from cycle 8 on (too early for the rank test to learn a trend, and
    their own dry spells short) show no trend over 32 batches: a stall, with a target or without,
    found sooner than by the other tests (or at all); healthy jobs always show theirs."""
    no_flat = DetectorConfig(stall_flat_window=10_000)
    for target in (-20.0, None):
        for seed in (3, 4, 8):
            records = normal_series(seed=seed, batch_best_score=_wandering_after(8, seed))
            found = run(records, target=target)
            assert [f.kind for f in found] == ["stall"], (target, seed, found)
            assert "show no trend" in found[0].message and found[0].evidence["z"] < 1.5, found
            later = run(records, target=target, config=no_flat)
            assert all(f.cycle > found[0].cycle + 10 for f in later), (found, later)
        healthy = [normal_series(seed=s) for s in range(30)]
        assert sum("show no trend" in f.message for r in healthy for f in run(r, target=target)) == 0


def test_a_regression_is_not_named_a_stall_on_its_first_cycles() -> None:
    """A slowly converging job whose batch bests turn 10x worse for 4 cycles: the bad batches
    end the trend the stall tests look for, so they used to call a stall on the regression's
    first or second cycle, which then named the cause. A stall is not named on a cycle whose batch
    best is a regression suspect: the regression is named on its third cycle, as it should be."""
    named = []
    for seed in range(30):
        calm = normal_series(seed=seed, rate=0.02)
        worse = {c: 10 * calm[c - 1].batch_best_score for c in range(45, 49)}  # type: ignore[operator]
        findings = run(normal_series(seed=seed, rate=0.02, batch_best_score=worse))
        if any(f.cycle < 45 for f in findings):
            continue  # a slow noisy job some stall test already found stalled earlier
        named.append([(f.kind, f.cycle) for f in findings if f.cycle <= 52])
    assert len(named) >= 20 and all(n == [("regression", 47)] for n in named), named


def test_a_dry_spell_needs_the_ranks_to_confirm_it() -> None:
    """A dry spell after a very lucky batch (the others keep closing in on it) is not a stall,
    with a target or without: the batch bests kept their trend. Without the confirmation it would
    be one; a job that stalled for real is confirmed."""
    lucky = {25: 100 * math.exp(-0.08 * 25 - 2.0)}  # 7x better than its neighbours
    records = normal_series(batch_best_score=lucky)
    unconfirmed = DetectorConfig(stall_rank_confirm_z=-1e9)
    for target in (None, -20.0):
        assert [(f.kind, f.cycle) for f in run(records, target=target, config=unconfirmed)] == [("stall", 42)]
        assert run(records, target=target) == []
    stalled = normal_series(batch_best_score=_frozen_after(30))
    assert [f.kind for f in run(stalled)] == ["stall"]


def test_a_regression_is_not_also_called_a_stall() -> None:
    """A search that lost ground makes no progress either: one finding, the regression, for the
    whole episode (far from the target, the same lack of progress alone is a stall)."""
    records = normal_series(batch_best_score=span(40, 75, 60.0))
    assert [(f.kind, f.cycle) for f in run(records, target=-100.0)] == [("regression", 42)]


def test_a_regression_leaves_no_stall_behind_in_the_batch_bests_ranks() -> None:
    """The batch bests of a regression (3x worse for 8 cycles) lose the trend of their ranks; a
    window that holds them after the regression episode closed is not a stall (it was one, at
    cycle 50, on these series)."""
    worse = {c: 3 * 100 * math.exp(-0.08 * 39) for c in range(40, 48)}
    for seed in (0, 1, 4, 6):
        findings = run(normal_series(seed=seed, batch_best_score=worse), target=-20.0)
        assert [(f.kind, f.cycle) for f in findings] == [("regression", 42)], (seed, findings)


def _fast_job(seed: int, factor: float) -> list[CycleRecord]:
    """A job that halves its gap to a floor of -90 every cycle (log-gap noise 0.5); from cycle 15
    to 19 its batch bests' gap is ``factor`` times that of cycle 14, without progress."""
    rng = random.Random(seed)
    best = math.inf
    out = []
    for cycle in range(1, 41):
        regressed = 15 <= cycle <= 19
        gap = 1000 * math.exp(-0.7 * (14 if regressed else cycle)) * (factor if regressed else 1.0)
        batch = -90 + gap * math.exp(rng.gauss(0, 0.5))
        improved, best = batch < best, min(best, batch)
        out.append(CycleRecord(cycle, 32, 0, 0, batch, best, improved, duration=2.0, eval_seconds=8.0))
    return out


def test_a_regression_of_a_fast_converging_job_is_judged_against_its_trend() -> None:
    """A job that halves its gap every cycle: a median of its recent raw batch bests lies far above
    where it now is (it missed these regressions, 30x the gap); the fitted trend (floor and
    log-linear approach) does not. The same jobs without the regression raise nothing. (Found on
    its third cycle, or its fourth when one of the first batches lay under 2 level-to-best gaps
    above the level, ``regression_min_excess``.)"""
    for seed in range(10):
        found = [(f.kind, f.cycle) for f in run(_fast_job(seed, 30.0))]
        assert found in ([("regression", 17)], [("regression", 18)]), seed
        assert run(_fast_job(seed, 1.0)) == [], seed


def _hovering(seed: int, floor_share: float) -> dict[int, object]:
    """Batch bests of a job that levels off at ``floor_share`` of its first gap, noise 30%."""
    rng = random.Random(seed + 100)
    return {c: 100 * (math.exp(-0.08 * c) + floor_share) * math.exp(rng.gauss(0, 0.3)) for c in range(1, 121)}


def test_without_a_target_a_stall_far_from_the_floor_is_told_by_the_fitted_floor() -> None:
    """No target: the floor fitted to the batch bests before the window that lost the pace (they
    wander with their noise from cycle 20, 20% of the way from the first best) lies far below
    them: a stall, by its dry spells or, alone, by the ranks of its batch bests (too short a
    history to fit falls back on their spread and the pace of the best); jobs hovering at a floor
    0.1-1% of their first gap sit at the floor fitted to them: not stalled, whichever test."""
    stalls = [normal_series(seed=s, batch_best_score=_wandering_after(20, s)) for s in range(10)]
    found = [run(records) for records in stalls]
    assert sum(1 for f in found if [x.kind for x in f] == ["stall"]) >= 9, found
    fitted = [f for f in found if f and "convergence fitted to its batch bests" in f[0].evidence["reason"]]
    assert len(fitted) >= 5, found
    by_ranks = [run(records, config=RANKS_ONLY) for records in stalls]
    assert sum(1 for f in by_ranks if [x.kind for x in f] == ["stall"]) >= 8, by_ranks
    assert all("lost the job's trend" in f[0].message for f in by_ranks if f)
    assert sum(map(len, (run(normal_series(seed=s), config=RANKS_ONLY) for s in range(20)))) == 0
    for seed in range(10):
        for floor_share in (0.001, 0.01):
            hovering = normal_series(120, seed=seed, batch_best_score=_hovering(seed, floor_share))
            assert run(hovering) == [] and run(hovering, config=RANKS_ONLY) == []


def test_the_floor_fit_finds_where_a_converging_job_levels_off() -> None:
    """``log(loss - floor)`` is a line in the cycle: the floor profiled from 40 batch bests with 30%
    log-normal noise and a bad batch lies within the last gap of the true one, wherever it is."""
    for seed in range(10):
        rng = random.Random(seed)
        for floor in (-1000.0, 5.0):
            points = [(t, floor + 100 * math.exp(-0.08 * t + rng.gauss(0, 0.3))) for t in range(1, 41)]
            points[20] = (21, floor + 5 * 100 * math.exp(-0.08 * 21))  # a bad batch
            fitted = _fit_floor(points)
            assert fitted is not None and abs(fitted - floor) < 100 * math.exp(-0.08 * 40), (seed, floor)
    assert _fit_floor([(t, 3.0) for t in range(1, 20)]) is None  # nothing moved


def _young_noisy(seed: int, regressed: bool) -> list[CycleRecord]:
    """A fast job with a noisy batch best (sd 0.7 in log) whose batch bests turn 40x worse in
    their gap at cycles 11-15, before its trend has many batches to be sure of, or do not."""
    rng = random.Random(seed)
    batches: dict[int, object] = {c: 10 + 100 * math.exp(-0.3 * c + rng.gauss(0, 0.7)) for c in range(1, 61)}
    if regressed:
        for c in range(11, 16):
            batches[c] = 10 + 100 * math.exp(-0.3 * 10 + math.log(40) + rng.gauss(0, 0.7))
    return normal_series(cycles=60, seed=seed, batch_best_score=batches)


def test_a_large_regression_of_a_young_trend_is_found_by_its_distance_from_the_level() -> None:
    """A few noisy batches leave the trend's line and noise loose: a 40x regression at cycle 11
    lies only 2-3 deviations above it, short of the bound in 2 of 3 cycles. Three cycles in a
    row over the hold bound (or 2 deviations), each ``regression_run_excess`` level-to-best gaps
    above the level the job just kept, are a regression all the same; the same job without the
    regression raises nothing."""
    off = DetectorConfig(regression_run_excess=1e9)
    for seed in (19, 21, 25):
        records = _young_noisy(seed, regressed=True)
        assert [(f.kind, f.cycle) for f in run(records, target=10.0)] == [("regression", 13)]
        assert run(records, target=10.0, config=off) == []
    # Batches that far above the level count from 2 deviations (regression_far_z), and are held
    # out of the trend from any: the regression's first batches no longer loosen it.
    for seed in (23, 24):
        records = _young_noisy(seed, regressed=True)
        assert [(f.kind, f.cycle) for f in run(records, target=10.0)] == [("regression", 13)]
        assert run(records, target=10.0, config=DetectorConfig(regression_far_z=1e9)) == []
    assert [f for seed in range(40) for f in run(_young_noisy(seed, regressed=False), target=10.0)] == []


def test_a_job_regaining_the_ground_a_regression_lost_is_not_called_stalled() -> None:
    """Batch bests 8x worse for 8 cycles from cycle 40, after which the job goes on from where it
    was (8 cycles behind): the regression is reported, and the cycles the job then needs to beat
    its best again are not a stall -- a dry spell or a rate drop is counted from the end of a
    reported regression (before, this job drew a stall at cycle 50)."""
    rng = random.Random(18)
    batches: dict[int, object] = {}
    for c in range(1, 81):
        t = c if c < 40 else 39 if c < 48 else c - 8
        batches[c] = 100 * math.exp(-0.08 * t + rng.gauss(0, 0.3)) * (8 if 40 <= c < 48 else 1)
    records = normal_series(seed=18, batch_best_score=batches)
    assert [(f.kind, f.cycle) for f in run(records, target=-20.0)] == [("regression", 42)]


def test_a_search_that_lost_ground_is_not_called_stalled() -> None:
    """Batch bests 3x worse for 6 cycles from cycle 40 make no progress, but a stall is a
    population that keeps its level: the regression rule calls it (3 cycles in a row over the
    hold bound, 2 of them over the bound) when a level-to-best gap above the level is enough;
    by default 2 are needed, and then nothing is called. With that rule off (and no batch a regression
    suspect, which alone keeps a stall from being named), nothing is called; without the
    lost-ground test too, it was a stall at cycle 43."""
    rng = random.Random(50)
    setback = {c: 3 * 100 * math.exp(-0.08 * 39 + rng.gauss(0, 0.3)) for c in range(40, 46)}
    records = normal_series(batch_best_score=setback)
    near = DetectorConfig(regression_min_excess=1.0)  # 3x at a noise of 0.3 is 3.7 deviations:
    assert run(records, target=-20.0) == []  # under the default's 2 level-to-best gaps at times
    assert [(f.kind, f.cycle) for f in run(records, target=-20.0, config=near)] == [("regression", 42)]
    no_regression = replace(near, regression_z=1e9, regression_hold_z=1e9)
    assert run(records, target=-20.0, config=no_regression) == []
    unchecked = replace(no_regression, stall_lost_ground=1e9)
    assert [(f.kind, f.cycle) for f in run(records, target=-20.0, config=unchecked)] == [("stall", 43)]


def test_config_from_spec_params() -> None:
    config = DetectorConfig.from_params(
        {"max_cycle_seconds": 5, "stall_cycles": 7, "failure_prior": [1, 10], "stall_slowdown_windows": [10]}
    )
    assert config.max_cycle_seconds == 5.0 and config.stall_cycles == 7
    assert config.failure_prior == (1.0, 10.0) and config.stall_slowdown_windows == (10,)
    assert DetectorConfig.from_params({}) == DetectorConfig()
    assert DetectorConfig.from_params({"max_cycle_seconds": None}).max_cycle_seconds is None


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"max_cycle_second": 5}, "unknown setting 'max_cycle_second'"),
        ({"max_cycle_seconds": -1}, "max_cycle_seconds must be positive"),
        ({"max_cycle_seconds": "5"}, "max_cycle_seconds must be a number"),
        ({"timing_z": True}, "timing_z must be a number"),
        ({"stall_cycles": 2.5}, "stall_cycles must be a whole number"),
        ({"stall_cycles": 0}, "stall_cycles must be at least 1"),
        ({"stall_alpha": 1.0}, "stall_alpha must be between 0 and 1"),
        ({"failure_prior": [1]}, "failure_prior must be [failures, evaluations]"),
        ({"stall_slowdown_windows": [0]}, "stall_slowdown_windows must be a list"),
        ({"stall_rank_windows": "8"}, "stall_rank_windows must be a list"),
        ({"stall_rank_windows": [2, 8]}, "stall_rank_windows must be a list of whole numbers >= 3"),
        ({"timing_z": math.nan}, "timing_z must be a number"),
        ({"timing_sustained_z": 0}, "timing_sustained_z must be positive"),
        ({"timing_sustained_cycles": 0}, "timing_sustained_cycles must be at least 1"),
        ({"stall_spread_far": 1.5}, "stall_spread_far must be between 0 and 1"),
        ({"stall_spread_window": 1}, "stall_spread_window must be at least 2"),
    ],
)
def test_config_from_spec_params_rejects_bad_values(params: dict, needle: str) -> None:
    with pytest.raises(ValueError) as caught:
        DetectorConfig.from_params(params)
    assert needle in str(caught.value) and "\n" not in str(caught.value)


def test_spec_anomaly_params_are_checked_when_the_job_is_built() -> None:
    from engine.core import JobSpec, SpecError
    from engine.runner import anomaly_config, build_job

    spec = JobSpec.parse({"problem": "sphere", "anomaly_params": {"max_cycle_seconds": 30}})
    assert anomaly_config(spec).max_cycle_seconds == 30.0
    assert anomaly_config(JobSpec.parse({"problem": "sphere"})) == DetectorConfig()
    bad = JobSpec.parse({"problem": "sphere", "anomaly_params": {"max_cycle_seconds": 0}})
    with pytest.raises(SpecError, match=r"^anomaly_params: max_cycle_seconds must be positive"):
        build_job("j1", bad)


def test_cli_rejects_bad_anomaly_params_with_exit_2_and_writes_no_job(tmp_path, ire_env) -> None:
    import sqlite3
    import subprocess
    import sys
    from pathlib import Path

    spec = tmp_path / "job.toml"
    spec.write_text('problem = "sphere"\nmax_cycles = 2\n[anomaly_params]\nstall_cycle = 3\n')
    out = subprocess.run(
        [sys.executable, "-m", "irefine", "run", str(spec), "--executor", "local"],
        env=ire_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "anomaly_params: unknown setting 'stall_cycle'" in lines[0], out.stderr
    db = Path(ire_env["IRE_HOME"]) / "irefine.db"
    if db.exists():
        with sqlite3.connect(db) as conn:
            assert conn.execute("select count(*) from jobs").fetchone() == (0,)


def _noisy_durations(seed: int, factors: dict[int, float]) -> dict[int, object]:
    """Cycle times with 30% noise (a busy shared machine), times ``factors`` per cycle."""
    rng = random.Random(seed)
    return {c: 2.0 * math.exp(rng.gauss(0, 0.3)) * factors.get(c, 1.0) for c in range(1, 81)}


def test_a_lasting_milder_slowdown_in_noisy_timing_is_found() -> None:
    """An idle executor at x2.2 for 8 cycles in a job whose cycle times jitter by 30%: no cycle
    is 3.5 deviations out, but 4 in a row are 2 out; spikes every other cycle never line up."""
    slowed = normal_series(duration=_noisy_durations(3, span(40, 47, 2.2)))
    assert [(f.kind, f.cycle) for f in run(slowed)] == [("throughput_collapse", 43)]
    assert run(slowed, config=DetectorConfig(timing_sustained_cycles=100)) == []  # the new rule found it
    spikes = normal_series(duration=_noisy_durations(3, dict.fromkeys((40, 42, 44, 46), 2.5)))
    assert run(spikes) == []
    assert run(normal_series(duration=_noisy_durations(3, {}))) == []


def test_absolute_cycle_time_bound() -> None:
    findings = run(normal_series(), config=DetectorConfig(max_cycle_seconds=4.0))
    assert [(f.kind, f.cycle) for f in findings] == [("slow_cycle", 30)]  # the GC-like spike
    assert findings[0].evidence["bound"] == 4.0


def test_rebuilt_detector_continues_where_the_first_left_off() -> None:
    """Resume: a detector rebuilt from stored cycles reports what an uninterrupted one would, and
    not the episode that was already open (reported before the crash)."""
    records = normal_series(failed={**span(20, 60, 20), **span(70, 72, 20)})
    whole = run(records)
    assert [(f.kind, f.cycle) for f in whole] == [("failure_burst", 20), ("failure_burst", 70)]
    rebuilt = AnomalyDetector.rebuild(records[:40], maximize=False)
    assert rebuilt.open_episodes == ["failure_burst"]
    rest = [f for r in records[40:] for f in rebuilt.observe(r)]
    assert [(f.kind, f.cycle) for f in rest] == [("failure_burst", 70)]


def test_cycles_must_come_in_order() -> None:
    detector = AnomalyDetector(maximize=False)
    records = normal_series(3)
    detector.observe(records[1])
    with pytest.raises(ValueError, match="in order"):
        detector.observe(records[0])


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("failure_share_bound", 1.5),
        ("stall_cycles", 0),
        ("failure_alpha", 0.0),
        ("stall_rank_z", 0.0),
        ("stall_lost_ground", 0.0),
        ("stall_level", 0),
        ("stall_flat_window", 2),
    ],
)
def test_config_rejects_bad_values(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        DetectorConfig(**{field: value})


@pytest.mark.parametrize(
    ("k", "n", "p"), [(0, 5, 0.3), (3, 8, 0.05), (5, 5, 0.5), (9, 32, 0.02), (2, 3, 0.0)]
)
def test_binomial_upper_tail_is_exact(k: int, n: int, p: float) -> None:
    exact = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))
    assert binomial_upper_tail(k, n, p) == pytest.approx(exact, rel=1e-9, abs=1e-300)


def test_kinds_are_stable() -> None:
    assert ANOMALY_KINDS == ("failure_burst", "stall", "regression", "slow_cycle", "throughput_collapse")


def test_store_keeps_anomalies_once_per_cycle_and_kind(sqlite_url: str) -> None:
    from engine.core import JobSpec
    from engine.store import JobStore

    store = JobStore(sqlite_url)
    try:
        spec = JobSpec.parse({"problem": "sphere", "max_evaluations": 10})
        store.create_job("a1", spec)
        found = [
            Finding("failure_burst", 3, "cycle 3: 9 of 16 failed", {"failed": 9, "share": 0.5625}),
            Finding("stall", 7, "cycle 7: no improvement", {"cycles_without_improvement": 6}),
        ]
        store.add_anomalies("a1", found)
        store.add_anomalies("a1", found[:1])  # a replayed cycle: kept once
        stored = store.anomalies("a1", fresh=True)
        assert [(a.cycle, a.kind, a.evidence) for a in stored] == [
            (f.cycle, f.kind, f.evidence) for f in found
        ]
        assert stored[0].to_dict()["message"] == "cycle 3: 9 of 16 failed"
        assert store.anomalies("nosuchjob") == []
        store.delete_job("a1")
        assert store.anomalies("a1", fresh=True) == []
    finally:
        store.close()


def test_bench_scoring_on_a_small_labelled_set() -> None:
    """bench/anomaly.py's scoring on 150 runs of another seed than the bench's. The issue's
    targets (precision and recall >= 0.95) are NOT met yet by stalls and regressions: this guards
    what is met (false alarms, delay), the per-kind recall of failure bursts and timing anomalies
    (>= 0.95 on the full bench; 13-15 episodes each here) and the current overall level (here
    precision 0.96, recall 0.93 in session 6; 0.91 and 0.88 in session 3), so a change that makes
    the detector worse fails here. With half the normal runs levelled off at a floor
    (``--plateau``), false alarms stay within the bound (here 0.09 per 100 cycles, precision 0.85)."""
    from bench.anomaly import score, synthetic_runs

    report = score(synthetic_runs(150, seed=1))
    assert report["episodes"] >= 70 and report["cycles"] > 8000
    assert report["false_alarms_per_100_normal_cycles"] <= 0.1
    assert report["detection_delay_cycles_p50"] <= 3
    assert report["precision"] >= 0.93 and report["recall"] >= 0.92
    for kind in ("failure_burst", "slow_cycle", "throughput_collapse"):
        assert report["per_kind"][kind]["recall"] >= 0.85, report["per_kind"][kind]
    plateaued = score(synthetic_runs(150, seed=1, plateau_share=0.5))
    assert plateaued["false_alarms_per_100_normal_cycles"] <= 0.25 and plateaued["precision"] >= 0.8


def test_bench_leaves_unscored_only_episodes_a_reached_target_cut_short() -> None:
    """An episode the job's reaching its target cut shorter than its kind's shortest (one slow
    cycle at the end, as a normal run's GC-like spike can be) is neither a hit nor a miss; every
    other episode is scored, a burst that failed the job included. A finding of its kind in its
    window is not a false alarm either."""
    from bench.anomaly import SHORTEST, score, synthetic_runs

    runs = synthetic_runs(600, seed=4242)
    cut = [(run, e) for run in runs for e in run.unscored]
    assert cut, "seed 4242 has runs that reached their target during an episode"
    for run, e in cut:
        assert run.target is not None and run.records[-1].best_score is not None
        reached = (
            run.records[-1].best_score >= run.target
            if run.maximize
            else run.records[-1].best_score <= run.target
        )
        assert reached and e.end == len(run.records) and e.end - e.onset + 1 < SHORTEST[e.kind]
    assert any(e.end - e.onset + 1 < SHORTEST[e.kind] for run in runs for e in run.episodes)  # failed jobs
    report = score(runs)
    assert report["unscored_episodes"] == len(cut)
    assert report["episodes"] == sum(len(run.episodes) for run in runs)


@pytest.mark.parametrize("restart", [False, True])
def test_restart_on_stall_restarts_the_strategy_from_the_best_candidate(
    restart: bool, sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """CMA-ES on rastrigin settles in a local minimum far from the target 0: a stall. With
    restart_on_stall (off by default) it restarts from its best candidate."""
    from engine.core import JobSpec
    from engine.execution import InProcessExecutor
    from engine.runner import create_job, run_job
    from engine.store import JobStore

    spec = JobSpec.parse(
        {
            "problem": "rastrigin",
            "problem_params": {"dim": 3},
            "strategy": "cmaes",
            "batch_size": 8,
            "max_cycles": 50,
            "max_evaluations": None,
            "target": 0.0,
            "tolerance": 1e-3,
            "seed": 0,
            "cache": "off",
            "restart_on_stall": restart,
        }
    )
    assert JobSpec.parse({"problem": "sphere"}).restart_on_stall is False
    store = JobStore(sqlite_url)
    try:
        job = create_job(store, spec, f"restart-{restart}")
        with caplog.at_level(logging.WARNING, logger="engine.runner"):
            run_job(job, store, InProcessExecutor())
        stall_cycles = [f.cycle for f in run(store.cycles(job.job_id), target=0.0, tolerance=1e-3)]
    finally:
        store.close()
    assert stall_cycles, "the job did not stall"
    restarts = [r.getMessage() for r in caplog.records if "restarted" in r.getMessage()]
    state = job.strategy.state()
    if not restart:
        assert restarts == [] and state["seed"] == 0
        return
    assert restarts == [
        f"job restart-True stalled at cycle {stall_cycles[0]}: cmaes restarted from the best candidate"
    ]
    assert state["seed"] == stall_cycles[0]
    best = job.progress.best_candidate
    assert best is not None
    assert state["x0"] == pytest.approx(list(job.space.encode([best])[0]), abs=1e-9)


def _levelling_off(seed: int) -> list[CycleRecord]:
    """A job that closes in on its floor fast (gap x0.74 a cycle) and levels off at 0.5% of its
    first gap (log-gap noise 0.4): a bend in its convergence, no anomaly."""
    rng = random.Random(seed)
    best = math.inf
    out = []
    for cycle in range(1, 81):
        batch = 100 + 1000 * (math.exp(-0.3 * cycle) + 0.005) * math.exp(rng.gauss(0, 0.4))
        improved, best = batch < best, min(best, batch)
        out.append(CycleRecord(cycle, 32, 0, 0, batch, best, improved, duration=2.0, eval_seconds=8.0))
    return out


def test_the_regression_trend_follows_a_job_that_levels_off() -> None:
    """One line through all 32 batch bests of a job that bent (levelled off) puts the floor just
    under the lowest batch, and ordinary batches look far above the trend; a trend that weighs
    recent batches more (half-life 16 cycles) follows the bend and calls far fewer regressions."""

    def regressions(**kwargs: object) -> int:
        return sum(f.kind == "regression" for seed in range(60) for f in run(_levelling_off(seed), **kwargs))

    local, flat = regressions(), regressions(config=DetectorConfig(regression_half_life=None))
    assert 2 * local <= flat, (local, flat)


def _cached_series(seed: int, factors: dict[int, float]) -> list[CycleRecord]:
    """A job whose cache hits vary from 0 to 28 of its 32 candidates a cycle, on workers that are
    never saturated: its cycle time is steady (times ``factors``), its evaluations per second not."""
    rng = random.Random(seed)
    cached = {c: rng.randint(0, 28) for c in range(1, 81)}
    duration = {c: 2.0 * math.exp(rng.gauss(0, 0.05)) * factors.get(c, 1.0) for c in range(1, 81)}
    eval_seconds = {c: (32 - cached[c]) * 0.25 * math.exp(rng.gauss(0, 0.03)) for c in range(1, 81)}
    return normal_series(cached=cached, duration=duration, eval_seconds=eval_seconds)


@pytest.mark.parametrize("seed", range(5))
def test_an_idle_executor_shows_in_the_cycle_time_when_cache_hits_blur_the_throughput(seed: int) -> None:
    """Cycles 3x as long for 4 cycles from cycle 40 while each evaluation costs as usual: the
    evaluations per second jitter by 8x with the cache hits and do not look low, the cycle time
    does. A cycle with many cache hits computes fewer evaluations in the same time: its
    evaluations per second drop, but its cycle time did not grow, so the executor was not idle
    (seeds 2 and 4 had 2-3 such false collapses each when the throughput alone decided)."""
    findings = run(_cached_series(seed, span(40, 43, 3.0)))
    assert [(f.kind, f.cycle) for f in findings] == [("throughput_collapse", 42)]
    assert findings[0].evidence["ratio"] == pytest.approx(1 / 3, rel=0.2)
    assert run(_cached_series(seed, {})) == []
