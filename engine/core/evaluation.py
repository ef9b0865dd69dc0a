"""Evaluations: the outcome of scoring one candidate."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Status(StrEnum):
    """How an evaluation ended."""

    OK = "ok"
    FAILED = "failed"
    CACHED = "cached"


@dataclass(frozen=True, slots=True)
class Evaluation:
    """The score of one candidate, with optional metrics.

    ``score`` is the user's number (lower is better unless the problem maximises); it is ``None``
    when the evaluation failed, and ``error`` then says why. A NaN or infinite score is a failure.
    """

    score: float | None
    status: Status = Status.OK
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    duration: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status is not Status.FAILED

    @classmethod
    def failed(cls, error: str, duration: float = 0.0) -> Evaluation:
        return cls(score=None, status=Status.FAILED, error=error, duration=duration)

    @classmethod
    def from_result(cls, result: Any, duration: float = 0.0) -> Evaluation:
        """Normalise what a problem's ``evaluate`` returned: a number or an Evaluation."""
        if isinstance(result, Evaluation):
            ev = result
            if ev.status is Status.FAILED:
                return cls(None, Status.FAILED, dict(ev.metrics), ev.error or "failed", duration)
            score, metrics = ev.score, dict(ev.metrics)
        else:
            score, metrics = result, {}
        try:
            if isinstance(score, (bool, str)) or score is None:
                raise TypeError
            score = float(score)  # also numpy scalars and 0-d arrays
        except (TypeError, ValueError):
            return cls.failed(f"evaluate returned {type(result).__name__}, expected a number", duration)
        if not math.isfinite(score):
            return cls(
                None, Status.FAILED, metrics, f"evaluate returned a non-finite score ({score})", duration
            )
        return cls(score, Status.OK, metrics, None, duration)


def loss(evaluation: Evaluation, maximize: bool) -> float | None:
    """The value strategies minimise: the score, negated when the problem maximises; None if failed."""
    if evaluation.score is None or evaluation.status is Status.FAILED:
        return None
    return -evaluation.score if maximize else evaluation.score
