"""The ``refine`` flow: one Prefect flow run per job, each cycle's stages as Prefect tasks.

The per-candidate fan-out happens on Dask futures inside the ``evaluate`` task, never as one
Prefect task per candidate (DESIGN.md section 4: that costs 177-367 ms a candidate).
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal, TypeVar

from prefect import flow, get_run_logger, task
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE
from prefect.client.schemas.objects import FlowRun, State, TaskRun
from prefect.context import FlowRunContext
from prefect.runtime import flow_run
from prefect.tasks import Task, exponential_backoff
from prefect.utilities.annotations import NotSet, quote

from engine.cache import CacheConfig
from engine.core import JobExistsError, JobNotFoundError, JobSpec, Progress, SpecError
from engine.execution import Executor, InProcessExecutor
from engine.execution.transient import is_transient
from engine.observe.logs import RunContextFormatter, bind_log_context, record_context, use_json_logs
from engine.problems import describe_problem, load_problem
from engine.runner import CycleListener, JobResult, StageRunner, create_job, resume_job, run_job
from engine.settings import load_settings
from engine.signing import use_secret_key
from engine.store import JobRecord, JobStatus, JobStore
from flows.observers import ObserverContext, Observers
from flows.secret_key import secret_key_from_block

T = TypeVar("T")

_RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
"""Prefect's loggers of flow and task runs, whose lines it also sends to the API as run logs."""


@dataclass(frozen=True)
class LocalHooks:
    """What an in-process caller (the CLI) lends the flow runs it starts: progress listeners, and
    a Dask executor it began starting before Prefect was even imported (it closes that one)."""

    listeners: Sequence[CycleListener] = ()
    executor: Future[Executor] | None = None


_hooks: ContextVar[LocalHooks | None] = ContextVar("irefine_local_hooks", default=None)


@contextlib.contextmanager
def local_hooks(hooks: LocalHooks) -> Iterator[None]:
    """Have flow runs started in this context use ``hooks``."""
    token = _hooks.set(hooks)
    try:
        yield
    finally:
        _hooks.reset(token)


def retry_transient(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry only infrastructure errors (a lost worker or connection), never a user's mistake."""
    try:
        state.result(raise_on_failure=True)
    except Exception as exc:
        return is_transient(exc)
    return False


class _Opaque:
    """Hides a stage's return value from Prefect, which would otherwise walk every item of it
    looking for futures (measured: +27 ms a task for a list of 5,000 candidates)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def _run_stage(stage: str, cycle: int, fn: Callable[..., Any], args: tuple[Any, ...]) -> _Opaque:
    return _Opaque(fn(*args))


_STAGE_OPTIONS: dict[str, Any] = {
    "cache_policy": NO_CACHE,  # inputs are live objects and large batches: never hash them
    "persist_result": False,
    "task_run_name": "{stage}-{cycle}",
}
_stage_tasks: dict[str, Task[[str, int, Callable[..., Any], tuple[Any, ...]], _Opaque]] = {
    "propose": task(name="propose", **_STAGE_OPTIONS)(_run_stage),
    "evaluate": task(
        name="evaluate",
        retries=3,
        retry_delay_seconds=exponential_backoff(backoff_factor=1),
        retry_jitter_factor=0.5,
        retry_condition_fn=retry_transient,
        **_STAGE_OPTIONS,
    )(_run_stage),
    "record": task(name="record", **_STAGE_OPTIONS)(_run_stage),
}


@task(
    name="describe-problem",
    task_run_name="describe-problem",
    # Inputs and code only (Prefect's default policy adds the run id and never hits across runs):
    # every later run of the same problem reads this from result storage instead of loading it.
    cache_policy=INPUTS + TASK_SOURCE,
    cache_expiration=timedelta(days=7),
    persist_result=True,
    result_serializer="json",
)
def describe(problem: str, params: dict[str, Any]) -> dict[str, Any]:
    """What the job refines: the problem's class, version, direction and search space."""
    return describe_problem(load_problem(problem, params))


def prefect_stage(stage: str, cycle: int, fn: Callable[..., T], *args: Any) -> T:
    """Run one cycle stage as a tracked Prefect task (arguments quoted: Prefect must not walk them)."""
    boxed: _Opaque = _stage_tasks[stage](stage, cycle, fn, quote(args))
    return boxed.value  # type: ignore[no-any-return]  # the stage returns a T


@contextlib.contextmanager
def _without_flow_heartbeat() -> Iterator[None]:
    """Prefect's settings with the flow heartbeat off (Prefect 3.9 defaults it to 180 s).

    A copy of the current settings with one field changed: ``temporary_settings`` would rebuild
    and validate every setting, 80-500 ms for each run (profiled on a busy 2-core machine).
    """
    from prefect.context import SettingsContext, get_settings_context

    context = get_settings_context()
    settings = context.settings
    if settings.flows.heartbeat_frequency is None:
        yield
        return
    flows = settings.flows.model_copy(update={"heartbeat_frequency": None})
    with SettingsContext(profile=context.profile, settings=settings.model_copy(update={"flows": flows})):
        yield


def run_refine(hooks: LocalHooks | None = None, **parameters: Any) -> dict[str, Any]:
    """Call the ``refine`` flow in this process (the CLI's and the benchmarks' way in).

    Prefect's flow heartbeat is off for the call: the job writes its own heartbeat to the store
    with every cycle, and a sync flow run would otherwise wait up to 1 s at exit for the
    heartbeat thread's sleep to end.
    """
    # Exempt what exists now (Prefect, pydantic and Dask leave millions of long-lived objects)
    # from the cyclic collector: py-spy showed 54% of a 5,000-candidate cycle in gc_collect_main
    # walking that heap again and again while the cycle allocated its candidates.
    gc.freeze()
    with _without_flow_heartbeat(), local_hooks(hooks or LocalHooks()):
        result: dict[str, Any] = refine(**parameters)
    return result


def _existing(store: JobStore, job_id: str, spec: JobSpec) -> JobRecord | None:
    """The job ``job_id`` if it exists (None if not); a JobExistsError if it has another spec."""
    try:
        record = store.get_job(job_id, fresh=True)
    except JobNotFoundError:
        return None
    if record.spec != spec:
        raise JobExistsError(f"job {job_id!r} exists with another spec: choose another job id")
    return record


def _completed_result(store: JobStore, record: JobRecord) -> dict[str, Any]:
    """What the run that completed ``record`` returned (its progress from the last checkpoint)."""
    checkpoint = store.last_checkpoint(record.job_id)
    progress = Progress.from_dict(checkpoint.state["progress"]) if checkpoint else Progress()
    return JobResult(record.job_id, JobStatus.COMPLETED, progress, record.stop_reason).to_dict()


JOB_SLOT_LEASE_SECONDS = 60.0
"""A killed flow process frees its running-jobs slot after at most this long (the lease is renewed
while the job runs); Prefect's default of 300 s would hold back the resumed run that long."""


def run_job_id(spec: object, job_id: str | None) -> str | None:
    """The job a ``refine`` flow run runs: ``job_id``, or for a deployment run given a spec and no
    job id, ``run-<flow run id>`` -- so that a rerun of the same flow run (the resume-on-crash
    automation) finds and resumes the job instead of starting anew."""
    if job_id is None and spec is not None:
        run = _context_flow_run()
        if run is not None and run.deployment_id:
            return f"run-{run.id}"
    return job_id


class _RunJobFilter(logging.Filter):
    """Gives Prefect's own lines about a ``refine`` flow run its job id: those its engine logs
    before the flow binds the job ("Beginning flow run ...") from the run's parameters, and those
    after the run's context is gone ("Finished in state ...") from what it found for the run."""

    def __init__(self) -> None:
        super().__init__()
        self._jobs: dict[str, str] = {}  # flow run id -> job id, for the runs of this process

    def filter(self, record: logging.LogRecord) -> bool:
        job_id, _, run_id = record_context(record)
        if job_id is not None or run_id is None:
            return True
        job_id = self._jobs.get(run_id)
        context = FlowRunContext.get() if job_id is None else None
        if context is not None and context.flow is not None and context.flow.name == "refine":
            parameters = context.parameters or {}
            job_id = run_job_id(parameters.get("spec"), parameters.get("job_id"))
            if job_id is not None:
                while len(self._jobs) >= 64:  # a long-lived process: keep the recent runs only
                    del self._jobs[next(iter(self._jobs))]
                self._jobs[run_id] = job_id
        if job_id is not None:
            record.job_id = job_id
        return True


def prefix_run_logs() -> None:
    """Have Prefect's run logs (sent to the API, which keeps only the text) start with
    ``[job J cycle C]``, its own lines about the run included. Idempotent; harmless outside a job
    (no prefix then). Called at import too: a worker imports the flow before its engine logs."""
    for name in _RUN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _RunJobFilter) for f in logger.filters):
            logger.addFilter(_RunJobFilter())
        for handler in logger.handlers:
            if type(handler).__name__ == "APILogHandler" and not isinstance(
                handler.formatter, RunContextFormatter
            ):
                handler.setFormatter(RunContextFormatter())


def deployment_id() -> str | None:
    """This flow run's deployment, from its run context. ``prefect.runtime.deployment.get_id``
    looks for it on the context object rather than on its flow run, finds nothing, and reads the
    flow run from the API instead, on every call: three round trips a job, 0.1 s each on a busy
    2-core machine."""
    run = _context_flow_run()
    return str(run.deployment_id) if run is not None and run.deployment_id else None


def _context_flow_run() -> FlowRun | None:
    """The flow run of the current run context (None outside one)."""
    context = FlowRunContext.get()
    return context.flow_run if context is not None else None


@contextlib.contextmanager
def running_job_slot(deployed: bool) -> Iterator[None]:
    """In a deployment run, hold a slot of the global limit ``irefine-running-jobs`` for the job.

    The work pool's concurrency limit (``irefine setup`` sets it to the same number) is what makes
    the server hand runs out in queue-priority order, but it is checked only when a worker polls:
    two workers polling at once can claim one run too many, and other pools share the budget.
    This slot is the hard cap; a run beyond it waits here. ``strict``: a missing limit fails the
    run instead of running unlimited. In-process runs (``irefine run``) have no deployment and
    take no slot.
    """
    if not deployed:
        yield
        return
    from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError
    from prefect.concurrency.sync import concurrency

    from deployments.setup import RUNNING_JOBS_LIMIT

    with contextlib.ExitStack() as held:
        try:
            held.enter_context(
                concurrency(
                    RUNNING_JOBS_LIMIT,
                    strict=True,
                    lease_duration=JOB_SLOT_LEASE_SECONDS,
                    # A failed renewal (an API hiccup) must not kill a running job.
                    raise_on_lease_renewal_failure=False,
                )
            )
        except ConcurrencySlotAcquisitionError as exc:
            raise SpecError(f"{exc}: run `irefine setup` against this Prefect server") from None
        yield


def evaluation_slots(stages: StageRunner, deployed: bool) -> StageRunner:
    """In a deployment run, ``stages`` with each cycle's evaluate stage inside slots of the global
    limit ``irefine-evaluations``: one slot per shard it fans out (at most the whole limit), so
    all jobs together keep at most that many shards in flight. ``strict``: a missing limit fails
    the run. In-process runs (``irefine run``) take none: their stages are ``stages`` itself.
    """
    if not deployed:
        return stages
    from prefect import get_client
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectNotFound

    from deployments.setup import EVALUATIONS_LIMIT

    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(EVALUATIONS_LIMIT).limit
        except ObjectNotFound:
            raise SpecError(f"no global limit {EVALUATIONS_LIMIT!r}: run `irefine setup`") from None

    def run(stage: str, cycle: int, fn: Callable[..., T], *args: Any) -> T:
        if stage != "evaluate":
            return stages(stage, cycle, fn, *args)
        job, runner, candidates = args  # engine.runner.evaluate(job, executor, candidates)
        shard_count = getattr(runner, "shard_count", None)
        shards = shard_count(len(candidates), job.spec.shard_size) if shard_count else 1
        with concurrency(
            EVALUATIONS_LIMIT,
            occupy=max(1, min(limit, shards)),
            strict=True,
            lease_duration=JOB_SLOT_LEASE_SECONDS,
            raise_on_lease_renewal_failure=False,
        ):
            return stages(stage, cycle, fn, *args)

    return run


def open_executor(kind: Literal["dask", "local"], dask_address: str | None) -> Executor:
    """The executor for a flow run: one Dask client for the whole run, or in-process."""
    if kind == "local":
        return InProcessExecutor()
    from engine.execution.dask import DaskExecutor

    settings = load_settings()
    return DaskExecutor.start(dask_address or settings.dask_address, settings.dask_workers)


def _bind_run_logs(job_id: str | None, run_id: str | None, *, json_lines: bool) -> Callable[[], None]:
    """Bind the job and the run to this run's log lines, prefix its API run logs with them and,
    if asked, write its console lines as JSON (a worker's ``prefect flow-run execute`` has done none
    of it); returns the undo."""
    undo = [bind_log_context(job_id=job_id, flow_run_id=run_id)]
    prefix_run_logs()
    if json_lines:
        undo.append(use_json_logs())

    def undo_all() -> None:
        for step in reversed(undo):
            step()

    return undo_all


@flow(name="refine", persist_result=False, validate_parameters=True)
def refine(
    spec: JobSpec | None = None,
    job_id: str | None = None,
    executor: Literal["dask", "local"] = "dask",
    dask_address: str | None = None,
) -> dict[str, Any]:
    """Run a refinement job to its stop rule.

    Give ``spec`` to start a new job (with an optional ``job_id``), or only ``job_id`` to run a
    pending job or resume an interrupted or crashed one from its last checkpoint. Both, for a job
    that exists with that same spec, resume it: a rerun of a crashed flow run (the resume
    automation) continues the job instead of failing on its id.
    """
    logger = get_run_logger()
    settings = load_settings()
    run_id = str(flow_run.get_id() or "") or None
    deployed = deployment_id() is not None
    job_id = run_job_id(spec, job_id)
    # From here on every line of the run carries the job (when known yet) and the run id.
    undo_logs = _bind_run_logs(job_id, run_id, json_lines=settings.log_format == "json")
    store = JobStore.from_settings(settings)
    cache_config = CacheConfig.from_settings(settings)
    slot = contextlib.ExitStack()  # released after the store's last write
    slot.callback(undo_logs)
    try:
        slot.enter_context(running_job_slot(deployed))
        existing = _existing(store, job_id, spec) if spec is not None and job_id is not None else None
        if existing is not None and existing.status is JobStatus.COMPLETED:
            # A rerun of a flow run whose process died after the job completed, before Prefect
            # heard of it: the job is done, so the run returns its result instead of failing.
            logger.info("job %s already completed (%s)", existing.job_id, existing.stop_reason)
            return _completed_result(store, existing)
        # A deployment run's spec comes from whoever may create flow runs: allow-listed problems only.
        allowed = settings.problem_module_prefixes() if deployed else None
        use_secret_key(secret_key_from_block(settings.secret_key_block))
        if spec is not None and existing is None:
            job = create_job(store, spec, job_id, allowed_modules=allowed)
        elif job_id is not None:
            job = resume_job(store, job_id, allowed_modules=allowed)
        else:
            raise SpecError("give a job spec to start a job, or a job_id to resume one")
        bind_log_context(job_id=job.job_id)  # a new job's generated id
        store.set_status(job.job_id, JobStatus.RUNNING, flow_run_id=run_id)
        describe_task = describe.with_options(result_storage=settings.result_storage or NotSet)
        problem = describe_task(job.spec.problem, dict(job.spec.problem_params))
        logger.info(
            "job %s: %s with %s, from cycle %d",
            job.job_id,
            job.spec.problem,
            job.spec.strategy,
            job.progress.cycles + 1,
        )
        hooks = _hooks.get() or LocalHooks()
        lent = hooks.executor is not None and executor == "dask" and dask_address is None
        runner = hooks.executor.result() if lent and hooks.executor else open_executor(executor, dask_address)
        observers = Observers(job, ObserverContext(store, settings, logger, run_id, runner))
        error: BaseException | None = None
        try:
            result = run_job(
                job,
                store,
                runner,
                stages=evaluation_slots(prefect_stage, deployed),
                listeners=[*hooks.listeners, observers],
                cache=cache_config,
            )
        except BaseException as exc:
            error = exc
            raise
        finally:
            observers.finish(job, None if error else {**result.to_dict(), "problem": problem}, error)
            if not lent:
                runner.close()
        logger.info(
            "job %s %s: %s; best %s",
            job.job_id,
            result.status.value,
            result.stop_reason,
            result.progress.best_score,
        )
        return {**result.to_dict(), "problem": problem}
    finally:
        try:
            store.close()
        finally:
            slot.close()


# A worker imports this module to load the flow, before the engine logs the run's first line.
prefix_run_logs()
