"""The job spec on the command line: a TOML file, plus flags generated from :class:`JobSpec` fields.

A flag's type, choices, help and default come from the field it sets (one declaration, in
``engine/core/spec.py``); :data:`SPEC_FLAGS` only chooses which fields are flags.
"""

from __future__ import annotations

import argparse
import tomllib
import types
import typing
from collections.abc import Sequence
from typing import Any

from irefine.errors import BadInput

SPEC_FLAGS = (
    "batch_size",
    "max_evaluations",
    "max_cycles",
    "target",
    "patience",
    "tolerance",
    "max_seconds",
    "seed",
    "max_failure_share",
    "shard_size",
    "cache",
)
"""The :class:`~engine.core.JobSpec` fields that are flags of ``irefine run`` (``--batch-size`` ...)."""


def _flag_type(annotation: Any) -> tuple[type, list[str] | None]:
    """The argparse type and choices of a scalar field: ``int | None`` gives int, a Literal its values."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return str, [str(v) for v in typing.get_args(annotation)]
    if annotation not in (int, float, str):
        raise TypeError(f"JobSpec field of type {annotation!r} cannot be a flag")
    return annotation, None


def add_spec_flags(parser: argparse.ArgumentParser) -> None:
    """Add one flag per name in :data:`SPEC_FLAGS`, typed and described by its JobSpec field."""
    from engine.core import JobSpec

    for name in SPEC_FLAGS:
        field = JobSpec.model_fields[name]
        kind, choices = _flag_type(field.annotation)
        default = "" if field.default is None else f" (default {field.default})"
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=kind,
            choices=choices,
            help=f"{field.description}{default}",
        )


def load_spec_file(path: str) -> dict[str, Any]:
    """Read a TOML job spec; a malformed file is a BadInput naming the file and the problem."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise BadInput(f"spec file {path!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise BadInput(f"spec file {path!r} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise BadInput(f"spec file {path!r}: {exc.strerror}") from None


def _key_values(pairs: Sequence[str] | None, flag: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise BadInput(f"{flag} {pair!r}: write it as KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def build_spec(args: argparse.Namespace) -> Any:
    """Merge the spec file (if any) with the flags (flags win) and validate (a SpecError if bad)."""
    from engine.core import JobSpec

    data: dict[str, Any] = load_spec_file(args.spec) if args.spec else {}
    if args.problem:
        data["problem"] = args.problem
    if args.strategy:
        data["strategy"] = args.strategy
    for flag, value in (("problem_params", args.problem_param), ("strategy_params", args.strategy_param)):
        extra = _key_values(value, "--" + flag.replace("_params", "-param"))
        if extra:
            data[flag] = {**data.get(flag, {}), **extra}
    for name in SPEC_FLAGS:
        value = getattr(args, name)
        if value is not None:
            data[name] = value
    if "problem" not in data:
        raise BadInput("no problem given: pass --problem NAME (see `irefine problems`) or a spec file")
    return JobSpec.parse(data)
