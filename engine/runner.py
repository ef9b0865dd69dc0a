"""The refinement loop: ``propose -> evaluate -> record -> stop?`` until a stop rule is met.

The loop is framework-free. Each stage goes through a :class:`StageRunner`, which by default
just calls it; the Prefect flow passes one that runs each stage as a Prefect task, so the UI shows
every cycle's DAG without the engine knowing about Prefect.

Cycle commits are pipelined: cycle N is written to the store by a background thread while cycle
N+1 evaluates, with at most one commit in flight; and for strategies that ask ahead, cycle N+1 is
proposed and sent out while cycle N evaluates (``engine/pipeline.py``). A crash therefore loses at
most the cycles not yet committed, and resume replays them deterministically from the last
checkpoint.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar

from engine.cache import CacheConfig, InferenceCache, key_prefix, process_cache
from engine.cache.inflight import evaluate_once, lease_owner
from engine.core import (
    Candidate,
    CycleRecord,
    Evaluation,
    JobExistsError,
    JobFailedError,
    JobNotFoundError,
    JobSpec,
    Progress,
    ResourceUsage,
    Space,
    SpecError,
    Status,
    Strategy,
    account_cycle,
    fingerprint,
    losses,
    problem_direction,
    problem_version,
    stop_reason,
)
from engine.core.cycle import too_many_failures
from engine.core.strategy import asks_ahead
from engine.execution import EvaluatedBatch, Executor, ProblemRef, Writeback
from engine.observe.anomaly import AnomalyDetector, DetectorConfig
from engine.observe.logs import bind_log_context, bound_log_job, set_log_cycle
from engine.pipeline import CyclePipeline, EvaluationSlots, StageRunner
from engine.problems import load_problem, problem_space
from engine.signing import secret_key, sign_checkpoint, verified_checkpoint
from engine.store import JobRecord, JobStatus, JobStore
from engine.strategies import make_strategy, restore_strategy

log = logging.getLogger("engine.runner")
T = TypeVar("T")


def call_stage(stage: str, cycle: int, fn: Callable[..., T], *args: Any) -> T:
    """The plain stage runner: call the stage in this thread."""
    return fn(*args)


class CycleListener(Protocol):
    """Told about a job's progress; called in the loop's thread, so it must be quick. What it
    returns (an observer's findings, say) is its own business: the loop ignores it."""

    def __call__(self, job: Job, record: CycleRecord) -> object: ...


ResourceReader = Callable[[], ResourceUsage]
"""Reads the CPU and memory in use, once a cycle on the loop's thread (so it must be quick)."""


@dataclass
class Job:
    """A job being run: its spec, its problem and strategy, and where it stands."""

    job_id: str
    spec: JobSpec
    problem: Any
    space: Space
    strategy: Strategy
    progress: Progress = field(default_factory=Progress)
    cache: InferenceCache | None = None
    cache_config: CacheConfig | None = None

    def cache_keys(self, candidates: Sequence[Candidate]) -> list[str]:
        """The cache key of each candidate (``key_prefix`` + fingerprint, as ``cache_key`` builds it)."""
        assert self.cache_config is not None
        prefix = key_prefix(self.cache_config.namespace, self.spec.problem, problem_version(self.problem))
        return [prefix + fingerprint(c) for c in candidates]

    @property
    def maximize(self) -> bool:
        return problem_direction(self.problem) == "maximize"

    @property
    def ref(self) -> ProblemRef:
        return ProblemRef(self.spec.problem, dict(self.spec.problem_params))


@dataclass(frozen=True)
class JobResult:
    """How a job ended."""

    job_id: str
    status: JobStatus
    progress: Progress
    stop_reason: str | None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "status": self.status.value,
            "stop_reason": self.stop_reason,
            "error": self.error,
            **self.progress.to_dict(),
        }


def new_job_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def build_job(job_id: str, spec: JobSpec, *, allowed_modules: Sequence[str] | None = None) -> Job:
    """Load the problem and make a fresh strategy; raises SpecError on bad input (nothing written).

    ``allowed_modules``: for a spec from outside (a deployment run), the module prefixes its
    import path may name (see :func:`engine.problems.load_problem`).
    """
    anomaly_config(spec)
    problem = load_problem(spec.problem, dict(spec.problem_params), allowed_modules=allowed_modules)
    space = problem_space(problem)
    strategy = make_strategy(spec.strategy, space, spec.seed, dict(spec.strategy_params))
    return Job(job_id, spec, problem, space, strategy)


def anomaly_config(spec: JobSpec) -> DetectorConfig:
    """The job's anomaly detector settings: the defaults with the spec's ``anomaly_params``."""
    try:
        return DetectorConfig.from_params(spec.anomaly_params)
    except ValueError as exc:
        raise SpecError(f"anomaly_params: {exc}") from None


def create_job(
    store: JobStore, spec: JobSpec, job_id: str | None = None, *, allowed_modules: Sequence[str] | None = None
) -> Job:
    """Validate everything first, then record the new job (so bad input writes nothing)."""
    job = build_job(job_id or new_job_id(), spec, allowed_modules=allowed_modules)
    store.create_job(job.job_id, spec)
    return job


def resume_job(
    store: JobStore,
    job_id: str,
    record: JobRecord | None = None,
    *,
    allowed_modules: Sequence[str] | None = None,
) -> Job:
    """Rebuild a job from its last committed checkpoint, which must carry a valid signature
    (``record``: the job as just read)."""
    record = record or store.get_job(job_id)
    if record.status is JobStatus.COMPLETED:
        raise SpecError(f"job {job_id!r} already completed ({record.stop_reason}): nothing to resume")
    job = build_job(job_id, record.spec, allowed_modules=allowed_modules)
    checkpoint = store.last_checkpoint(job_id)
    if checkpoint is not None:
        # A checkpoint can hold a pickle: load only one this deployment signed (engine.signing).
        state = verified_checkpoint(job_id, checkpoint.state, secret_key())
        job.strategy = restore_strategy(record.spec.strategy, job.space, state["strategy"])
        job.progress = Progress.from_dict(state["progress"])
    return job


def open_job(
    store: JobStore,
    spec: JobSpec | None,
    job_id: str | None,
    *,
    allowed_modules: Sequence[str] | None = None,
) -> Job | JobRecord:
    """The job to run, built once: a new job for ``spec`` (under ``job_id`` or a fresh id), or the
    job ``job_id`` resumed from its last checkpoint.

    Both given, for a job that exists with that same spec, resume it (a rerun of a crashed flow
    run continues its job); if that job has completed, its record is returned instead (nothing to
    run). Raises :class:`SpecError` (nothing written) for bad input, another spec under the id, or
    a completed job asked for by id alone. ``allowed_modules``: see :func:`build_job`.
    """
    if spec is None:
        if job_id is None:
            raise SpecError("give a job spec to start a job, or a job_id to resume one")
        return resume_job(store, job_id, allowed_modules=allowed_modules)
    if job_id is None:
        return create_job(store, spec, allowed_modules=allowed_modules)
    try:
        record = store.get_job(job_id, fresh=True)
    except JobNotFoundError:
        return create_job(store, spec, job_id, allowed_modules=allowed_modules)
    if record.spec != spec:
        raise JobExistsError(f"job {job_id!r} exists with another spec: choose another job id")
    if record.status is JobStatus.COMPLETED:
        return record
    return resume_job(store, job_id, record, allowed_modules=allowed_modules)


class CycleCommitter:
    """Writes cycles to the store on a background thread, one commit in flight at most.

    A queued commit is held until :meth:`release`, which the loop calls when the next cycle's
    evaluations go out: the commit's Python work (thousands of rows) then runs while the loop's
    thread waits on Dask with the GIL released, not while it is busy proposing or telling.
    """

    def __init__(self, store: JobStore) -> None:
        self._store = store
        self._key = secret_key()  # checkpoints are signed (engine.signing)
        self._held: Callable[[], None] | None = None
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="cycle-committer", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                if self._error is None:
                    item()
            except BaseException as exc:
                self._error = exc
            finally:
                self._queue.task_done()

    def check(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, commit: Callable[[], None]) -> None:
        """Hold ``commit`` until the next :meth:`release` (a held one is released first)."""
        self.release()
        self._held = commit

    def release(self) -> None:
        """Start writing the held commit, if any, on the background thread."""
        self.check()
        if self._held is not None:
            commit, self._held = self._held, None
            self._queue.put(commit)

    def commit_cycle(
        self,
        job: Job,
        cycle: CycleRecord,
        candidates: Sequence[Candidate],
        evaluations: Sequence[Evaluation],
        state: dict[str, Any],
    ) -> None:
        """Queue the commit of one cycle; the job's progress is captured now."""
        store, job_id, progress, key = self._store, job.job_id, job.progress, self._key
        self.submit(
            lambda: store.commit_cycle(
                job_id, cycle, progress, candidates, evaluations, sign_checkpoint(job_id, state, key)
            )
        )

    def flush(self) -> None:
        """Wait until every submitted commit is written; raise the first commit error."""
        self.release()
        self._queue.join()
        self.check()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()


def propose(job: Job, n: int) -> list[Candidate]:
    """Stage 1: ask the strategy for ``n`` candidates."""
    return job.strategy.ask(n)


AUTO_CACHE_MIN_SECONDS = 1e-3
"""With ``cache = "auto"``, evaluations faster than this are not worth a cache round trip."""


def evaluate(job: Job, executor: Executor, candidates: Sequence[Candidate]) -> EvaluatedBatch:
    """Stage 2: look the batch up in the cache, evaluate the distinct misses on the executor
    (the Dask fan-out happens in there; workers write each result back as it finishes), and
    return one evaluation per candidate with the count of misses. A repeat within the batch is
    paid for once."""
    # Read once: with cycles in flight, another cycle's evaluate may turn "auto" caching off meanwhile.
    cache, config = job.cache, job.cache_config
    if cache is None or config is None:  # run_job attaches it unless cache = "off"
        return EvaluatedBatch(executor.evaluate(job.ref, candidates, job.spec.shard_size))
    keys = job.cache_keys(candidates)
    found = cache.get_many(keys)
    todo: dict[str, int] = {}
    for i, (key, hit) in enumerate(zip(keys, found, strict=True)):
        if hit is None and key not in todo:
            todo[key] = i

    def compute(misses: list[str]) -> list[Evaluation]:
        writeback = Writeback(config, tuple(misses), job.spec.cache_ttl_seconds, job.spec.cache_failures)
        return executor.evaluate(
            job.ref, [candidates[todo[k]] for k in misses], job.spec.shard_size, writeback
        )

    # A miss another job is computing right now is waited for, not computed again.
    shared = evaluate_once(
        cache,
        list(todo),
        compute,
        owner=lease_owner(job.job_id),
        lease_seconds=config.lease_seconds,
        max_wait_seconds=config.max_wait_seconds,
    )
    out: list[Evaluation] = []
    for i, (key, hit) in enumerate(zip(keys, found, strict=True)):
        if hit is not None:
            out.append(hit)
        elif todo[key] == i:
            out.append(shared.get(key))
        else:  # a repeat of a candidate computed in this batch: not paid for twice
            ev = shared.get(key)
            out.append(replace(ev, status=Status.CACHED) if ev.ok else ev)
    _maybe_stop_caching(job, list(shared.computed.values()))
    return EvaluatedBatch(out, cache_misses=len(shared.computed))


def _maybe_stop_caching(job: Job, computed: Sequence[Evaluation]) -> None:
    if job.spec.cache != "auto" or not computed:
        return
    durations = sorted(e.duration for e in computed)
    median = durations[len(durations) // 2]
    if median < AUTO_CACHE_MIN_SECONDS:
        log.info(
            "job %s: evaluations take %.0f us, less than a cache round trip; caching off for this run "
            "(set cache = 'on' to keep it)",
            job.job_id,
            median * 1e6,
        )
        job.cache = None


def record(
    job: Job,
    committer: CycleCommitter,
    candidates: Sequence[Candidate],
    batch: EvaluatedBatch,
    cycle_seconds: float,
    resources: ResourceUsage | None = None,
) -> CycleRecord:
    """Stage 3: tell the strategy, fold the cycle into the progress, and queue its commit."""
    maximize, evaluations = job.maximize, batch.evaluations
    job.strategy.tell(candidates, losses(evaluations, maximize))
    job.progress, cycle = account_cycle(
        job.progress,
        candidates,
        evaluations,
        maximize=maximize,
        tolerance=job.spec.tolerance,
        duration=cycle_seconds,
        cache_misses=batch.cache_misses,
        resources=resources,
    )
    state = {"strategy": job.strategy.state(), "progress": job.progress.to_dict()}
    committer.commit_cycle(job, cycle, candidates, evaluations, state)
    return cycle


class StallRestarter:
    """``restart_on_stall``: when the job stalls, restart its strategy from the best candidate.

    A strategy that takes a start point (CMA-ES: ``x0``) restarts there with the spec's other
    parameters; one that takes none (random search, TPE) restarts afresh. Either way with a new
    seed (the spec's plus the cycle), so the restart is reproducible. The restarted strategy is in
    the next cycle's checkpoint. The detector is rebuilt from the stored cycles, so a stall acted
    on before a resume is not acted on again.
    """

    def __init__(self, job: Job, store: JobStore) -> None:
        self._detector = AnomalyDetector.rebuild(
            store.cycles(job.job_id, fresh=True),
            maximize=job.maximize,
            target=job.spec.target,
            tolerance=job.spec.tolerance,
            config=anomaly_config(job.spec),
        )

    def __call__(self, job: Job, record: CycleRecord) -> None:
        if any(finding.kind == "stall" for finding in self._detector.observe(record)):
            restart_strategy(job, record.cycle)


def restart_strategy(job: Job, cycle: int) -> None:
    """Replace the job's strategy by a fresh one started from its best candidate (see above)."""
    spec, best = job.spec, job.progress.best_candidate
    seed = (spec.seed + cycle) % 2**32
    params = dict(spec.strategy_params)
    if best is not None:
        try:
            job.strategy = make_strategy(spec.strategy, job.space, seed, {**params, "x0": best})
        except SpecError:  # the strategy takes no start point: restart it afresh below
            log.debug("strategy %s takes no start point", spec.strategy)
        else:
            log.warning(
                "job %s stalled at cycle %d: %s restarted from the best candidate",
                job.job_id,
                cycle,
                spec.strategy,
            )
            return
    job.strategy = make_strategy(spec.strategy, job.space, seed, params)
    log.warning(
        "job %s stalled at cycle %d: %s restarted with seed %d", job.job_id, cycle, spec.strategy, seed
    )


def run_job(
    job: Job,
    store: JobStore,
    executor: Executor,
    *,
    stages: StageRunner = call_stage,
    listeners: Sequence[CycleListener] = (),
    cache: CacheConfig | None = None,
    evaluation_slots: EvaluationSlots | None = None,
    resource_usage: ResourceReader | None = None,
    flow_run_id: str | None = None,
) -> JobResult:
    """Run ``job`` to a stop rule; record the outcome in the store and return it.

    With ``cache``, evaluations are looked up in (and written to) that inference cache unless the
    job's spec says ``cache = "off"``. ``evaluation_slots`` wraps each evaluate stage (given its
    shard count); ``resource_usage`` is read once a cycle into the cycle's record; the job is
    marked running (by ``flow_run_id``, if given) once, here.

    Raises :class:`JobFailedError` (after recording it) when a cycle fails more than the spec
    allows; ``KeyboardInterrupt`` marks the job interrupted, resumable from its last checkpoint.
    """
    if cache is not None and job.spec.cache != "off":
        job.cache, job.cache_config = process_cache(cache), cache
    committer = CycleCommitter(store)
    restarter = StallRestarter(job, store) if job.spec.restart_on_stall else None
    store.set_status(job.job_id, JobStatus.RUNNING, flow_run_id=flow_run_id)
    # The job is bound to the log lines once per process path: here unless the caller (the CLI,
    # the refine flow) bound it; the undo also clears the cycle the loop marks.
    bound = bound_log_job() == job.job_id
    unbind_log_context = bind_log_context() if bound else bind_log_context(job_id=job.job_id)
    # A restart on stall replaces the strategy, which must then have no batch still out.
    pipeline = CyclePipeline(
        job,
        executor,
        stages=stages,
        propose=propose,
        evaluate=evaluate,
        ahead=asks_ahead(job.strategy) and restarter is None,
        evaluation_slots=evaluation_slots,
        on_wait=committer.release,  # write the last cycle while this one evaluates
    )
    interrupted = False
    try:
        reason = stop_reason(job.spec, job.progress, job.maximize)
        while reason is None:
            evaluated = pipeline.next()
            set_log_cycle(evaluated.cycle)
            resources = resource_usage() if resource_usage is not None else None
            cycle = stages(
                "record",
                evaluated.cycle,
                record,
                job,
                committer,
                evaluated.candidates,
                evaluated.batch,
                time.perf_counter() - evaluated.started,
                resources,
            )
            for listener in listeners:
                listener(job, cycle)
            if restarter is not None:
                restarter(job, cycle)
            if too_many_failures(job.spec, cycle):
                committer.flush()
                error = (
                    f"cycle {cycle.cycle}: {cycle.failed} of {cycle.evaluations} evaluations failed, more "
                    f"than max_failure_share={job.spec.max_failure_share:g}"
                )
                store.set_status(job.job_id, JobStatus.FAILED, error=error)
                raise JobFailedError(error)
            reason = stop_reason(job.spec, job.progress, job.maximize)
        committer.flush()
        store.set_status(job.job_id, JobStatus.COMPLETED, stop_reason=reason)
        return JobResult(job.job_id, JobStatus.COMPLETED, job.progress, reason)
    except KeyboardInterrupt:
        interrupted = True
        _flush_quietly(committer)
        store.set_status(job.job_id, JobStatus.INTERRUPTED, error="interrupted")
        raise
    except JobFailedError:
        raise
    except BaseException as exc:
        _flush_quietly(committer)
        store.set_status(job.job_id, JobStatus.FAILED, error=f"{type(exc).__name__}: {exc}"[:2000])
        raise
    finally:
        pipeline.close(wait=not interrupted)
        committer.close()
        unbind_log_context()


def _flush_quietly(committer: CycleCommitter) -> None:
    try:
        committer.flush()
    except Exception:  # the original error matters more; the commit error is logged
        log.exception("could not write the last cycle")
