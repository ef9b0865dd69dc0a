"""Pipelined cycles: cycle n+1 is proposed and sent out while cycle n evaluates.

For a strategy that asks ahead (``engine.core.strategy.asks_ahead``: TPE, random search) the
strategy calls run in one fixed order, whatever the timing: ``ask(n+1)`` after ``tell(n-1)`` and
before ``tell(n)``, so a seed gives one result. Cycle n+1's shards then wait in Dask's queue behind
cycle n's, and a worker that finishes a shard of cycle n starts one of cycle n+1 at once instead of
idling while the strategy thinks. Other strategies (CMA-ES: one generation at a time) run lock-step,
their record and checkpoint still overlapping the next evaluation through the ``CycleCommitter``.

Exact resume: the checkpoint of cycle n holds the strategy's state, which lists the batch already
asked for cycle n+1 (``pending_batches``); a resumed pipeline sends exactly that batch out again
(what finished before the crash comes back from the inference cache) and goes on from there.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import Any, Generic, Protocol, TypeVar

from engine.core import Candidate, JobSpec, Progress, Strategy, next_batch_size
from engine.core.strategy import pending_batches
from engine.execution import EvaluatedBatch, Executor
from engine.observe.logs import set_log_cycle

log = logging.getLogger("engine.pipeline")
T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

MAX_IN_FLIGHT = 2
"""Cycles asked for and not yet told: the one evaluating and the one proposed behind it."""


class StageFuture(Protocol[T_co]):
    """A stage running elsewhere (a thread, a Prefect task run): ``result()`` waits for it."""

    def result(self) -> T_co: ...


class StageSubmitter(Protocol):
    """Starts one stage without waiting for it: ``submit(stage, cycle, fn, *args)`` returns a future
    of ``fn(*args)``. A stage runner that has a ``submit`` method of this shape (the Prefect flow's)
    runs the evaluate stage through it; otherwise the pipeline runs that stage on its own threads."""

    def __call__(self, stage: str, cycle: int, fn: Callable[..., T], *args: Any) -> StageFuture[T]: ...


class StageRunner(Protocol):
    """Runs one stage of a cycle: ``run(stage_name, cycle, fn, *args)`` returns ``fn(*args)``."""

    def __call__(self, stage: str, cycle: int, fn: Callable[..., T], *args: Any) -> T: ...


EvaluationSlots = Callable[[int], AbstractContextManager[None]]
"""Holds slots (of a global limit, say) while an evaluate stage fans out into that many shards."""


class Job(Protocol):
    """What the pipeline reads of a job (``engine.runner.Job``): its spec, progress and strategy."""

    spec: JobSpec
    progress: Progress
    strategy: Strategy


ProposeStage = Callable[..., list[Candidate]]  # (job, n)
EvaluateStage = Callable[..., EvaluatedBatch]  # (job, executor, candidates)


@dataclass
class Flight:
    """A cycle asked for and not yet told: its candidates and, once sent out, its evaluation."""

    cycle: int
    candidates: list[Candidate]
    started: float
    future: StageFuture[EvaluatedBatch] | None = None


@dataclass(frozen=True)
class EvaluatedCycle:
    """A cycle whose evaluations are back, ready for the record stage."""

    cycle: int
    candidates: list[Candidate]
    batch: EvaluatedBatch
    started: float


class _Later(Generic[T]):
    """A stage run in the loop's thread when its result is asked for (lock-step cycles)."""

    def __init__(self, run: Callable[[], T]) -> None:
        self._run = run

    def result(self) -> T:
        return self._run()


def within_budget(spec: JobSpec, cycles: int, evaluations: int) -> bool:
    """Whether the spec's cycle and evaluation budgets allow another cycle after these counts."""
    if spec.max_evaluations is not None and evaluations >= spec.max_evaluations:
        return False
    return spec.max_cycles is None or cycles < spec.max_cycles


def _evaluate_holding_slots(
    slots: EvaluationSlots,
    shards: int,
    evaluate: EvaluateStage,
    job: Job,
    executor: Executor,
    batch: list[Candidate],
) -> EvaluatedBatch:
    with slots(shards):
        return evaluate(job, executor, batch)


class CyclePipeline:
    """Hands the loop one evaluated cycle at a time, having asked and sent out the next one first
    (``ahead``) or not (lock-step). :meth:`close` waits for what is still in flight."""

    def __init__(
        self,
        job: Job,
        executor: Executor,
        *,
        stages: StageRunner,
        propose: ProposeStage,
        evaluate: EvaluateStage,
        ahead: bool,
        evaluation_slots: EvaluationSlots | None = None,
        on_wait: Callable[[], None] | None = None,
    ) -> None:
        self._job, self._executor, self._stages = job, executor, stages
        self._propose, self._evaluate, self._slots = propose, evaluate, evaluation_slots
        self._ahead, self._on_wait = ahead, on_wait
        submit: StageSubmitter | None = getattr(stages, "submit", None)
        self._threads: ThreadPoolExecutor | None = None
        if not ahead:
            submit = self._submit_later
        elif submit is None:
            self._threads = ThreadPoolExecutor(MAX_IN_FLIGHT, thread_name_prefix="evaluate")
            submit = self._submit_on_thread
        self._submit = submit
        # A resumed job: the batch its strategy had asked for when the checkpoint was written.
        first = job.progress.cycles + 1
        self._flights: deque[Flight] = deque(
            Flight(first + i, batch, time.perf_counter())
            for i, batch in enumerate(pending_batches(job.strategy))
        )

    def _submit_later(self, stage: str, cycle: int, fn: Callable[..., T], *args: Any) -> StageFuture[T]:
        return _Later(lambda: self._stages(stage, cycle, fn, *args))

    def _submit_on_thread(self, stage: str, cycle: int, fn: Callable[..., T], *args: Any) -> StageFuture[T]:
        assert self._threads is not None
        return self._threads.submit(self._stages, stage, cycle, fn, *args)

    def _send(self, flight: Flight) -> None:
        job, executor = self._job, self._executor
        if self._slots is None:
            fn: Callable[..., EvaluatedBatch] = self._evaluate
            args: tuple[Any, ...] = (job, executor, flight.candidates)
        else:
            shards = executor.shard_count(len(flight.candidates), job.spec.shard_size)
            fn, args = (
                _evaluate_holding_slots,
                (self._slots, shards, self._evaluate, job, executor, flight.candidates),
            )
        flight.future = self._submit("evaluate", flight.cycle, fn, *args)

    def _ask_next(self) -> None:
        """Ask for the cycle after those in flight, and send it out unless the budget ends before it."""
        job = self._job
        cycles = job.progress.cycles + len(self._flights)
        evaluations = job.progress.evaluations + sum(len(f.candidates) for f in self._flights)
        spec = job.spec
        if spec.max_evaluations is not None and evaluations >= spec.max_evaluations:
            return  # no cycle can follow: nothing to ask
        n = next_batch_size(spec, replace(job.progress, cycles=cycles, evaluations=evaluations))
        cycle = cycles + 1
        set_log_cycle(cycle)
        candidates = self._stages("propose", cycle, self._propose, job, n)
        flight = Flight(cycle, list(candidates), time.perf_counter())
        self._flights.append(flight)
        # Asked even past max_cycles (asking must not depend on a budget a resume may lift), but
        # evaluated only within it.
        if within_budget(spec, cycles, evaluations):
            self._send(flight)

    def next(self) -> EvaluatedCycle:
        """The next cycle, evaluated; the cycle after it is asked for and sent out first if ahead."""
        if not self._flights:
            self._ask_next()
        head = self._flights[0]
        if head.future is None:  # asked past a budget since lifted, or restored from a checkpoint
            self._send(head)
        if self._ahead and len(self._flights) < MAX_IN_FLIGHT:
            self._ask_next()
        if self._on_wait is not None:
            self._on_wait()
        assert head.future is not None
        # Out of the pipeline before it is waited on: a cycle whose evaluation raised is over, and
        # close() must not wait on it again (a lock-step cycle would be evaluated a second time).
        self._flights.popleft()
        batch = head.future.result()
        return EvaluatedCycle(head.cycle, head.candidates, batch, head.started)

    def close(self, wait: bool = True) -> None:
        """Wait for evaluations still in flight (their results are dropped: they reach the cache),
        unless ``wait`` is false; then stop the pipeline's threads."""
        flights, self._flights = list(self._flights), deque()
        for flight in flights:
            # A lock-step cycle not yet evaluated is dropped, not started.
            if wait and flight.future is not None and not isinstance(flight.future, _Later):
                try:
                    flight.future.result()
                except Exception as exc:  # the job is over: an error here changes nothing
                    log.debug("cycle %d evaluated after the job ended: %s", flight.cycle, exc)
        if self._threads is not None:
            self._threads.shutdown(wait=wait, cancel_futures=True)
