"""The Dask executor: a cycle's candidates go out as a few shards of Dask futures on one client."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import dask
from dask.utils import parse_bytes
from distributed import Client, LocalCluster, system
from distributed.utils import get_mp_context

from engine.core import Candidate, EngineError, Evaluation, SpecError, TransientError
from engine.execution.base import Executor, ProblemRef, Writeback, evaluate_shard, split_shards
from engine.execution.transient import is_transient
from engine.settings import load_settings

log = logging.getLogger(__name__)


WORKER_PRELOAD = ["distributed", "numpy", "engine.execution.base", "engine.problems"]
"""Modules the forkserver imports once, so that every LocalCluster worker (and every worker a
nanny restarts) forks from a process that has them: two workers start in 1.7 s instead of the
3.2 s they take with Dask's default ``spawn`` (measured on a 2-core machine)."""


def _preload_forkserver() -> None:
    """Have the forkserver import :data:`WORKER_PRELOAD` (it matters only before the forkserver
    first starts). Dask's own first call would set a longer list (every optional package it can
    import) and is skipped once ours has run."""
    get_mp_context().set_forkserver_preload(WORKER_PRELOAD)


def start_local_cluster(**kwargs: Any) -> LocalCluster:
    """A process ``LocalCluster`` whose workers fork from a preloaded forkserver (the settings'
    and the Dask-cluster block's local clusters both start here)."""
    with dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"}):
        _preload_forkserver()
        return LocalCluster(**kwargs)


@dataclass(frozen=True)
class ShardFailure:
    """A shard that failed for good on a worker (e.g. its problem cannot be built there), returned
    instead of raised so that Dask does not retry it."""

    message: str
    user_error: bool

    def error(self, ref: ProblemRef) -> EngineError:
        """The error that fails the job: the user's own message for a problem that cannot load."""
        if self.user_error:
            return SpecError(f"{self.message} (on a Dask worker; not retried)")
        return EngineError(f"a Dask task for problem {ref.name!r} failed: {self.message}")


def evaluate_shard_task(
    ref: ProblemRef, candidates: Sequence[Candidate], writeback: Writeback | None = None
) -> list[Evaluation] | ShardFailure:
    """The Dask task: :func:`evaluate_shard`, raising only transient errors (Dask retries those).

    A user's exception in ``evaluate`` is already that evaluation's failure; what is left (the
    problem cannot be imported or built on this worker) would fail every retry the same way.
    """
    try:
        return evaluate_shard(ref, candidates, writeback)
    except Exception as exc:
        if is_transient(exc):
            raise
        if isinstance(exc, SpecError):
            return ShardFailure(str(exc), user_error=True)
        return ShardFailure(f"{type(exc).__name__}: {exc}", user_error=False)


class DaskExecutor:
    """Evaluates shards of candidates on a Dask cluster through one client reused for the whole job.

    Shards, not single candidates, are the unit of work: a Dask task costs ~1 ms of scheduling, so
    thousands of cheap evaluations a cycle must travel in a few large tasks. A worker that dies
    mid-cycle is replaced by its nanny and Dask reruns its shards elsewhere (``retries``); the
    cycle fails only if a shard keeps killing workers. Workers of a LocalCluster get a memory
    limit, so a worker that leaks is restarted by its nanny (at 95% of the limit) before it
    starves the machine.
    """

    def __init__(self, client: Client, cluster: LocalCluster | None = None, retries: int = 3) -> None:
        self.client = client
        self._cluster = cluster
        self._retries = retries

    @classmethod
    def start(
        cls, address: str | None = None, n_workers: int | None = None, **cluster_kwargs: Any
    ) -> DaskExecutor:
        """Connect to ``address``, or start a process ``LocalCluster`` sized to this machine, each
        worker limited to ``IRE_DASK_WORKER_MEMORY`` (see :func:`worker_memory_limit`)."""
        if address:
            return cls(Client(address, set_as_default=False))
        n = n_workers or os.cpu_count() or 1
        kwargs: dict[str, Any] = {
            "n_workers": n,
            "threads_per_worker": 1,
            "processes": True,
            # Any free port: a fixed :8787 clashes (with a warning) when two clusters run here.
            "dashboard_address": ":0",
        }
        if "memory_limit" not in cluster_kwargs:
            kwargs["memory_limit"] = worker_memory_limit(load_settings().dask_worker_memory, n)
        kwargs.update(cluster_kwargs)
        cluster = start_local_cluster(**kwargs)
        return cls(Client(cluster, set_as_default=False), cluster)

    @property
    def workers(self) -> int:
        threads: dict[str, int] = self.client.nthreads()
        return max(1, sum(threads.values()))

    def shard_count(self, n: int, shard_size: int | None) -> int:
        if shard_size:
            return max(1, math.ceil(n / shard_size))
        # One shard per worker thread: the fewest round trips that still keep every worker busy.
        return self.workers

    def evaluate(
        self,
        ref: ProblemRef,
        candidates: Sequence[Candidate],
        shard_size: int | None = None,
        writeback: Writeback | None = None,
    ) -> list[Evaluation]:
        if not candidates:
            return []
        count = self.shard_count(len(candidates), shard_size)
        shards = split_shards(candidates, count)
        writebacks: list[Writeback | None] = [None] * len(shards)
        if writeback is not None:
            writebacks = [writeback.for_shard(keys) for keys in split_shards(writeback.keys, count)]
        # Dask retries what a task raises; evaluate_shard_task raises only transient errors.
        futures = self.client.map(
            evaluate_shard_task, [ref] * len(shards), shards, writebacks, pure=False, retries=self._retries
        )
        try:
            results = self.client.gather(futures)
        except Exception as exc:
            if is_transient(exc):
                raise TransientError(
                    f"Dask lost the cycle's evaluations: {type(exc).__name__}: {exc}"
                ) from exc
            raise
        out: list[Evaluation] = []
        for shard in results:
            if isinstance(shard, ShardFailure):
                raise shard.error(ref)
            out.extend(shard)
        return out

    def close(self) -> None:
        self.client.close()
        if self._cluster is not None:
            self._cluster.close()


WORKER_MEMORY_SHARE = 0.8
"""Share of the machine's memory (or of its cgroup limit) the local workers may use together."""


def worker_memory_limit(setting: str | None, n_workers: int) -> int:
    """Bytes each local worker may use: ``setting`` (a size such as '2GiB', checked by the
    settings), or by default :data:`WORKER_MEMORY_SHARE` of the machine split evenly, which leaves
    the flow process and the system room when a worker leaks."""
    if setting is None:
        return int(system.MEMORY_LIMIT * WORKER_MEMORY_SHARE / max(1, n_workers))
    return int(parse_bytes(setting))


def _conforms(executor: DaskExecutor) -> Executor:
    return executor  # mypy checks that DaskExecutor implements the Executor protocol
