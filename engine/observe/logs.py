"""Structured logs: every line carries the job id, the cycle and the flow run id.

The job is bound once per process path, by the outermost caller that runs it: the CLI's ``irefine
run``/``resume``, else the ``refine`` flow (with its run id), else ``engine.runner.run_job``; the
inner ones find it bound (:func:`bound_log_job`). The loop marks the cycle it is in
(:func:`set_log_cycle`). Those live in context variables, so a line logged anywhere in the
loop's thread (or a Prefect task run, which copies the context) knows them without being told.
:class:`JsonLogFormatter` writes a line as one JSON object; :class:`RunContextFormatter` prefixes
the message with ``[job J cycle C]`` for destinations whose records have fixed fields (Prefect's
run logs in the API). :func:`use_json_logs` switches this process's console lines to JSON, and
:func:`hide_engine_failures_on_console` keeps a run's engine-named failure off them.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

import orjson

from engine.core import EngineError, TransientError

__all__ = [
    "JsonLogFormatter",
    "RunContextFormatter",
    "EngineFailureFilter",
    "bind_log_context",
    "bound_log_job",
    "hide_engine_failures_on_console",
    "record_context",
    "set_log_cycle",
    "use_json_logs",
]

_job_id: ContextVar[str | None] = ContextVar("ire_log_job_id", default=None)
_cycle: ContextVar[int | None] = ContextVar("ire_log_cycle", default=None)
_flow_run_id: ContextVar[str | None] = ContextVar("ire_log_flow_run_id", default=None)

_UNSET: Any = object()


def bind_log_context(
    job_id: str | None = _UNSET, flow_run_id: str | None = _UNSET, cycle: int | None = _UNSET
) -> Callable[[], None]:
    """Bind the given fields for lines logged from this context on; returns the undo.

    The undo restores the earlier values (by value, not by token: it may run in a copy of the
    context, as Prefect's flow engine does).
    """
    previous = (_job_id.get(), _flow_run_id.get(), _cycle.get())
    if job_id is not _UNSET:
        _job_id.set(job_id)
    if flow_run_id is not _UNSET:
        _flow_run_id.set(flow_run_id)
    if cycle is not _UNSET:
        _cycle.set(cycle)

    def undo() -> None:
        _job_id.set(previous[0])
        _flow_run_id.set(previous[1])
        _cycle.set(previous[2])

    return undo


def bound_log_job() -> str | None:
    """The job bound to lines logged from this context (None if none is)."""
    return _job_id.get()


def set_log_cycle(cycle: int | None) -> None:
    """Mark the cycle the loop is now in (a context variable write: ~0.1 us)."""
    _cycle.set(cycle)


def record_context(record: logging.LogRecord) -> tuple[str | None, int | None, str | None]:
    """The job id, cycle and flow run id of ``record``: its own attributes (``extra=``, or Prefect's
    run loggers) first, else the bound context."""
    job_id = getattr(record, "job_id", None) or _job_id.get()
    cycle = getattr(record, "cycle", None)
    flow_run_id = getattr(record, "flow_run_id", None) or _flow_run_id.get()
    return (
        job_id,
        cycle if cycle is not None else _cycle.get(),
        None if flow_run_id is None else str(flow_run_id),
    )


class JsonLogFormatter(logging.Formatter):
    """One JSON object a line: timestamp (UTC, ISO 8601), level, logger, message, job_id, cycle,
    flow_run_id, and ``exception`` with the traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        job_id, cycle, flow_run_id = record_context(record)
        doc: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "job_id": job_id,
            "cycle": cycle,
            "flow_run_id": flow_run_id,
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exception"] = record.exc_text
        return orjson.dumps(doc, default=str).decode()


class RunContextFormatter(logging.Formatter):
    """The message prefixed with ``[job J cycle C]`` (the parts that are known), for log
    destinations that keep only the message text."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        job_id, cycle, _ = record_context(record)
        parts = ([f"job {job_id}"] if job_id else []) + ([f"cycle {cycle}"] if cycle is not None else [])
        return f"[{' '.join(parts)}] {message}" if parts else message


def _is_console(handler: logging.Handler) -> bool:
    # Stream handlers on the terminal, Prefect's console handler among them; not pytest's capture
    # handlers or file handlers, which subclass StreamHandler too.
    if type(handler).__name__ == "PrefectConsoleHandler":
        return True
    terminals = (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)
    return isinstance(handler, logging.StreamHandler) and any(handler.stream is t for t in terminals)


def use_json_logs() -> Callable[[], None]:
    """Make every console handler of this process's loggers write JSON lines; returns the undo.

    Each is replaced by a plain stream handler on the same stream with the same level (Prefect's
    rich console would wrap long lines); if the root logger has none, one on stderr is added.
    Idempotent: handlers that already write JSON are left alone.
    """
    root = logging.getLogger()
    loggers = [
        root,
        *(x for x in logging.Logger.manager.loggerDict.values() if isinstance(x, logging.Logger)),
    ]
    swapped: list[tuple[logging.Logger, logging.Handler, logging.StreamHandler[Any]]] = []
    for logger in loggers:
        for old in [h for h in logger.handlers if _is_console(h)]:
            if isinstance(old.formatter, JsonLogFormatter):
                continue
            new = logging.StreamHandler(getattr(old, "stream", None) or sys.stderr)
            new.setLevel(old.level)
            new.setFormatter(JsonLogFormatter())
            swapped.append((logger, old, new))
    added: logging.Handler | None = None
    if not any(_is_console(h) for h in root.handlers):
        added = logging.StreamHandler(sys.stderr)
        added.setFormatter(JsonLogFormatter())
        root.addHandler(added)
    for logger, console, json_handler in swapped:
        logger.removeHandler(console)
        logger.addHandler(json_handler)

    def undo() -> None:
        for logger, console, json_handler in swapped:
            logger.removeHandler(json_handler)
            logger.addHandler(console)
        if added is not None:
            root.removeHandler(added)

    return undo


_RUN_LOGGER_NAMES = ("prefect.flow_runs", "prefect.task_runs")


class EngineFailureFilter(logging.Filter):
    """Drops a run logger's report of an error the engine raised on purpose (a job over its
    failure share, a user's mistake): its message already says why, and whoever runs the job
    prints that once. Retryable errors and every other exception pass, traceback and all."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.exc_info or not record.name.startswith(_RUN_LOGGER_NAMES):
            return True
        error = record.exc_info[1]
        return not isinstance(error, EngineError) or isinstance(error, TransientError)


def hide_engine_failures_on_console() -> Callable[[], None]:
    """Add :class:`EngineFailureFilter` to every console handler of this process (the run log sent
    to the API keeps the report and its traceback); returns the undo. Idempotent."""
    loggers = [
        logging.getLogger(),
        *(x for x in logging.Logger.manager.loggerDict.values() if isinstance(x, logging.Logger)),
    ]
    added: list[tuple[logging.Handler, EngineFailureFilter]] = []
    for logger in loggers:
        for handler in logger.handlers:
            if _is_console(handler) and not any(isinstance(f, EngineFailureFilter) for f in handler.filters):
                added.append((handler, EngineFailureFilter()))
                handler.addFilter(added[-1][1])

    def undo() -> None:
        for handler, failure_filter in added:
            handler.removeFilter(failure_filter)

    return undo
