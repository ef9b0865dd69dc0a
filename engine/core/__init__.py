"""The pure domain of the engine: spaces, candidates, evaluations, strategies, stop rules, cycles.

Imports nothing outside the standard library, numpy, orjson and pydantic.
"""

from engine.core.candidate import Candidate, canonical_json, fingerprint
from engine.core.cycle import (
    LATENCY_BUCKETS,
    CycleRecord,
    LatencyHistogram,
    Progress,
    ResourceUsage,
    account_cycle,
    losses,
    next_batch_size,
    stop_reason,
)
from engine.core.errors import (
    EngineError,
    JobExistsError,
    JobFailedError,
    JobNotFoundError,
    SpecError,
    TransientError,
)
from engine.core.evaluation import Evaluation, Status
from engine.core.problem import Problem, problem_direction, problem_version
from engine.core.space import Choice, Dimension, Float, Int, Space
from engine.core.spec import JobSpec
from engine.core.strategy import Strategy

__all__ = [
    "LATENCY_BUCKETS",
    "Candidate",
    "Choice",
    "CycleRecord",
    "Dimension",
    "EngineError",
    "Evaluation",
    "Float",
    "Int",
    "JobExistsError",
    "JobFailedError",
    "JobNotFoundError",
    "JobSpec",
    "LatencyHistogram",
    "Problem",
    "Progress",
    "ResourceUsage",
    "Space",
    "SpecError",
    "Status",
    "Strategy",
    "TransientError",
    "account_cycle",
    "canonical_json",
    "fingerprint",
    "losses",
    "next_batch_size",
    "problem_direction",
    "problem_version",
    "stop_reason",
]
