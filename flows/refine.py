"""The ``refine`` flow: one Prefect flow run per job, each cycle's stages as Prefect tasks.

The per-candidate fan-out happens on Dask futures inside the ``evaluate`` task, never as one
Prefect task per candidate (docs/architecture.md section 4: that costs 177-367 ms a candidate).
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from datetime import timedelta
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import INPUTS, TASK_SOURCE
from prefect.runtime import flow_run
from prefect.utilities.annotations import NotSet, quote

from engine.core import JobSpec
from engine.execution import Executor
from engine.observe.metrics import ResourceProbe
from engine.problems import describe_problem
from engine.runner import CycleListener, Job, new_job_id, open_job
from engine.services import ExecutorKind, UnstartedServices, services_from_settings
from engine.settings import Settings, load_settings
from engine.signing import use_secret_key
from engine.status import JobStatusReport
from engine.store import JobRecord, JobStore
from flows.limits import evaluation_slots, running_job_slot
from flows.metrics import start_resource_sampler
from flows.observer_set import DEFAULT_OBSERVERS, report_findings
from flows.observers import ObserverContext, Observers
from flows.run_context import bind_run_logs, deployment_id, prefix_run_logs, run_job_id
from flows.secret_key import secret_key_from_block
from flows.stages import PrefectStages, prefect_stage, retry_transient

__all__ = [
    "InProcessRun",
    "PrefectStages",
    "deployment_id",
    "describe",
    "prefect_stage",
    "refine",
    "retry_transient",
    "run_refine",
]


class InProcessRun:
    """What an in-process caller (the CLI, a benchmark) hands the flow run it starts: the job it
    opened, its settings, the store it opened the job in and an executor (or a Future of one
    still starting) that it lends and closes, and progress listeners. Not JSON: Prefect records
    the parameter as a placeholder."""

    __slots__ = ("executor", "job", "listeners", "settings", "store")

    def __init__(
        self,
        job: Job | None = None,
        settings: Settings | None = None,
        store: JobStore | None = None,
        executor: Executor | Future[Executor] | None = None,
        listeners: Sequence[CycleListener] = (),
    ) -> None:
        self.job, self.settings, self.store, self.executor = job, settings, store, executor
        self.listeners = tuple(listeners)

    def lent_executor(self) -> Executor | None:
        return self.executor.result() if isinstance(self.executor, Future) else self.executor


@task(
    name="describe-problem",
    task_run_name="describe-problem",
    # Inputs and code only (Prefect's default policy adds the run id and never hits across runs):
    # every later run of the same problem reads this from result storage instead of loading it.
    cache_policy=(INPUTS - "built") + TASK_SOURCE,
    cache_expiration=timedelta(days=7),
    persist_result=True,
    result_serializer="json",
)
def describe(problem: str, params: dict[str, Any], built: Any = None) -> dict[str, Any]:
    """What the job refines: the problem's class, version, direction and search space, described
    from ``built`` (the job's problem object, left out of the cache key)."""
    return describe_problem(built)


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


def run_refine(in_process: InProcessRun | None = None, **parameters: Any) -> JobStatusReport:
    """Call the ``refine`` flow in this process (the CLI's and the benchmarks' way in).

    Prefect's flow heartbeat is off for the call: the job writes its own heartbeat to the store
    with every cycle, and a sync flow run would otherwise wait up to 1 s at exit for the
    heartbeat thread's sleep to end.
    """
    # Exempt what exists now (Prefect, pydantic and Dask leave millions of long-lived objects)
    # from the cyclic collector: py-spy showed 54% of a 5,000-candidate cycle in gc_collect_main
    # walking that heap again and again while the cycle allocated its candidates.
    gc.freeze()
    with _without_flow_heartbeat():
        result: JobStatusReport = refine(**parameters, in_process=in_process)
    return result


def job_services(
    settings: Settings,
    block_set: str | None,
    kind: ExecutorKind,
    dask_address: str | None,
    local: InProcessRun,
) -> UnstartedServices:
    """The run's store, cache and executor (not started yet): from the saved blocks named
    ``block_set``, else from the settings (with what an in-process caller lends)."""
    if block_set:
        from blocks.services import services_from_blocks

        return services_from_blocks(
            block_set, settings, executor=local.lent_executor(), kind=kind, dask_address=dask_address
        )
    return services_from_settings(
        settings, store=local.store, executor=local.lent_executor(), kind=kind, dask_address=dask_address
    )


@flow(name="refine", persist_result=False, validate_parameters=True)
def refine(
    spec: JobSpec | None = None,
    job_id: str | None = None,
    executor: ExecutorKind = "dask",
    dask_address: str | None = None,
    services: str | None = None,
    in_process: InProcessRun | None = None,
) -> JobStatusReport:
    """Run a refinement job to its stop rule; return its status (as ``irefine status --json``).

    Give ``spec`` to start a new job (with an optional ``job_id``), or only ``job_id`` to run a
    pending job or resume an interrupted or crashed one from its last checkpoint. Both, for a job
    that exists with that same spec, resume it: a rerun of a crashed flow run (the resume
    automation) continues the job instead of failing on its id. ``services`` names a set of saved
    blocks (a job store, an inference cache and optionally a Dask cluster saved under that name)
    to run on instead of the settings' services. ``in_process`` is for ``run_refine`` only.
    """
    logger = get_run_logger()
    local = in_process or InProcessRun()
    settings = local.settings or load_settings()
    run_id = str(flow_run.get_id() or "") or None
    deployed = deployment_id() is not None
    job_id = local.job.job_id if local.job is not None else run_job_id(spec, job_id)
    if job_id is None and spec is not None:
        job_id = new_job_id()  # known before the job is created: the run's lines carry it throughout
    with contextlib.ExitStack() as held:  # left in reverse: the slot after the store's last write
        # From here on every line of the run carries the job and the run id (bound once, here).
        held.callback(bind_run_logs(job_id, run_id, json_lines=settings.log_format == "json"))
        held.enter_context(running_job_slot(deployed))
        unstarted = job_services(settings, services, executor, dask_address, local)
        held.callback(unstarted.close)
        # A deployment run's spec comes from whoever may create flow runs: allow-listed problems only.
        allowed = settings.problem_module_prefixes() if deployed else None
        use_secret_key(secret_key_from_block(settings.secret_key_block))
        opened = local.job or open_job(unstarted.store, spec, job_id, allowed_modules=allowed)
        if isinstance(opened, JobRecord):
            # A rerun of a flow run whose process died after the job completed, before Prefect
            # heard of it: the job is done, so the run returns its status instead of failing.
            logger.info("job %s already completed (%s)", opened.job_id, opened.stop_reason)
            return JobStatusReport.read(unstarted.store, opened.job_id, fresh=True)
        job = opened
        base = unstarted.start()  # the executor (a Dask cluster) only for a job that opened
        held.callback(base.close)
        describe_task = describe.with_options(result_storage=settings.result_storage or NotSet)
        describe_task(job.spec.problem, dict(job.spec.problem_params), quote(job.problem))
        logger.info(
            "job %s: %s with %s, from cycle %d",
            job.job_id,
            job.spec.problem,
            job.spec.strategy,
            job.progress.cycles + 1,
        )
        sampler = start_resource_sampler(base.executor)
        held.callback(sampler.stop)
        context = ObserverContext(base.store, settings, logger, run_id, base.executor, sampler)
        observers = Observers(job, context, DEFAULT_OBSERVERS, report_findings)
        run = base.with_run(
            stages=prefect_stage,
            listeners=[*local.listeners, observers],
            evaluation_slots=evaluation_slots(deployed),
            resource_usage=ResourceProbe(sampler),
        )
        try:
            result = run.run(job, flow_run_id=run_id)
        except BaseException as exc:
            observers.finish(job, None, exc)
            raise
        status = JobStatusReport.read(base.store, job.job_id, fresh=True)
        observers.finish(job, status.model_dump(mode="json"), None)
        logger.info(
            "job %s %s: %s; best %s", job.job_id, result.status.value, result.stop_reason, status.best_score
        )
        return status


# A worker imports this module to load the flow, before the engine logs the run's first line.
prefix_run_logs()
