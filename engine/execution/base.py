"""The executor port: evaluate a batch of candidates somewhere, one Evaluation per candidate."""

from __future__ import annotations

import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from engine.core import Candidate, Evaluation


@dataclass(frozen=True)
class ProblemRef:
    """How a worker finds the problem: its name or import path and its parameters (picklable)."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.name + "|" + orjson.dumps(self.params, option=orjson.OPT_SORT_KEYS).decode()


class Executor(Protocol):
    """Evaluates candidates of one problem and returns their evaluations in the same order.

    Contract: never raises for a failing evaluation (that is a ``failed`` Evaluation); raises only
    when the execution backend itself is lost for good. One executor serves one job at a time and
    is reused across its cycles; ``close()`` releases what the executor created (not what it was
    handed).
    """

    @property
    def workers(self) -> int: ...

    def evaluate(
        self, ref: ProblemRef, candidates: Sequence[Candidate], shard_size: int | None = None
    ) -> list[Evaluation]: ...

    def close(self) -> None: ...


_PROBLEMS: dict[str, Any] = {}


def worker_problem(ref: ProblemRef) -> Any:
    """The problem for ``ref``, loaded once per process (workers evaluate many shards of it)."""
    problem = _PROBLEMS.get(ref.key)
    if problem is None:
        from engine.problems import load_problem

        problem = _PROBLEMS[ref.key] = load_problem(ref.name, ref.params)
    return problem


def _error_text(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}" if tb else ""
    return f"{type(exc).__name__}: {exc}{where}"[:2000]


def evaluate_shard(ref: ProblemRef, candidates: Sequence[Candidate]) -> list[Evaluation]:
    """Evaluate a shard of candidates in this process; failures become failed evaluations."""
    problem = worker_problem(ref)
    batch = getattr(problem, "evaluate_batch", None)
    if batch is not None and len(candidates) > 1:
        start = time.perf_counter()
        try:
            results = batch(candidates)
        except Exception:
            results = None
        if results is not None and len(results) == len(candidates):
            each = (time.perf_counter() - start) / len(candidates)
            return [Evaluation.from_result(r, each) for r in results]
    evaluate = problem.evaluate
    out: list[Evaluation] = []
    clock = time.perf_counter
    for candidate in candidates:
        start = clock()
        try:
            result = evaluate(candidate)
        except Exception as exc:
            out.append(Evaluation.failed(_error_text(exc), clock() - start))
            continue
        out.append(Evaluation.from_result(result, clock() - start))
    return out


def split_shards(candidates: Sequence[Candidate], shards: int) -> list[list[Candidate]]:
    """Split ``candidates`` into at most ``shards`` contiguous, nearly equal lists."""
    n = len(candidates)
    shards = max(1, min(shards, n))
    size, extra = divmod(n, shards)
    out, start = [], 0
    for i in range(shards):
        end = start + size + (1 if i < extra else 0)
        out.append(list(candidates[start:end]))
        start = end
    return out
