"""The Problem protocol: what a user implements to have something refined."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, Protocol, runtime_checkable

from engine.core.errors import SpecError
from engine.core.evaluation import Evaluation
from engine.core.space import Dimension

Direction = Literal["minimize", "maximize"]


@runtime_checkable
class Problem(Protocol):
    """A search space and a function that scores one candidate.

    Required: ``space`` (a mapping of parameter name to ``Float``/``Int``/``Choice``) and
    ``evaluate(candidate) -> float | Evaluation``. Optional attributes: ``version`` (str, default
    ``"0"``; part of every cache key, so bumping it invalidates cached results), ``direction``
    (``"minimize"``, the default, or ``"maximize"``), and ``evaluate_batch(candidates) -> list``
    for problems that score many candidates faster at once (it may return ``NotImplemented`` to
    decline a batch: then each candidate is evaluated, timed and cached on its own).

    ``evaluate`` runs on Dask workers, possibly many times at once in different processes: it must
    be importable there and must not rely on state shared between calls. An exception or a
    non-finite score marks that one evaluation as failed; the job goes on.
    """

    space: Mapping[str, Dimension]

    def evaluate(self, candidate: Mapping[str, Any]) -> float | Evaluation: ...


def problem_version(problem: Any) -> str:
    return str(getattr(problem, "version", "0"))


def problem_direction(problem: Any) -> Direction:
    direction = getattr(problem, "direction", "minimize")
    if direction == "minimize" or direction == "maximize":
        return "minimize" if direction == "minimize" else "maximize"
    raise SpecError(f"problem direction {direction!r}: use 'minimize' or 'maximize'")
