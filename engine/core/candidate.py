"""Candidates: frozen parameter mappings with a stable fingerprint."""

from __future__ import annotations

import hashlib
import math
from typing import Any, NoReturn

import orjson

_SORTED = orjson.OPT_SORT_KEYS


class Candidate(dict[str, Any]):
    """One point of a search space: an immutable ``name -> value`` mapping.

    It is a ``dict`` subclass so that it pickles, serialises and reads like one at no cost, but
    every mutating method raises. Equal candidates have equal :func:`fingerprint`.
    """

    __slots__ = ()

    def _readonly(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError("Candidate is immutable")

    __setitem__ = __delitem__ = _readonly
    clear = pop = popitem = setdefault = update = _readonly  # type: ignore[assignment]
    __ior__ = _readonly  # type: ignore[assignment]

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(canonical_json(self))

    def __reduce__(self) -> tuple[Any, ...]:
        return (Candidate, (dict(self),))


def canonical_json(params: dict[str, Any]) -> bytes:
    """Canonical JSON of a parameter mapping: sorted keys, shortest round-trip floats, no spaces."""
    raw = orjson.dumps(params, option=_SORTED)
    # orjson writes NaN and infinities as null; look at the values only when a null shows up (a
    # loop over every value cost more than the serialisation itself).
    if b"null" in raw:
        bad = [v for v in params.values() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            raise ValueError(f"parameter value {bad[0]!r} is not finite")
    return raw


def fingerprint(params: dict[str, Any]) -> str:
    """Stable 32-hex-digit identity of a parameter mapping, equal across processes and machines."""
    return hashlib.blake2b(canonical_json(params), digest_size=16).hexdigest()
