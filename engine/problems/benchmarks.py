"""Classic test functions to minimise (global minimum 0), with knobs for cost and failures.

``cost_ms`` busy-waits that many milliseconds of CPU per evaluation to simulate a costly model;
``fail_share`` makes that share of candidates raise, chosen by a hash of the candidate's values so
the same candidates fail on every run and every worker.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Mapping, Sequence
from itertools import chain
from operator import itemgetter
from typing import Any, ClassVar

import numpy as np

from engine.core.problem import Direction
from engine.core.space import Dimension, Float
from engine.problems.loader import BuiltFromParams, param_error

__all__ = ["Ackley", "Benchmark", "Rastrigin", "Rosenbrock", "Sphere", "busy_wait"]

_HASH_SCALE = float(2**64)


def busy_wait(ms: float) -> None:
    """Spend ``ms`` milliseconds of this thread's CPU time in a loop (CPU time, not wall time: on a
    busy machine an evaluation still does the same work, it just takes longer)."""
    if ms <= 0:
        return
    end = time.thread_time() + ms / 1000.0
    while time.thread_time() < end:
        pass


class Benchmark(BuiltFromParams):
    """Base of the benchmark functions: a box in ``dim`` dimensions and a vectorised function."""

    name: ClassVar[str] = "benchmark"
    bounds: ClassVar[tuple[float, float]] = (-1.0, 1.0)
    min_dim: ClassVar[int] = 1
    direction: Direction = "minimize"

    def __init__(
        self, *, dim: int = 10, cost_ms: float = 0.0, fail_share: float = 0.0, version: str = "1"
    ) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < self.min_dim:
            raise param_error(self.name, "dim", dim, f"an integer >= {self.min_dim}")
        if not _is_real(cost_ms) or not 0.0 <= cost_ms < math.inf:
            raise param_error(self.name, "cost_ms", cost_ms, "a number of milliseconds >= 0")
        if not _is_real(fail_share) or not 0.0 <= fail_share <= 1.0:
            raise param_error(self.name, "fail_share", fail_share, "a share from 0 to 1")
        if not isinstance(version, str) or not version:
            raise param_error(self.name, "version", version, "a non-empty string")
        self.dim = dim
        self.cost_ms = float(cost_ms)
        self.fail_share = float(fail_share)
        self.version = version
        lo, hi = self.bounds
        self.names: tuple[str, ...] = tuple(f"x{i}" for i in range(dim))
        bound = Float(lo, hi)
        self.space: Mapping[str, Dimension] = dict.fromkeys(self.names, bound)
        self._getter = itemgetter(*self.names)

    @property
    def params(self) -> dict[str, Any]:
        """The constructor parameters, enough to rebuild this problem."""
        return {
            "dim": self.dim,
            "cost_ms": self.cost_ms,
            "fail_share": self.fail_share,
            "version": self.version,
        }

    @staticmethod
    def function(x: np.ndarray) -> np.ndarray:
        """The function on an ``(n, dim)`` array of points: one value a row."""
        raise NotImplementedError

    def optimum(self) -> dict[str, float]:
        """A candidate where the function reaches its global minimum 0."""
        return dict.fromkeys(self.names, 0.0)

    def fails(self, candidate: Mapping[str, Any]) -> bool:
        """Whether ``candidate`` is one of the ``fail_share`` that fail (a hash of its values)."""
        if self.fail_share <= 0.0:
            return False
        if self.fail_share >= 1.0:
            return True
        row = np.asarray([candidate[n] for n in self.names], dtype=np.float64)
        digest = hashlib.blake2b(row.tobytes(), digest_size=8).digest()
        return int.from_bytes(digest, "little") / _HASH_SCALE < self.fail_share

    def evaluate(self, candidate: Mapping[str, Any]) -> float:
        """Score one candidate, after ``cost_ms`` of busy CPU; raise for the failing share."""
        busy_wait(self.cost_ms)
        if self.fails(candidate):
            raise RuntimeError(f"simulated failure ({type(self).__name__} fail_share={self.fail_share})")
        row = np.asarray([[candidate[n] for n in self.names]], dtype=np.float64)
        return float(self.function(row)[0])

    def evaluate_batch(self, candidates: Sequence[Mapping[str, Any]]) -> Any:
        """Score many candidates in one numpy pass when evaluations are free and failure-free.

        Otherwise return ``NotImplemented``: the engine then evaluates one candidate at a time,
        timing and caching each as it finishes (what costly evaluations need).
        """
        if self.cost_ms != 0.0 or self.fail_share != 0.0:
            return NotImplemented
        if not candidates:
            return []
        values = map(self._getter, candidates)
        flat = values if self.dim == 1 else chain.from_iterable(values)
        x = np.fromiter(flat, dtype=np.float64, count=len(candidates) * self.dim)
        return list(self.function(x.reshape(len(candidates), self.dim)).tolist())


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


class Sphere(Benchmark):
    """Sphere: sum of squares on [-5.12, 5.12]^dim; minimum 0 at the origin."""

    name = "sphere"
    bounds = (-5.12, 5.12)

    @staticmethod
    def function(x: np.ndarray) -> np.ndarray:
        """Sum of squares of each row."""
        value: np.ndarray = np.einsum("ij,ij->i", x, x)
        return value


class Rosenbrock(Benchmark):
    """Rosenbrock's valley on [-5, 10]^dim (dim >= 2); minimum 0 at (1, ..., 1)."""

    name = "rosenbrock"
    bounds = (-5.0, 10.0)
    min_dim = 2

    @staticmethod
    def function(x: np.ndarray) -> np.ndarray:
        """Sum of 100 (x[i+1] - x[i]^2)^2 + (1 - x[i])^2 over each row."""
        head, tail = x[:, :-1], x[:, 1:]
        value: np.ndarray = np.sum(100.0 * (tail - head**2) ** 2 + (1.0 - head) ** 2, axis=1)
        return value

    def optimum(self) -> dict[str, float]:
        """All ones."""
        return dict.fromkeys(self.names, 1.0)


class Rastrigin(Benchmark):
    """Rastrigin: a bowl covered in regular local minima on [-5.12, 5.12]^dim; minimum 0 at 0."""

    name = "rastrigin"
    bounds = (-5.12, 5.12)

    @staticmethod
    def function(x: np.ndarray) -> np.ndarray:
        """10 dim + sum of x^2 - 10 cos(2 pi x) over each row."""
        value: np.ndarray = 10.0 * x.shape[1] + np.sum(x**2 - 10.0 * np.cos(2.0 * np.pi * x), axis=1)
        return value


class Ackley(Benchmark):
    """Ackley: a nearly flat plain with a deep hole, on [-32.768, 32.768]^dim; minimum 0 at 0."""

    name = "ackley"
    bounds = (-32.768, 32.768)

    @staticmethod
    def function(x: np.ndarray) -> np.ndarray:
        """-20 exp(-0.2 sqrt(mean x^2)) - exp(mean cos(2 pi x)) + 20 + e, clipped at 0."""
        rms = np.sqrt(np.mean(x**2, axis=1))
        waves = np.mean(np.cos(2.0 * np.pi * x), axis=1)
        value = -20.0 * np.exp(-0.2 * rms) - np.exp(waves) + 20.0 + np.e
        clipped: np.ndarray = np.maximum(value, 0.0)
        return clipped
