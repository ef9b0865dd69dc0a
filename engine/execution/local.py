"""The in-process executor: evaluates in the calling thread. For debugging and small problems."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from engine.core import Candidate, Evaluation
from engine.execution.base import Executor, ProblemRef, Writeback, evaluate_shard


class InProcessExecutor:
    """Evaluates candidates one after another in this process (breakpoints work).

    Batches sent while another evaluates (the pipeline sends the next cycle early) wait their
    turn: a problem need not be thread-safe.
    """

    def __init__(self) -> None:
        self._one_at_a_time = threading.Lock()

    @property
    def workers(self) -> int:
        return 1

    def shard_count(self, n: int, shard_size: int | None) -> int:
        return 1

    def evaluate(
        self,
        ref: ProblemRef,
        candidates: Sequence[Candidate],
        shard_size: int | None = None,
        writeback: Writeback | None = None,
    ) -> list[Evaluation]:
        with self._one_at_a_time:
            return evaluate_shard(ref, candidates, writeback)

    def close(self) -> None:
        return None


def _conforms(executor: InProcessExecutor) -> Executor:
    return executor  # mypy checks that InProcessExecutor implements the Executor protocol
