"""Evaluation backends behind one interface: Dask (the default) and in-process (for debugging)."""

from engine.execution.base import (
    EvaluatedBatch,
    Executor,
    ProblemRef,
    Writeback,
    evaluate_shard,
    split_shards,
    worker_problem,
)
from engine.execution.local import InProcessExecutor

__all__ = [
    "EvaluatedBatch",
    "Executor",
    "InProcessExecutor",
    "ProblemRef",
    "evaluate_shard",
    "split_shards",
    "worker_problem",
    "Writeback",
]
