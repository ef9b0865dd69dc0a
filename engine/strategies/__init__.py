"""Strategies: the built-in optimisers and the registry that builds them from a job spec.

Built-ins are ``random``, ``cmaes`` and ``tpe``. Other packages add strategies through the entry-point
group ``irefine.strategies``: ``name = "package.module:Class"``, where the class implements
:class:`engine.core.strategy.Strategy` and is built by ``Class.create(space, seed, params)`` if it
has that classmethod, else by ``Class(space, seed, **params)``. Built-in names win over plug-ins.
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from engine.core.errors import SpecError
from engine.core.space import Space
from engine.core.strategy import Strategy
from engine.strategies.cmaes import CMAES, MIN_POPSIZE
from engine.strategies.random_search import RandomSearch
from engine.strategies.tpe import TPE

ENTRY_POINT_GROUP = "irefine.strategies"

STRATEGIES: dict[str, str] = {
    "random": "uniform random sampling of the space: a baseline that learns nothing",
    "cmaes": "CMA-ES (pycma) on the unit cube: continuous, correlated, ill-conditioned problems",
    "tpe": "Tree-structured Parzen Estimator (optuna): mixed, integer and categorical spaces",
}
"""Built-in strategy name -> one-line description."""

_CLASSES: dict[str, Any] = {"random": RandomSearch, "cmaes": CMAES, "tpe": TPE}

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


class _Params:
    """Checks and coerces one strategy's parameters; every problem is a one-line SpecError."""

    def __init__(self, strategy: str, params: Mapping[str, Any] | None, known: Sequence[str]) -> None:
        if params is None:
            params = {}
        if not isinstance(params, Mapping):
            raise SpecError(f"strategy parameters must be a mapping of name to value, got {params!r}")
        for key in params:
            if key not in known:
                allowed = f"choose from {', '.join(sorted(known))}" if known else "it takes none"
                raise SpecError(f"unknown strategy parameter {key!r} for {strategy}: {allowed}")
        self._params = params

    def _bad(self, key: str, want: str) -> SpecError:
        return SpecError(f"strategy parameter {key!r} must be {want}, got {self._params[key]!r}")

    def number(self, key: str, default: float, *, low: float, high: float, low_open: bool = False) -> float:
        value = self._params.get(key)
        if value is None:
            return default
        want = f"a number in {'(' if low_open else '['}{low:g}, {high:g}]"
        x = _as_number(value)
        if x is None or not (low < x if low_open else low <= x) or not x <= high:
            raise self._bad(key, want)
        return x

    def integer(self, key: str, default: int | None, *, minimum: int) -> int | None:
        value = self._params.get(key)
        if value is None:
            return default
        i = _as_integer(value)
        if i is None or i < minimum:
            raise self._bad(key, f"an integer >= {minimum}")
        return i

    def flag(self, key: str, default: bool) -> bool:
        value = self._params.get(key)
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower() if isinstance(value, (str, int)) else None
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise self._bad(key, "true or false")

    def point(self, key: str, space: Space) -> dict[str, Any] | None:
        value = self._params.get(key)
        if value is None:
            return None
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise self._bad(key, "a JSON object of parameter values") from None
        if not isinstance(value, Mapping):
            raise self._bad(key, "a mapping of every parameter to a value")
        try:
            space.validate(value)
        except SpecError as exc:
            raise SpecError(f"strategy parameter {key!r} must be a point of the space: {exc}") from None
        return dict(value)


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        x = float(value)
    elif isinstance(value, str):
        try:
            x = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return x if math.isfinite(x) else None


def _as_integer(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    x = _as_number(value)
    return int(x) if x is not None and x.is_integer() else None


def _check_seed(seed: Any) -> int:
    try:
        value = operator.index(seed)
    except TypeError:
        value = -1
    if not 0 <= value < 2**32:
        raise SpecError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    return value


def _make_random(space: Space, seed: int, params: Mapping[str, Any] | None) -> Strategy:
    _Params("random", params, ())
    return RandomSearch(space, seed)


def _make_cmaes(space: Space, seed: int, params: Mapping[str, Any] | None) -> Strategy:
    p = _Params("cmaes", params, ("sigma0", "popsize", "x0"))
    return CMAES(
        space,
        seed,
        sigma0=p.number("sigma0", 0.3, low=0.0, high=1.0, low_open=True),
        popsize=p.integer("popsize", None, minimum=MIN_POPSIZE),
        x0=p.point("x0", space),
    )


def _make_tpe(space: Space, seed: int, params: Mapping[str, Any] | None) -> Strategy:
    p = _Params("tpe", params, ("n_startup_trials", "multivariate", "constant_liar", "ask_ahead"))
    n_startup_trials = p.integer("n_startup_trials", 10, minimum=1)
    assert n_startup_trials is not None
    return TPE(
        space,
        seed,
        n_startup_trials=n_startup_trials,
        multivariate=p.flag("multivariate", True),
        constant_liar=p.flag("constant_liar", True),
        ask_ahead=p.flag("ask_ahead", True),
    )


_FACTORIES: dict[str, Callable[[Space, int, Mapping[str, Any] | None], Strategy]] = {
    "random": _make_random,
    "cmaes": _make_cmaes,
    "tpe": _make_tpe,
}


def _plugins() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name not in _CLASSES}


def _plugin_class(name: str) -> Any:
    plugins = _plugins()
    if name not in plugins:
        choices = ", ".join(sorted({*_CLASSES, *plugins}))
        raise SpecError(f"unknown strategy {name!r}: choose one of {choices}")
    ep = plugins[name]
    try:
        return ep.load()
    except Exception as exc:
        raise SpecError(f"strategy plug-in {name!r} ({ep.value}) failed to load: {exc}") from exc


def available_strategies() -> dict[str, str]:
    """Every usable strategy name -> description: the built-ins, then installed plug-ins."""
    return {**STRATEGIES, **{name: f"plug-in {ep.value}" for name, ep in sorted(_plugins().items())}}


def make_strategy(name: str, space: Space, seed: int, params: Mapping[str, Any] | None) -> Strategy:
    """Build strategy ``name`` for ``space``; parameters may be strings (from a CLI) and are coerced.

    Raises :class:`SpecError` for an unknown name, an unknown or invalid parameter or a bad seed.
    """
    seed = _check_seed(seed)
    factory = _FACTORIES.get(name)
    if factory is not None:
        return factory(space, seed, params)
    cls = _plugin_class(name)
    args = dict(params or {})
    try:
        strategy = cls.create(space, seed, args) if hasattr(cls, "create") else cls(space, seed, **args)
    except TypeError as exc:
        raise SpecError(f"strategy {name!r} rejected its parameters {args!r}: {exc}") from exc
    if not isinstance(strategy, Strategy):
        raise SpecError(f"strategy plug-in {name!r} built a {type(strategy).__name__}, not a Strategy")
    return strategy


def restore_strategy(name: str, space: Space, state: dict[str, Any]) -> Strategy:
    """Rebuild strategy ``name`` from :meth:`Strategy.state` output, continuing where it stopped."""
    cls = _CLASSES.get(name) or _plugin_class(name)
    restored: Strategy = cls.from_state(space, state)
    return restored


__all__ = [
    "STRATEGIES",
    "ENTRY_POINT_GROUP",
    "available_strategies",
    "make_strategy",
    "restore_strategy",
    "CMAES",
    "RandomSearch",
    "TPE",
]
