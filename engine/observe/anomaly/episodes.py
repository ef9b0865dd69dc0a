"""What the detector reports (:class:`Finding`), the kinds it knows, and each kind's episode state."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Final

ANOMALY_KINDS: Final = ("failure_burst", "stall", "regression", "slow_cycle", "throughput_collapse")
"""Every kind a finding can have, in the order a cycle is checked."""

Evidence = dict[str, Any]
"""What a rule found on a cycle: a ``message`` and the figures behind it (``{"message": ""}``
keeps an open episode open without reporting it again)."""


@dataclass(frozen=True, slots=True)
class Finding:
    """One anomaly episode, reported at the cycle it was recognised."""

    kind: str
    cycle: int
    message: str
    evidence: dict[str, Any]

    @property
    def event(self) -> str:
        """The Prefect event name: ``refinement.anomaly.<kind>``."""
        return f"refinement.anomaly.{self.kind}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Episode:
    """Whether a kind's anomaly is going on, and for how many cycles it has been clear."""

    open: bool = False
    clear: int = 0
    run: int = 0  # consecutive cycles the raw condition held


@dataclass
class Episodes:
    """Every kind's episode, and the last cycle a stall or a regression episode was open (the two
    kinds share symptoms, so each rule looks at the other's)."""

    by_kind: dict[str, Episode] = field(default_factory=lambda: {kind: Episode() for kind in ANOMALY_KINDS})
    stall_ended: int | None = None
    regression_ended: int | None = None

    def is_open(self, kind: str) -> bool:
        return self.by_kind[kind].open


def reaches(start: int, ended: int | None) -> bool:
    """Whether a window from cycle ``start`` on reaches back into an episode that was last open at
    cycle ``ended`` (None: none was)."""
    return ended is not None and start <= ended


def as_loss(score: float | None, maximize: bool) -> float | None:
    """A score as a loss (lower is better, whatever the job's direction)."""
    return None if score is None else (-score if maximize else score)
