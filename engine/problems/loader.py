"""Turn a problem reference into a checked problem object.

A reference is an import path ``module:attr`` (``attr`` may be dotted) or an already imported
object. Classes are instantiated with the given params, coerced from CLI strings to the types the
constructor annotates; instances are used as they are. Every mistake raises a one-line SpecError.
"""

from __future__ import annotations

import importlib
import inspect
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, cast

from engine.core.errors import SpecError
from engine.core.problem import Problem, problem_direction
from engine.core.space import Space

_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})
_NONE = frozenset({"none", "null"})


def param_error(problem: str, param: str, value: Any, allowed: str) -> SpecError:
    """The SpecError for a parameter value out of range: names the problem, parameter and range."""
    return SpecError(f"problem {problem!r} parameter {param!r}: {value!r} is out of range: use {allowed}")


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def import_object(path: str, name: str | None = None) -> Any:
    """Import ``module:attr`` and return the attribute; ``name`` is how messages call the problem."""
    name = name or path
    module_name, sep, attr = path.partition(":")
    module_name, attr = module_name.strip(), attr.strip()
    if not sep or not module_name or not attr:
        raise SpecError(
            f"problem {name!r}: give an import path as module:attr, e.g. mypkg.problems:MyProblem"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = " (is it installed or on PYTHONPATH?)" if isinstance(exc, ModuleNotFoundError) else ""
        raise SpecError(
            f"cannot import module {module_name!r} for problem {name!r}: {_one_line(exc)}{hint}"
        ) from None
    except Exception as exc:
        raise SpecError(
            f"importing module {module_name!r} for problem {name!r} failed: "
            f"{type(exc).__name__}: {_one_line(exc)}"
        ) from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise SpecError(f"module {module_name!r} has no attribute {attr!r} (problem {name!r})") from None
    return obj


ALWAYS_ALLOWED_MODULES = ("engine.problems",)
"""Where the built-ins live: their import paths are allowed wherever built-in names are."""


def check_module_allowed(path: str, allowed_modules: Sequence[str]) -> None:
    """Refuse (SpecError) the import path ``module:attr`` unless its module lies in one of
    ``allowed_modules`` (a prefix ``a.b`` allows ``a.b`` and ``a.b.*``); imports nothing."""
    module_name = path.partition(":")[0].strip()
    for prefix in (*ALWAYS_ALLOWED_MODULES, *allowed_modules):
        if module_name == prefix or module_name.startswith(prefix + "."):
            return
    listed = ", ".join(allowed_modules) or "none"
    raise SpecError(
        f"problem {path!r}: module {module_name!r} is not allowed for specs from deployment runs "
        f"(allowed: built-ins, plug-ins and IRE_PROBLEM_MODULES={listed}): use a built-in or a "
        "plug-in, or have the operator add the module to IRE_PROBLEM_MODULES"
    )


def instantiate(obj: Any, params: Mapping[str, Any], name: str) -> Any:
    """Build the problem from ``obj``: call a class with coerced params, or take an instance as is.

    A class is called only if it defines a callable ``evaluate`` (the problem protocol), so that
    an import path cannot make the engine call an arbitrary class (``subprocess:Popen``).
    """
    if inspect.isclass(obj):
        if not callable(getattr(obj, "evaluate", None)):
            raise SpecError(
                f"problem {name!r} is a class with no callable 'evaluate(candidate)', so it was not "
                "called: point at a problem class (with 'space' and 'evaluate')"
            )
        kwargs = coerce_params(obj, params, name)
        try:
            return obj(**kwargs)
        except SpecError:
            raise
        except Exception as exc:
            raise SpecError(
                f"problem {name!r} could not be created: {type(exc).__name__}: {_one_line(exc)}"
            ) from None
    if inspect.isroutine(obj) or inspect.ismodule(obj):
        kind = "a function" if inspect.isroutine(obj) else "a module"
        raise SpecError(
            f"problem {name!r} is {kind}: point at a class or an object with 'space' and 'evaluate'"
        )
    if params:
        raise SpecError(
            f"problem {name!r} is an instance, so it takes no parameters (got {', '.join(sorted(params))}): "
            "point at its class to pass parameters"
        )
    return obj


def check_problem(problem: Any, name: str) -> Problem:
    """Check ``problem`` has a valid space, a callable ``evaluate`` and a valid direction."""
    space = getattr(problem, "space", None)
    if space is None:
        raise SpecError(
            f"problem {name!r} has no 'space': give it a mapping of parameter name to Float, Int or Choice"
        )
    space_of(problem, name)
    if not callable(getattr(problem, "evaluate", None)):
        raise SpecError(f"problem {name!r} has no callable 'evaluate(candidate)': add one returning a score")
    batch = getattr(problem, "evaluate_batch", None)
    if batch is not None and not callable(batch):
        raise SpecError(f"problem {name!r}: 'evaluate_batch' is not callable: make it a method or remove it")
    try:
        problem_direction(problem)
    except SpecError as exc:
        raise SpecError(f"problem {name!r}: {exc}") from None
    return cast(Problem, problem)


def space_of(problem: Any, name: str | None = None) -> Space:
    """The problem's ``space`` as a :class:`Space`, or a SpecError saying what is wrong with it."""
    name = name or type(problem).__name__
    space = getattr(problem, "space", None)
    if isinstance(space, Space):
        return space
    if not isinstance(space, Mapping):
        raise SpecError(
            f"problem {name!r}: 'space' is {type(space).__name__}, not a mapping of parameter name "
            "to Float, Int or Choice"
        )
    try:
        return Space(space)
    except SpecError as exc:
        raise SpecError(f"problem {name!r}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Parameter coercion


def coerce_params(target: Callable[..., Any], params: Mapping[str, Any], name: str) -> dict[str, Any]:
    """Check ``params`` against ``target``'s signature and coerce strings to the annotated types."""
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return dict(params)
    hints = _type_hints(target)
    named = {
        p.name: p
        for p in sig.parameters.values()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    open_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    out: dict[str, Any] = {}
    for key, value in params.items():
        param = named.get(key)
        if param is None:
            if open_kwargs:
                out[key] = value
                continue
            if not named:
                raise SpecError(f"problem {name!r} takes no parameters: remove {key!r}")
            raise SpecError(
                f"problem {name!r} has no parameter {key!r}: use one of {', '.join(sorted(named))}"
            )
        annotation = hints.get(key, param.annotation)
        if annotation is inspect.Parameter.empty and param.default is not inspect.Parameter.empty:
            annotation = type(param.default) if param.default is not None else inspect.Parameter.empty
        out[key] = _coerce(value, annotation, name, key)
    missing = [k for k, p in named.items() if p.default is inspect.Parameter.empty and k not in out]
    if missing:
        raise SpecError(f"problem {name!r} needs parameter(s) {', '.join(missing)}: give them as params")
    return out


def _type_hints(target: Callable[..., Any]) -> dict[str, Any]:
    func = target.__init__ if inspect.isclass(target) else target  # type: ignore[misc]
    try:
        return typing.get_type_hints(func)
    except Exception:
        raw = getattr(func, "__annotations__", {})
        basic = {"int": int, "float": float, "bool": bool, "str": str}
        return {k: basic[v] for k, v in raw.items() if isinstance(v, str) and v in basic}


def _coerce(value: Any, annotation: Any, problem: str, param: str) -> Any:
    if annotation in (int, float, bool, str):
        return _coerce_basic(value, annotation, problem, param)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (
            value is None or (isinstance(value, str) and value.strip().lower() in _NONE)
        ):
            return None
        basic = [a for a in args if a in (int, float, bool, str)]
        if len(basic) == 1:
            return _coerce_basic(value, basic[0], problem, param)
        return value
    if origin is Literal and isinstance(value, str):
        for option in args:
            if isinstance(option, str):
                continue
            try:
                coerced = _coerce_basic(value, type(option), problem, param)
            except SpecError:
                continue
            if coerced == option:
                return coerced
    return value


def _coerce_basic(value: Any, kind: type, problem: str, param: str) -> Any:
    where = f"problem {problem!r} parameter {param!r}"
    if kind is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        return value
    if kind is bool:
        if isinstance(value, str):
            text = value.strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise SpecError(f"{where}: {value!r} is not a boolean: use true or false")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        return value
    if kind is int:
        number: Any = value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                try:
                    number = float(value.strip())
                except ValueError:
                    raise SpecError(f"{where}: {value!r} is not an integer") from None
        if isinstance(number, bool):
            raise SpecError(f"{where}: {value!r} is not an integer")
        if isinstance(number, float):
            if not number.is_integer():
                raise SpecError(f"{where}: {value!r} is not an integer")
            return int(number)
        return number
    if kind is float:
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise SpecError(f"{where}: {value!r} is not a number") from None
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value
    return value


class BuiltFromParams:
    """Base of the built-in problems: rebuilt from their constructor ``params`` when unpickled
    (only those travel to Dask workers; data and derived state are rebuilt there) and shown by
    them in ``repr``. Subclasses define ``params``."""

    @property
    def params(self) -> dict[str, Any]:
        raise NotImplementedError

    def __getstate__(self) -> dict[str, Any]:
        return self.params

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"
