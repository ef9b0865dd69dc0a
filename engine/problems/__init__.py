"""The problem registry: built-in problems, entry-point plugins and ``module:attr`` import paths.

``load_problem(ref, params)`` resolves, in order, a built-in name (see :data:`PROBLEMS`), an entry
point of group ``irefine.problems``, then an import path ``module:attr``. Built-ins are imported
lazily, so importing this package does not import scikit-learn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from engine.core.errors import SpecError
from engine.core.problem import Problem, problem_direction, problem_version
from engine.core.space import Choice, Dimension, Float, Int, Space
from engine.problems.loader import (
    check_module_allowed,
    check_problem,
    import_object,
    instantiate,
    space_of,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "PROBLEMS",
    "check_module_allowed",
    "describe_problem",
    "format_dimension",
    "load_problem",
    "problem_space",
]

ENTRY_POINT_GROUP = "irefine.problems"

PROBLEMS: dict[str, str] = {
    "sphere": "sum of squares; minimum 0 at the origin (dim, cost_ms, fail_share)",
    "rosenbrock": "Rosenbrock's curved valley; minimum 0 at (1, ..., 1) (dim >= 2, cost_ms, fail_share)",
    "rastrigin": "a bowl covered in regular local minima; minimum 0 at the origin (dim, cost_ms, fail_share)",
    "ackley": "a flat plain with one deep hole; minimum 0 at the origin (dim, cost_ms, fail_share)",
    "gradient_boosting": "tune HistGradientBoostingClassifier by CV score (dataset, cv, scoring, seed)",
    "random_forest": "tune RandomForestClassifier by CV score (dataset, cv, scoring, seed)",
    "svc": "tune an SVC (rbf, poly or sigmoid kernel) by CV score (dataset, cv, scoring, seed)",
}

_BUILTIN_PATHS: dict[str, str] = {
    "sphere": "engine.problems.benchmarks:Sphere",
    "rosenbrock": "engine.problems.benchmarks:Rosenbrock",
    "rastrigin": "engine.problems.benchmarks:Rastrigin",
    "ackley": "engine.problems.benchmarks:Ackley",
    "gradient_boosting": "engine.problems.sklearn_tuning:GradientBoostingTuning",
    "random_forest": "engine.problems.sklearn_tuning:RandomForestTuning",
    "svc": "engine.problems.sklearn_tuning:SVCTuning",
}


def load_problem(
    ref: str, params: Mapping[str, Any] | None = None, *, allowed_modules: Sequence[str] | None = None
) -> Problem:
    """Build and check the problem ``ref`` names, with ``params`` (strings are coerced to types).

    ``allowed_modules`` (for specs from outside: deployment runs, submissions): an import path must
    lie in one of these module prefixes, checked before anything is imported; ``None``: any module.
    Raises :class:`SpecError` with one line saying what to change for an unknown name, a failed
    import, a module not allowed, a bad or out-of-range parameter, or an object that is not a
    valid problem.
    """
    params = dict(params or {})
    name = ref.strip() if isinstance(ref, str) else ""
    if not name:
        raise SpecError(f"problem {ref!r}: {_choices()}")
    if name in _BUILTIN_PATHS:
        obj = import_object(_BUILTIN_PATHS[name], name)
    else:
        plugin = _entry_points().get(name)
        if plugin is not None:
            try:
                obj = plugin.load()
            except Exception as exc:
                raise SpecError(
                    f"cannot load entry point {name!r} ({plugin.value}): {type(exc).__name__}: "
                    + " ".join(str(exc).split())
                ) from None
        elif ":" in name:
            if allowed_modules is not None:
                check_module_allowed(name, allowed_modules)
            obj = import_object(name, name)
        else:
            raise SpecError(f"unknown problem {name!r}: {_choices()}")
    return check_problem(instantiate(obj, params, name), name)


def describe_problem(problem: Any) -> dict[str, Any]:
    """A JSON-ready summary for ``irefine problems``: class name, direction, version, space as strings."""
    doc = (type(problem).__doc__ or "").strip()
    return {
        "name": type(problem).__name__,
        "description": doc.splitlines()[0] if doc else "",
        "direction": problem_direction(problem),
        "version": problem_version(problem),
        "space": {key: format_dimension(dim) for key, dim in problem_space(problem).items()},
    }


def problem_space(problem: Any) -> Space:
    """The problem's search space as a :class:`Space` (SpecError if it is missing or invalid)."""
    return space_of(problem)


def format_dimension(dim: Dimension) -> str:
    """A short human form of a dimension: ``Float(0.001, 0.5, log)``, ``Int(2, 8)``, ``Choice([...])``."""
    if isinstance(dim, (Float, Int)):
        return f"{type(dim).__name__}({dim.low!r}, {dim.high!r}{', log' if dim.log else ''})"
    if isinstance(dim, Choice):
        return f"Choice({list(dim.options)!r})"
    return repr(dim)


def _entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _choices() -> str:
    names = [*PROBLEMS, *sorted(set(_entry_points()) - set(PROBLEMS))]
    return f"choose one of {', '.join(names)} or give an import path module:attr"
