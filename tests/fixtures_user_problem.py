"""A user problem module, written the way the README shows one (tests load it as module:attr)."""

from collections.abc import Mapping
from typing import Any

from engine import Choice, Evaluation, Float, Int


class Quadratic:
    """A parabola in x, shifted by n and by the kind; minimum ``offset`` at x=1, n=2, kind='a'."""

    version = "1"

    def __init__(self, offset: float = 0.0) -> None:
        self.space = {"x": Float(-3, 3), "n": Int(1, 5), "kind": Choice(["a", "b"])}
        self.offset = offset

    def evaluate(self, candidate: Mapping[str, Any]) -> float:
        shift = 0.0 if candidate["kind"] == "a" else 0.5
        return float((candidate["x"] - 1.0) ** 2 + (candidate["n"] - 2) ** 2 + shift + self.offset)


quadratic = Quadratic()

# A problem may also return an Evaluation to report metrics next to the score.
__all__ = ["Evaluation", "Quadratic", "quadratic"]
