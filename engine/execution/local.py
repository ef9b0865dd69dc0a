"""The in-process executor: evaluates in the calling thread. For debugging and small problems."""

from __future__ import annotations

from collections.abc import Sequence

from engine.core import Candidate, Evaluation
from engine.execution.base import ProblemRef, evaluate_shard


class InProcessExecutor:
    """Evaluates candidates one after another in this process (breakpoints work)."""

    @property
    def workers(self) -> int:
        return 1

    def evaluate(
        self, ref: ProblemRef, candidates: Sequence[Candidate], shard_size: int | None = None
    ) -> list[Evaluation]:
        return evaluate_shard(ref, candidates)

    def close(self) -> None:
        return None
