"""TPE (Tree-structured Parzen Estimator) through optuna's ask/tell interface.

The strategy keeps an in-memory optuna study. Dimensions map to optuna distributions: ``Float`` to
``FloatDistribution(low, high, log=...)``, ``Int`` to ``IntDistribution(low, high, log=...)`` and
``Choice`` to ``CategoricalDistribution`` over the option *indices* (options such as ``1``, ``1.0``
and ``True`` compare equal in Python, which would confuse optuna's value lookup).

Determinism: the sampler is re-created at every ``ask`` with seed ``(seed + 7919 * n_asks) mod 2**32``,
so its randomness depends only on the seed and the number of asks so far, never on the process it
lived in; together with the trials in the state this makes a restored strategy continue exactly.

Failed evaluations (``None`` or non-finite losses) are told as ``TrialState.FAIL``: TPE ignores them.

Asking ahead (``ask_ahead``, default true): one more batch may be asked before the previous one is
told, so the loop proposes cycle n+1 while cycle n evaluates; the pending batches form a FIFO, and
with ``constant_liar`` every running trial repels the next asks.

State (JSON-serialisable)::

    {"seed": int, "n_startup_trials": int, "multivariate": bool, "constant_liar": bool,
     "ask_ahead": bool,                                      # absent in old states: true
     "n_asks": int,                                          # ask() calls so far
     "trials": [{"params": {name: value}, "value": float | None}, ...],  # told; None = failed
     "pending": [{name: value}, ...] | None,                 # asked but not yet told, in order
     "pending_sizes": [int, ...]}                            # their batches (absent: one batch)
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from engine.core.candidate import Candidate
from engine.core.space import Choice, Dimension, Float, Int, Space

if TYPE_CHECKING:
    import optuna
    from optuna.distributions import BaseDistribution

_SEED_STRIDE = 7919
_quieted = False


def _import_optuna() -> Any:
    """Import optuna lazily (it takes ~0.5 s) and silence its per-trial INFO logging once."""
    global _quieted
    import optuna

    if not _quieted:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        _quieted = True
    return optuna


def _distribution(dim: Dimension) -> BaseDistribution:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if isinstance(dim, Float):
        return FloatDistribution(float(dim.low), float(dim.high), log=dim.log)
    if isinstance(dim, Int):
        return IntDistribution(int(dim.low), int(dim.high), log=dim.log)
    return CategoricalDistribution(list(range(len(dim.options))))


def _option_index(dim: Choice, value: Any) -> int:
    for i, option in enumerate(dim.options):
        if value == option and type(value) is type(option):
            return i
    raise ValueError(f"{value!r} is not an option of {dim!r}")


class TPE:
    """optuna's ``TPESampler`` driven by ask/tell; see the module docstring for the state format."""

    name: str = "tpe"

    def __init__(
        self,
        space: Space,
        seed: int,
        *,
        n_startup_trials: int = 10,
        multivariate: bool = True,
        constant_liar: bool = True,
        ask_ahead: bool = True,
    ) -> None:
        optuna_ = _import_optuna()
        self._space = space
        self._seed = int(seed)
        self._n_startup_trials = int(n_startup_trials)
        self._multivariate = bool(multivariate)
        self._constant_liar = bool(constant_liar)
        self._ask_ahead = bool(ask_ahead)
        self._n_asks = 0
        self._distributions = {name: _distribution(space[name]) for name in space.names}
        self._study: optuna.Study = optuna_.create_study(direction="minimize", sampler=self._sampler())
        self._pending: deque[list[int]] = deque()  # trial numbers of each batch asked, oldest first

    @property
    def asks_ahead(self) -> bool:
        """Whether one more batch may be asked before the previous one is told."""
        return self._ask_ahead

    def pending_batches(self) -> list[list[Candidate]]:
        """The batches asked and not yet told, oldest first."""
        trials = self._study.get_trials(deepcopy=False)
        return [[self._to_candidate(trials[number].params) for number in batch] for batch in self._pending]

    def _sampler(self) -> optuna.samplers.TPESampler:
        from optuna.samplers import TPESampler

        return TPESampler(
            seed=(self._seed + _SEED_STRIDE * self._n_asks) % 2**32,
            n_startup_trials=self._n_startup_trials,
            multivariate=self._multivariate,
            constant_liar=self._constant_liar,
        )

    def _to_candidate(self, params: dict[str, Any]) -> Candidate:
        values: list[tuple[str, Any]] = []
        for name in self._space.names:
            dim, value = self._space[name], params[name]
            if isinstance(dim, Choice):
                value = dim.options[value]
            elif isinstance(dim, Int):
                value = int(value)
            else:
                value = float(value)
            values.append((name, value))
        return Candidate(values)

    def _to_params(self, candidate: dict[str, Any]) -> dict[str, Any]:
        params: dict[str, Any] = {}
        for name in self._space.names:
            dim, value = self._space[name], candidate[name]
            params[name] = _option_index(dim, value) if isinstance(dim, Choice) else value
        return params

    def ask(self, n: int) -> list[Candidate]:
        """Ask optuna for ``n`` trials (running trials repel each other with ``constant_liar``)."""
        if n < 1:
            raise ValueError(f"ask(n) needs n >= 1, got {n}")
        if len(self._pending) >= (2 if self._ask_ahead else 1):
            raise RuntimeError(f"TPE.ask() called with {len(self._pending)} batches not yet told")
        self._study.sampler = self._sampler()
        self._n_asks += 1
        trials = [self._study.ask(self._distributions) for _ in range(n)]
        self._pending.append([t.number for t in trials])
        return [self._to_candidate(t.params) for t in trials]

    def tell(self, candidates: Sequence[Candidate], losses: Sequence[float | None]) -> None:
        """Complete the oldest pending batch with its losses; ``None`` marks a failed trial."""
        from optuna.trial import TrialState

        if not self._pending:
            raise RuntimeError("TPE.tell() called without a pending ask()")
        batch = self._pending[0]
        if len(candidates) != len(batch) or len(losses) != len(batch):
            raise ValueError(
                f"tell expects {len(batch)} candidates and losses, got {len(candidates)} and {len(losses)}"
            )
        for number, loss in zip(batch, losses, strict=True):
            if loss is None or not math.isfinite(loss):
                self._study.tell(number, state=TrialState.FAIL)
            else:
                self._study.tell(number, float(loss))
        self._pending.popleft()

    def state(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot: the parameters, the ask count and every trial."""
        from optuna.trial import TrialState

        trials: list[dict[str, Any]] = []
        pending: list[dict[str, Any]] = []
        for t in self._study.get_trials(deepcopy=False):
            params = dict(self._to_candidate(t.params))
            if t.state == TrialState.RUNNING:
                pending.append(params)
            else:
                value = t.value if t.state == TrialState.COMPLETE else None
                trials.append({"params": params, "value": value})
        return {
            "seed": self._seed,
            "n_startup_trials": self._n_startup_trials,
            "multivariate": self._multivariate,
            "constant_liar": self._constant_liar,
            "ask_ahead": self._ask_ahead,
            "n_asks": self._n_asks,
            "trials": trials,
            "pending": pending if self._pending else None,
            "pending_sizes": [len(batch) for batch in self._pending],
        }

    @classmethod
    def from_state(cls, space: Space, state: dict[str, Any]) -> TPE:
        """Rebuild the study from the saved trials; the next ``ask`` matches the saved strategy's."""
        from optuna.trial import TrialState, create_trial

        strategy = cls(
            space,
            int(state["seed"]),
            n_startup_trials=int(state["n_startup_trials"]),
            multivariate=bool(state["multivariate"]),
            constant_liar=bool(state["constant_liar"]),
            ask_ahead=bool(state.get("ask_ahead", True)),
        )
        strategy._n_asks = int(state["n_asks"])
        dists = strategy._distributions
        study = strategy._study
        for record in state["trials"]:
            params = strategy._to_params(record["params"])
            value = record["value"]
            if value is None:
                trial = create_trial(state=TrialState.FAIL, params=params, distributions=dists)
            else:
                trial = create_trial(value=float(value), params=params, distributions=dists)
            study.add_trial(trial)
        pending = state.get("pending")
        if pending is not None:
            first = len(state["trials"])
            for params in pending:
                trial = create_trial(
                    state=TrialState.RUNNING, params=strategy._to_params(params), distributions=dists
                )
                study.add_trial(trial)
            for size in state.get("pending_sizes") or [len(pending)]:
                strategy._pending.append(list(range(first, first + size)))
                first += size
        return strategy
