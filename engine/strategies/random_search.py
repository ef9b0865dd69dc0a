"""Random search: independent uniform draws from the unit cube, decoded by the space.

A baseline and a sanity check. ``Int`` and ``Choice`` dimensions get equal shares of the unit
interval (see :meth:`engine.core.space.Space.decode`), so every integer and every option is equally
likely; ``log=True`` dimensions are sampled log-uniformly.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np

from engine.core.candidate import Candidate
from engine.core.space import Space


class RandomSearch:
    """Uniform random sampling with numpy's ``default_rng(seed)``; ``tell`` learns nothing.

    State: ``{"seed": int, "bit_generator": {...}, "pending": [[{name: value}, ...], ...]}`` where
    ``bit_generator`` is numpy's PCG64 state with its two 128-bit integers written as decimal
    strings (so any JSON library can hold them) and ``pending`` the batches asked and not yet told.
    It asks ahead: the loop proposes the next batch while the previous one evaluates.
    """

    name: str = "random"
    asks_ahead: bool = True
    MAX_PENDING = 2

    def __init__(self, space: Space, seed: int) -> None:
        self._space = space
        self._seed = int(seed)
        self._rng = np.random.default_rng(self._seed)
        self._pending: deque[list[Candidate]] = deque()

    def pending_batches(self) -> list[list[Candidate]]:
        """The batches asked and not yet told, oldest first."""
        return [list(batch) for batch in self._pending]

    def ask(self, n: int) -> list[Candidate]:
        """Draw ``n`` candidates uniformly from the space."""
        if n < 1:
            raise ValueError(f"ask(n) needs n >= 1, got {n}")
        if len(self._pending) >= self.MAX_PENDING:
            raise RuntimeError(f"RandomSearch.ask() called with {len(self._pending)} batches not yet told")
        batch = self._space.decode(self._rng.random((n, len(self._space))))
        self._pending.append(batch)
        return list(batch)

    def tell(self, candidates: Sequence[Candidate], losses: Sequence[float | None]) -> None:
        """Accept the losses of the oldest pending batch (random search ignores them)."""
        if len(candidates) != len(losses):
            raise ValueError(f"tell got {len(candidates)} candidates but {len(losses)} losses")
        if self._pending:
            self._pending.popleft()

    def state(self) -> dict[str, Any]:
        """The seed and the exact position of the random stream, JSON-serialisable."""
        bg = self._rng.bit_generator.state
        return {
            "seed": self._seed,
            "bit_generator": {
                "bit_generator": bg["bit_generator"],
                "state": {k: str(v) for k, v in bg["state"].items()},
                "has_uint32": int(bg["has_uint32"]),
                "uinteger": int(bg["uinteger"]),
            },
            "pending": [[dict(c) for c in batch] for batch in self._pending],
        }

    @classmethod
    def from_state(cls, space: Space, state: dict[str, Any]) -> RandomSearch:
        """Rebuild a random search that continues the saved random stream."""
        strategy = cls(space, int(state["seed"]))
        saved = state["bit_generator"]
        strategy._rng.bit_generator.state = {
            "bit_generator": saved["bit_generator"],
            "state": {k: int(v) for k, v in saved["state"].items()},
            "has_uint32": int(saved["has_uint32"]),
            "uinteger": int(saved["uinteger"]),
        }
        for batch in state.get("pending", []):
            strategy._pending.append([Candidate(c) for c in batch])
        return strategy
