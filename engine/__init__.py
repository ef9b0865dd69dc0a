"""Iterative Refinement Engine: propose candidates, evaluate them, keep the best, repeat.

The public face for problem authors::

    from engine import Float, Int, Choice, Evaluation
"""

from engine.core import (
    Candidate,
    Choice,
    EngineError,
    Evaluation,
    Float,
    Int,
    JobSpec,
    Problem,
    Space,
    SpecError,
    Status,
    Strategy,
)

__all__ = [
    "Candidate",
    "Choice",
    "EngineError",
    "Evaluation",
    "Float",
    "Int",
    "JobSpec",
    "Problem",
    "Space",
    "SpecError",
    "Status",
    "Strategy",
]
