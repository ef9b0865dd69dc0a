"""The Strategy protocol: an ask/tell optimiser with a serialisable state."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from engine.core.candidate import Candidate
from engine.core.space import Space


@runtime_checkable
class Strategy(Protocol):
    """Proposes candidates and learns from their losses.

    Contract:
    - ``ask(n)`` returns ``n`` candidates of the space; ``tell`` is then called exactly once with
      those candidates (same order) and their losses, before the next ``ask``.
    - Losses are minimised; ``None`` marks a failed evaluation.
    - ``state()`` returns a JSON-serialisable dict; ``Strategy.from_state(space, state)`` restores
      an object that behaves exactly as the original would have from that point on. Given the same
      seed, the same sequence of ``ask``/``tell`` calls gives the same candidates.
    - Not thread-safe: one job drives one strategy.

    Asking ahead (optional): a strategy whose ``asks_ahead`` attribute is true also accepts one more
    ``ask`` before the ``tell`` of the batch asked before it; ``tell`` then completes the oldest
    batch asked (first in, first out), and ``pending_batches()`` returns the batches asked but not
    yet told, oldest first, also on a strategy restored from ``state()``. The loop then proposes
    cycle n+1 while cycle n evaluates (``engine/pipeline.py``).
    """

    name: str

    def ask(self, n: int) -> list[Candidate]: ...

    def tell(self, candidates: Sequence[Candidate], losses: Sequence[float | None]) -> None: ...

    def state(self) -> dict[str, Any]: ...

    @classmethod
    def from_state(cls, space: Space, state: dict[str, Any]) -> Strategy: ...


def asks_ahead(strategy: Strategy) -> bool:
    """True when ``strategy`` accepts an ``ask`` before the previous batch is told (see above)."""
    return bool(getattr(strategy, "asks_ahead", False))


def pending_batches(strategy: Strategy) -> list[list[Candidate]]:
    """The batches ``strategy`` has asked for and not yet been told about, oldest first."""
    read = getattr(strategy, "pending_batches", None)
    return [list(batch) for batch in read()] if read is not None else []
