"""The cycle step as plain functions: account for a cycle's evaluations and decide whether to stop.

A cycle is ``propose -> evaluate -> tell -> record -> stop?``; the loop that drives it lives in
``engine.runner``. Everything here is pure and cheap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np

from engine.core.candidate import Candidate
from engine.core.evaluation import Evaluation, Status
from engine.core.spec import JobSpec


@dataclass(frozen=True, slots=True)
class Progress:
    """Where a job stands after its last committed cycle."""

    cycles: int = 0
    evaluations: int = 0
    failed: int = 0
    cached: int = 0
    cache_misses: int = 0
    best_loss: float | None = None
    best_score: float | None = None
    best_candidate: dict[str, Any] | None = None
    best_cycle: int | None = None
    cycles_without_improvement: int = 0
    elapsed_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Progress:
        return cls(**data)


LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0,
)  # fmt: skip
"""Upper bounds (seconds) of the evaluation latency histogram: from vectorised functions (~us) to
model training (an hour)."""

_LATENCY_BOUNDS = np.asarray(LATENCY_BUCKETS)


@dataclass(frozen=True, slots=True)
class LatencyHistogram:
    """A cycle's computed evaluations binned by duration, for a Prometheus-style histogram.

    ``cumulative_counts[i]`` counts the durations ``<= LATENCY_BUCKETS[i]``; ``count`` and
    ``total`` (seconds) cover all of them. Counted in bulk once a cycle, so that exposing the
    histogram costs nothing per evaluation.
    """

    cumulative_counts: tuple[int, ...]
    count: int
    total: float


@dataclass(frozen=True, slots=True)
class ResourceUsage:
    """CPU and memory around a cycle: of the process running the loop and of the workers.

    ``process_cpu_percent`` is the loop process's CPU time over the cycle's wall time (100 = one
    core busy); worker figures are the latest reading of the cluster (None without workers).
    """

    process_cpu_percent: float | None = None
    process_rss_bytes: int | None = None
    worker_memory_total_bytes: int | None = None
    worker_memory_max_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class CycleRecord:
    """What one cycle did: its counts, its best and the job's best after it.

    The fields from ``eval_p50`` on are measurements, None when not taken: the latency quantiles
    (seconds, nearest rank) of the evaluations computed in the cycle (cached ones excluded), and
    the resources of :class:`ResourceUsage`. ``latency`` is for live metrics and is not stored.
    """

    cycle: int
    evaluations: int
    failed: int
    cached: int
    batch_best_score: float | None
    best_score: float | None
    improved: bool
    duration: float
    eval_seconds: float
    eval_p50: float | None = None
    eval_p95: float | None = None
    eval_max: float | None = None
    process_cpu_percent: float | None = None
    process_rss_bytes: int | None = None
    worker_memory_total_bytes: int | None = None
    worker_memory_max_bytes: int | None = None
    latency: LatencyHistogram | None = None

    @property
    def failure_share(self) -> float:
        return self.failed / self.evaluations if self.evaluations else 0.0

    @property
    def evaluations_per_second(self) -> float | None:
        """The cycle's throughput: its evaluations (cached included) over its duration."""
        return self.evaluations / self.duration if self.duration > 0 else None


def latency_quantiles(durations: Sequence[float]) -> tuple[float, float, float, LatencyHistogram] | None:
    """p50, p95 (nearest rank), max and the histogram of ``durations``; None when there are none.

    numpy in bulk: ~0.15 ms for 5,000 durations, where sorting them in Python costs ~0.4 ms.
    """
    if not durations:
        return None
    values = np.asarray(durations, dtype=float)
    n = values.size
    k50, k95 = (n - 1) // 2, max(0, math.ceil(0.95 * n) - 1)
    ranked = np.partition(values, (k50, k95))
    below = np.bincount(np.searchsorted(_LATENCY_BOUNDS, values), minlength=_LATENCY_BOUNDS.size + 1)
    histogram = LatencyHistogram(
        tuple(below.cumsum()[: _LATENCY_BOUNDS.size].tolist()), n, float(sum(durations))
    )
    return float(ranked[k50]), float(ranked[k95]), float(values.max()), histogram


def losses(evaluations: Sequence[Evaluation], maximize: bool) -> list[float | None]:
    """The values strategies minimise, one per evaluation; None where it failed."""
    sign = -1.0 if maximize else 1.0
    return [None if e.score is None or e.status is Status.FAILED else sign * e.score for e in evaluations]


def account_cycle(
    progress: Progress,
    candidates: Sequence[Candidate],
    evaluations: Sequence[Evaluation],
    *,
    maximize: bool,
    tolerance: float,
    duration: float,
    cache_misses: int = 0,
    resources: ResourceUsage | None = None,
) -> tuple[Progress, CycleRecord]:
    """Fold one cycle's evaluations into the job's progress (``cache_misses``: look-ups that missed;
    ``resources``: what the cycle used, copied into the record)."""
    cycle = progress.cycles + 1
    cycle_losses = losses(evaluations, maximize)
    failed = sum(1 for x in cycle_losses if x is None)
    cached = sum(1 for e in evaluations if e.status is Status.CACHED)
    scored = [(x, i) for i, x in enumerate(cycle_losses) if x is not None]
    best_i = min(scored)[1] if scored else None
    batch_best = None if best_i is None else evaluations[best_i].score
    improved = best_i is not None and (
        progress.best_loss is None or cycle_losses[best_i] < progress.best_loss - tolerance  # type: ignore[operator]
    )
    new = replace(
        progress,
        cycles=cycle,
        evaluations=progress.evaluations + len(evaluations),
        failed=progress.failed + failed,
        cached=progress.cached + cached,
        cache_misses=progress.cache_misses + cache_misses,
        cycles_without_improvement=0 if improved else progress.cycles_without_improvement + 1,
        elapsed_seconds=progress.elapsed_seconds + duration,
    )
    # The best moves on any strict improvement, even one within tolerance; patience counts only
    # improvements beyond tolerance.
    if best_i is not None and (progress.best_loss is None or cycle_losses[best_i] < progress.best_loss):  # type: ignore[operator]
        new = replace(
            new,
            best_loss=cycle_losses[best_i],
            best_score=evaluations[best_i].score,
            best_candidate=dict(candidates[best_i]),
            best_cycle=cycle,
        )
    durations = [e.duration for e in evaluations]
    computed = durations if not cached else [e.duration for e in evaluations if e.status is not Status.CACHED]
    p50, p95, p_max, histogram = latency_quantiles(computed) or (None, None, None, None)
    usage = resources or ResourceUsage()
    record = CycleRecord(
        cycle=cycle,
        evaluations=len(evaluations),
        failed=failed,
        cached=cached,
        batch_best_score=batch_best,
        best_score=new.best_score,
        improved=improved,
        duration=duration,
        eval_seconds=sum(durations),
        eval_p50=p50,
        eval_p95=p95,
        eval_max=p_max,
        process_cpu_percent=usage.process_cpu_percent,
        process_rss_bytes=usage.process_rss_bytes,
        worker_memory_total_bytes=usage.worker_memory_total_bytes,
        worker_memory_max_bytes=usage.worker_memory_max_bytes,
        latency=histogram,
    )
    return new, record


def stop_reason(spec: JobSpec, progress: Progress, maximize: bool, now: datetime | None = None) -> str | None:
    """Why the job should stop after its last cycle, or None to go on. The first rule met wins."""
    if spec.target is not None and progress.best_score is not None:
        reached = progress.best_score >= spec.target if maximize else progress.best_score <= spec.target
        if reached:
            return f"target reached: best score {progress.best_score:.6g} vs target {spec.target:g}"
    if spec.max_evaluations is not None and progress.evaluations >= spec.max_evaluations:
        return f"max evaluations reached ({progress.evaluations})"
    if spec.max_cycles is not None and progress.cycles >= spec.max_cycles:
        return f"max cycles reached ({progress.cycles})"
    if spec.patience is not None and progress.cycles_without_improvement >= spec.patience:
        return f"no improvement beyond {spec.tolerance:g} for {spec.patience} cycles"
    if spec.max_seconds is not None and progress.elapsed_seconds >= spec.max_seconds:
        return f"time limit reached ({progress.elapsed_seconds:.1f} s)"
    if spec.deadline is not None:
        deadline = spec.deadline if spec.deadline.tzinfo else spec.deadline.replace(tzinfo=UTC)
        if (now or datetime.now(UTC)) >= deadline:
            return f"deadline reached ({deadline.isoformat()})"
    return None


def next_batch_size(spec: JobSpec, progress: Progress) -> int:
    """How many candidates the next cycle proposes: the batch size, trimmed to the evaluation budget."""
    if spec.max_evaluations is None:
        return spec.batch_size
    return max(1, min(spec.batch_size, spec.max_evaluations - progress.evaluations))


def too_many_failures(spec: JobSpec, record: CycleRecord) -> bool:
    """True when the cycle's failure share exceeds what the spec tolerates."""
    return (
        record.evaluations > 0
        and record.failure_share > spec.max_failure_share
        and not math.isclose(record.failure_share, spec.max_failure_share)
    )
