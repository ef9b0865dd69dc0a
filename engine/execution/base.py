"""The executor port: evaluate a batch of candidates somewhere, one Evaluation per candidate."""

from __future__ import annotations

import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import orjson

from engine.cache.config import CacheConfig, process_cache
from engine.core import Candidate, Evaluation, SpecError


@dataclass(frozen=True)
class ProblemRef:
    """How a worker finds the problem: its name or import path and its parameters (picklable)."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.name + "|" + orjson.dumps(self.params, option=orjson.OPT_SORT_KEYS).decode()


@dataclass(frozen=True)
class Writeback:
    """Where a shard writes each finished evaluation, so that a crash loses none of them.

    ``keys`` are the cache keys of the shard's candidates, in order. An evaluation that took
    ``WRITE_NOW_SECONDS`` or more is written the moment it ends; cheaper ones are buffered until
    they add up to ``WRITE_NOW_SECONDS`` of computing (or ``FLUSH_SECONDS`` have passed) and go
    out in one batched round trip: a crash of a worker loses less than ``WRITE_NOW_SECONDS`` of
    its evaluations' time, never an expensive evaluation.
    """

    config: CacheConfig
    keys: tuple[str, ...] = ()
    ttl_seconds: float | None = None
    include_failed: bool = False

    def for_shard(self, keys: Sequence[str]) -> Writeback:
        return Writeback(self.config, tuple(keys), self.ttl_seconds, self.include_failed)


@dataclass(frozen=True)
class EvaluatedBatch:
    """What the evaluate stage hands the record stage: one evaluation per candidate, in order,
    and how many distinct candidates missed the inference cache (were computed)."""

    evaluations: list[Evaluation]
    cache_misses: int = 0


FLUSH_SECONDS = 0.5
WRITE_NOW_SECONDS = 0.05
T = TypeVar("T")


class Executor(Protocol):
    """Evaluates candidates of one problem and returns their evaluations in the same order.

    Contract: never raises for a failing evaluation (that is a ``failed`` Evaluation); raises only
    when the execution backend itself is lost for good. One executor serves one job at a time and
    is reused across its cycles; ``close()`` releases what the executor created (not what it was
    handed).
    """

    @property
    def workers(self) -> int: ...

    def shard_count(self, n: int, shard_size: int | None) -> int:
        """How many shards (tasks) a batch of ``n`` candidates goes out as."""
        ...

    def evaluate(
        self,
        ref: ProblemRef,
        candidates: Sequence[Candidate],
        shard_size: int | None = None,
        writeback: Writeback | None = None,
    ) -> list[Evaluation]: ...

    def close(self) -> None: ...


_PROBLEMS: dict[str, Any] = {}


def worker_problem(ref: ProblemRef) -> Any:
    """The problem for ``ref``, loaded once per process (workers evaluate many shards of it)."""
    problem = _PROBLEMS.get(ref.key)
    if problem is None:
        from engine.problems import load_problem

        try:
            problem = load_problem(ref.name, ref.params)
        except SpecError:
            raise
        except Exception as exc:  # a user's problem broken in a way the loader does not catch
            raise SpecError(
                f"problem {ref.name!r} could not be loaded: {type(exc).__name__}: {exc}"
            ) from None
        _PROBLEMS[ref.key] = problem
    return problem


def _error_text(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}" if tb else ""
    return f"{type(exc).__name__}: {exc}{where}"[:2000]


class _Writer:
    """Buffers a shard's evaluations and writes them to the cache once the buffer holds
    WRITE_NOW_SECONDS of evaluation time, or FLUSH_SECONDS after the last write."""

    def __init__(self, writeback: Writeback | None) -> None:
        self._wb = writeback
        self._cache = process_cache(writeback.config) if writeback is not None else None
        self._buffer: list[tuple[str, Evaluation]] = []
        self._buffered_seconds = 0.0  # evaluation time a crash would lose now
        self._last = time.monotonic()

    def add(self, index: int, evaluation: Evaluation) -> None:
        if self._wb is None or not (evaluation.ok or self._wb.include_failed):
            return
        self._buffer.append((self._wb.keys[index], evaluation))
        self._buffered_seconds += evaluation.duration
        if self._buffered_seconds >= WRITE_NOW_SECONDS or time.monotonic() - self._last >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self._cache is not None and self._buffer:
            self._cache.put_many(self._buffer, ttl_seconds=self._wb.ttl_seconds if self._wb else None)
        self._buffer = []
        self._buffered_seconds = 0.0
        self._last = time.monotonic()


def evaluate_shard(
    ref: ProblemRef, candidates: Sequence[Candidate], writeback: Writeback | None = None
) -> list[Evaluation]:
    """Evaluate a shard of candidates in this process; failures become failed evaluations.

    With a ``writeback``, each finished evaluation also goes to the inference cache from here, so
    that work done before a crash of the flow process is found again on resume.
    """
    problem = worker_problem(ref)
    writer = _Writer(writeback)
    out: list[Evaluation] = []
    batch = getattr(problem, "evaluate_batch", None)
    if batch is not None and len(candidates) > 1:
        start = time.perf_counter()
        try:
            results = batch(candidates)
        except Exception:
            results = None
        if results is not None and results is not NotImplemented and len(results) == len(candidates):
            each = (time.perf_counter() - start) / len(candidates)
            out = [Evaluation.from_result(r, each) for r in results]
            for i, ev in enumerate(out):
                writer.add(i, ev)
            writer.flush()
            return out
    evaluate = problem.evaluate
    clock = time.perf_counter
    for i, candidate in enumerate(candidates):
        start = clock()
        try:
            ev = Evaluation.from_result(evaluate(candidate), clock() - start)
        except Exception as exc:
            ev = Evaluation.failed(_error_text(exc), clock() - start)
        out.append(ev)
        writer.add(i, ev)
    writer.flush()
    return out


def split_shards(items: Sequence[T], shards: int) -> list[list[T]]:
    """Split ``items`` into at most ``shards`` contiguous, nearly equal lists."""
    n = len(items)
    shards = max(1, min(shards, n))
    size, extra = divmod(n, shards)
    out, start = [], 0
    for i in range(shards):
        end = start + size + (1 if i < extra else 0)
        out.append(list(items[start:end]))
        start = end
    return out
