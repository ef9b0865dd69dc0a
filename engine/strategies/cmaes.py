"""CMA-ES through pycma's ask/tell interface, run on the unit cube ``[0, 1]^d``.

pycma only ever sees vectors in ``[0, 1]^d`` (option ``bounds=[0, 1]``); candidates come from
:meth:`engine.core.space.Space.decode`, which maps each coordinate to its dimension: affinely (or
log-affinely) for ``Float``, by rounding to equal-width integer bins for ``Int`` and by equal-width
bins for ``Choice``. CMA-ES therefore treats integers and categories as plateaus of a continuous
landscape; that works for wide integer ranges and is a rough heuristic for small categorical ones
(prefer ``tpe`` there).

Batches: pycma's population size is the ``popsize`` parameter or, if unset, the batch size of the
first ``ask`` (at least 3, pycma's minimum). When ``ask(n)`` gets ``n < popsize`` (typically the
last cycle trimmed to the evaluation budget) a full population is still sampled, the first ``n`` are
returned, and on ``tell`` the ``popsize - n`` unreturned ones are ranked last (given the penalty
loss below). When ``n > popsize`` all ``n`` are sampled from the same distribution and told.

Failures: a ``None`` (or non-finite) loss becomes ``worst + 1 + |worst|`` where ``worst`` is the
worst finite loss of the batch, so failures rank last; if no loss of the batch is finite, all get
``1e300``.

Determinism: pycma draws from numpy's *global* random state. The strategy keeps its own copy of
that state and swaps it in around every pycma call (restoring the caller's state afterwards), so a
run is reproducible, independent of other code using ``np.random`` and identical to a standalone
loop ``es = cma.CMAEvolutionStrategy(x0, sigma0, {"seed": seed, "popsize": p, "bounds": [0, 1],
"verbose": -9}); X = es.ask(); es.tell(X, [f(c) for c in space.decode(np.array(X))])`` with the
same (non-zero) seed. A seed of 0, which pycma would replace by a time-based one, is honoured too.
In 1-D the option ``maxstd`` is set to infinity to dodge a pycma crash (so there the equivalence
needs that option too).

State (JSON-serialisable)::

    {"seed": int, "sigma0": float, "popsize": int | None,   # the parameters as given
     "x0": [float, ...],                                    # start point in the unit cube
     "es": str | None,          # base64 pickle of the pycma object (None before the first ask)
     "np_random": [str, [int, ...], int, int, float] | None,  # numpy global-state copy (MT19937)
     "pending": [[float, ...], ...] | None,  # unit vectors of an asked-but-not-told population
     "n_asked": int}            # how many of ``pending`` were returned by that ask

Between ``ask`` and ``tell`` the state holds pycma as it was *before* that ask; restoring repeats the
ask (and checks it reproduces ``pending``), because pycma keys its record of sent solutions by
``hash(bytes)``, which differs between Python processes. ``es`` is a pickle: restore only states
this engine wrote (the runner loads a checkpoint only if its signature matches: engine.signing).
"""

from __future__ import annotations

import base64
import io
import math
import pickle
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from engine.core.candidate import Candidate
from engine.core.space import Space

MIN_POPSIZE = 3
"""pycma refuses to ``tell`` fewer than three solutions."""

_ALL_FAILED_LOSS = 1e300

_RngState = tuple[str, "np.ndarray[Any, np.dtype[np.uint32]]", int, int, float]


_CMA_OPTIONAL = ("matplotlib", "scipy.stats")
"""What ``import cma`` imports at module level but the ask/tell loop never uses: its plotting
(``cma.s``) and a Kendall tau for its surrogate models, which falls back to its own. Hidden while
pycma is imported, they cost a first cycle ~1-2 s less; imported later they load as usual."""


def _import_cma() -> Any:
    """Import pycma lazily, without its plotting and scipy.stats (see ``_CMA_OPTIONAL``) and without
    its warning about a missing matplotlib."""
    hidden = [name for name in _CMA_OPTIONAL if name not in sys.modules]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in hidden:
            sys.modules[name] = None  # type: ignore[assignment]  # makes `import name` raise ImportError
        try:
            import cma
        finally:
            for name in hidden:
                if sys.modules.get(name, 0) is None:
                    del sys.modules[name]
    return cma


def _global_random_state() -> np.random.RandomState:
    """numpy's global ``RandomState``: what ``np.random.randn`` and friends draw from."""
    return np.random.mtrand._rand


class _Pickler(pickle.Pickler):
    """Pickles references to numpy's global ``RandomState`` as references, not as copies.

    pycma keeps ``np.random.randn`` (a bound method of the global ``RandomState``) in its options
    and sampler; a plain pickle would give the restored object a private copy of that generator,
    escaping the state swapping this module relies on.
    """

    def reducer_override(self, obj: Any) -> Any:
        if obj is np.random.mtrand._rand:
            return _global_random_state, ()
        return NotImplemented


_TRANSIENT = ("ary", "pop_sorted", "_tell2_args")
"""Per-generation arrays pycma rebuilds at the next ask: ~1 MB at popsize 5,000, left out of
checkpoints (a test checks that a restored strategy still continues identically)."""


def _dump_es(es: Any) -> bytes:
    buf = io.BytesIO()
    transient = {k: es.__dict__.pop(k) for k in _TRANSIENT if k in es.__dict__}
    try:
        _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(es)
    finally:
        es.__dict__.update(transient)
    return buf.getvalue()


def _load_es(data: bytes) -> Any:
    cma = _import_cma()
    es = pickle.loads(data)
    # Constructing an es sets pycma's module-wide verbosity; a restored one must do it too, or
    # pycma's warnings (e.g. about popsize changes) reappear in a fresh process.
    cma.utilities.utils.global_verbosity = -9
    return es


def _get_rng() -> _RngState:
    name, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    return (str(name), np.array(keys, dtype=np.uint32), int(pos), int(has_gauss), float(gauss))


def _rng_to_json(state: _RngState) -> list[Any]:
    name, keys, pos, has_gauss, gauss = state
    return [name, [int(k) for k in keys], pos, has_gauss, gauss]


def _rng_from_json(data: Sequence[Any]) -> _RngState:
    name, keys, pos, has_gauss, gauss = data
    return (str(name), np.array(keys, dtype=np.uint32), int(pos), int(has_gauss), float(gauss))


def penalised_losses(losses: Sequence[float | None], total: int) -> list[float]:
    """pycma-ready losses: failures (None, non-finite) and ``total - len(losses)`` pads rank last."""
    finite = [float(v) for v in losses if v is not None and math.isfinite(v)]
    if finite:
        worst = max(finite)
        penalty = worst + 1.0 + abs(worst)
        if not math.isfinite(penalty):
            penalty = worst
    else:
        penalty = _ALL_FAILED_LOSS
    out = [float(v) if v is not None and math.isfinite(v) else penalty for v in losses]
    return out + [penalty] * (total - len(out))


class CMAES:
    """CMA-ES (pycma) on the unit cube; see the module docstring for batches, failures and state."""

    name: str = "cmaes"

    def __init__(
        self,
        space: Space,
        seed: int,
        *,
        sigma0: float = 0.3,
        popsize: int | None = None,
        x0: Mapping[str, Any] | None = None,
    ) -> None:
        self._space = space
        self._seed = int(seed)
        self._sigma0 = float(sigma0)
        self._popsize = popsize
        if x0 is None:
            self._x0 = [0.5] * len(space)
        else:
            self._x0 = [float(u) for u in np.clip(space.encode([x0])[0], 0.0, 1.0)]
        self._es: Any = None
        self._rng: _RngState | None = None
        # The population of the current ask (as pycma returned it), how many of it went out, and
        # pycma + random state from just before that ask.
        self._pending: list[np.ndarray[Any, Any]] | None = None
        self._n_asked = 0
        self._before_ask: tuple[bytes, _RngState | None] | None = None
        self._dumped: bytes | None = None  # dump of the es since the last tell(), made by state()

    @contextmanager
    def _own_global_rng(self) -> Iterator[None]:
        """Run a block on this strategy's copy of numpy's global random state."""
        caller = np.random.get_state()
        try:
            if self._rng is not None:
                np.random.set_state(self._rng)
            yield
            self._rng = _get_rng()
        finally:
            np.random.set_state(caller)

    def _start(self, n: int) -> None:
        cma = _import_cma()
        popsize = self._popsize if self._popsize is not None else max(n, MIN_POPSIZE)
        # pycma seeds np.random with "seed", except 0 which it replaces by a time-based seed: seed
        # ourselves and tell pycma "nan" (= leave the random state alone) in that case.
        opts: dict[str, Any] = {
            "seed": self._seed or math.nan,
            "popsize": popsize,
            "bounds": [0, 1],
            "verbose": -9,
        }
        if len(self._space) == 1:
            # pycma 4.5 crashes in 1-D when sigma exceeds the bounds-derived "maxstd" (its
            # one-element scaling vector looks uninitialised): drop that cap in 1-D.
            opts["maxstd"] = math.inf
        with self._own_global_rng():
            np.random.seed(self._seed)
            self._es = cma.CMAEvolutionStrategy(self._x0, self._sigma0, opts)

    def ask(self, n: int) -> list[Candidate]:
        """Sample a population and return its first ``n`` members, decoded."""
        if n < 1:
            raise ValueError(f"ask(n) needs n >= 1, got {n}")
        if self._pending is not None:
            raise RuntimeError("CMAES.ask() called again before tell()")
        if self._es is None:
            self._start(n)
        es = self._es
        # The snapshot a mid-cycle state() needs; after tell() + state() it is already made.
        self._before_ask = (self._dumped or _dump_es(es), self._rng)
        self._dumped = None
        with self._own_global_rng():
            X = es.ask() if n <= es.popsize else es.ask(n)
        self._pending = list(X)
        self._n_asked = n
        return self._space.decode(np.array(X[:n]))

    def tell(self, candidates: Sequence[Candidate], losses: Sequence[float | None]) -> None:
        """Update the distribution with the losses of the last ``ask`` (same order)."""
        if self._pending is None:
            raise RuntimeError("CMAES.tell() called without a pending ask()")
        if len(candidates) != self._n_asked or len(losses) != self._n_asked:
            raise ValueError(
                f"tell expects {self._n_asked} candidates and losses, got {len(candidates)} and {len(losses)}"
            )
        values = penalised_losses(losses, len(self._pending))
        with self._own_global_rng():
            self._es.tell(self._pending, values)
        self._pending = None
        self._n_asked = 0
        self._before_ask = None
        self._dumped = None

    def state(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot; see the module docstring for its fields."""
        es_bytes: bytes | None
        if self._before_ask is not None and self._pending is not None:
            es_bytes, rng = self._before_ask
            pending: list[list[float]] | None = [np.asarray(x, dtype=float).tolist() for x in self._pending]
        else:
            if self._es is not None and self._dumped is None:
                self._dumped = _dump_es(self._es)
            es_bytes = self._dumped
            rng, pending = self._rng, None
        return {
            "seed": self._seed,
            "sigma0": self._sigma0,
            "popsize": self._popsize,
            "x0": list(self._x0),
            "es": None if es_bytes is None else base64.b64encode(es_bytes).decode("ascii"),
            "np_random": None if rng is None else _rng_to_json(rng),
            "pending": pending,
            "n_asked": self._n_asked,
        }

    @classmethod
    def from_state(cls, space: Space, state: dict[str, Any]) -> CMAES:
        """Rebuild a strategy that continues exactly as the saved one would have."""
        popsize = state.get("popsize")
        strategy = cls(
            space,
            int(state["seed"]),
            sigma0=float(state["sigma0"]),
            popsize=None if popsize is None else int(popsize),
        )
        x0 = [float(u) for u in state["x0"]]
        if len(x0) != len(space):
            raise ValueError(f"CMA-ES state has a {len(x0)}-D x0 but the space has {len(space)} dimensions")
        strategy._x0 = x0
        if state.get("es") is not None:
            strategy._es = _load_es(base64.b64decode(state["es"]))
            rng = state.get("np_random")
            strategy._rng = None if rng is None else _rng_from_json(rng)
        pending = state.get("pending")
        if pending is not None:
            strategy.ask(int(state["n_asked"]))
            assert strategy._pending is not None
            if not np.array_equal(np.array(strategy._pending), np.array(pending, dtype=float)):
                raise ValueError("CMA-ES state does not reproduce its pending population")
        return strategy
