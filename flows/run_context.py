"""Where a ``refine`` flow run's log lines say which job and run they are about.

Binds the job and run id to the run's lines, prefixes Prefect's run logs (sent to the API) with
``[job J cycle C]``, and reads the run's deployment from its context.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from prefect.client.schemas.objects import FlowRun
from prefect.context import FlowRunContext

from engine.observe.logs import (
    RunContextFormatter,
    bind_log_context,
    bound_log_job,
    record_context,
    use_json_logs,
)

_RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
"""Prefect's loggers of flow and task runs, whose lines it also sends to the API as run logs."""


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


def bind_run_logs(job_id: str | None, run_id: str | None, *, json_lines: bool) -> Callable[[], None]:
    """Bind the run (and the job, unless the caller bound it: the CLI does) to this run's log
    lines, prefix its API run logs with them and, if asked, write its console lines as JSON (a
    worker's ``prefect flow-run execute`` has done none of it); returns the undo."""
    if bound_log_job() == job_id:
        undo = [bind_log_context(flow_run_id=run_id)]
    else:
        undo = [bind_log_context(job_id=job_id, flow_run_id=run_id)]
    prefix_run_logs()
    if json_lines:
        undo.append(use_json_logs())

    def undo_all() -> None:
        for step in reversed(undo):
            step()

    return undo_all
