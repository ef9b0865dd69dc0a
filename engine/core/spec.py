"""The job spec: everything that defines a refinement job, validated at the edge."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.core.errors import SpecError


class JobSpec(BaseModel):
    """What to refine, how, and when to stop. Frozen; serialises to JSON for the store and Prefect."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    problem: str = Field(description="built-in problem name or 'module:attr' import path")
    problem_params: dict[str, Any] = Field(default_factory=dict)
    strategy: str = "cmaes"
    strategy_params: dict[str, Any] = Field(default_factory=dict)
    batch_size: int = Field(16, ge=1, le=1_000_000, description="candidates proposed per cycle")
    seed: int = Field(0, ge=0, lt=2**32, description="random seed; same seed, same result")
    max_evaluations: int | None = Field(1000, ge=1, description="stop after this many evaluations")
    max_cycles: int | None = Field(None, ge=1, description="stop after this many cycles")
    target: float | None = Field(
        None, allow_inf_nan=False, description="stop once the best score is at least this good"
    )
    patience: int | None = Field(None, ge=1, description="stop after this many cycles without improvement")
    tolerance: float = Field(
        0.0, ge=0.0, allow_inf_nan=False, description="an improvement must beat the best by more than this"
    )
    max_seconds: float | None = Field(None, gt=0, description="stop after this much run time (seconds)")
    deadline: datetime | None = None
    max_failure_share: float = Field(0.5, ge=0.0, le=1.0, description="fail the job when a cycle fails more")
    shard_size: int | None = Field(None, ge=1, description="candidates per Dask task; default: spread evenly")
    cache: Literal["auto", "on", "off"] = Field(
        "auto", description="inference cache: 'auto' turns it off when evaluations cost under 1 ms"
    )
    cache_ttl_seconds: float | None = Field(None, gt=0, description="entry lifetime; default: the settings'")
    cache_failures: bool = Field(False, description="cache failed evaluations too (deterministic failures)")
    restart_on_stall: bool = Field(
        False, description="restart the strategy from the best candidate when the job stalls (see anomalies)"
    )
    anomaly_params: dict[str, Any] = Field(
        default_factory=dict,
        description="anomaly detector settings (DetectorConfig fields), e.g. max_cycle_seconds",
    )

    @model_validator(mode="after")
    def _bounded(self) -> JobSpec:
        if not any((self.max_evaluations, self.max_cycles, self.max_seconds, self.deadline)):
            raise ValueError("set max_evaluations, max_cycles, max_seconds or deadline so the job ends")
        return self

    @classmethod
    def parse(cls, data: dict[str, Any]) -> JobSpec:
        """Validate ``data``; raise :class:`SpecError` with one line naming the first bad field."""
        from pydantic import ValidationError

        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "spec"
            msg = err["msg"].removeprefix("Value error, ")
            raise SpecError(f"{where}: {msg}") from None
