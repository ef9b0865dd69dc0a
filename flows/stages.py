"""A cycle's stages as Prefect tasks: ``propose``, ``evaluate`` (retried on infrastructure errors
only) and ``record``, each one task run a cycle, named ``<stage>-<cycle>`` in the UI."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State, TaskRun
from prefect.futures import PrefectFuture
from prefect.tasks import Task, exponential_backoff
from prefect.utilities.annotations import quote

from engine.execution.transient import is_transient
from engine.pipeline import StageFuture

__all__ = ["PrefectStages", "prefect_stage", "retry_transient"]

T = TypeVar("T")


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


class _Unboxed:
    """A submitted stage's Prefect future that hands back the stage's own value."""

    __slots__ = ("_future",)

    def __init__(self, future: PrefectFuture[_Opaque]) -> None:
        self._future = future

    def result(self) -> Any:
        return self._future.result().value


class PrefectStages:
    """Runs each cycle stage as a tracked Prefect task (arguments quoted: Prefect must not walk
    them). ``submit`` starts one on the flow's thread-pool task runner: the pipeline submits each
    evaluate stage, so cycle n's evaluate and cycle n+1's propose show as parallel branches."""

    def __call__(self, stage: str, cycle: int, fn: Callable[..., T], *args: Any) -> T:
        boxed: _Opaque = _stage_tasks[stage](stage, cycle, fn, quote(args))
        return boxed.value  # type: ignore[no-any-return]  # the stage returns a T

    def submit(self, stage: str, cycle: int, fn: Callable[..., T], *args: Any) -> StageFuture[T]:
        return _Unboxed(_stage_tasks[stage].submit(stage, cycle, fn, quote(args)))


prefect_stage = PrefectStages()
