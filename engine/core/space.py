"""Search spaces: named dimensions and their encoding to the unit cube.

Strategies that work on vectors (random search, CMA-ES) sample in ``[0, 1]^d`` and decode with
:meth:`Space.decode`; strategies that work on named parameters (TPE) use the dimensions directly.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.core.candidate import Candidate
from engine.core.errors import SpecError

Value = float | int | str | bool | None


def _finite_number(value: Any) -> bool:
    """A real bound: an int or float (not a bool, a string or None), neither NaN nor infinite."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Float:
    """A real parameter in ``[low, high]``, sampled uniformly or, with ``log=True``, log-uniformly."""

    low: float
    high: float
    log: bool = False

    def __post_init__(self) -> None:
        if not (_finite_number(self.low) and _finite_number(self.high)) or self.low >= self.high:
            raise SpecError(f"Float({self.low}, {self.high}): need finite bounds with low < high")
        if self.log and self.low <= 0:
            raise SpecError(f"Float({self.low}, {self.high}, log=True): log scale needs low > 0")

    def from_unit(self, u: float) -> float:
        u = min(max(u, 0.0), 1.0)
        if self.log:
            return float(math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low))))
        return float(self.low + u * (self.high - self.low))

    def to_unit(self, value: Any) -> float:
        if self.log:
            return (math.log(value) - math.log(self.low)) / (math.log(self.high) - math.log(self.low))
        return (float(value) - self.low) / (self.high - self.low)

    def contains(self, value: Any) -> bool:
        return (
            isinstance(value, (int, float)) and not isinstance(value, bool) and self.low <= value <= self.high
        )


@dataclass(frozen=True)
class Int:
    """An integer parameter in ``[low, high]`` (both included), optionally on a log scale.

    Vector strategies see it as a real in the unit cube; decoding rounds to the nearest integer,
    each integer owning an equal share of the interval.
    """

    low: int
    high: int
    log: bool = False

    def __post_init__(self) -> None:
        if (
            not (_finite_number(self.low) and _finite_number(self.high))
            or int(self.low) != self.low
            or int(self.high) != self.high
            or self.low >= self.high
        ):
            raise SpecError(f"Int({self.low}, {self.high}): need integer bounds with low < high")
        if self.log and self.low <= 0:
            raise SpecError(f"Int({self.low}, {self.high}, log=True): log scale needs low > 0")

    def from_unit(self, u: float) -> int:
        u = min(max(u, 0.0), 1.0)
        if self.log:
            lo, hi = math.log(self.low - 0.5 if self.low > 0.5 else self.low), math.log(self.high + 0.5)
            value = math.exp(lo + u * (hi - lo))
        else:
            value = (self.low - 0.5) + u * (self.high - self.low + 1)
        return int(min(max(round(value), self.low), self.high))

    def to_unit(self, value: Any) -> float:
        if self.log:
            lo, hi = math.log(self.low - 0.5 if self.low > 0.5 else self.low), math.log(self.high + 0.5)
            return (math.log(value) - lo) / (hi - lo)
        return (int(value) - self.low + 0.5) / (self.high - self.low + 1)

    def contains(self, value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and self.low <= value <= self.high


@dataclass(frozen=True)
class Choice:
    """A categorical parameter: one of ``options`` (JSON scalars).

    Vector strategies see it as a real in the unit cube split into equal bins, one per option.
    """

    options: tuple[Value, ...]

    def __init__(self, options: Sequence[Value]) -> None:
        opts = tuple(options)
        if not opts:
            raise SpecError("Choice([]): give at least one option")
        if len(set(map(repr, opts))) != len(opts):
            raise SpecError(f"Choice({list(opts)}): options must be distinct")
        for o in opts:
            if not isinstance(o, (str, int, float, bool)) and o is not None:
                raise SpecError(f"Choice option {o!r}: options must be str, int, float, bool or None")
            if isinstance(o, float) and not math.isfinite(o):
                raise SpecError(f"Choice option {o!r}: number options must be finite")
        object.__setattr__(self, "options", opts)

    def from_unit(self, u: float) -> Value:
        k = len(self.options)
        return self.options[min(int(max(u, 0.0) * k), k - 1)]

    def to_unit(self, value: Any) -> float:
        return (self.options.index(value) + 0.5) / len(self.options)

    def contains(self, value: Any) -> bool:
        return any(value == o and type(value) is type(o) for o in self.options)


Dimension = Float | Int | Choice


class Space(Mapping[str, Dimension]):
    """An ordered, immutable mapping of parameter name to dimension."""

    __slots__ = ("_dims", "_names")

    def __init__(self, dims: Mapping[str, Dimension]) -> None:
        if not dims:
            raise SpecError("the search space is empty: give at least one parameter")
        for name, dim in dims.items():
            if not isinstance(name, str) or not name:
                raise SpecError(f"parameter name {name!r}: names must be non-empty strings")
            if not isinstance(dim, (Float, Int, Choice)):
                raise SpecError(f"parameter {name!r}: {dim!r} is not a Float, Int or Choice")
        self._dims: dict[str, Dimension] = dict(dims)
        self._names: tuple[str, ...] = tuple(self._dims)

    def __getitem__(self, name: str) -> Dimension:
        return self._dims[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return f"Space({self._dims!r})"

    @property
    def names(self) -> tuple[str, ...]:
        return self._names

    def decode(self, unit: np.ndarray) -> list[Candidate]:
        """Turn an ``(n, d)`` array of unit-cube points into candidates."""
        rows = np.clip(np.asarray(unit, dtype=float), 0.0, 1.0)
        if rows.ndim != 2 or rows.shape[1] != len(self._names):
            raise ValueError(f"expected shape (n, {len(self._names)}), got {rows.shape}")
        dims = [self._dims[n] for n in self._names]
        names = self._names
        if all(type(d) is Float and not d.log for d in dims):
            # Fast path for purely linear real spaces: one vectorised affine map.
            lows = np.array([d.low for d in dims])  # type: ignore[union-attr]
            spans = np.array([d.high - d.low for d in dims])  # type: ignore[union-attr]
            return [Candidate(zip(names, row, strict=True)) for row in (lows + rows * spans).tolist()]
        return [
            Candidate(zip(names, (d.from_unit(u) for d, u in zip(dims, row, strict=True)), strict=True))
            for row in rows.tolist()
        ]

    def encode(self, candidates: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Turn candidates into an ``(n, d)`` array of unit-cube points (inverse of :meth:`decode`)."""
        dims = [self._dims[n] for n in self._names]
        return np.array(
            [[d.to_unit(c[n]) for n, d in zip(self._names, dims, strict=True)] for c in candidates],
            dtype=float,
        )

    def validate(self, candidate: Mapping[str, Any]) -> None:
        """Raise :class:`SpecError` unless ``candidate`` names every parameter with a value in range."""
        if set(candidate) != set(self._names):
            raise SpecError(f"candidate keys {sorted(candidate)} differ from the space {sorted(self._names)}")
        for name, dim in self._dims.items():
            if not dim.contains(candidate[name]):
                raise SpecError(f"parameter {name!r}: {candidate[name]!r} is outside {dim!r}")
